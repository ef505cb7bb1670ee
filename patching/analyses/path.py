"""Path patching: one head's effect on the answer through one path only, computed exactly.

Method (Wang et al. 2022, "Interpretability in the Wild", the IOI paper; Goldowsky-Dill et al. 2023,
"Localizing Model Behavior with Path Patching"): the *sender* is a head, the *receivers* are the
inputs some later heads read (their queries, keys or values) or the final residual stream (`logits`).
Three runs of the base prompt (the corrupt one when denoising):
  1. record the base run and the source run (every head's z, every MLP's output);
  2. run the base with the sender's z taken from the source run and every other head's z frozen at
     the base run's value (MLPs recomputed, or frozen too with --freeze-mlps), and record the
     receivers' inputs: what reaches them is the sender's change, through MLPs unless frozen, and
     through no other head;
  3. run the base again patching only those receiver inputs (at every position), and measure.
Nothing is linearised: LayerNorms, softmaxes and MLPs all run. For `logits` the receiver input is the
final residual stream of run 2; with --freeze-mlps it is the base run's plus the sender's z change
through its slice of c_proj, the sender's *direct* effect.

A sender in the receiver's layer or later cannot reach it (attention reads the block's input);
with `--sender all` those cells are not applicable (NaN, null in JSON, hatched in the figure).
Every applicable sender runs at once: runs 2 and 3 are batched, one batch row per sender.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from mingpt.errors import quote
from mingpt.sites import Patch, Recording
from patching.analyses.base import PAIR, Analysis, Events, Grid, Shape
from patching.core.context import Context
from patching.core.errors import PatchingError
from patching.core.figures import diverging, figure, png
from patching.core.metrics import DIRECTIONS, METRICS, check_recovery, metric_values, needs_lse, readout
from patching.core.options import Options, option
from patching.core.prompts import Pair, Prepared, prepare
from patching.core.serial import csv_text, json_floats, json_text, slug

INPUTS = ("q", "k", "v")


@dataclass(frozen=True)
class Receiver:
    layer: int | None  # None for logits
    head: int | None
    input: str  # q, k, v or logits

    def __str__(self):
        return "logits" if self.input == "logits" else f"{self.layer}.{self.head}:{self.input}"


def parse_head(text: str, what: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)\.(\d+)", text.strip())
    if not m:
        raise PatchingError(f"{what} {text!r} is not a head: write LAYER.HEAD, e.g. 0.1.")
    return int(m[1]), int(m[2])


def parse_receiver(text: str) -> Receiver:
    if text.strip() == "logits":
        return Receiver(None, None, "logits")
    head, _, inp = text.strip().partition(":")
    if inp not in INPUTS:
        raise PatchingError(f"receiver {text!r} does not name the input it reads: write logits or LAYER.HEAD:q, "
                            f":k or :v (e.g. 1.0:k).")
    l, h = parse_head(head, "receiver")
    return Receiver(l, h, inp)


@dataclass(frozen=True)
class PathOptions(Options):
    sender: str = option(help="the sending head LAYER.HEAD, or all (a layer x head matrix)")
    receivers: tuple[str, ...] = option(("logits",), help="logits (the final residual stream) or LAYER.HEAD:q|k|v, "
                                        "one or more [logits]", flag="--receiver", nargs="+", metavar="SPEC")
    freeze_mlps: bool = option(False, help="freeze every MLP at the base run too (only the direct path from the "
                               "sender remains)")
    metric: str = option("logit-diff", help="[logit-diff]", choices=tuple(METRICS))
    direction: str = option("denoise", help="denoise: the clean sender into the corrupt run; noise: the reverse "
                            "[denoise]", choices=tuple(DIRECTIONS))
    prepend_bos: bool = option(False, help="put <|endoftext|> before both prompts")
    every_metric: bool = option(False, internal=True)  # a study's pairs: recovery beside logit-diff

    def validate(self):
        if not isinstance(self.sender, str):  # YAML reads 1.10 as the number 1.1
            raise PatchingError("a path analysis needs sender: 'LAYER.HEAD' in quotes (e.g. '0.1') or all.")
        receivers = (self.receivers,) if isinstance(self.receivers, str) else self.receivers
        if not isinstance(receivers, (list, tuple)) or not all(isinstance(r, str) for r in receivers):
            raise PatchingError(f"receivers must be a list like [logits] or ['1.0:k', '1.2:q'], got {quote(receivers)}.")
        object.__setattr__(self, "receivers", tuple(receivers))
        if self.sender != "all":
            parse_head(self.sender, "sender")
        if not self.receivers:
            raise PatchingError("no receiver: give logits or LAYER.HEAD:q|k|v with --receiver.")
        parsed = [parse_receiver(r) for r in self.receivers]
        if any(r.input == "logits" for r in parsed) and len(parsed) > 1:
            raise PatchingError("the logits receiver takes the whole final residual stream: give it alone, "
                                "or only head inputs (LAYER.HEAD:q|k|v).")

    def parsed(self, L: int, H: int) -> tuple[list[tuple[int, int]] | None, list[Receiver]]:
        """(the senders asked for, or None for all; the receivers), checked against the model's shape."""
        receivers = [parse_receiver(r) for r in self.receivers]
        for r in receivers:
            if r.input != "logits":
                check_head(r.layer, r.head, L, H, f"receiver {r}")
        if self.sender == "all":
            if first_layer(receivers, L) == 0:
                raise PatchingError("every receiver reads in block 0, before any head has written: pick receivers "
                                    "in later layers.")
            return None, receivers
        l, h = parse_head(self.sender, "sender")
        check_head(l, h, L, H, f"sender {self.sender}")
        first = first_layer(receivers, L)
        if l >= first:
            raise PatchingError(f"sender {self.sender} is in layer {l}, but receiver "
                                f"{next(r for r in receivers if r.layer == first)} reads the input of layer {first}: "
                                f"a head reaches only later layers; pick a sender in layers 0..{first - 1}.")
        return [(l, h)], receivers


