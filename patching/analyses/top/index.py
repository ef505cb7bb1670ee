"""`--unit all`: one pass keeps every unit's bounded top-k, density, mean and exact histogram, and its
values at a uniform sample of tokens, in an index folder, resumable after Ctrl-C.

The folder holds index.json (what was run: model, site, k, window, BOS, batch size, threshold,
histograms or not, the corpus's fingerprint, batches done), state.npz (per layer and unit: the top-k
`values`, `document` and `position` (L, U, k); `above`, tokens above the threshold, `total`, the sum
of the values, `low` and `high`, the smallest and largest value (L, U); the histogram `hist` (L, U,
HIST_BINS; no bins with --no-histograms) on bins 2**`exponent` wide from `start` (L, U) (fold.py);
`sample` (L, S, U), every unit's value at the S sampled tokens `sample_document`, `sample_position`
(S,); `done`, the batches folded in), tokens.npy and offsets.npy (the tokenised corpus, so a unit
renders from the folder with no corpus and no forward). state.npz is replaced whole (written beside,
then renamed) after a batch at most every SAVE_SECONDS, at the end and on Ctrl-C, so it always holds
whole batches; a run with the same settings picks up from `done`. Batches are fixed by the corpus and
settings, each one's fold is exact and the sampled tokens are a function of the corpus, so a resumed
index equals an uninterrupted one.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from patching.analyses.top import corpus as corpora
from patching.analyses.top import fold as folds
from patching.analyses.top.scan import Observe, TopK, make_batch, reduce, width
from patching.core.errors import PatchingError
from patching.core.serial import json_text
from patching.io.files import replace_file

FORMAT = "patch-run top index 2"
FAMILY = "patch-run top index "  # every format of this index starts so
SAVE_SECONDS = 60.0
SETTINGS = ("model", "site", "k", "window", "prepend_bos", "batch_size", "threshold", "histograms", "fingerprint")
PER_LAYER = ("above", "total", "low", "high", "exponent", "start", "hist")


def _format(folder: Path) -> str | None:
    try:
        meta = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta.get("format") if isinstance(meta, dict) and isinstance(meta.get("format"), str) else None


def read_meta(folder: Path) -> dict | None:
    """The index's meta, None where the folder is no index; an index of another format is refused."""
    fmt = _format(folder)
    if fmt is None or not fmt.startswith(FAMILY):
        return None
    if fmt != FORMAT:
        raise PatchingError(f"the index {folder} was built by another version of patch-run top ({fmt!r}, this one "
                            f"reads {FORMAT!r}): build it again into a new --index folder.")
    return json.loads((folder / "index.json").read_text(encoding="utf-8"))


class Builder:
    """Every layer's bookkeeping (fold.Layer) and the token sample, fed one batch at a time: `step` runs
    the batch through the model once with an Observe edit and folds every layer's values in. `state`
    (the layers and the batches done) changes in one assignment after the whole batch, so an interrupt
    never leaves half a batch in it; `profile`, when a dict, adds up the CPU seconds of each part."""

    def __init__(self, ctx, corpus: corpora.Corpus, site: str, k: int, threshold: float, bos: bool,
                 histograms: bool = True, saved: dict | None = None, profile: dict | None = None):
        cfg = ctx.config
        self.ctx, self.corpus, self.site, self.threshold = ctx, corpus, site, threshold
        self.L, self.U, self.k = cfg.n_layer, width(site, cfg), k
        self.first = 1 if bos else 0
        self.sample_index = folds.sample_tokens(corpus.offsets)
        self.profile = profile
        self.scratch = folds.Scratch()
        if saved is None:
            layers = tuple(folds.Layer.fresh(self.U, k, histograms) for _ in range(self.L))
            self.sample = np.full((self.L, len(self.sample_index), self.U), np.nan, np.float32)
            self.state = (layers, 0)
        else:
            layers = tuple(folds.Layer(TopK.of(saved["values"][l], saved["document"][l], saved["position"][l]),
                                       *(saved[name][l] for name in PER_LAYER)) for l in range(self.L))
            self.sample = saved["sample"]
            self.state = (layers, int(saved["done"]))
        self.observe = Observe(site, range(self.L), self._see)
        self._cur: dict = {}
        self._pending: dict = {}

    def _see(self, layer: int, x: torch.Tensor):
        cur = self._cur
        t0 = time.process_time()
        a = reduce(self.site, x, self.first)
        a = a.reshape(-1, a.shape[-1]) if cur["all"] else a[cur["valid"]]  # (n, U): document tokens only
        if self.profile is not None:
            self.profile["reduce"] = self.profile.get("reduce", 0.0) + time.process_time() - t0
        try:
            self._pending[layer] = folds.fold(self.state[0][layer], a, cur["document"], cur["position"],
                                              self.threshold, self.scratch, self.profile)
        except folds.NonFinite:
            raise PatchingError(f"the model produced non-finite values at {self.site} of layer {layer}: its weights "
                                f"may be damaged.") from None
        if len(cur["rows"]):  # idempotent: a batch run again writes the same values
            self.sample[layer, cur["slots"]] = a[cur["rows"]].float().cpu().numpy()

    def step(self, batch) -> None:
        """Fold one batch (scan.Batch) into every layer."""
        where = batch.where(self.corpus.offsets)  # each valid token's corpus index, in a's row order
        slot = np.minimum(np.searchsorted(self.sample_index, where), len(self.sample_index) - 1)
        hit = self.sample_index[slot] == where
        self._cur = dict(valid=torch.from_numpy(batch.valid).to(self.ctx.device), all=bool(batch.valid.all()),
                         document=batch.document[batch.valid], position=batch.position[batch.valid],
                         rows=torch.from_numpy(np.nonzero(hit)[0]).to(self.ctx.device), slots=slot[hit])
        self._pending.clear()
        self.ctx.model(batch.ids, patch=self.observe, last_only=True)
        layers, done = self.state
        self.state = (tuple(self._pending[l] for l in range(self.L)), done + 1)  # the batch counts only whole

    def arrays(self) -> dict:
        layers, done = self.state
        out = {"values": np.stack([x.top.values for x in layers]),
               "document": np.stack([x.top.document for x in layers]),
               "position": np.stack([x.top.position for x in layers])}
        out.update({name: np.stack([getattr(x, name) for x in layers]) for name in PER_LAYER})
        doc = np.searchsorted(self.corpus.offsets, self.sample_index, side="right") - 1
        out.update(sample=self.sample, sample_document=doc,
                   sample_position=self.sample_index - self.corpus.offsets[doc], done=np.int64(done))
        return out


