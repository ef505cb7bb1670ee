"""Zero and mean ablation: knock out one component at a time and see what the answer loses.

Method (the ablation experiments of Olsson et al. 2022 and Wang et al., "Interpretability in the
Wild", 2022): for every head (its mixed value z at every position), every layer's attention output
and every MLP output, rerun the prompt with that activation replaced, and report the change of
logit(foil) - logit(target) at the last position: ablated value minus the unablated `base_value`.

- `zero`: the activation becomes 0 at every position. Zeroing z removes the head's write but keeps
  c_proj's bias; zeroing attn_out removes the whole attention output, bias included.
- `mean`: the activation becomes its mean over every position of the reference prompts (one per
  line of `--reference`; by default the prompt itself), the same vector at every position. This
  keeps the activation's typical offset, so only its prompt-specific information is removed.

Runs on the patching engine (`engines.sweep` with a source of zeros or means and all positions at
once); the `loop` engine, one plain forward per ablation, is the oracle in tests. In a study the
reference means are computed once per prompt length and shared by every pair.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch

from mingpt.sites import Recording
from patching.analyses.base import PROMPT, Analysis, Events, Grid, Shape
from patching.analyses.dla import component_files, components
from patching.core import engines
from patching.core.context import Context
from patching.core.engines import ENGINES
from patching.core.errors import PatchingError
from patching.core.figures import layer_bars_figure, layer_head_figure
from patching.core.metrics import readout
from patching.core.options import Options, option
from patching.core.prompts import Prompt, Prompts, answer_ids, encode
from patching.core.serial import json_floats

KINDS = ("zero", "mean")
SITES = {"heads": "z", "attn": "attn_out", "mlp": "mlp_out"}  # result key -> activation site
LD = "logit(foil) - logit(target)"


@dataclass(frozen=True)
class AblateOptions(Options):
    ablation: str = option("zero", help="replace by zeros or by the reference mean [zero]", choices=KINDS, flag="--kind")
    # a list of prompts, or the name of a text file with one prompt per line (read when the options are made)
    reference: Prompts | None = option(None, help="mean ablation: one prompt per line [the prompt itself]",
                                       metavar="FILE")
    engine: str = option("fast", help="fast (batched, exact) or loop [fast]", choices=ENGINES)

    def validate(self):
        if self.reference is None:
            return
        if self.ablation != "mean":  # before reading any file: the flag is wrong whatever it holds
            raise PatchingError("--reference gives the prompts of mean ablation: add --kind mean "
                                "(ablation: mean) or drop it.")
        object.__setattr__(self, "reference", Prompts.of(self.reference, "reference"))


@dataclass
class AblateResult:
    model: str
    kind: str
    tokens: list[str]
    ids: list[int]
    target: tuple[str, int]
    foil: tuple[str, int]
    n_reference: int  # reference prompts averaged (mean), 0 for zero
    base_value: float
    heads: np.ndarray  # (L, H): ablated - base
    attn: np.ndarray  # (L,)
    mlp: np.ndarray  # (L,)

    def components(self) -> list[tuple[str, float]]:
        """Every ablation by name, largest change first."""
        L, H = self.heads.shape
        named = [(f"L{l}H{h}", float(self.heads[l, h])) for l in range(L) for h in range(H)]
        named += [(f"attn {l}", float(v)) for l, v in enumerate(self.attn)]
        named += [(f"mlp {l}", float(v)) for l, v in enumerate(self.mlp)]
        return sorted(named, key=lambda kv: -abs(kv[1]))

    def to_json(self) -> dict:
        return {"analysis": "ablate", "model": self.model, "kind": self.kind, "tokens": self.tokens, "ids": self.ids,
                "target": {"text": self.target[0], "id": self.target[1]},
                "foil": {"text": self.foil[0], "id": self.foil[1]},
                "metric_definition": "logit(foil) - logit(target) at the last position",
                "n_reference_prompts": self.n_reference, "base_value": json_floats(self.base_value),
                "heads": json_floats(self.heads), "attn": json_floats(self.attn), "mlp": json_floats(self.mlp)}


@torch.no_grad()
def mean_source(ctx: Context, prompts, T: int) -> dict[str, torch.Tensor]:
    """site -> the mean activation over every position of every prompt, repeated at T positions."""
    model, tok = ctx.model, ctx.tok
    sums = {site: 0.0 for site in SITES.values()}
    count = 0
    for p in prompts:
        rec = Recording(sites=tuple(SITES.values()))
        model(torch.tensor([encode(tok, p, model.config.block_size, "reference prompt")], device=ctx.device),
              record=rec, last_only=True)
        sums["z"] = sums["z"] + rec["z"][:, 0].double().sum(2)  # (L, H, hs): summed over positions
        for site in ("attn_out", "mlp_out"):
            sums[site] = sums[site] + rec[site][:, 0].double().sum(1)  # (L, C)
        count += rec["z"].shape[3]
    dtype = model.transformer.wte.weight.dtype
    return {"z": (sums["z"] / count)[:, :, None].expand(-1, -1, T, -1).to(dtype),
            **{s: (sums[s] / count)[:, None].expand(-1, T, -1).to(dtype) for s in ("attn_out", "mlp_out")}}


@torch.no_grad()
def ablate(ctx: Context, prompt: Prompt, options: AblateOptions, means: dict | None = None) -> AblateResult:
    """`means`: mean_source's result for these reference prompts and this length, if the caller has it."""
    model, tok = ctx.model, ctx.tok
    ids = encode(tok, prompt.text, model.config.block_size)
    target, foil = answer_ids(tok, prompt.target, prompt.foil)
    T = len(ids)
    idx = torch.tensor([ids], device=ctx.device)
    base = engines.record(model, idx, sites=tuple(SITES.values()))
    if options.ablation == "mean":
        source = means if means is not None else mean_source(ctx, options.reference or [prompt.text], T)
    else:
        source = {site: torch.zeros_like(base[site][:, 0]) for site in SITES.values()}
    r0 = readout(base.last_logits[0], target[1], foil[1], False).cpu()
    base_value = float(r0[1] - r0[0])
    out = {}
    for key, site in SITES.items():
        r = engines.sweep(model, idx, base, source[site], site, target[1], foil[1], False,
                          all_positions=True, engine=options.engine)
        out[key] = (r[..., 1] - r[..., 0]).double().cpu().numpy() - base_value  # (L, H) or (L,)
    n_ref = (len(options.reference) if options.reference else 1) if options.ablation == "mean" else 0
    return AblateResult(ctx.name, options.ablation, [tok.token_str(i) for i in ids], ids, target, foil,
                        n_ref, base_value, out["heads"], out["attn"], out["mlp"])


