"""The logit lens: read every intermediate residual stream as if it were the last one.

Method (nostalgebraist, "interpreting GPT: the logit lens", 2020): the residual stream after the
embeddings and after each block is put through the model's own final LayerNorm and unembedding,
at every position, giving an (L+1) x T grid of next-token distributions. Row 0 is the embeddings,
row l+1 the output of block l; the last row at the last position is the model's output.

The final LayerNorm is applied in one of two ways:
- `recompute` (default): each state is centred and scaled with its own statistics, i.e. ln_f(x).
- `frozen`: each state is centred with its own mean (centring is linear) but divided by the final
  state's scale at that position, as direct logit attribution does. Early states have a smaller
  norm, so frozen logits are flatter there; recompute shows what the state alone would predict.
In both modes the last row equals the model's logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mingpt.sites import Recording
from patching.analyses.base import PROMPT, Analysis, Events, Grid, Shape
from patching.core.context import Context
from patching.core.figures import diverging, figure, png, show, token_labels
from patching.core.options import Options, option
from patching.core.prompts import Prompt, answer_ids, encode
from patching.core.serial import csv_text, json_floats, json_text

MODES = ("recompute", "frozen")
LD = "logit(foil) - logit(target)"


@dataclass(frozen=True)
class LensOptions(Options):
    ln: str = option("recompute", help="final LayerNorm with each state's own scale, or the final run's [recompute]",
                     choices=MODES)


@dataclass
class LensResult:
    model: str
    ln: str
    tokens: list[str]
    ids: list[int]
    target: tuple[str, int] | None
    foil: tuple[str, int] | None
    matrix: np.ndarray  # (L+1, T): logit(foil) - logit(target) if both given, else top-1 probability
    top_ids: np.ndarray  # (L+1, T) int64
    top_tokens: list[list[str]]  # (L+1, T)
    top_probs: np.ndarray  # (L+1, T)

    @property
    def value(self) -> str:
        return "logit(foil) - logit(target)" if self.target else "top-1 probability"

    def to_json(self) -> dict:
        words = {"target": {"text": self.target[0], "id": self.target[1]},
                 "foil": {"text": self.foil[0], "id": self.foil[1]}} if self.target else {"target": None, "foil": None}
        return {"analysis": "lens", "model": self.model, "ln": self.ln, "tokens": self.tokens, "ids": self.ids,
                **words, "value": self.value, "rows": row_labels(self.matrix.shape[0] - 1),
                "matrix": json_floats(self.matrix), "top_tokens": self.top_tokens,
                "top_ids": self.top_ids.tolist(), "top_probs": json_floats(self.top_probs)}


def row_labels(n_layer: int) -> list[str]:
    return ["embed"] + [f"block {l}" for l in range(n_layer)]


def normalise(states: torch.Tensor, ln: torch.nn.LayerNorm, mode: str) -> torch.Tensor:
    """(..., T, C) states through the final LayerNorm; `frozen` divides by the last state's scale."""
    if mode == "recompute":
        return ln(states)
    final = states[-1]  # the model's own final residual stream, (T, C)
    scale = (final.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()  # (T, 1)
    return (states - states.mean(-1, keepdim=True)) / scale * ln.weight + ln.bias


@torch.no_grad()
def lens(ctx: Context, prompt: Prompt, options: LensOptions) -> LensResult:
    model, tok = ctx.model, ctx.tok
    ids = encode(tok, prompt.text, model.config.block_size)
    words = answer_ids(tok, prompt.target, prompt.foil) if prompt.target else None
    rec = Recording(sites=("resid_pre", "resid_post"))
    model(torch.tensor([ids], device=ctx.device), record=rec, last_only=True)
    states = torch.cat([rec["resid_pre", 0][None], rec["resid_post"]])[:, 0]  # (L+1, T, C)
    normed = normalise(states, model.transformer.ln_f, options.ln)
    w_u = model.transformer.wte.weight  # the tied unembedding, (vocab, C)
    rows, top_ids, top_probs = [], [], []
    for h in normed:  # one row at a time: (T, vocab) logits, never (L+1, T, vocab)
        logits = (h @ w_u.T).float()
        probs = logits.softmax(-1)
        p, i = probs.max(-1)
        top_ids.append(i.cpu())
        top_probs.append(p.cpu())
        if words:
            rows.append((logits[:, words[1][1]] - logits[:, words[0][1]]).cpu())
    top_ids = torch.stack(top_ids).numpy().astype(np.int64)
    top_probs = torch.stack(top_probs).double().numpy()
    matrix = torch.stack(rows).double().numpy() if words else top_probs.copy()
    return LensResult(ctx.name, options.ln, [tok.token_str(i) for i in ids], ids,
                      words[0] if words else None, words[1] if words else None, matrix, top_ids,
                      [[tok.token_str(int(i)) for i in row] for row in top_ids], top_probs)


# ----------------------------------------------------------------------------- figure and files


def lens_figure(r: LensResult):
    """The classic logit-lens grid: layers down, positions across, each cell's top-1 token written in."""
    R, T = r.matrix.shape
    fig = figure(min(3.5 + 0.9 * T, 60), max(3.0, 1.6 + 0.45 * R))
    ax = fig.add_subplot()
    if r.target:
        im = ax.imshow(r.matrix, cmap="RdBu_r", norm=diverging(r.matrix), aspect="auto")
        label = f"logit({r.foil[0].strip()}) − logit({r.target[0].strip()})"
    else:
        im = ax.imshow(r.matrix, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        label = "top-1 probability"
    size = 8 if T <= 20 else 6
    for i in range(R):
        for j in range(T):
            ax.text(j, i, show(r.top_tokens[i][j])[:10], ha="center", va="center", fontsize=size)
    ax.set_xticks(range(T), token_labels(r.tokens), rotation=90, fontsize=8)
    ax.set_yticks(range(R), row_labels(R - 1))
    ax.set_xlabel("position (input token); cell text: top-1 next token")
    ax.set_ylabel("residual stream after")
    ax.set_title(f"logit lens ({r.ln} final LayerNorm), {r.model}", fontsize=10)
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    return fig


def files(r: LensResult, figures: bool = True) -> dict:
    header = ["row"] + [f"{i}:{t}" for i, t in enumerate(r.tokens)]
    labels = row_labels(r.matrix.shape[0] - 1)
    out = {
        "results.json": json_text(r.to_json()),
        "results.csv": csv_text(header, [[lab] + [repr(float(v)) for v in row] for lab, row in zip(labels, r.matrix)]),
        "top_tokens.csv": csv_text(header, [[lab] + row for lab, row in zip(labels, r.top_tokens)]),
    }
    if figures:
        out["lens.png"] = png(lambda: lens_figure(r))
    return out


class Lens(Analysis):
    name = "lens"
    help = "logit lens: every layer's residual stream read through the final LayerNorm and unembedding"
    Options = LensOptions
    takes = PROMPT
    figures = ("lens.png",)

    def run(self, ctx: Context, prompt: Prompt, options: LensOptions, events: Events | None = None) -> LensResult:
        options.verify()
        self.check_input(prompt)
        return lens(ctx, prompt, options)

    def files(self, result: LensResult, figures: bool = True) -> dict:
        return files(result, figures)

    def lines(self, r: LensResult) -> list[str]:
        last = [show(row[-1]) for row in r.top_tokens]
        return ["top-1 next token at the last position, by layer: " + ", ".join(
            f"{lab}: {t}" for lab, t in zip(row_labels(len(last) - 1), last))]

    # ------------------------------------------------------------------ studies: (L+1) x T, on each clean prompt

    def shape(self, options: LensOptions, config) -> Shape:
        return Shape(axes=["layer", "position"], metrics=["logit-diff", "top1-prob"], metric="logit-diff",
                     scalars=["clean_value"], labels={"layer": ["embed", *map(str, range(config.n_layer))]},
                     definition=f"{LD} of the residual stream after the row's block (embed: before block 0) at the "
                                f"column's position, through the final LayerNorm and unembedding",
                     row_label="residual stream after block")

    def grid(self, r: LensResult) -> Grid:
        # the last row at the last position is the model's own logit(foil) - logit(target)
        return Grid({"logit-diff": r.matrix, "top1-prob": r.top_probs}, r.tokens, {"clean_value": float(r.matrix[-1, -1])})

    def title(self, options: LensOptions) -> str:
        return f"lens (ln {options.ln})"
