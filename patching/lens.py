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

import argparse
import json
from dataclasses import dataclass

import numpy as np
import torch

from mingpt.model import Recording
from patching import toolkit
from patching.api import json_floats
from patching.report import show

MODES = ("recompute", "frozen")
HELP = "logit lens: every layer's residual stream read through the final LayerNorm and unembedding"


@dataclass
class LensOptions(toolkit.Options):
    prompt: str
    target: str | None = None
    foil: str | None = None
    ln: str = "recompute"

    def __post_init__(self):
        toolkit.check_prompt(self.prompt)
        toolkit.check_choice("--ln", self.ln, MODES)
        toolkit.check_pair(self.target, self.foil, needed=False, command="lens")


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
def lens(model, tok, options: LensOptions) -> LensResult:
    ids = toolkit.encode(tok, model, options.prompt)
    words = toolkit.answer_ids(tok, options.target, options.foil) if options.target else None
    rec = Recording(sites=("resid_pre", "resid_post"))
    model(torch.tensor([ids], device=toolkit.device_of(model)), record=rec, last_only=True)
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
    return LensResult(toolkit.model_name(model), options.ln, [tok.token_str(i) for i in ids], ids,
                      words[0] if words else None, words[1] if words else None, matrix, top_ids,
                      [[tok.token_str(int(i)) for i in row] for row in top_ids], top_probs)


# ----------------------------------------------------------------------------- figure and files


def lens_figure(r: LensResult):
    """The classic logit-lens grid: layers down, positions across, each cell's top-1 token written in."""
    R, T = r.matrix.shape
    fig = toolkit.figure(min(3.5 + 0.9 * T, 60), max(3.0, 1.6 + 0.45 * R))
    ax = fig.add_subplot()
    if r.target:
        im = ax.imshow(r.matrix, cmap="RdBu_r", norm=toolkit.diverging(r.matrix), aspect="auto")
        label = f"logit({r.foil[0].strip()}) − logit({r.target[0].strip()})"
    else:
        im = ax.imshow(r.matrix, cmap="Blues", vmin=0, vmax=1, aspect="auto")
        label = "top-1 probability"
    size = 8 if T <= 20 else 6
    for i in range(R):
        for j in range(T):
            ax.text(j, i, show(r.top_tokens[i][j])[:10], ha="center", va="center", fontsize=size)
    ax.set_xticks(range(T), toolkit.token_labels(r.tokens), rotation=90, fontsize=8)
    ax.set_yticks(range(R), row_labels(R - 1))
    ax.set_xlabel("position (input token); cell text: top-1 next token")
    ax.set_ylabel("residual stream after")
    ax.set_title(f"logit lens ({r.ln} final LayerNorm), {r.model}", fontsize=10)
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    return fig


def files(r: LensResult) -> dict:
    header = ["row"] + [f"{i}:{t}" for i, t in enumerate(r.tokens)]
    labels = row_labels(r.matrix.shape[0] - 1)
    return {
        "results.json": json.dumps(r.to_json(), indent=1) + "\n",
        "results.csv": toolkit.csv_text(header, [[lab] + [repr(float(v)) for v in row]
                                                 for lab, row in zip(labels, r.matrix)]),
        "top_tokens.csv": toolkit.csv_text(header, [[lab] + row for lab, row in zip(labels, r.top_tokens)]),
        "lens.png": toolkit.png(lambda: lens_figure(r)),
    }


def add_arguments(ap: argparse.ArgumentParser):
    toolkit.add_prompt_arguments(ap, "the text to read; with --target and --foil, cells are coloured by "
                                     "logit(foil) - logit(target)", pair_required=False)
    ap.add_argument("--ln", choices=MODES, default="recompute",
                    help="final LayerNorm with each state's own scale, or the final run's [recompute]")


def command(args: argparse.Namespace, say) -> int:
    options = LensOptions(args.prompt, args.target, args.foil, args.ln)
    model, tok = toolkit.load_model(args)
    with toolkit.claim_out(args, "lens", options.prompt) as dest:
        r = lens(model, tok, options)
        folder = dest.write(files(r))
    last = [show(row[-1]) for row in r.top_tokens]
    say("top-1 next token at the last position, by layer: " + ", ".join(
        f"{lab}: {t}" for lab, t in zip(row_labels(len(last) - 1), last)))
    say.result(f"wrote {folder}/results.json, results.csv, top_tokens.csv, lens.png")
    return 0
