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
once); the `loop` engine, one plain forward per ablation, is the oracle in tests.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mingpt.model import Recording
from patching import engines, toolkit
from patching.api import PatchingError, json_floats, read_text
from patching.engines import ENGINES

HELP = "zero or mean ablation of every head, attention output and MLP, one at a time"
KINDS = ("zero", "mean")
SITES = {"heads": "z", "attn": "attn_out", "mlp": "mlp_out"}  # result key -> activation site


@dataclass
class AblateOptions(toolkit.Options):
    prompt: str
    target: str | None = None
    foil: str | None = None
    kind: str = "zero"
    reference: list[str] | None = None  # prompts whose mean activations `mean` uses; None = the prompt
    engine: str = "fast"

    def __post_init__(self):
        toolkit.check_prompt(self.prompt)
        toolkit.check_pair(self.target, self.foil, needed=True, command="ablate")
        toolkit.check_choice("--kind", self.kind, KINDS)
        toolkit.check_choice("--engine", self.engine, ENGINES)
        if self.reference is not None:
            check_reference_kind(self.kind)
            if not self.reference:
                raise PatchingError("the reference prompts are empty: give one prompt per line.")
            for i, p in enumerate(self.reference, 1):
                toolkit.check_prompt(p, f"reference prompt {i}")


def check_reference_kind(kind: str):
    if kind != "mean":
        raise PatchingError("--reference gives the prompts of mean ablation: add --kind mean or drop it.")


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


def read_reference(path: str | Path) -> list[str]:
    """One prompt per non-blank line of a UTF-8 text file."""
    text = read_text(path, "--reference")
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise PatchingError(f"--reference {path} has no prompts: write one prompt per line.")
    return prompts


@torch.no_grad()
def mean_source(model, tok, prompts: list[str], T: int) -> dict[str, torch.Tensor]:
    """site -> the mean activation over every position of every prompt, repeated at T positions."""
    dev = toolkit.device_of(model)
    sums = {site: 0.0 for site in SITES.values()}
    count = 0
    for p in prompts:
        rec = Recording(sites=tuple(SITES.values()))
        model(torch.tensor([toolkit.encode(tok, model, p)], device=dev), record=rec, last_only=True)
        sums["z"] = sums["z"] + rec["z"][:, 0].double().sum(2)  # (L, H, hs): summed over positions
        for site in ("attn_out", "mlp_out"):
            sums[site] = sums[site] + rec[site][:, 0].double().sum(1)  # (L, C)
        count += rec["z"].shape[3]
    dtype = model.transformer.wte.weight.dtype
    return {"z": (sums["z"] / count)[:, :, None].expand(-1, -1, T, -1).to(dtype),
            **{s: (sums[s] / count)[:, None].expand(-1, T, -1).to(dtype) for s in ("attn_out", "mlp_out")}}


@torch.no_grad()
def ablate(model, tok, options: AblateOptions, means: dict | None = None) -> AblateResult:
    """`means`: mean_source's result for these reference prompts and this length, if the caller has it
    (a study ablates many prompts against one reference and computes it once per length)."""
    ids = toolkit.encode(tok, model, options.prompt)
    target, foil = toolkit.answer_ids(tok, options.target, options.foil)
    dev, T = toolkit.device_of(model), len(ids)
    idx = torch.tensor([ids], device=dev)
    base = engines.record(model, idx, sites=tuple(SITES.values()))
    if options.kind == "mean":
        source = means if means is not None else mean_source(model, tok, options.reference or [options.prompt], T)
    else:
        source = {site: torch.zeros_like(base[site][:, 0]) for site in SITES.values()}
    r0 = engines.readout(base.last_logits[0], target[1], foil[1], False).cpu()
    base_value = float(r0[1] - r0[0])
    out = {}
    for key, site in SITES.items():
        r = engines.sweep(model, idx, base, source[site], site, target[1], foil[1], False,
                          all_positions=True, engine=options.engine)
        out[key] = (r[..., 1] - r[..., 0]).double().cpu().numpy() - base_value  # (L, H) or (L,)
    n_ref = (len(options.reference) if options.reference else 1) if options.kind == "mean" else 0
    return AblateResult(toolkit.model_name(model), options.kind, [tok.token_str(i) for i in ids], ids, target, foil,
                        n_ref, base_value, out["heads"], out["attn"], out["mlp"])


# ----------------------------------------------------------------------------- figures and files


def heads_figure(r: AblateResult):
    return toolkit.layer_head_figure(r.heads, f"{r.kind}-ablating one head: change of logit({r.foil[0].strip()}) − "
                                              f"logit({r.target[0].strip()})\n(unablated {r.base_value:.3g})")


def layers_figure(r: AblateResult):
    return toolkit.layer_bars_figure({"attention output": r.attn, "MLP output": r.mlp}, "ablated − unablated",
                                     f"{r.kind}-ablating one layer's attention or MLP (unablated {r.base_value:.3g})")


def files(r: AblateResult) -> dict:
    return toolkit.component_files(r, "ablated_minus_base", heads_figure, layers_figure)


def add_arguments(ap: argparse.ArgumentParser):
    toolkit.add_prompt_arguments(ap, "the text whose next token is measured", pair_required=True)
    ap.add_argument("--kind", choices=KINDS, default="zero", help="replace by zeros or by the reference mean [zero]")
    ap.add_argument("--reference", metavar="FILE", help="mean ablation: one prompt per line [the prompt itself]")
    ap.add_argument("--engine", choices=ENGINES, default="fast", help="fast (batched, exact) or loop [fast]")


def command(args: argparse.Namespace, say) -> int:
    if args.reference:
        check_reference_kind(args.kind)  # before reading the file: the flag is wrong whatever it holds
    reference = read_reference(args.reference) if args.reference else None
    options = AblateOptions(args.prompt, args.target, args.foil, args.kind, reference, args.engine)
    model, tok = toolkit.load_model(args)
    with toolkit.claim_out(args, "ablate", options.prompt) as dest:
        r = ablate(model, tok, options)
        folder = dest.write(files(r))
    say(f"unablated logit({r.foil[0].strip()}) - logit({r.target[0].strip()}) = {r.base_value:.4f}; "
        f"{r.kind} ablation, largest changes:")
    for name, v in r.components()[:10]:
        say(f"  {name:>10}: {v:+.4f}")
    say.result(f"wrote {folder}/results.json, results.csv, heads.png, layers.png")
    return 0
