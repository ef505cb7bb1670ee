"""Attention patterns: where every head of every layer looks, on one prompt.

Each head's pattern is softmax(q k^T / sqrt(head_size)) with the causal mask: row t (destination)
is a distribution over positions 0..t (sources). Written as attention.npy, (L, H, T, T) float32,
destination x source; as PNG grids of per-head heatmaps labelled with the tokens; and as a
self-contained HTML page: hover a token to see, for every head, how much it attends to each earlier
token (or, switched, which later tokens attend to it).

The page is our own small script with the data inlined. circuitsvis, this field's usual viewer,
writes pages that import its JavaScript from the unpkg CDN, so they are blank without a network.
"""
from __future__ import annotations

import html
import io
import json
from dataclasses import dataclass

import numpy as np
import torch

from mingpt.errors import quote
from mingpt.sites import Recording
from patching.analyses.base import PROMPT, Analysis, Events
from patching.core.context import Context
from patching.core.errors import PatchingError
from patching.core.figures import figure, png, token_labels
from patching.core.options import Options, option
from patching.core.prompts import Prompt, encode
from patching.core.serial import json_text

GRID_HEADS = 16  # at most this many heads in one PNG; more heads get one PNG per layer


@dataclass(frozen=True)
class AttentionOptions(Options):
    layers: tuple[int, ...] | None = option(None, help="layers to draw in the PNGs and the page [all]; "
                                            "attention.npy always has every layer", nargs="+", item=int, metavar="L")

    def validate(self):
        if self.layers is None:
            return
        if not isinstance(self.layers, (list, tuple)):
            raise PatchingError(f"layers must be a list of layer numbers, got {quote(self.layers)}.")
        object.__setattr__(self, "layers", tuple(self.layers))
        for l in self.layers:
            if not isinstance(l, int) or isinstance(l, bool) or l < 0:
                raise PatchingError(f"a --layers entry must be an integer at least 0, got {quote(l)}.")
        if not self.layers:
            raise PatchingError("--layers is empty: give layer numbers such as 0 1, or leave it out for all.")


@dataclass
class AttentionResult:
    model: str
    tokens: list[str]
    ids: list[int]
    patterns: np.ndarray  # (L, H, T, T) float32, destination x source
    layers: tuple[int, ...]  # the layers drawn

    def to_json(self) -> dict:
        L, H, T, _ = self.patterns.shape
        return {"analysis": "attention", "model": self.model, "tokens": self.tokens, "ids": self.ids,
                "n_layers": L, "n_heads": H, "n_tokens": T, "layers_drawn": list(self.layers),
                "attention_file": "attention.npy", "attention_layout": "layer, head, destination, source"}


@torch.no_grad()
def attention(ctx: Context, prompt: Prompt, options: AttentionOptions) -> AttentionResult:
    model, tok = ctx.model, ctx.tok
    L = model.config.n_layer
    layers = options.layers if options.layers is not None else tuple(range(L))
    bad = [l for l in layers if l >= L]
    if bad:
        raise PatchingError(f"--layers {bad[0]} does not exist: this model has layers 0..{L - 1}.")
    ids = encode(tok, prompt.text, model.config.block_size)
    rec = Recording(sites=("pattern",))
    model(torch.tensor([ids], device=ctx.device), record=rec, last_only=True)
    patterns = rec["pattern"][:, 0].float().cpu().numpy()  # (L, H, T, T)
    return AttentionResult(ctx.name, [tok.token_str(i) for i in ids], ids, patterns, tuple(sorted(set(layers))))


# ----------------------------------------------------------------------------- figures and files


def grid_figure(r: AttentionResult, layers: list[int]):
    """One heatmap per (layer, head): rows are layers, columns heads."""
    H, T = r.patterns.shape[1], r.patterns.shape[2]
    cell = min(3.2, max(2.6, 0.14 * T))
    fig = figure(0.8 + cell * H, 0.6 + cell * len(layers), layout="constrained")
    labels = token_labels(r.tokens) if T <= 40 else None
    axes = fig.subplots(len(layers), H, squeeze=False)
    for i, l in enumerate(layers):
        for h in range(H):
            ax = axes[i][h]
            ax.imshow(r.patterns[l, h], cmap="Blues", vmin=0, vmax=1)
            ax.set_title(f"L{l}H{h}", fontsize=8)
            if labels:
                ax.set_xticks(range(T), labels, rotation=90, fontsize=5)
                ax.set_yticks(range(T), labels, fontsize=5)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
    fig.supxlabel("source (attended to)", fontsize=9)
    fig.supylabel("destination (attending)", fontsize=9)
    return fig


