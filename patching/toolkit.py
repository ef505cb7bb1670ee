"""What the circuit analyses (lens, dla, attention, heads, ablate) share, and nothing else.

Option dataclasses that refuse unknown keys, checks that raise one-sentence PatchingErrors, loading
the model from the CLI's shared flags, prompt and answer-word lookup, matplotlib figures drawn on the
Agg canvas (no pyplot: importing it costs startup time and needs no display), CSV text, JSON-safe
numbers, and the analysis's output folder, claimed (checked and locked) before any computing and
written complete or not at all (patching.files).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
from dataclasses import fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from patching.files import Claim, claim, expand
from patching.api import PatchingError, Settings, load, reject_unknown, single_token
from patching.report import show, slug


class Options:
    """Base of the analyses' option dataclasses: `from_dict` fails on keys the dataclass lacks."""

    @classmethod
    def from_dict(cls, data: dict, where: str = "options"):
        reject_unknown(data, [f.name for f in fields(cls)], where)
        return cls(**data)


def check_int(name: str, value, lo: int, hi: int | None = None):
    if not isinstance(value, int) or isinstance(value, bool) or value < lo or (hi is not None and value > hi):
        span = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
        raise PatchingError(f"{name} must be an integer {span}, got {value!r}.")


def check_choice(name: str, value, allowed: Sequence[str]):
    if value not in allowed:
        raise PatchingError(f"{name} {value!r} is not one of {', '.join(allowed)}.")


def check_prompt(text, role: str = "prompt"):
    if not isinstance(text, str) or not text.strip():
        raise PatchingError(f"the {role} is empty: give the text to analyse with --prompt.")


def check_pair(target, foil, needed: bool, command: str):
    """target/foil come together; `needed` analyses cannot run without them."""
    given = [w is not None for w in (target, foil)]
    if needed and not all(given):
        raise PatchingError(f"{command} needs both --target and --foil: the words whose logit difference "
                            f"logit(foil) - logit(target) it explains.")
    if any(given) and not all(given):
        raise PatchingError(f"give both --target and --foil, or neither ({command} got only one).")


# ----------------------------------------------------------------------------- model and prompts


def load_model(args: argparse.Namespace):
    """(model, tokenizer) from the CLI's shared --model/--device/--dtype flags."""
    given = {k: getattr(args, k, None) for k in ("model", "device", "dtype")}
    return load(Settings(**{k: v for k, v in given.items() if v is not None}))


def encode(tok, model, prompt: str) -> list[int]:
    """Token ids of a prompt, refused when empty or longer than the context."""
    check_prompt(prompt)
    ids = tok.encode(prompt)
    if not ids:
        raise PatchingError("the prompt has no tokens: give some text with --prompt.")
    if len(ids) > model.config.block_size:
        raise PatchingError(f"the prompt is {len(ids)} tokens but the model's context holds "
                            f"{model.config.block_size}: shorten it.")
    return ids


def answer_ids(tok, target: str, foil: str) -> tuple[tuple[str, int], tuple[str, int]]:
    t, f = single_token(tok, target, "target"), single_token(tok, foil, "foil")
    if t[1] == f[1]:
        raise PatchingError(f"target and foil are the same token {t[0]!r}: give two different words.")
    return t, f


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def model_name(model) -> str:
    return getattr(model, "name", "random")


# ----------------------------------------------------------------------------- figures and files


def figure(width: float, height: float, layout: str | None = None):
    """A matplotlib Figure on the Agg canvas (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def png(draw: Callable[[], object], dpi: int = 120) -> Callable[[Path], None]:
    """A write_folder entry that draws the figure only when the folder is written."""
    def save(path: Path):
        fig = draw()
        fig.savefig(path, dpi=dpi)
    return save


def diverging(values: np.ndarray):
    """A colour norm centred on zero for signed quantities."""
    from matplotlib.colors import TwoSlopeNorm
    lim = float(np.nanmax(np.abs(values))) if values.size and np.isfinite(values).any() else 0.0
    lim = lim or 1.0
    return TwoSlopeNorm(vcenter=0.0, vmin=-lim, vmax=lim)


def layer_head_figure(values: np.ndarray, title: str):
    """An L x H heatmap of a signed quantity, centred on zero, with each value written in its cell."""
    L, H = values.shape
    fig = figure(max(5.5, 2.5 + 0.5 * H), max(3.2, 1.6 + 0.4 * L), layout="constrained")
    ax = fig.add_subplot()
    norm = diverging(values)
    im = ax.imshow(values, cmap="RdBu_r", norm=norm, aspect="auto")
    if L * H <= 200:
        for l in range(L):
            for h in range(H):
                dark = abs(values[l, h]) > 0.6 * norm.vmax  # white text on the saturated colours
                ax.text(h, l, f"{values[l, h]:.3g}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")
    ax.set_xticks(range(H))
    ax.set_yticks(range(L))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    return fig


def layer_bars_figure(bars: dict[str, np.ndarray], ylabel: str, title: str):
    """Two bars per layer (e.g. attention and MLP) around a zero line."""
    (a_label, a), (b_label, b) = bars.items()
    fig = figure(max(4.5, 2.5 + 0.5 * len(a)), 3.5)
    ax = fig.add_subplot()
    x = np.arange(len(a))
    ax.bar(x - 0.2, a, 0.4, label=a_label)
    ax.bar(x + 0.2, b, 0.4, label=b_label)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(x)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def token_labels(tokens: Sequence[str]) -> list[str]:
    return [f"{show(t)} ({i})" for i, t in enumerate(tokens)]


def csv_text(header: Sequence, rows: Sequence[Sequence]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def add_prompt_arguments(ap: argparse.ArgumentParser, prompt_help: str, pair_required: bool):
    """--prompt, --target, --foil as lens, dla and ablate take them."""
    need = " (required)" if pair_required else " (give --foil too)"
    ap.add_argument("--prompt", required=True, help=prompt_help)
    ap.add_argument("--target", help=f"the word the model should predict{need}")
    ap.add_argument("--foil", help=f"the competing word{need if pair_required else ' (give --target too)'}")


def component_files(result, column: str, heads_figure, layers_figure) -> dict:
    """dla's and ablate's folder: results.json, one CSV row per component, the two figures."""
    rows = [[name, repr(v)] for name, v in result.components()]
    return {"results.json": json.dumps(result.to_json(), indent=1) + "\n",
            "results.csv": csv_text(["component", column], rows),
            "heads.png": png(lambda: heads_figure(result)),
            "layers.png": png(lambda: layers_figure(result))}


def claim_out(args: argparse.Namespace, kind: str, name: str) -> Claim:
    """--out, or a new outputs/<kind>-<name slug>; checked and locked before the work starts."""
    given = getattr(args, "out", None)
    out = expand(given) if given else expand("outputs") / f"{kind}-{slug(name, 50)}"
    return claim(out, kind=kind, overwrite=bool(getattr(args, "overwrite", False)), fresh=not given)
