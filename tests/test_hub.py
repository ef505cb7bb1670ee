"""The Hub path end to end: mingpt.hub + huggingface_hub against a loopback server that plays the Hub.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when it is imported, so every load
runs in a fresh interpreter (`sys.executable -c ...`) with its own environment. The server answers
what `hf_hub_download` (huggingface_hub 2.x) asks: `HEAD /{repo}/resolve/{revision}/{file}` for the
metadata (X-Repo-Commit, ETag, Content-Length), then `GET` of the same url for the bytes. Missing
files are 404 with `X-Error-Code: EntryNotFound`, missing repositories 404 with `RepoNotFound`
(the codes huggingface_hub.utils.hf_raise_for_status maps to its exceptions).
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch

from conftest import assert_close, make_checkpoint
from mingpt.model import GPT

REPO_ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Hello, world! Activation patching is fun."
IDS = [[15496, 11, 995, 0, 13, 1234]]


class FakeHub:
    """A threaded HTTP server on 127.0.0.1 serving {repo_id: {filename: bytes}} like the Hub does."""

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos
        self.commits = {repo: hashlib.sha1(repo.encode()).hexdigest() for repo in repos}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

            def log_message(self, *args):  # keep pytest's output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        self._stopped = False

    def stop(self):
        if not self._stopped:
            self._stopped = True
            self.server.shutdown()
            self.server.server_close()
            self._thread.join(timeout=5)

    def seen(self, method: str | None = None, contains: str = "") -> list[str]:
        with self._lock:
            return [p for m, p in self.requests if (method is None or m == method) and contains in p]

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool):
        path = unquote(urlsplit(handler.path).path)
        with self._lock:
            self.requests.append((handler.command, path))
        parts = path.strip("/").split("/")
        # /{owner}/{name}/resolve/{revision}/{filename...}
        if len(parts) < 5 or parts[2] != "resolve":
            return self._send(handler, 404, {"X-Error-Message": "Not Found"}, b"", body)
        repo_id, filename = "/".join(parts[:2]), "/".join(parts[4:])
        if repo_id not in self.repos:
            return self._send(handler, 404, {"X-Error-Code": "RepoNotFound",
                                             "X-Error-Message": "Repository not found"}, b"", body)
        commit = self.commits[repo_id]
        data = self.repos[repo_id].get(filename)
        if data is None:
            return self._send(handler, 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit,
                                             "X-Error-Message": "Entry not found"}, b"", body)
        etag = hashlib.sha256(data).hexdigest()
        self._send(handler, 200, {"X-Repo-Commit": commit, "ETag": f'"{etag}"',
                                  "Content-Type": "application/octet-stream"}, data, body)

    @staticmethod
    def _send(handler, status, headers, data: bytes, body: bool):
        handler.send_response(status)
        for k, v in headers.items():
            handler.send_header(k, v)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if body and data:
            handler.wfile.write(data)


# The child: run a list of steps, report each one's result (or mingpt error) as JSON on the last line.
CHILD = r"""
import json, sys, torch
torch.set_num_threads(1)  # a process of its own: conftest's one-thread fixture does not reach it
from mingpt.errors import MinGPTError
steps, out_dir = json.loads(sys.argv[1]), sys.argv[2]
results = []
for i, (op, name) in enumerate(steps):
    try:
        if op == "model":
            from mingpt.model import GPT
            model = GPT.from_pretrained(name)
            with torch.no_grad():
                logits, _ = model(torch.tensor(%(ids)r))
            torch.save(logits, f"{out_dir}/logits{i}.pt")
            results.append({"ok": f"{out_dir}/logits{i}.pt", "name": model.name})
        elif op == "bpe":
            from mingpt.bpe import BPETokenizer
            results.append({"ok": BPETokenizer().encode(%(prompt)r)})
        elif op == "fetch":
            from mingpt.hub import locate
            results.append({"ok": str(locate(name).fetch("model.safetensors", "pytorch_model.bin"))})
    except MinGPTError as e:
        results.append({"error": type(e).__module__ + "." + type(e).__name__, "message": str(e)})