def figure_files(r: AttentionResult) -> dict:
    H = r.patterns.shape[1]
    if len(r.layers) * H <= GRID_HEADS:
        return {"attention.png": png(lambda: grid_figure(r, list(r.layers)))}
    return {f"attention_layer{l:02d}.png": png(lambda l=l: grid_figure(r, [l])) for l in r.layers}


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>attention: __TITLE__</title>
<style>
body{font-family:sans-serif;margin:1em}
.tok{display:inline-block;padding:1px 3px;margin:1px;border:1px solid #ddd;white-space:pre;font-family:monospace;cursor:default}
.row{margin:2px 0}.name{display:inline-block;width:5em;font-size:12px;color:#555}
#hint{color:#555;font-size:13px}
</style></head><body>
<h3>Attention patterns: __TITLE__</h3>
<p id="hint">Hover a token in the top line. <label><input type="radio" name="dir" value="dest" checked>
it attends to (hovered = destination)</label> <label><input type="radio" name="dir" value="src">
attends to it (hovered = source)</label>. Darker blue = more attention; the number is the weight.</p>
<div id="prompt" class="row"></div><hr><div id="heads"></div>
<script>
const DATA = __DATA__;
const T = DATA.tokens.length;
function show(t){return t.replace(/\\n/g,"\\\\n")}
function span(t,i){const s=document.createElement("span");s.className="tok";s.textContent=show(t);s.dataset.i=i;return s}
const prompt=document.getElementById("prompt"), heads=document.getElementById("heads");
DATA.tokens.forEach((t,i)=>{const s=span(t,i);s.onmouseenter=()=>paint(i);prompt.appendChild(s)});
const rows=[];
DATA.layers.forEach((l,li)=>DATA.patterns[li].forEach((p,h)=>{
  const r=document.createElement("div");r.className="row";
  const n=document.createElement("span");n.className="name";n.textContent="L"+l+"H"+h;r.appendChild(n);
  const cells=DATA.tokens.map((t,i)=>{const s=span(t,i);r.appendChild(s);return s});
  heads.appendChild(r);rows.push({p:p,cells:cells});
}));
let cur=T-1;
document.querySelectorAll("input[name=dir]").forEach(b=>b.onchange=()=>paint(cur));
function paint(i){
  cur=i;
  const dest=document.querySelector("input[name=dir]:checked").value==="dest";
  prompt.querySelectorAll(".tok").forEach((s,j)=>s.style.outline=j===i?"2px solid #c00":"");
  rows.forEach(r=>r.cells.forEach((s,j)=>{
    const w=dest?(j<=i?r.p[i][j]:0):(j>=i?r.p[j][i]:0);
    s.style.background="rgba(30,90,200,"+w+")";s.style.color=w>0.55?"white":"black";
    s.title=(dest?"from "+i+" to "+j:"from "+j+" to "+i)+": "+w.toFixed(3);
    s.style.outline=j===i?"2px solid #c00":"";
  }));
}
paint(T-1);
</script></body></html>
"""


def page(r: AttentionResult) -> str:
    """The self-contained page: data inlined as JSON (weights rounded to 3 decimals), no network."""
    data = {"tokens": r.tokens, "layers": list(r.layers),
            "patterns": np.round(r.patterns[list(r.layers)].astype(np.float64), 3).tolist()}
    blob = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")  # cannot close the script tag
    return PAGE.replace("__TITLE__", html.escape(r.model)).replace("__DATA__", blob)


def files(r: AttentionResult, figures: bool = True) -> dict:
    return {"results.json": json_text(r.to_json()), "attention.npy": npy_bytes(r.patterns.astype(np.float32)),
            "attention.html": page(r), **(figure_files(r) if figures else {})}


class Attention(Analysis):
    name = "attention"
    help = "attention patterns of every head: attention.npy, PNG grids and an interactive HTML page"
    Options = AttentionOptions
    takes = PROMPT
    words = False

    def run(self, ctx: Context, prompt: Prompt, options: AttentionOptions, events: Events | None = None) -> AttentionResult:
        options.verify()
        return attention(ctx, self.check_input(prompt), options)

    def files(self, result: AttentionResult, figures: bool = True) -> dict:
        return files(result, figures)

    def lines(self, r: AttentionResult) -> list[str]:
        L, H, T, _ = r.patterns.shape
        return [f"{L} layers x {H} heads over {T} tokens"]
