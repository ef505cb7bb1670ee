"""`--unit all`: one pass keeps every unit's bounded top-k in an index folder, resumable after Ctrl-C.

The folder holds index.json (what was run: model, site, k, window, BOS, batch size, threshold, the
corpus's fingerprint, batches done), state.npz (per layer and unit: the top-k `values`, `document` and
`position` (L, U, k); `above`, tokens above the threshold, and `total`, the sum of the values (L, U);
`done`, the batches folded in), tokens.npy and offsets.npy (the tokenised corpus, so a unit renders
from the folder with no corpus and no forward). state.npz is replaced whole (written beside, then
renamed) after a batch at most every SAVE_SECONDS, at the end and on Ctrl-C, so it always holds whole
batches; a run with the same settings picks up from `done`. Batches are fixed by the corpus and
settings, and each one's top-k fold is exact, so a resumed index equals an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from patching.analyses.top import corpus as corpora
from patching.analyses.top.scan import Observe, TopK, make_batch, reduce, width
from patching.core.errors import PatchingError
from patching.core.serial import json_text

FORMAT = "patch-run top index 1"
SAVE_SECONDS = 60.0
SETTINGS = ("model", "site", "k", "window", "prepend_bos", "batch_size", "threshold", "fingerprint")


def read_meta(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def _save_state(folder: Path, tops: list[TopK], above, total, done: int):
    tmp = folder / f".state-{os.getpid()}.npz"
    with open(tmp, "wb") as f:
        np.savez(f, values=np.stack([t.values for t in tops]), document=np.stack([t.document for t in tops]),
                 position=np.stack([t.position for t in tops]), above=above, total=total, done=np.int64(done))
    os.replace(tmp, folder / "state.npz")


def load_state(folder: Path) -> dict:
    try:
        with np.load(folder / "state.npz", allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError):
        raise PatchingError(f"the index {folder} is damaged (state.npz cannot be read): build it again into an "
                            f"empty folder.") from None


def load_corpus(folder: Path, meta: dict) -> corpora.Corpus:
    try:
        tokens = np.load(folder / "tokens.npy", allow_pickle=False)
        offsets = np.load(folder / "offsets.npy", allow_pickle=False)
    except (OSError, ValueError):
        raise PatchingError(f"the index {folder} is damaged (tokens.npy or offsets.npy cannot be read): build it "
                            f"again into an empty folder.") from None
    return corpora.Corpus(meta["corpus"], tokens, offsets)


def open_index(folder: Path, meta: dict, corpus: corpora.Corpus, L: int, U: int, k: int):
    """The index's state to go on from: a fresh one in an absent or empty folder, or the saved one of an
    index built with the same settings (refused otherwise)."""
    old = read_meta(folder) if folder.is_dir() else None
    if old is not None:
        differ = [s for s in SETTINGS if old.get(s) != meta[s]]
        if differ:
            raise PatchingError(f"the index {folder} was built with another {differ[0]} ({old.get(differ[0])!r}, "
                                f"now {meta[differ[0]]!r}): pass another --index folder, or the same settings to "
                                f"resume it.")
        st = load_state(folder)
        tops = [TopK.of(st["values"][l], st["document"][l], st["position"][l]) for l in range(L)]
        return tops, st["above"], st["total"], int(st["done"])
    if folder.is_symlink() or (folder.exists() and (not folder.is_dir() or any(folder.iterdir()))):
        raise PatchingError(f"--index {folder} exists and is not an index of patch-run top: pass an empty or new "
                            f"folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "tokens.npy", corpus.tokens.astype(np.int32))
        np.save(folder / "offsets.npy", corpus.offsets.astype(np.int64))
        tops = [TopK(U, k) for _ in range(L)]
        above, total = np.zeros((L, U), np.int64), np.zeros((L, U), np.float64)
        _save_state(folder, tops, above, total, 0)
        (folder / "index.json").write_text(json_text(meta), encoding="utf-8")  # last: it makes the folder an index
    except OSError as exc:
        raise PatchingError(f"cannot write the index {folder} ({exc.strerror or exc.__class__.__name__}): pass a "
                            f"writable --index folder.") from None
    return tops, above, total, 0


@torch.no_grad()
def build(ctx, corpus: corpora.Corpus, site: str, options, folder: Path, progress=None) -> dict:
    """Fold every batch of the corpus into the index at `folder` (from where a saved one stopped); its meta."""
    model, cfg = ctx.model, ctx.config
    L, U, k = cfg.n_layer, width(site, cfg), options.k
    size = options.window or cfg.block_size
    bos = options.prepend_bos
    wins = corpora.windows(corpus, size, bos)
    groups = corpora.batches(wins, options.batch_size)
    meta = {"format": FORMAT, "model": ctx.name, "site": site, "k": k, "window": size, "prepend_bos": bos,
            "batch_size": options.batch_size, "threshold": options.threshold, "fingerprint": corpus.fingerprint(),
            "corpus": corpus.source, "n_documents": corpus.n_documents, "n_tokens": corpus.n_tokens,
            "n_layers": L, "units_per_layer": U, "n_batches": len(groups)}
    tops, above, total, done = open_index(folder, meta, corpus, L, U, k)
    first = 1 if bos else 0
    pending: dict = {}
    cur: dict = {}

    def see(layer, x):
        b = cur["batch"]
        a = reduce(site, x, first)
        a = a.reshape(-1, a.shape[-1]) if cur["all"] else a[cur["valid"]]  # (n, U): document tokens only
        if not bool(torch.isfinite(a).all()):
            raise PatchingError(f"the model produced non-finite values at {site} of layer {layer}: its weights "
                                f"may be damaged.")
        pending[layer] = (tops[layer].fold(a, b.document[b.valid], b.position[b.valid]),
                          torch.count_nonzero(a > options.threshold, dim=0).cpu().numpy(),
                          a.sum(0).double().cpu().numpy())  # float32 within a batch, float64 across

    observe = Observe(site, range(L), see)
    saved_at = time.monotonic()
    try:
        for bi in range(done, len(groups)):
            b = make_batch(corpus, wins, groups[bi], bos, cfg.vocab_size - 1, ctx.device)
            cur.update(batch=b, valid=torch.from_numpy(b.valid).to(ctx.device), all=bool(b.valid.all()))
            pending.clear()
            model(b.ids, patch=observe, last_only=True)
            for l in range(L):  # the batch counts only once every layer saw it
                tops[l], up, add = pending[l]
                above[l] += up
                total[l] += add
            done = bi + 1
            if time.monotonic() - saved_at > SAVE_SECONDS:
                _save_state(folder, tops, above, total, done)
                saved_at = time.monotonic()
            if progress:
                progress(done, len(groups))
    except KeyboardInterrupt as exc:
        _save_state(folder, tops, above, total, done)
        exc.kept = (f"the index {folder} holds {done} of {len(groups)} batches; run the same command again to "
                    f"resume it")
        raise
    _save_state(folder, tops, above, total, done)
    meta["complete"] = True
    (folder / "index.json").write_text(json_text(meta), encoding="utf-8")
    return meta


def read(folder: Path) -> tuple[dict, dict, corpora.Corpus]:
    """A complete index: its meta, state and corpus."""
    meta = read_meta(folder)
    if meta is None:
        raise PatchingError(f"--index {folder} is not an index of patch-run top: build one with --unit all "
                            f"--corpus SOURCE --index {folder}.")
    st = load_state(folder)
    if int(st["done"]) < meta["n_batches"]:
        raise PatchingError(f"the index {folder} is unfinished ({int(st['done'])} of {meta['n_batches']} batches): "
                            f"run its --unit all command again to finish it.")
    return meta, st, load_corpus(folder, meta)
