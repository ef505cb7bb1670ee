"""Direct logit attribution (DLA): how much each component writes logit(foil) - logit(target).

Method (Elhage et al., "A Mathematical Framework for Transformer Circuits", 2021; Nanda's DLA): the
final residual stream at the last position is a sum of what every component wrote into it,
    x = embed + sum_l (sum_h head_lh + attn_bias_l + mlp_l),
where head_lh = W_O[:, slice h] z_lh is head h's mixed value through its slice of c_proj, attn_bias_l is
c_proj's bias, mlp_l the MLP's output and embed = wte[token] + wpe[position]. The final LayerNorm is
ln(x) = w * (x - mean(x)) / s + b. With its scale s frozen at the run's value it is linear, and
centring distributes over the sum, so with d = W_U[foil] - W_U[target] (GPT-2's unembedding has no bias)
    logit(foil) - logit(target) = sum_c (c - mean(c)) . (w * d) / s  +  b . d.
Every term is kept, so the components add up to the model's own value (checked in tests); forgetting
the centring or the bias is why DLA "does not add up" without folded LayerNorm (TransformerLens #523).
Computed in float64 from the model's recorded activations.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mingpt.sites import Recording
from patching.analyses.base import PROMPT, Analysis, Events, Grid, Shape
from patching.core.context import Context
from patching.core.figures import layer_bars_figure, layer_head_figure, png
from patching.core.options import Options
from patching.core.prompts import Prompt, answer_ids, encode
from patching.core.serial import csv_text, json_floats, json_text

LD = "logit(foil) - logit(target)"


@dataclass(frozen=True)
class DLAOptions(Options):
    """DLA has no options: the prompt and the two words are its input."""


@dataclass
class DLAResult:
    model: str
    tokens: list[str]
    ids: list[int]
    target: tuple[str, int]
    foil: tuple[str, int]
    heads: np.ndarray  # (L, H)
    attn_bias: np.ndarray  # (L,)
    mlp: np.ndarray  # (L,)
    embed: float  # token + position embedding
    final_ln_bias: float
    metric: float  # the model's own logit(foil) - logit(target)
    scale: float  # the frozen final LayerNorm scale s at the last position

    @property
    def total(self) -> float:
        return float(self.heads.sum() + self.attn_bias.sum() + self.mlp.sum() + self.embed + self.final_ln_bias)

    def components(self) -> list[tuple[str, float]]:
        """Every component by name, largest magnitude first."""
        L, H = self.heads.shape
        named = [(f"L{l}H{h}", float(self.heads[l, h])) for l in range(L) for h in range(H)]
        named += [(f"attn bias {l}", float(self.attn_bias[l])) for l in range(L)]
        named += [(f"mlp {l}", float(self.mlp[l])) for l in range(L)]
        named += [("embed", self.embed), ("final LN bias", self.final_ln_bias)]
        return sorted(named, key=lambda kv: -abs(kv[1]))

    def to_json(self) -> dict:
        return {"analysis": "dla", "model": self.model, "tokens": self.tokens, "ids": self.ids,
                "target": {"text": self.target[0], "id": self.target[1]},
                "foil": {"text": self.foil[0], "id": self.foil[1]},
                "metric_definition": "logit(foil) - logit(target) at the last position",
                "heads": json_floats(self.heads), "attn_bias": json_floats(self.attn_bias),
                "mlp": json_floats(self.mlp), "embed": json_floats(self.embed),
                "final_ln_bias": json_floats(self.final_ln_bias), "total": json_floats(self.total),
                "metric": json_floats(self.metric), "final_ln_scale": json_floats(self.scale)}


@torch.no_grad()
def dla(ctx: Context, prompt: Prompt) -> DLAResult:
    model, tok = ctx.model, ctx.tok
    ids = encode(tok, prompt.text, model.config.block_size)
    target, foil = answer_ids(tok, prompt.target, prompt.foil)
    rec = Recording(sites=("resid_pre", "z", "mlp_out", "resid_post"))
    model(torch.tensor([ids], device=ctx.device), record=rec, last_only=True)
    cfg, tr = model.config, model.transformer
    L, H, C = cfg.n_layer, cfg.n_head, cfg.n_embd
    f64 = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
    d = f64(tr.wte.weight[foil[1]] - tr.wte.weight[target[1]])  # (C,) the logit-difference direction
    x = f64(rec["resid_post", L - 1][0, -1])  # the final residual stream at the last position
    scale = float((x.var(unbiased=False) + tr.ln_f.eps).sqrt())
    g = f64(tr.ln_f.weight) * d / scale  # what one unit of a centred component adds to the metric

    def project(v: torch.Tensor) -> torch.Tensor:  # (..., C) -> (...): centre, then read along g
        return (v - v.mean(-1, keepdim=True)) @ g

    heads, bias, mlp = np.zeros((L, H)), np.zeros(L), np.zeros(L)
    for l, block in enumerate(tr.h):
        w_o = f64(block.attn.c_proj.weight).view(C, H, C // H)  # (C_out, head, head_size)
        z = f64(rec["z", l][0, :, -1])  # (H, head_size) at the last position
        heads[l] = project(torch.einsum("chd,hd->hc", w_o, z)).numpy()
        bias[l] = float(project(f64(block.attn.c_proj.bias)))
        mlp[l] = float(project(f64(rec["mlp_out", l][0, -1])))
    embed = float(project(f64(rec["resid_pre", 0][0, -1])))
    ln_bias = float(f64(tr.ln_f.bias) @ d)
    last = rec.last_logits[0].double()
    return DLAResult(ctx.name, [tok.token_str(i) for i in ids], ids, target, foil, heads, bias,
                     mlp, embed, ln_bias, float(last[foil[1]] - last[target[1]]), scale)


# ----------------------------------------------------------------------------- figures and files


def heads_figure(r: DLAResult):
    return layer_head_figure(r.heads, f"direct logit attribution per head\nlogit({r.foil[0].strip()}) − "
                                      f"logit({r.target[0].strip()}) = {r.metric:.3g}")


def layers_figure(r: DLAResult):
    return layer_bars_figure(
        {"attention (heads + bias)": r.heads.sum(1) + r.attn_bias, "MLP": r.mlp},
        f"logit({r.foil[0].strip()}) − logit({r.target[0].strip()})",
        f"per layer; embed {r.embed:.3g}, final LN bias {r.final_ln_bias:.3g}, total {r.total:.4g}")


def component_files(result, column: str, heads_figure, layers_figure, figures: bool) -> dict:
    """DLA's and ablation's folder: results.json, one CSV row per component, the two figures."""
    out = {"results.json": json_text(result.to_json()),
           "results.csv": csv_text(["component", column], [[name, repr(v)] for name, v in result.components()])}
    if figures:
        out.update({"heads.png": png(lambda: heads_figure(result)), "layers.png": png(lambda: layers_figure(result))})
    return out


def components(L: int, H: int, extra: tuple[str, str]) -> dict:
    """A component grid's labels: rows the layers, columns each head and two per-layer parts."""
    return {"layer": [str(l) for l in range(L)], "component": [f"head {h}" for h in range(H)] + list(extra)}