print(json.dumps(results))
""" % {"ids": IDS, "prompt": PROMPT}


def _child_env(hf_home: Path, endpoint: str, offline: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_")) and k.lower() not in
           ("http_proxy", "https_proxy", "all_proxy")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1" if offline else "0",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="10",
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_XET="1", NO_PROXY="127.0.0.1,localhost",
               OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    return env


def run_children(*jobs: dict) -> list[list[dict]]:
    """Run children one after the other (side by side is slower on the 2 shared cores)."""
    results = []
    for job in jobs:
        job["out_dir"].mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job["steps"]), str(job["out_dir"])],
                              env=_child_env(job["hf_home"], job["endpoint"], job["offline"]), cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return results


def run_child(steps, *, hf_home: Path, endpoint: str, offline: bool, out_dir: Path) -> list[dict]:
    return run_children(dict(steps=steps, hf_home=hf_home, endpoint=endpoint, offline=offline, out_dir=out_dir))[0]


# ----------------------------------------------------------------------------- fixtures


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def bin_ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("hub_bin"), n_layer=1, n_head=2, n_embd=16, n_positions=32,
                           seed=7, vocab=False, safe=False)


@pytest.fixture(scope="module")
def hub(tiny_ckpt, bin_ckpt):
    server = FakeHub({"openai-community/gpt2": _files(tiny_ckpt), "test-org/bin-only": _files(bin_ckpt)})
    assert "model.safetensors" in server.repos["openai-community/gpt2"]
    assert "model.safetensors" not in server.repos["test-org/bin-only"]
    yield server
    server.stop()


@pytest.fixture(scope="module")
def online(hub, tmp_path_factory):
    """One child with the Hub up and an empty cache; then the server goes down for the offline tests."""
    hf_home = tmp_path_factory.mktemp("hf_home")
    steps = [["model", "gpt2"], ["fetch", "gpt2"], ["bpe", ""], ["model", "test-org/bin-only"],
             ["model", "nobody/nothing"]]
    results = run_child(steps, hf_home=hf_home, endpoint=hub.url, offline=False,
                        out_dir=tmp_path_factory.mktemp("online_out"))
    hub.stop()
    return {"hf_home": hf_home, "results": dict(zip(["model", "fetch", "bpe", "bin", "nobody"], results))}


@pytest.fixture(scope="module")
def after(online, hub, tmp_path_factory):
    """With the server stopped: offline with the cache, online-but-unreachable with the cache, and
    offline with an empty cache. The server must see no request."""
    assert hub._stopped
    n = len(hub.requests)
    cached, unreachable, empty = run_children(
        dict(steps=[["model", "gpt2"], ["bpe", ""], ["model", "test-org/bin-only"], ["model", "nobody/nothing"]],
             hf_home=online["hf_home"], endpoint=hub.url, offline=True, out_dir=tmp_path_factory.mktemp("cached")),
        dict(steps=[["model", "gpt2"]], hf_home=online["hf_home"], endpoint=hub.url, offline=False,
             out_dir=tmp_path_factory.mktemp("unreachable")),
        dict(steps=[["model", "gpt2"], ["bpe", ""]], hf_home=tmp_path_factory.mktemp("empty_home"),
             endpoint=hub.url, offline=True, out_dir=tmp_path_factory.mktemp("empty")),
    )
    assert len(hub.requests) == n
    return {"cached": cached, "unreachable": unreachable, "empty": empty}


def _logits_of(folder: Path) -> torch.Tensor:
    with torch.no_grad():
        return GPT.from_pretrained(str(folder))(torch.tensor(IDS))[0]


def _assert_loaded(result: dict, folder: Path):
    assert "ok" in result, result
    assert_close(torch.load(result["ok"]), _logits_of(folder), what="logits loaded from the Hub")


# ----------------------------------------------------------------------------- tests


def test_first_load_downloads_from_the_hub(online, hub, tiny_ckpt):
    _assert_loaded(online["results"]["model"], tiny_ckpt)
    assert online["results"]["model"]["name"] == "gpt2"
    for name in ("config.json", "model.safetensors"):
        path = f"/openai-community/gpt2/resolve/main/{name}"
        assert hub.seen("HEAD", path) and hub.seen("GET", path) == [path], hub.requests
    # the weights are fetched once (the second fetch is a cache hit after one metadata check)
    assert len(hub.seen("GET", "/openai-community/gpt2/resolve/main/model.safetensors")) == 1
    assert not hub.seen(contains="/openai-community/gpt2/resolve/main/pytorch_model.bin")
    # the file lives in HF_HOME's hub cache, under the commit the server reported
    commit = hub.commits["openai-community/gpt2"]
    cached = Path(online["results"]["fetch"]["ok"])
    assert cached == online["hf_home"] / "hub" / "models--openai-community--gpt2" / "snapshots" / commit / "model.safetensors"
    assert cached.read_bytes() == (tiny_ckpt / "model.safetensors").read_bytes()


def test_tokenizer_loads_through_the_hub(online, hub, tiny_ckpt):
    from mingpt.bpe import BPETokenizer
    got = online["results"]["bpe"]
    assert got == {"ok": BPETokenizer(tiny_ckpt).encode(PROMPT)}, got
    assert got["ok"][:4] == [15496, 11, 995, 0]  # "Hello", ",", " world", "!" in GPT-2's vocabulary
    for name in ("vocab.json", "merges.txt"):
        assert hub.seen("GET", f"/openai-community/gpt2/resolve/main/{name}")


def test_unknown_repo_is_model_not_found(online, hub):
    got = online["results"]["nobody"]
    assert got["error"] == "mingpt.errors.ModelNotFoundError", got
    assert "nobody/nothing" in got["message"] and "no model" in got["message"]
    assert hub.seen("HEAD", "/nobody/nothing/resolve/main/config.json")
    assert not hub.seen("GET", "/nobody/nothing/")


def test_safetensors_less_repo_falls_back_to_bin(online, hub, bin_ckpt):
    _assert_loaded(online["results"]["bin"], bin_ckpt)
    assert hub.seen("HEAD", "/test-org/bin-only/resolve/main/model.safetensors")
    assert not hub.seen("GET", "/test-org/bin-only/resolve/main/model.safetensors")
    assert hub.seen("GET", "/test-org/bin-only/resolve/main/pytorch_model.bin")


def test_offline_loads_from_the_cache(after, online, tiny_ckpt, bin_ckpt):
    model, bpe, binonly, nobody = after["cached"]
    _assert_loaded(model, tiny_ckpt)
    assert bpe == online["results"]["bpe"]
    _assert_loaded(binonly, bin_ckpt)
    assert nobody["error"] == "mingpt.errors.OfflineError", nobody  # never cached: cannot tell offline


def test_unreachable_hub_falls_back_to_the_cache(after, tiny_ckpt):
    """HF_HUB_OFFLINE=0 but the server is down (connection refused): the cached copy is used."""
    (model,) = after["unreachable"]
    _assert_loaded(model, tiny_ckpt)


def test_offline_with_empty_cache_says_what_to_do(after):
    model, bpe = after["empty"]
    for got in (model, bpe):
        assert got["error"] == "mingpt.errors.OfflineError", got
        assert "run once with network access" in got["message"], got
        assert "pass a local folder" in got["message"], got
    assert "gpt2" in model["message"]
