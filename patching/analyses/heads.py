"""Head scores on repeated random tokens, and the model's loss on both copies.

Method (Olsson et al., "In-context Learning and Induction Heads", 2022; the repeated-random-tokens
experiment of Elhage et al. 2021): n_seqs sequences of seq_len random token ids R, followed by R
again (optionally after a BOS token). Nothing predicts the first copy; a model with induction heads
predicts the second copy by finding the earlier occurrence of the current token and copying the
token after it. For every head we score how much of its attention falls on the cells that define a
behaviour, with pattern A[dest, src] (rows sum to 1) and tokens x:

    previous_token   cell (d, d-1)                              for d >= 1
    duplicate_token  cells (d, s), s < d, x[s] == x[d]          earlier copies of the current token
    induction        cells (d, s), 1 <= s <= d, x[s-1] == x[d]  the token after an earlier copy
    first_token      cell (d, 0)                                for d >= 1 (d = 0 can only see itself)

score = mean over every (sequence, destination) that has at least one such cell of the attention
mass on those cells. A head that always attends to its defining cells scores 1.0, whatever the
sequence length; averaging over destinations where the cell does not exist (as some detectors do)
would cap a perfect induction head near 0.5. A head that attends uniformly to the d+1 visible
positions scores the mean of (number of cells)/(d+1).

Loss: per-position cross-entropy of the next token, averaged over sequences. As in the demo models'
training evaluation, `loss_first_copy` is the mean over the predictions of copy-1 tokens 2..n and
`loss_second_copy` over copy-2 tokens 2..n (the first token of each copy is unpredictable).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mingpt.errors import quote
from mingpt.sites import Recording
from patching.analyses.base import NOTHING, Analysis, Events
from patching.core.context import Context
from patching.core.errors import PatchingError
from patching.core.figures import figure, png
from patching.core.options import Options, option
from patching.core.prompts import BOS
from patching.core.serial import csv_text, json_floats, json_text, slug

SCORES = ("previous_token", "duplicate_token", "induction", "first_token")
ID_RANGE = (1000, 40000)  # the ids demo-induction was trained on (inclusive)
CHUNK = 8  # sequences per forward: bounds the (chunk, T, vocab) logits and (L, chunk, H, T, T) patterns


def parse_range(text: str) -> tuple[int, int]:
    """--id-range LOW:HIGH."""
    try:
        low, high = (int(v) for v in text.split(":"))
    except ValueError:
        raise PatchingError(f"--id-range {text!r} is not LOW:HIGH with two integers, e.g. 1000:40000.") from None
    return low, high


@dataclass(frozen=True)
class HeadsOptions(Options):
    seq_len: int = option(25, help="length of R [25]", low=2)
    n_seqs: int = option(50, help="number of sequences [50]", low=1)
    seed: int = option(0, help="random seed of the token ids [0]", low=0)
    prepend_bos: bool = option(False, help="start each sequence with <|endoftext|>")
    id_range: tuple[int, int] = option(ID_RANGE, help=f"draw ids uniformly from LOW..HIGH inclusive [{ID_RANGE[0]}:"
                                       f"{ID_RANGE[1]}, what demo-induction was trained on]", metavar="LOW:HIGH",
                                       parse=parse_range, load=lambda v, where: parse_range(v) if isinstance(v, str) else v)

    def validate(self):
        r = self.id_range
        if not isinstance(r, (list, tuple)) or len(r) != 2 or not all(isinstance(v, int) and not isinstance(v, bool)
                                                                    for v in r):
            raise PatchingError(f"id_range must be two integers LOW, HIGH, got {quote(r)}.")
        object.__setattr__(self, "id_range", tuple(r))
        if r[0] < 0 or r[1] < r[0] + 1:
            raise PatchingError(f"id_range must have 0 <= LOW < HIGH, got {r[0]}:{r[1]}.")

    @property
    def id_low(self) -> int:
        return self.id_range[0]

    @property
    def id_high(self) -> int:
        return self.id_range[1]

    @property
    def n_tokens(self) -> int:
        return 2 * self.seq_len + self.prepend_bos


@dataclass
class HeadsResult:
    model: str
    options: HeadsOptions
    scores: dict[str, np.ndarray]  # name -> (L, H)
    loss_per_position: np.ndarray  # (T-1,): mean loss of predicting token t+1 from position t
    loss_first_copy: float
    loss_second_copy: float

    def top_heads(self, n: int = 5) -> dict[str, list[dict]]:
        out = {}
        for name, s in self.scores.items():
            order = np.argsort(s, axis=None)[::-1][:n]
            out[name] = [{"layer": int(i // s.shape[1]), "head": int(i % s.shape[1]), "score": float(s.flat[i])}
                         for i in order]
        return out

    def to_json(self) -> dict:
        o = self.options
        return {"analysis": "heads", "model": self.model, "seed": o.seed, "seq_len": o.seq_len, "n_seqs": o.n_seqs,
                "prepend_bos": o.prepend_bos, "id_range": [o.id_low, o.id_high],
                "scores": {k: json_floats(v) for k, v in self.scores.items()},
                "top_heads": self.top_heads(),
                "loss_per_position": json_floats(self.loss_per_position),
                "loss_first_copy": json_floats(self.loss_first_copy),
                "loss_second_copy": json_floats(self.loss_second_copy)}


def repeated_tokens(options: HeadsOptions) -> torch.Tensor:
    """(n_seqs, n_tokens) ids: [BOS] R R with R uniform over id_low..id_high, from the seed alone."""
    g = torch.Generator().manual_seed(options.seed)
    r = torch.randint(options.id_low, options.id_high + 1, (options.n_seqs, options.seq_len), generator=g)
    ids = torch.cat([r, r], dim=1)
    if options.prepend_bos:
        ids = torch.cat([torch.full((options.n_seqs, 1), BOS), ids], dim=1)
    return ids


def score_cells(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """(B, T) token ids -> name -> (B, T_dest, T_src) bool masks of the cells defining each score."""
    B, T = tokens.shape
    d = torch.arange(T)[:, None]
    s = torch.arange(T)[None, :]
    same = tokens[:, :, None] == tokens[:, None, :]  # (B, d, s): x[d] == x[s]
    after_same = torch.zeros_like(same)
    after_same[:, :, 1:] = same[:, :, :-1]  # x[d] == x[s-1]
    return {
        "previous_token": (s == d - 1).expand(B, T, T),
        "duplicate_token": same & (s < d),
        "induction": after_same & (s <= d),
        "first_token": ((s == 0) & (d >= 1)).expand(B, T, T),
    }


def score_sums(patterns: torch.Tensor, tokens: torch.Tensor) -> dict[str, tuple[torch.Tensor, int]]:
    """patterns (L, B, H, T, T), tokens (B, T) -> name -> (summed mass (L, H), destinations counted)."""
    out = {}
    for name, cells in score_cells(tokens).items():
        cells = cells.to(patterns.device)
        mass = (patterns.double() * cells[None, :, None]).sum(-1)  # (L, B, H, T_dest)
        has = cells.any(-1)  # (B, T_dest): destinations where the cell exists
        out[name] = ((mass * has[None, :, None]).sum((1, 3)).cpu(), int(has.sum()))
    return out


def head_scores(patterns: torch.Tensor, tokens: torch.Tensor) -> dict[str, np.ndarray]:
    """The four scores (L, H) of patterns (L, B, H, T, T) on tokens (B, T); NaN where no cell exists."""
    return {k: (m / n if n else torch.full_like(m, float("nan"))).numpy() for k, (m, n) in score_sums(patterns, tokens).items()}


@torch.no_grad()
def heads(ctx: Context, options: HeadsOptions) -> HeadsResult:
    model = ctx.model
    T, V = options.n_tokens, model.config.vocab_size
    if T > model.config.block_size:
        raise PatchingError(f"--seq-len {options.seq_len} makes {T} tokens (two copies"
                            f"{' and BOS' if options.prepend_bos else ''}) but the model's context holds "
                            f"{model.config.block_size}: use --seq-len {(model.config.block_size - options.prepend_bos) // 2} or less.")
    if options.id_high >= V or (options.prepend_bos and BOS >= V):
        raise PatchingError(f"token ids up to {max(options.id_high, BOS * options.prepend_bos)} do not exist in "
                            f"this model's vocabulary of {V}: choose a smaller id range.")
    ids = repeated_tokens(options)
    dev = ctx.device
    sums = {k: 0.0 for k in SCORES}
    counts = {k: 0 for k in SCORES}
    nll = []
    for chunk in ids.split(CHUNK):
        rec = Recording(sites=("pattern",))
        logits, _ = model(chunk.to(dev), record=rec)
        for k, (m, n) in score_sums(rec["pattern"], chunk).items():
            sums[k] = sums[k] + m
            counts[k] += n
        lp = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), chunk[:, 1:].flatten().to(dev), reduction="none")
        nll.append(lp.view(len(chunk), T - 1).double().cpu())
    scores = {k: (sums[k] / counts[k]).numpy() if counts[k] else np.full(sums[k].shape, np.nan)
              for k in SCORES}
    loss = torch.cat(nll).mean(0).numpy()  # loss[t]: predicting token t+1
    o, n = int(options.prepend_bos), options.seq_len
    first = float(loss[o:o + n - 1].mean())  # copy-1 tokens 2..n sit at o+1..o+n-1
    second = float(loss[o + n:o + 2 * n - 1].mean())  # copy-2 tokens 2..n sit at o+n+1..o+2n-1
    return HeadsResult(ctx.name, options, scores, loss, first, second)


# ----------------------------------------------------------------------------- figures and files


def scores_figure(r: HeadsResult):
    L, H = r.scores["induction"].shape
    fig = figure(1.0 + 4 * max(2.0, 1.0 + 0.4 * H), max(3.2, 2.0 + 0.35 * L), layout="constrained")
    axes = fig.subplots(1, 4, squeeze=False)[0]
    for ax, name in zip(axes, SCORES):
        s = r.scores[name]
        im = ax.imshow(s, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        if L * H <= 64:
            for l in range(L):
                for h in range(H):
                    ax.text(h, l, f"{s[l, h]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if s[l, h] < 0.6 else "black")
        ax.set_title(name.replace("_", "-"), fontsize=10)
        ax.set_xticks(range(H))
        ax.set_yticks(range(L))
        ax.set_xlabel("head")
    axes[0].set_ylabel("layer")
    fig.colorbar(im, ax=list(axes), shrink=0.9)
    fig.suptitle(f"head scores on {r.options.n_seqs} x (R R), |R| = {r.options.seq_len}; {r.model}", fontsize=10)
    return fig


def loss_figure(r: HeadsResult):
    o, n = int(r.options.prepend_bos), r.options.seq_len
    fig = figure(7.0, 3.5)
    ax = fig.add_subplot()
    pos = np.arange(1, len(r.loss_per_position) + 1)  # the position of the predicted token
    ax.plot(pos, r.loss_per_position, marker=".", lw=1)
    ax.axvspan(o - 0.5, o + n - 0.5, color="tab:orange", alpha=0.12, label=f"first copy: {r.loss_first_copy:.2f} nats")
    ax.axvspan(o + n - 0.5, o + 2 * n - 0.5, color="tab:green", alpha=0.12,
               label=f"second copy: {r.loss_second_copy:.2f} nats")
    ax.set_xlabel("position of the predicted token")
    ax.set_ylabel("loss (nats)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"per-token loss on repeated random tokens, {r.model}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def files(r: HeadsResult, figures: bool = True) -> dict:
    L, H = r.scores["induction"].shape
    rows = [[l, h] + [repr(float(r.scores[k][l, h])) for k in SCORES] for l in range(L) for h in range(H)]
    out = {"results.json": json_text(r.to_json()),
           "results.csv": csv_text(["layer", "head", *SCORES], rows),
           "loss.csv": csv_text(["predicted_position", "loss"],
                                [[t + 1, repr(float(v))] for t, v in enumerate(r.loss_per_position)])}
    if figures:
        out.update({"scores.png": png(lambda: scores_figure(r)), "loss.png": png(lambda: loss_figure(r))})
    return out


class Heads(Analysis):
    name = "heads"
    help = "head scores (previous-token, duplicate, induction, first-token) and loss on repeated random tokens"
    Options = HeadsOptions
    takes = NOTHING
    figures = ("scores.png", "loss.png")

    def run(self, ctx: Context, input: None, options: HeadsOptions, events: Events | None = None) -> HeadsResult:
        options.verify()
        return heads(ctx, options)

    def files(self, result: HeadsResult, figures: bool = True) -> dict:
        return files(result, figures)

    def lines(self, r: HeadsResult) -> list[str]:
        out = [f"loss: first copy {r.loss_first_copy:.3f} nats, second copy {r.loss_second_copy:.3f} nats"]
        for name, top in r.top_heads(3).items():
            out.append(f"  {name:>15}: " + ", ".join(f"L{t['layer']}H{t['head']} {t['score']:.3f}" for t in top))
        return out

    def folder_name(self, ctx: Context, input: None, options: HeadsOptions) -> str:
        return f"heads-{slug(ctx.name, 50)}"