class DLA(Analysis):
    name = "dla"
    help = "direct logit attribution: each head's, MLP's and embedding's share of logit(foil) - logit(target)"
    Options = DLAOptions
    takes = PROMPT
    answer = True
    figures = ("heads.png", "layers.png")

    def run(self, ctx: Context, prompt: Prompt, options: DLAOptions, events: Events | None = None) -> DLAResult:
        options.verify()
        self.check_input(prompt)
        return dla(ctx, prompt)

    def files(self, result: DLAResult, figures: bool = True) -> dict:
        return component_files(result, "contribution", heads_figure, layers_figure, figures)

    def lines(self, r: DLAResult) -> list[str]:
        return ([f"logit({r.foil[0].strip()}) - logit({r.target[0].strip()}) = {r.metric:.4f}; "
                 f"sum of the components {r.total:.4f}"] + [f"  {name:>14}: {v:+.4f}" for name, v in r.components()[:10]])

    # ------------------------------------------------------------------ studies: L x (H + 2), on each clean prompt

    def shape(self, options: DLAOptions, config) -> Shape:
        return Shape(axes=["layer", "component"], metrics=["contribution"], metric="contribution",
                     scalars=["clean_value", "embed", "final_ln_bias"],
                     labels=components(config.n_layer, config.n_head, ("attn bias", "mlp")),
                     definition=f"direct contribution of the component to {LD} at the last position")

    def grid(self, r: DLAResult) -> Grid:
        # the embedding's and the final LayerNorm bias's terms are per-pair numbers: cells + them = the value
        grid = np.concatenate([r.heads, r.attn_bias[:, None], r.mlp[:, None]], axis=1)
        return Grid({"contribution": grid}, r.tokens,
                    {"clean_value": r.metric, "embed": r.embed, "final_ln_bias": r.final_ln_bias})
