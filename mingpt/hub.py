"""Where model files come from: a local folder, a demo model shipped in the package, or the Hub.

A name resolves in this order: an existing folder on disk; a demo model (`demo-names`, ...)
shipped inside the package; a Hugging Face Hub id (`gpt2`, `openai-community/gpt2-xl`, ...)
downloaded once with `huggingface_hub` into its cache, which honours HF_HUB_OFFLINE, HF_HOME and
HF_ENDPOINT. Every failure becomes one of mingpt.errors' one-sentence errors.
"""
from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from mingpt.errors import ModelNotFoundError, OfflineError

# Short names the Hub redirects; we ask for the canonical repository so the cache has one copy.
HUB_ALIASES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}

# Small GPT-2s trained by scripts/train_demo.py and shipped as package data (no download).
DEMO_ROOT = Path(__file__).resolve().parent / "demo"
DEMO_NAMES = ("demo-names", "demo-induction", "demo-ioi")


@dataclass(frozen=True)
class Source:
    """A resolved model location: exactly one of `folder` or `repo_id` is set."""

    name: str
    folder: Path | None = None
    repo_id: str | None = None

    def fetch(self, *candidates: str) -> Path:
        """Return the local path of the first candidate file that exists (downloading if needed)."""
        if self.folder is not None:
            for name in candidates:
                if (self.folder / name).is_file():
                    return self.folder / name
            raise ModelNotFoundError(
                f"folder {self.folder} has no {' or '.join(candidates)}: pass a folder in Hugging Face "
                f"layout (config.json, model.safetensors or pytorch_model.bin, vocab.json, merges.txt)."
            )
        return _hub_fetch(self.repo_id, self.name, candidates)


def locate(name_or_dir: str | os.PathLike) -> Source:
    """Turn what the user typed (a folder, a demo name or a Hub id) into a Source."""
    text = str(name_or_dir)
    if not text.strip():
        raise ModelNotFoundError("the model name is empty: pass gpt2, gpt2-medium, gpt2-large, gpt2-xl, "
                                 "a demo model (demo-names, demo-induction, demo-ioi) or a local folder.")
    path = Path(text).expanduser()
    if path.is_dir():
        return Source(text, folder=path)
    if text in DEMO_NAMES:
        folder = DEMO_ROOT / text.removeprefix("demo-")
        if not folder.is_dir():
            raise ModelNotFoundError(f"demo model {text!r} is not installed in {DEMO_ROOT}: reinstall patch-run.")
        return Source(text, folder=folder)
    if text in HUB_ALIASES:
        return Source(text, repo_id=HUB_ALIASES[text])
    if path.exists():
        raise ModelNotFoundError(f"{text} is a file, not a folder: pass the folder that holds config.json and the weights.")
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return Source(text, repo_id=text)  # owner/name on the Hub
    known = ", ".join(list(HUB_ALIASES) + list(DEMO_NAMES))
    raise ModelNotFoundError(f"unknown model {text!r} (no such folder either): use one of {known}, a Hub id like "
                             f"openai-community/gpt2, or a local folder in Hugging Face layout.")


def _hub_fetch(repo_id: str, name: str, candidates: tuple[str, ...]) -> Path:
    # Imported here so that using local folders never needs huggingface_hub's import time.
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    from huggingface_hub import constants
    local_only = bool(constants.HF_HUB_OFFLINE) or not _reachable(constants.ENDPOINT)
    offline = False
    for filename in candidates:
        try:
            return Path(hf_hub_download(repo_id, filename, local_files_only=local_only))
        except GatedRepoError:
            raise ModelNotFoundError(f"the Hub repository {repo_id} is gated: log in with `hf auth login` "
                                     f"after accepting its terms, or pass a local folder.") from None
        except RepositoryNotFoundError:
            raise ModelNotFoundError(f"the Hub has no model {repo_id!r}: check the name, or pass a local folder.") from None
        except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: test it first
            offline = True  # not cached and the Hub cannot be asked; a later candidate may be cached
        except EntryNotFoundError:
            continue  # the repository lacks this file; try the next candidate
        except Exception as exc:  # HTTP errors, and transfers cut off mid-file (httpx, OSError)
            raise OfflineError(f"downloading {filename} of {name} from the Hub failed ({exc.__class__.__name__}): "
                               f"try again, or pass a local folder.") from None
    if offline:
        raise OfflineError(
            f"{name} ({' or '.join(candidates)}) is not in the Hugging Face cache and the Hub cannot be reached "
            f"(offline or HF_HUB_OFFLINE=1): run once with network access to download it, or pass a local folder."
        )
    raise ModelNotFoundError(f"the Hub repository {repo_id} has no {' or '.join(candidates)}: it is not a GPT-2 "
                             f"checkpoint we can load; pass another model or a local folder.")


@functools.lru_cache(maxsize=None)
def _reachable(endpoint: str) -> bool:
    """One quick connection to the Hub (3 s at most) decides whether to ask it at all: offline,
    huggingface_hub would retry five times over ~25 s, printing a line each time, before failing."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")):
        return True  # through a proxy only a real request can tell
    url = urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
        return True
    except (OSError, ValueError):
        return False