def check_head(l: int, h: int, L: int, H: int, what: str):
    if not (0 <= l < L and 0 <= h < H):
        raise PatchingError(f"{what} does not exist: the model has layers 0..{L - 1} and heads 0..{H - 1}.")


def first_layer(receivers: list[Receiver], L: int) -> int:
    """The earliest layer a receiver reads at (logits: after the last block, L)."""
    return min(L if r.input == "logits" else r.layer for r in receivers)


# ----------------------------------------------------------------------------- the three runs


@torch.no_grad()
def path_readouts(model, base_ids: torch.Tensor, source_ids: torch.Tensor, senders: list[tuple[int, int]],
                  receivers: list[Receiver], freeze_mlps: bool, target_id: int, foil_id: int, lse: bool,
                  chunk: int = 64) -> torch.Tensor:
    """Readouts (n_senders, 3) of run 3 for each sender (patching.core.metrics.readout: target, foil, log-sum-exp)."""
    L = model.config.n_layer
    base, src = Recording(sites=("z", "mlp_out")), Recording(sites=("z",))  # run 1
    model(base_ids, record=base, last_only=True)
    model(source_ids, record=src, last_only=True)
    heads = [r for r in receivers if r.input != "logits"]
    stop = max([r.layer for r in heads], default=L)  # heads from the last receiver's layer on reach none
    out = []
    for a in range(0, len(senders), chunk):
        part = senders[a:a + chunk]
        n = len(part)
        ids = base_ids.expand(n, -1)
        # run 2: every head frozen at the base run, the sender's (one per batch row) from the source run
        z = base["z"][:stop, 0].expand(n, -1, -1, -1, -1).clone()  # (n, stop, H, T, hs)
        for i, (l, h) in enumerate(part):
            z[i, l, h] = src["z", l][0, h]
        frozen = [Patch(l, None, z[:, l], site="z") for l in range(stop)]
        if freeze_mlps:
            frozen += [Patch(l, None, base["mlp_out", l][0], site="mlp_out") for l in range(stop)]
        seen = Recording(sites=tuple({r.input for r in heads}) or ("resid_post",))
        model(ids, record=seen, patch=frozen, last_only=True)
        # run 3: the base run with only the receivers' inputs replaced by what run 2 gave them
        if heads:
            edits = [Patch(r.layer, None, seen[r.input, r.layer][:, r.head], site=r.input, head=r.head) for r in heads]
        else:  # logits: the final residual stream itself
            edits = [Patch(L - 1, None, seen["resid_post", L - 1], site="resid_post")]
        logits, _ = model(ids, patch=edits, last_only=True)
        out.append(readout(logits[:, -1], target_id, foil_id, lse).cpu())
    return torch.cat(out)