def _save_state(folder: Path, builder: Builder):
    arrays = builder.arrays()

    def write(tmp: Path):
        with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to a bare name
            np.savez(f, **arrays)
    replace_file(folder / "state.npz", write)


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


def open_index(ctx, folder: Path, meta: dict, corpus: corpora.Corpus) -> Builder:
    """A builder to go on from: a fresh one in an absent or empty folder, or the saved state of an index
    built with the same settings (refused otherwise)."""
    old = read_meta(folder) if folder.is_dir() else None
    args = (ctx, corpus, meta["site"], meta["k"], meta["threshold"], meta["prepend_bos"], meta["histograms"])
    if old is not None:
        differ = [s for s in SETTINGS if old.get(s) != meta[s]]
        if differ:
            raise PatchingError(f"the index {folder} was built with another {differ[0]} ({old.get(differ[0])!r}, "
                                f"now {meta[differ[0]]!r}): pass another --index folder, or the same settings to "
                                f"resume it.")
        return Builder(*args, saved=load_state(folder))
    if folder.is_symlink() or (folder.exists() and (not folder.is_dir() or any(folder.iterdir()))):
        raise PatchingError(f"--index {folder} exists and is not an index of patch-run top: pass an empty or new "
                            f"folder.")
    builder = Builder(*args)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "tokens.npy", corpus.tokens.astype(np.int32))
        np.save(folder / "offsets.npy", corpus.offsets.astype(np.int64))
        _save_state(folder, builder)
        (folder / "index.json").write_text(json_text(meta), encoding="utf-8")  # last: it makes the folder an index
    except OSError as exc:
        raise PatchingError(f"cannot write the index {folder} ({exc.strerror or exc.__class__.__name__}): pass a "
                            f"writable --index folder.") from None
    return builder


@torch.no_grad()
def build(ctx, corpus: corpora.Corpus, site: str, options, folder: Path, progress=None) -> dict:
    """Fold every batch of the corpus into the index at `folder` (from where a saved one stopped); its meta."""
    cfg = ctx.config
    L, U, k = cfg.n_layer, width(site, cfg), options.k
    size = options.window or cfg.block_size
    bos = options.prepend_bos
    wins = corpora.windows(corpus, size, bos)
    groups = corpora.batches(wins, options.batch_size)
    meta = {"format": FORMAT, "model": ctx.name, "site": site, "k": k, "window": size, "prepend_bos": bos,
            "batch_size": options.batch_size, "threshold": options.threshold, "histograms": options.histograms,
            "fingerprint": corpus.fingerprint(),
            "corpus": corpus.source, "n_documents": corpus.n_documents, "n_tokens": corpus.n_tokens,
            "n_layers": L, "units_per_layer": U, "n_batches": len(groups), "hist_bins": folds.HIST_BINS,
            "sample_tokens": int(min(folds.SAMPLE_TOKENS, corpus.n_tokens))}
    builder = open_index(ctx, folder, meta, corpus)
    saved_at = time.monotonic()
    try:
        for bi in range(builder.state[1], len(groups)):
            builder.step(make_batch(corpus, wins, groups[bi], bos, cfg.vocab_size - 1, ctx.device))
            if time.monotonic() - saved_at > SAVE_SECONDS:
                _save_state(folder, builder)
                saved_at = time.monotonic()
            if progress:
                progress(builder.state[1], len(groups))
    except KeyboardInterrupt as exc:
        _save_state(folder, builder)
        exc.kept = (f"the index {folder} holds {builder.state[1]} of {len(groups)} batches; run the same command "
                    f"again to resume it")
        raise
    _save_state(folder, builder)
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