# ----------------------------------------------------------------------------- figures and files


def heads_figure(r: AblateResult):
    return layer_head_figure(r.heads, f"{r.kind}-ablating one head: change of logit({r.foil[0].strip()}) − "
                                      f"logit({r.target[0].strip()})\n(unablated {r.base_value:.3g})")


def layers_figure(r: AblateResult):
    return layer_bars_figure({"attention output": r.attn, "MLP output": r.mlp}, "ablated − unablated",
                             f"{r.kind}-ablating one layer's attention or MLP (unablated {r.base_value:.3g})")


class Ablate(Analysis):
    name = "ablate"
    help = "zero or mean ablation of every head, attention output and MLP, one at a time"
    Options = AblateOptions
    takes = PROMPT
    answer = True
    figures = ("heads.png", "layers.png")

    def __init__(self):
        # (reference, prompt length) -> (the model, its means): a study ablates many prompts against one
        # reference, so its means are computed once per length (for the model they came from)
        self._means: dict = {}

    def run(self, ctx: Context, prompt: Prompt, options: AblateOptions, events: Events | None = None) -> AblateResult:
        options.verify()
        self.check_input(prompt)
        means = None
        if options.ablation == "mean" and options.reference:
            key = (tuple(options.reference), len(encode(ctx.tok, prompt.text, ctx.config.block_size)))
            model, cached = self._means.get(key, (None, None))
            if model is None or model() is not ctx.model:
                cached = mean_source(ctx, options.reference, key[1])
                kept = [(k, v) for k, v in self._means.items() if k != key][:7]  # the stale entry goes
                self._means = {key: (weakref.ref(ctx.model), cached), **dict(kept)}
            means = cached
        return ablate(ctx, prompt, options, means)

    def files(self, result: AblateResult, figures: bool = True) -> dict:
        return component_files(result, "ablated_minus_base", heads_figure, layers_figure, figures)

    def lines(self, r: AblateResult) -> list[str]:
        return ([f"unablated logit({r.foil[0].strip()}) - logit({r.target[0].strip()}) = {r.base_value:.4f}; "
                 f"{r.kind} ablation, largest changes:"] + [f"  {name:>10}: {v:+.4f}" for name, v in r.components()[:10]])

    # ------------------------------------------------------------------ studies: L x (H + 2), on each clean prompt

    def shape(self, options: AblateOptions, config) -> Shape:
        return Shape(axes=["layer", "component"], metrics=["ablated-minus-base"], metric="ablated-minus-base",
                     scalars=["clean_value"], labels=components(config.n_layer, config.n_head, ("attn", "mlp")),
                     definition=f"change of {LD} at the last position when the component is ablated")

    def grid(self, r: AblateResult) -> Grid:
        grid = np.concatenate([r.heads, r.attn[:, None], r.mlp[:, None]], axis=1)
        return Grid({"ablated-minus-base": grid}, r.tokens, {"clean_value": r.base_value})

    def title(self, options: AblateOptions) -> str:
        return f"ablate (ablation {options.ablation})"