@dataclass
class PathResult:
    model: str
    options: PathOptions
    prepared: Prepared
    receivers: list[Receiver]
    matrix: np.ndarray  # (L, H): the metric after path patching from each sender; NaN where not applicable/asked
    applicable: np.ndarray  # (L, H) bool
    single: tuple[int, int] | None  # the one sender asked for, or None for all
    base_value: float
    source_value: float
    clean_value: float
    corrupt_value: float

    @property
    def value(self) -> float | None:
        return float(self.matrix[self.single]) if self.single else None

    def to_json(self) -> dict:
        o, p = self.options, self.prepared
        doc = {"analysis": "path", "model": self.model, "metric": o.metric, "metric_definition": METRICS[o.metric],
               "direction": o.direction, "direction_definition": DIRECTIONS[o.direction],
               "sender": o.sender, "receivers": [str(r) for r in self.receivers], "freeze_mlps": o.freeze_mlps,
               "prepend_bos": o.prepend_bos, "tokens": p.tokens, "corrupt_tokens": p.corrupt_tokens,
               "clean_ids": p.clean_ids, "corrupt_ids": p.corrupt_ids,
               "target": {"text": p.target, "id": p.target_id}, "foil": {"text": p.foil, "id": p.foil_id},
               "base_value": self.base_value, "source_value": self.source_value,
               "clean_value": self.clean_value, "corrupt_value": self.corrupt_value}
        if self.single:
            doc["value"] = self.value
        else:
            doc["axes"] = ["layer", "head"]
            doc["matrix"] = json_floats(self.matrix)
            doc["not_applicable"] = "null: the sender is in the receiver's layer or later, so no path exists"
        return doc


def path(ctx: Context, pair: Pair, options: PathOptions) -> PathResult:
    model, tok, cfg = ctx.model, ctx.tok, ctx.config
    L, H = cfg.n_layer, cfg.n_head
    single, receivers = options.parsed(L, H)
    prep = prepare(tok, pair, cfg.block_size, cfg.vocab_size, options.prepend_bos)
    clean, corrupt = (torch.tensor([i], device=ctx.device) for i in (prep.clean_ids, prep.corrupt_ids))
    base_ids, source_ids = (corrupt, clean) if options.direction == "denoise" else (clean, corrupt)
    lse = needs_lse(options.metric)
    with torch.no_grad():
        r_base, r_src = (readout(model(i, last_only=True)[0][0, -1], prep.target_id, prep.foil_id, True).cpu()
                         for i in (base_ids, source_ids))
    if options.metric == "recovery" or (options.every_metric and options.metric == "logit-diff"):
        check_recovery(r_src, r_base, model.transformer.wte.weight.dtype)  # one rule for every analysis
    first = first_layer(receivers, L)
    applicable = np.zeros((L, H), dtype=bool)
    applicable[:first] = True
    senders = single or [(l, h) for l in range(first) for h in range(H)]
    readouts = path_readouts(model, base_ids, source_ids, senders, receivers, options.freeze_mlps,
                             prep.target_id, prep.foil_id, lse)
    values = metric_values(options.metric, readouts, r_src, r_base).double().numpy()
    matrix = np.full((L, H), np.nan)
    for (l, h), v in zip(senders, values):
        matrix[l, h] = v
    value = lambda r: float(metric_values(options.metric, r, r_src, r_base))  # noqa: E731
    denoise = options.direction == "denoise"
    return PathResult(ctx.name, options, prep, receivers, matrix, applicable,
                      single[0] if single else None, value(r_base), value(r_src),
                      value(r_src if denoise else r_base), value(r_base if denoise else r_src))


# ----------------------------------------------------------------------------- figures and files


def describe(r: PathResult) -> str:
    rec = ", ".join(map(str, r.receivers))
    return f"path patching {r.options.sender} -> {rec} ({r.options.direction}{', MLPs frozen' if r.options.freeze_mlps else ''})"


def matrix_figure(r: PathResult):
    """The layer x head matrix, not-applicable cells grey and hatched."""
    import matplotlib
    from matplotlib.patches import Rectangle
    m = r.matrix
    L, H = m.shape
    fig = figure(max(5.5, 2.5 + 0.5 * H), max(3.2, 1.6 + 0.4 * L), layout="constrained")
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["RdBu_r"].copy()
    cmap = cmap.with_extremes(bad="lightgrey")
    # centred on the base run's value: blue/red = the sender moves the metric down/up through this path
    shifted = m - r.base_value
    norm = diverging(shifted[np.isfinite(shifted)])
    im = ax.imshow(np.ma.masked_invalid(shifted), cmap=cmap, norm=norm, aspect="auto")
    for l in range(L):
        for h in range(H):
            if not np.isfinite(m[l, h]):
                ax.add_patch(Rectangle((h - 0.5, l - 0.5), 1, 1, fill=False, hatch="//", edgecolor="grey", lw=0))
                if L * H <= 200:
                    ax.text(h, l, "n/a", ha="center", va="center", fontsize=7, color="dimgrey")
            elif L * H <= 200:
                ax.text(h, l, f"{shifted[l, h]:+.2g}", ha="center", va="center", fontsize=7)  # what the colour shows
    ax.set_xticks(range(H))
    ax.set_yticks(range(L))
    ax.set_xlabel("sender head")
    ax.set_ylabel("sender layer")
    ax.set_title(f"{describe(r)}\n{r.options.metric}: base {r.base_value:.3g}, source {r.source_value:.3g}", fontsize=9)
    fig.colorbar(im, ax=ax, label=f"{r.options.metric} − base value")
    return fig


def bars_figure(r: PathResult):
    """One sender: the base run, the path-patched run, the source run."""
    fig = figure(5.0, 3.5, layout="constrained")
    ax = fig.add_subplot()
    names = ["base run", f"path {r.options.sender}", "source run"]
    vals = [r.base_value, r.value, r.source_value]
    ax.bar(names, vals, color=["tab:red", "tab:purple", "tab:blue"])
    ax.axhline(0, color="black", lw=0.8)
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.4g}", ha="center", va="bottom" if v >= 0 else "top", fontsize=8)
    ax.set_ylabel(r.options.metric)
    ax.set_title(describe(r), fontsize=9)
    return fig


def files(r: PathResult, figures: bool = True) -> dict:
    L, H = r.matrix.shape
    rows = [[f"{l}.{h}", l, h, "" if not np.isfinite(r.matrix[l, h]) else repr(float(r.matrix[l, h])),
             "yes" if r.applicable[l, h] else "no"]
            for l in range(L) for h in range(H) if r.single is None or (l, h) == r.single]
    out = {"results.json": json_text(r.to_json()),
           "results.csv": csv_text(["sender", "layer", "head", r.options.metric, "applicable"], rows)}
    if figures:
        out["heatmap.png" if r.single is None else "bars.png"] = png(
            lambda: matrix_figure(r) if r.single is None else bars_figure(r))
    return out


class Path(Analysis):
    name = "path"
    help = "exact path patching: a head's effect through one path only (into later heads' q/k/v, or the logits)"
    Options = PathOptions
    takes = PAIR
    figures = ("heatmap.png", "bars.png")

    def run(self, ctx: Context, pair: Pair, options: PathOptions, events: Events | None = None) -> PathResult:
        options.verify()
        return path(ctx, self.check_input(pair), options)

    def files(self, result: PathResult, figures: bool = True) -> dict:
        return files(result, figures)

    def lines(self, r: PathResult) -> list[str]:
        out = [f"{describe(r)}: {r.options.metric} base {r.base_value:.4f}, source {r.source_value:.4f}"]
        if r.single:
            return out + [f"  after path patching: {r.value:.4f}"]
        order = np.argsort(-np.abs(np.nan_to_num(r.matrix - r.base_value)), axis=None)[:5]
        for i in order:
            l, h = np.unravel_index(i, r.matrix.shape)
            if np.isfinite(r.matrix[l, h]):
                out.append(f"  sender {l}.{h}: {r.matrix[l, h]:.4f}")
        if not r.applicable.all():
            out.append(f"  senders in layer {first_layer(r.receivers, r.matrix.shape[0])} and after: not applicable")
        return out

    def folder_name(self, ctx: Context, pair: Pair, options: PathOptions) -> str:
        options.parsed(ctx.config.n_layer, ctx.config.n_head)  # shape errors before the folder is claimed
        return f"path-{slug(options.sender + '-to-' + '-'.join(options.receivers), 50)}"

    # ------------------------------------------------------------------ studies: L x H, each pair's two prompts

    def shape(self, options: PathOptions, config) -> Shape:
        senders, _ = options.parsed(config.n_layer, config.n_head)
        labels = ({"layer": [str(l) for l in range(config.n_layer)], "head": [str(h) for h in range(config.n_head)]}
                  if senders is None else {"layer": [str(senders[0][0])], "head": [str(senders[0][1])]})
        metrics = [options.metric, "recovery"] if options.metric == "logit-diff" else [options.metric]
        return Shape(axes=["layer", "head"], metrics=metrics, metric=options.metric,
                     scalars=["clean_value", "corrupt_value"], labels=labels,
                     definition=f"{METRICS[options.metric]} after path patching from the sender head (row layer, "
                                f"column head) into the receivers; NaN/null where no path exists")

    def grid(self, r: PathResult) -> Grid:
        grid = r.matrix if r.single is None else r.matrix[r.single][None, None]  # (L, H) or (1, 1)
        metrics = {r.options.metric: grid}
        if r.options.metric == "logit-diff":  # recovery of the path-patched value: 0 = the base run, 1 = the source
            metrics["recovery"] = (grid - r.base_value) / (r.source_value - r.base_value)
        return Grid(metrics, r.prepared.tokens, {"clean_value": r.clean_value, "corrupt_value": r.corrupt_value})

    def for_study(self, options: PathOptions) -> PathOptions:
        return options.replace(every_metric=True)

    def title(self, options: PathOptions) -> str:
        return f"path {options.sender} -> {', '.join(options.receivers)}"
