"""Reading heads from their weights alone: OV and QK circuits, copying and positional scores, and
composition between heads. No prompt is run.

Method (Elhage et al., "A Mathematical Framework for Transformer Circuits", 2021). Row vectors, x W.
Per head h of block l, with W_Q^h, W_K^h, W_V^h (d_model x d_head) the head's columns of c_attn and
W_O^h (d_head x d_model) its rows of c_proj:

    W_OV = W_V^h W_O^h                              what the head moves from a source to the output
    W_QK = W_Q^h (W_K^h)^T / sqrt(d_head)           how a query vector scores a key vector

Folding: block l's ln_1 scale gamma multiplies W_Q, W_K, W_V (diag(gamma) W); the final LayerNorm's
scale is folded into the unembedding, W_U = diag(gamma_f) W_E^T (GPT-2 ties it to W_E). LayerNorm
centring and biases, and the attention biases, are left out, as in the paper.

- copying score: Re(sum lambda_i) / sum |lambda_i| over the eigenvalues of the full OV circuit
  W_E W_OV W_U (vocab x vocab). W_E W_V W_O W_U = A B with A = W_E W_V and B = W_O W_U has the
  same non-zero eigenvalues as B A = W_O (W_U W_E) W_V, a d_head x d_head matrix: that is what is
  computed, with W_U W_E (d_model x d_model) summed over the vocabulary in chunks.
- positional QK: X W_QK X^T for the first N positions, X = W_pos's rows normalised as ln_1 normalises
  an input (centred, divided by sqrt(var + eps)); the scale is in W_QK, the bias left out. The
  previous-token score from weights is the mean, over destinations d = 1..N-1, of the causal
  softmax's weight (over sources 0..d) on source d - 1 of row d.
- composition from (l1, h1) into (l2, h2), l1 < l2:
      Q: |W_OV^1 W_QK^2|_F / (|W_OV^1|_F |W_QK^2|_F)
      K: |W_OV^1 (W_QK^2)^T|_F / (|W_OV^1|_F |W_QK^2|_F)
      V: |W_OV^1 W_OV^2|_F / (|W_OV^1|_F |W_OV^2|_F)
  computed without any d_model x d_model product per pair: with the thin QR factorisations
  W_V = Q_V R_V, W_K = Q_K R_K, W_Q = Q_Q R_Q, W_O^T = Q_O R_O (orthonormal Q_*, d_head x d_head
  R_*), |W_V M W_K^T|_F = |R_V M R_K^T|_F for any M, so the Q score is |A^1 B^2|_F with
  A = R_V W_O / |W_OV|_F (d_head x d_model) and B = W_Q R_K^T / |W_QK|_F (d_model x d_head),
  likewise K with W_K R_Q^T and V with W_V R_O^T. One float32 product of all of a block's A with
  all later blocks' B gives every pair's d_head x d_head block at once.
  Beside them, the same score of random matrices of the same shapes (Gaussian factors, so Q, K and V
  share one baseline), the paper's point of comparison.
- --tokens: rows of the full OV circuit (e_t W_OV W_U: which tokens a head makes more likely when it
  attends to token t) and of the full QK circuit (e_t W_QK W_E^T: which key tokens query token t
  scores highest), as top-k tables.

Everything but the composition product is float64; nothing of vocabulary squared is ever built.
"""
from __future__ import annotations

import io
import math
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from mingpt.errors import quote
from patching.analyses.base import NOTHING, Analysis, Events
from patching.core.context import Context
from patching.core.errors import PatchingError
from patching.core.figures import figure, layer_head_figure, png_bytes, show
from patching.core.options import Options, option
from patching.core.prompts import single_token
from patching.core.serial import csv_text, json_floats, json_text, slug
from patching.io.pages import data_uri, fmt

KINDS = ("q", "k", "v")
POSITIONS = 64  # default N of the positional QK circuit
GRID_HEADS = 16  # at most this many heads in one positional PNG; more heads get one PNG per layer
BASELINE_SAMPLES = 200  # random pairs drawn for the composition baseline
BASELINE_SEED = 0
VOCAB_CHUNK = 8192  # vocabulary rows per step of W_U W_E and of a token table
PRODUCT_ELEMENTS = 1 << 26  # float32 elements of one composition product (256 MiB)
TOP = 10  # heads and pairs listed in results.json's `top`
FOLD = {"ln_1": "block l's ln_1 scale folded into W_Q, W_K and W_V of its heads: diag(gamma_1) W",
        "ln_f": "the final LayerNorm's scale folded into the unembedding: W_U = diag(gamma_f) W_E^T",
        "left_out": "LayerNorm centring and biases, and the attention biases b_Q, b_K, b_V, b_O "
                    "(as in Elhage et al. 2021)",
        "positional": "the positional QK circuit normalises W_pos's rows as ln_1 would (centred, divided by "
                      "sqrt(var + eps)) before W_QK, without the bias"}
DEFINITIONS = {
    "W_OV": "W_V^h W_O^h (d_model x d_model)",
    "W_QK": "W_Q^h (W_K^h)^T / sqrt(d_head) (d_model x d_model)",
    "copying": "Re(sum of eigenvalues) / sum of |eigenvalues| of the full OV circuit W_E W_OV W_U, from the "
               "d_head x d_head matrix W_O W_U W_E W_V (same non-zero eigenvalues)",
    "previous_token_from_weights": "mean over destinations d = 1..N-1 of the causal softmax weight on d - 1 of "
                                   "row d of X W_QK X^T, X the first N rows of W_pos normalised as ln_1 does",
    "composition_q": "|W_OV^1 W_QK^2|_F / (|W_OV^1|_F |W_QK^2|_F)",
    "composition_k": "|W_OV^1 (W_QK^2)^T|_F / (|W_OV^1|_F |W_QK^2|_F)",
    "composition_v": "|W_OV^1 W_OV^2|_F / (|W_OV^1|_F |W_OV^2|_F)",
    "ov_row": "e_t W_OV W_U: logit change per unit of attention to token t (only the order and relative size "
              "are meaningful: LayerNorm's division is left out)",
    "qk_row": "e_t W_QK W_E^T: attention score of query token t for each key token (same caveat)",
}
HEAD_TEXT = re.compile(r"(\d+)\.(\d+)")


def parse_head(text: str) -> tuple[int, int]:
    m = HEAD_TEXT.fullmatch(text.strip())
    if not m:
        raise PatchingError(f"--heads {quote(text, 30)} is not a head: write LAYER.HEAD, e.g. 1.0.")
    return int(m[1]), int(m[2])


def head_name(l: int, h: int) -> str:
    return f"{l}.{h}"


def _strings(value, name: str, example: str):
    """A list option's value as a tuple of strings (YAML may give one string, or numbers)."""
    if value is None:
        return None
    value = (value,) if isinstance(value, str) else value
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise PatchingError(f"{name} must be a list of text entries in quotes, e.g. [{example}], got {quote(value)}.")
    if not value:
        raise PatchingError(f"--{name.replace('_', '-')} is empty: give at least one entry, or leave it out.")
    return tuple(value)


@dataclass(frozen=True)
class WeightsOptions(Options):
    heads: tuple[str, ...] | None = option(None, help="heads LAYER.HEAD whose positional QK pattern is drawn and "
                                           "whose token rows are tabulated [all]", nargs="+", metavar="L.H")
    tokens: tuple[str, ...] | None = option(None, help="tokens whose rows of the full OV and QK circuits are "
                                            "tabulated, each a single token (a leading space is added; =TEXT "
                                            "takes TEXT exactly) [none]", nargs="+", metavar="WORD")
    positions: int = option(POSITIONS, help=f"positions N of the positional QK circuit [{POSITIONS}]", low=2)
    top_k: int = option(10, help="rows of each token table [10]", low=1, high=100)

    def validate(self):
        object.__setattr__(self, "heads", _strings(self.heads, "heads", "'1.0', '0.3'"))
        object.__setattr__(self, "tokens", _strings(self.tokens, "tokens", "' Jones'"))
        for h in self.heads or ():
            parse_head(h)

    def chosen(self, L: int, H: int, name: str) -> list[tuple[int, int]]:
        """The heads asked for (all by default), checked against the model's shape, in order, once each."""
        if self.heads is None:
            return [(l, h) for l in range(L) for h in range(H)]
        out = []
        for text in self.heads:
            l, h = parse_head(text)
            if not (l < L and h < H):
                raise PatchingError(f"head {l}.{h} does not exist: {name} has layers 0..{L - 1} and heads "
                                    f"0..{H - 1} in each.")
            if (l, h) not in out:
                out.append((l, h))
        return out


# ----------------------------------------------------------------------------- the result


@dataclass
class TokenRow:
    """One head's rows of the full circuits for one token: the top-k (id, value) of each."""

    head: tuple[int, int]
    token: str
    id: int
    ov: list[tuple[int, float]]  # e_t W_OV W_U, largest first
    ov_self_rank: int  # 1 + the number of tokens the row puts above t itself
    qk: list[tuple[int, float]]  # e_t W_QK W_E^T, largest first


@dataclass
class WeightsResult:
    model: str
    options: WeightsOptions
    shape: dict  # n_layers, n_heads, d_model, d_head, vocab_size
    copying: np.ndarray  # (L, H)
    previous_token: np.ndarray  # (L, H)
    positional_qk: np.ndarray  # (L, H, N, N) float64 logits X W_QK X^T
    composition: dict[str, np.ndarray]  # kind -> (L, H, L, H), NaN where l1 >= l2
    baseline: dict  # mean, std, samples, seed, distribution
    heads: list[tuple[int, int]]  # the chosen heads
    rows: list[TokenRow]
    names: dict[int, str] = field(default_factory=dict)  # token id -> text, for the tables
    seconds: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.copying.shape[0]

    @property
    def n_heads(self) -> int:
        return self.copying.shape[1]

    def pattern(self, l: int, h: int) -> np.ndarray:
        """The causal softmax of a head's positional QK logits (N x N, rows sum to 1)."""
        return causal_softmax(self.positional_qk[l, h])

    def top_heads(self, values: np.ndarray, n: int = TOP) -> list[dict]:
        finite = [(float(values[l, h]), l, h) for l in range(values.shape[0]) for h in range(values.shape[1])
                  if math.isfinite(values[l, h])]
        return [{"head": head_name(l, h), "layer": l, "index": h, "score": v}
                for v, l, h in sorted(finite, reverse=True)[:n]]

    def pairs(self, kind: str) -> list[tuple[float, int, int, int, int]]:
        """(score, l1, h1, l2, h2) of every pair with a score, largest first."""
        c = self.composition[kind]
        L, H = self.n_layers, self.n_heads
        out = [(float(c[a, b, x, y]), a, b, x, y) for a in range(L) for b in range(H) for x in range(a + 1, L)
               for y in range(H) if math.isfinite(c[a, b, x, y])]
        return sorted(out, reverse=True)

    def top_pairs(self, kind: str, n: int = TOP) -> list[dict]:
        mean = self.baseline["mean"]
        return [{"sender": head_name(a, b), "receiver": head_name(x, y), "score": s,
                 "over_baseline": s / mean if mean else None} for s, a, b, x, y in self.pairs(kind)[:n]]

    def token_text(self, i: int) -> str:
        return self.names.get(i, str(i))

    def to_json(self) -> dict:
        o = self.options
        rows = [{"head": head_name(*r.head), "token": r.token, "id": r.id,
                 "ov": {"top": [{"token": self.token_text(i), "id": i, "value": v} for i, v in r.ov],
                        "self_rank": r.ov_self_rank},
                 "qk": {"top": [{"token": self.token_text(i), "id": i, "value": v} for i, v in r.qk]}}
                for r in self.rows]
        return {"analysis": "weights", "model": self.model, **self.shape,
                "fold": FOLD, "definitions": DEFINITIONS,
                "positions": o.positions, "heads": [head_name(*h) for h in self.heads],
                "copying": json_floats(self.copying),
                "previous_token_from_weights": json_floats(self.previous_token),
                "composition": {k: nested(self.composition[k]) for k in KINDS},
                "composition_layout": "[sender layer][sender head][receiver layer][receiver head], null where the "
                                      "sender's layer is not before the receiver's",
                "baseline": self.baseline,
                "top": {"copying": self.top_heads(self.copying),
                        "previous_token_from_weights": self.top_heads(self.previous_token),
                        "composition": {k: self.top_pairs(k) for k in KINDS}},
                "positional_qk_file": "positional_qk.npy",
                "positional_qk_layout": "layer, head, destination (query) position, source (key) position: the "
                                        "logits X W_QK X^T, before the causal mask and softmax",
                "tokens": rows, "seconds": self.seconds}


def nested(a: np.ndarray) -> list:
    """(L, H, L, H) with NaN -> nested lists with None."""
    return json_floats(a)


def causal_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax over sources 0..d of an (..., N, N) array of logits."""
    n = logits.shape[-1]
    masked = np.where(np.tril(np.ones((n, n), dtype=bool)), logits, -np.inf)
    e = np.exp(masked - masked.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# ----------------------------------------------------------------------------- the computation


def _f64(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return t.detach().to(device=device, dtype=torch.float64)


def unembed_embed(model, device: torch.device) -> torch.Tensor:
    """W_U W_E = diag(gamma_f) W_lm^T W_E (d_model x d_model), float64, summed over vocabulary chunks."""
    tr = model.transformer
    e, u = tr.wte.weight, model.lm_head.weight  # (V, C) each; the same tensor in GPT-2
    C = e.shape[1]
    acc = torch.zeros(C, C, dtype=torch.float64, device=device)
    for start in range(0, e.shape[0], VOCAB_CHUNK):
        rows = slice(start, start + VOCAB_CHUNK)
        acc += _f64(u[rows], device).T @ _f64(e[rows], device)
    return _f64(tr.ln_f.weight, device)[:, None] * acc


def layer_heads(block, H: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A block's per-head matrices, float64, row-vector convention, ln_1's scale folded into q, k, v:
    q, k, v (H, C, hs); o (H, hs, C)."""
    attn = block.attn
    C = attn.n_embd
    hs = C // H
    gamma = _f64(block.ln_1.weight, device)
    w = _f64(attn.c_attn.weight, device)  # (3C out, C in): x @ w.T
    out = {}
    for i, name in enumerate(KINDS):
        m = gamma[:, None] * w[i * C:(i + 1) * C].T  # (C in, C out)
        out[name] = m.view(C, H, hs).permute(1, 0, 2)  # (H, C, hs)
    out["o"] = _f64(attn.c_proj.weight, device).T.reshape(H, hs, C)  # (H, hs, C): rows of head h
    return out


def r_factor(m: torch.Tensor) -> torch.Tensor:
    """R of the thin QR factorisation of each (..., n, k) matrix, n >= k: |m X|_F = |R X|_F."""
    return torch.linalg.qr(m, mode="r").R


def copying_scores(w: dict, ue: torch.Tensor) -> torch.Tensor:
    """(H,) Re(sum lambda) / sum |lambda| of W_O W_U W_E W_V, per head."""
    core = w["o"] @ ue @ w["v"]  # (H, hs, hs)
    lam = torch.linalg.eigvals(core.cpu())
    total = lam.abs().sum(-1)
    return torch.where(total > 0, lam.sum(-1).real / total, torch.full_like(total, float("nan")))


def normalised_positions(model, n: int, eps: float, device: torch.device) -> torch.Tensor:
    """The first n rows of W_pos, each centred and divided by sqrt(var + eps), as ln_1 does (no scale, no bias)."""
    p = _f64(model.transformer.wpe.weight[:n], device)
    p = p - p.mean(-1, keepdim=True)
    return p / torch.sqrt(p.pow(2).mean(-1, keepdim=True) + eps)


def previous_token_scores(logits: np.ndarray) -> np.ndarray:
    """(..., N, N) logits -> (...,) mean over d = 1..N-1 of the causal softmax's weight on d - 1."""
    a = causal_softmax(logits)
    n = logits.shape[-1]
    d = np.arange(1, n)
    return a[..., d, d - 1].mean(-1)


def composition_factors(w: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's sides of every composition score (see the module docstring), float64:
    left (H, hs, C) = R_V W_O / |W_OV|; right (C, 3, H, hs): W_Q R_K^T / |W_QK|, W_K R_Q^T / |W_QK|,
    W_V R_O^T / |W_OV| (the 1 / sqrt(d_head) of W_QK cancels in the ratio)."""
    r = {k: r_factor(w[k]) for k in KINDS}
    r_o = r_factor(w["o"].transpose(-1, -2))
    norm_ov = torch.linalg.matrix_norm(r["v"] @ r_o.transpose(-1, -2))  # |W_OV|_F = |R_V R_O^T|_F
    norm_qk = torch.linalg.matrix_norm(r["q"] @ r["k"].transpose(-1, -2))  # |W_Q W_K^T|_F
    left = r["v"] @ w["o"] / norm_ov[:, None, None]
    right = torch.stack([w["q"] @ r["k"].transpose(-1, -2) / norm_qk[:, None, None],
                         w["k"] @ r["q"].transpose(-1, -2) / norm_qk[:, None, None],
                         w["v"] @ r_o.transpose(-1, -2) / norm_ov[:, None, None]])  # (3, H, C, hs)
    return left, right.permute(2, 0, 1, 3)  # (C, 3, H, hs)


def composition_scores(lefts: torch.Tensor, rights: torch.Tensor, events: Events | None) -> np.ndarray:
    """lefts (L, H, hs, C), rights (L, C, 3, H, hs), float32 on one device -> (3, L, H, L, H) float64,
    NaN where l1 >= l2: the Frobenius norm of each pair's d_head x d_head block of left @ right."""
    L, H, hs, C = lefts.shape
    out = np.full((3, L, H, L, H), np.nan)
    per_layer = C * 3 * H * hs + H * hs * 3 * H * hs  # elements of one receiving block and its product
    step = max(1, PRODUCT_ELEMENTS // per_layer)
    for l1 in range(L - 1):
        a = lefts[l1].reshape(H * hs, C)
        for start in range(l1 + 1, L, step):
            stop = min(L, start + step)
            b = rights[start:stop].reshape(stop - start, C, 3 * H * hs)
            p = (a @ b).view(stop - start, H, hs, 3, H, hs)  # (receiving layer, h1, ., kind, h2, .)
            norms = p.square().sum((2, 5)).double().sqrt()  # (n, H1, 3, H2)
            out[:, l1, :, start:stop, :] = norms.permute(2, 1, 0, 3).cpu().numpy()
        if events and events.progress:
            events.progress(l1 + 1, L - 1)
    return out


def random_baseline(C: int, hs: int, samples: int = BASELINE_SAMPLES, seed: int = BASELINE_SEED) -> dict:
    """The Q-composition score of `samples` random pairs (W_V W_O, W_Q W_K^T) with standard Gaussian factors of
    the heads' shapes, by the definition's route (R factors, float64). Gaussian factors are rotation
    invariant, so Q, K and V composition of random heads share this distribution."""
    g = torch.Generator().manual_seed(seed)
    scores = []
    for start in range(0, samples, 25):
        n = min(25, samples - start)
        v, q, k = (torch.randn(n, C, hs, generator=g, dtype=torch.float64) for _ in range(3))
        o = torch.randn(n, hs, C, generator=g, dtype=torch.float64)
        w = {"q": q, "k": k, "v": v, "o": o}
        left, right = composition_factors(w)  # right (C, 3, n, hs)
        m = left @ right[:, 0].permute(1, 0, 2)  # (n, hs, hs): pair i is (v_i o_i, q_i k_i^T)
        scores.append(torch.linalg.matrix_norm(m))
    s = torch.cat(scores).numpy()
    return {"mean": float(s.mean()), "std": float(s.std(ddof=1)) if samples > 1 else 0.0, "samples": samples,
            "seed": seed, "distribution": "Q-composition of W_V W_O and W_Q W_K^T with the heads' shapes "
                                          f"({C} x {hs} and {hs} x {C}), every factor's entries N(0, 1)"}


def token_rows(w: dict, l: int, heads: list[int], ids: list[tuple[str, int]], model, k: int,
               device: torch.device) -> list[TokenRow]:
    """Rows of the full OV and QK circuits of the chosen heads of one block for each token."""
    tr = model.transformer
    e = _f64(tr.wte.weight[[i for _, i in ids]], device)  # (T, C)
    hs = w["q"].shape[-1]
    gamma_f = _f64(tr.ln_f.weight, device)
    ov_in = torch.stack([e @ w["v"][h] @ w["o"][h] * gamma_f for h in heads])  # (n, T, C): e_t W_OV diag(gamma_f)
    qk_in = torch.stack([(e @ w["q"][h]) @ w["k"][h].T / math.sqrt(hs) for h in heads])  # e_t W_QK
    ov = _vocab_product(ov_in, model.lm_head.weight, device)  # (n, T, V)
    qk = _vocab_product(qk_in, tr.wte.weight, device)
    rows = []
    for j, h in enumerate(heads):
        for t, (text, i) in enumerate(ids):
            o_vals, o_ids = torch.topk(ov[j, t], k)
            q_vals, q_ids = torch.topk(qk[j, t], k)
            rank = 1 + int((ov[j, t] > ov[j, t, i]).sum())
            rows.append(TokenRow((l, h), text, i, list(zip(o_ids.tolist(), o_vals.tolist())), rank,
                                 list(zip(q_ids.tolist(), q_vals.tolist()))))
    return rows


def _vocab_product(x: torch.Tensor, table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """x (..., C) @ table^T (C, V), float64, the vocabulary in chunks."""
    parts = [x @ _f64(table[s:s + VOCAB_CHUNK], device).T for s in range(0, table.shape[0], VOCAB_CHUNK)]
    return torch.cat(parts, -1).cpu()


@torch.no_grad()
def weights(ctx: Context, options: WeightsOptions, events: Events | None = None) -> WeightsResult:
    model = ctx.model
    cfg = model.config
    L, H, C = cfg.n_layer, cfg.n_head, cfg.n_embd
    hs = C // H
    N = options.positions
    if N > cfg.block_size:
        raise PatchingError(f"--positions {N} is more than the model's context of {cfg.block_size} positions: "
                            f"use --positions {cfg.block_size} or less.")
    chosen = options.chosen(L, H, ctx.name)
    ids = list(dict.fromkeys(single_token(ctx.tok, t, "--tokens entry") for t in options.tokens or ()))
    bad = [(t, i) for t, i in ids if i >= cfg.vocab_size]
    if bad:
        raise PatchingError(f"the token {bad[0][0]!r} (id {bad[0][1]}) is not in this model's vocabulary of "
                            f"{cfg.vocab_size}: pick another.")
    # float64 work where float64 is fast (CPU, CUDA); the composition product in float32 on the model's device
    work = ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
    t0 = time.perf_counter()
    ue = unembed_embed(model, work)
    copying, prev = np.zeros((L, H)), np.zeros((L, H))
    positional = np.zeros((L, H, N, N))
    lefts = torch.empty(L, H, hs, C, dtype=torch.float32, device=ctx.device)
    rights = torch.empty(L, C, 3, H, hs, dtype=torch.float32, device=ctx.device)
    rows = []
    for l, block in enumerate(model.transformer.h):
        w = layer_heads(block, H, work)
        copying[l] = copying_scores(w, ue).numpy()
        x = normalised_positions(model, N, block.ln_1.eps, work)
        logits = (x @ w["q"]) @ (x @ w["k"]).transpose(-1, -2) / math.sqrt(hs)  # (H, N, N)
        positional[l] = logits.cpu().numpy()
        prev[l] = previous_token_scores(positional[l])
        left, right = composition_factors(w)
        lefts[l], rights[l] = left.float(), right.float()
        mine = [h for ll, h in chosen if ll == l]
        if ids and mine:
            rows += token_rows(w, l, mine, ids, model, options.top_k, work)
    t1 = time.perf_counter()
    comp = composition_scores(lefts, rights, events)
    t2 = time.perf_counter()
    baseline = random_baseline(C, hs)
    rows.sort(key=lambda r: (chosen.index(r.head), [i for _, i in ids].index(r.id)))
    names = {i: ctx.tok.token_str(i) for r in rows for i, _ in r.ov + r.qk}
    names.update({i: t for t, i in ids})
    shape = {"n_layers": L, "n_heads": H, "d_model": C, "d_head": hs, "vocab_size": cfg.vocab_size}
    return WeightsResult(ctx.name, options, shape, copying, prev, positional,
                         {k: comp[i] for i, k in enumerate(KINDS)}, baseline, chosen, rows, names,
                         {"per_head": round(t1 - t0, 4), "composition": round(t2 - t1, 4),
                          "baseline": round(time.perf_counter() - t2, 4)})


# ----------------------------------------------------------------------------- figures


def grid_figure(values: np.ndarray, title: str, vmin: float, vmax: float, cmap: str):
    """An L x H grid of one score per head, on a fixed colour scale, each value written in its cell."""
    return layer_head_figure(values, title, (vmin, vmax), cmap, ".2f")


def copying_figure(r: WeightsResult):
    return grid_figure(r.copying, f"copying score from weights, {r.model}\nRe(Σλ) / Σ|λ| of W_E W_OV W_U",
                       -1.0, 1.0, "RdBu_r")


def previous_figure(r: WeightsResult):
    return grid_figure(r.previous_token, f"previous-token score from weights, {r.model}\ncausal softmax of "
                       f"W_pos W_QK W_pos^T, first {r.options.positions} positions", 0.0, 1.0, "viridis")


def composition_figure(r: WeightsResult):
    """Per kind, a (L*H) x (L*H) matrix: rows the sending head, columns the receiving head."""
    L, H = r.n_layers, r.n_heads
    n = L * H
    labels = [head_name(l, h) for l in range(L) for h in range(H)]
    top = max([float(np.nanmax(c)) for c in r.composition.values() if np.isfinite(c).any()] + [r.baseline["mean"]])
    side = min(5.5, max(2.6, 0.25 * n + 1.5))
    fig = figure(0.8 + 3 * side, side + 1.0, layout="constrained")
    axes = fig.subplots(1, 3, squeeze=False)[0]
    for ax, kind in zip(axes, KINDS):
        m = r.composition[kind].reshape(n, n)
        im = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", vmin=0, vmax=top, aspect="equal")
        ax.set_facecolor("#e6e6e6")
        if n <= 12:
            for i in range(n):
                for j in range(n):
                    if math.isfinite(m[i, j]):
                        ax.text(j, i, f"{m[i, j]:.3f}", ha="center", va="center", fontsize=7,
                                color="white" if m[i, j] < 0.6 * top else "black")
        if n <= 48:
            ax.set_xticks(range(n), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(n), labels, fontsize=6)
        else:
            ticks = [l * H for l in range(L)]
            ax.set_xticks(ticks, [str(l) for l in range(L)], fontsize=6)
            ax.set_yticks(ticks, [str(l) for l in range(L)], fontsize=6)
            for t in ticks[1:]:
                ax.axhline(t - 0.5, color="white", lw=0.3)
                ax.axvline(t - 0.5, color="white", lw=0.3)
        ax.set_title(f"{kind.upper()}-composition", fontsize=9)
        ax.set_xlabel("receiving head (L.H)", fontsize=8)
    axes[0].set_ylabel("sending head (L.H)", fontsize=8)
    fig.colorbar(im, ax=list(axes), shrink=0.8)
    b = r.baseline
    fig.suptitle(f"composition scores from weights, {r.model}; random baseline {b['mean']:.3f} ± {b['std']:.3f}",
                 fontsize=9)
    return fig


def positional_figure(r: WeightsResult, heads: list[tuple[int, int]]):
    """The causal softmax of each chosen head's positional QK logits: rows destinations, columns sources."""
    cols = min(len(heads), 4 if len(heads) > 4 else len(heads))
    rows = math.ceil(len(heads) / cols)
    fig = figure(0.8 + 3.0 * cols, 0.8 + 3.0 * rows, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(heads):]:
        ax.set_visible(False)
    for ax, (l, h) in zip(axes.flat, heads):
        ax.imshow(r.pattern(l, h), cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"L{l}H{h}: previous-token {r.previous_token[l, h]:.3f}", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.supxlabel("source position (key)", fontsize=9)
    fig.supylabel("destination position (query)", fontsize=9)
    fig.suptitle(f"positional attention from weights, {r.model}: softmax over sources ≤ d of W_pos W_QK W_pos^T",
                 fontsize=9)
    return fig


def positional_figures(r: WeightsResult) -> dict:
    if len(r.heads) <= GRID_HEADS:
        return {"positional_qk.png": lambda: positional_figure(r, r.heads)}
    layers = sorted({l for l, _ in r.heads})
    return {f"positional_qk_layer{l:02d}.png": (lambda l=l: positional_figure(r, [x for x in r.heads if x[0] == l]))
            for l in layers}


def figure_makers(r: WeightsResult) -> dict:
    return {"copying.png": lambda: copying_figure(r), "previous_token.png": lambda: previous_figure(r),
            "composition.png": lambda: composition_figure(r), **positional_figures(r)}


# ----------------------------------------------------------------------------- the page and the files

PAGE = """{% extends "base.html" %}
{% block title %}patch-run weights: {{ r.model }}{% endblock %}
{% block body %}
<h1>Heads read from their weights: {{ r.model }}</h1>
<p>{{ shape.n_layers }} layers × {{ shape.n_heads }} heads, d_model {{ shape.d_model }}, d_head {{ shape.d_head }}.
No prompt was run: every number below comes from the weights.</p>
<div class="read"><b>Conventions.</b> Row vectors (x W); definitions of Elhage et al., “A Mathematical Framework for
Transformer Circuits” (2021).<ul>{% for k, v in fold.items() %}<li><b>{{ k }}</b>: {{ v }}</li>{% endfor %}</ul></div>

<h2>Copying and previous-token scores</h2>
<div class="row">{% for name in ("copying.png", "previous_token.png") %}{% if images.get(name) %}
<figure><img src="{{ images[name] }}" alt="{{ name }}"></figure>{% endif %}{% endfor %}</div>
<table class="sortable">
<thead><tr><th>head</th><th>copying</th><th>previous-token from weights</th></tr></thead>
<tbody>{% for h, c, p in per_head %}<tr><td>{{ h }}</td><td class="num">{{ fmt(c) }}</td><td class="num">{{ fmt(p) }}</td></tr>{% endfor %}</tbody>
</table>
<div class="read"><b>How to read it.</b> Copying: {{ definitions.copying }}; 1 means the head, attending to a
token, raises that same token's logit (all eigenvalues positive), −1 that it lowers it. Previous-token:
{{ definitions.previous_token_from_weights }} (N = {{ positions }}); 1 means that, from positions alone,
the head attends to the token just before.</div>

<h2>Composition between heads</h2>
<p>Random baseline (matrices of the same shapes): <b>{{ fmt(baseline.mean) }}</b> ± {{ fmt(baseline.std) }}
({{ baseline.samples }} samples). {{ baseline.distribution }}.</p>
{% if images.get("composition.png") %}<figure><img src="{{ images["composition.png"] }}" alt="composition scores"></figure>{% endif %}
<div class="row">{% for kind, pairs in top_pairs %}<div>
<h3>{{ kind | upper }}-composition, strongest pairs</h3>
<table class="sortable"><thead><tr><th>sender</th><th>receiver</th><th>score</th><th>÷ baseline</th></tr></thead>
<tbody>{% for p in pairs %}<tr><td>{{ p.sender }}</td><td>{{ p.receiver }}</td><td class="num">{{ fmt(p.score) }}</td><td class="num">{{ fmt(p.over_baseline) }}</td></tr>{% endfor %}</tbody></table>
</div>{% endfor %}</div>
<div class="read"><b>How to read it.</b> Q: {{ definitions.composition_q }}; K: {{ definitions.composition_k }};
V: {{ definitions.composition_v }}. A score well above the baseline means the receiving head's query,
key or value reads the subspace the sending head writes: an induction head K-composes with a
previous-token head.</div>

<h2>Positional attention of the chosen heads</h2>
{% for name in positional %}{% if images.get(name) %}<figure><img src="{{ images[name] }}" alt="{{ name }}"></figure>{% endif %}{% endfor %}
<p class="small">Rows: destination (query) positions 0..{{ positions - 1 }}; columns: source (key) positions. The
logits are in positional_qk.npy.</p>

{% if rows %}<h2>Token rows of the full circuits</h2>
<p class="small">OV: {{ definitions.ov_row }}. QK: {{ definitions.qk_row }}.</p>
<div class="row">{% for row in rows %}<div>
<h3>{{ row.head }}, token <span class="tok">{{ row.token }}</span> ({{ row.id }})</h3>
<table><thead><tr><th>OV: makes more likely</th><th>value</th><th>QK: attends to</th><th>value</th></tr></thead>
<tbody>{% for a, b in row.pairs %}<tr><td class="tok">{{ a.token }}</td><td class="num">{{ fmt(a.value) }}</td><td class="tok">{{ b.token }}</td><td class="num">{{ fmt(b.value) }}</td></tr>{% endfor %}</tbody></table>
<p class="small">the token itself ranks {{ row.self_rank }} in its OV row</p>
</div>{% endfor %}</div>{% endif %}
{% endblock %}
"""


def page(r: WeightsResult, images: dict[str, str]) -> str:
    import jinja2
    env = jinja2.Environment(loader=jinja2.ChoiceLoader([jinja2.DictLoader({"weights.html": PAGE}),
                                                         jinja2.PackageLoader("patching.io", "templates")]),
                             autoescape=True)
    doc = r.to_json()
    per_head = [(head_name(l, h), r.copying[l, h], r.previous_token[l, h])
                for l in range(r.n_layers) for h in range(r.n_heads)]
    rows = [{"head": t["head"], "token": show(t["token"]), "id": t["id"], "self_rank": t["ov"]["self_rank"],
             "pairs": [tuple({"token": show(x["token"]), "value": x["value"]} for x in pair)
                       for pair in zip(t["ov"]["top"], t["qk"]["top"])]} for t in doc["tokens"]]
    return env.get_template("weights.html").render(
        fmt=fmt, r=r, shape=r.shape, fold=FOLD, definitions=DEFINITIONS, per_head=per_head,
        positions=r.options.positions, baseline=r.baseline, images=images, rows=rows,
        top_pairs=[(k, doc["top"]["composition"][k]) for k in KINDS], positional=list(positional_figures(r)))


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def files(r: WeightsResult, figures: bool = True) -> dict:
    L, H = r.n_layers, r.n_heads
    heads = [[l, h, repr(float(r.copying[l, h])), repr(float(r.previous_token[l, h]))]
             for l in range(L) for h in range(H)]
    c = r.composition
    pairs = [[a, b, x, y, *(repr(float(c[k][a, b, x, y])) for k in KINDS)]
             for a in range(L) for b in range(H) for x in range(a + 1, L) for y in range(H)]
    out = {"results.json": json_text(r.to_json()),
           "results.csv": csv_text(["layer", "head", "copying", "previous_token_from_weights"], heads),
           "composition.csv": csv_text(["sender_layer", "sender_head", "receiver_layer", "receiver_head", *KINDS],
                                       pairs),
           "positional_qk.npy": npy_bytes(r.positional_qk.astype(np.float32))}
    drawn: dict[str, bytes] = {}
    makers = figure_makers(r) if figures else {}

    def draw(name: str) -> bytes:
        if name not in drawn:
            drawn[name] = png_bytes(makers[name](), dpi=120)
        return drawn[name]

    for name in makers:
        out[name] = lambda path, name=name: path.write_bytes(draw(name))

    def write_page(path):
        path.write_text(page(r, {name: data_uri(draw(name)) for name in makers}), encoding="utf-8")
    out["weights.html"] = write_page
    return out


class Weights(Analysis):
    name = "weights"
    help = ("heads read from their weights: copying scores, positional QK and previous-token scores, Q/K/V "
            "composition between heads (no prompt)")
    Options = WeightsOptions
    takes = NOTHING
    figures = ("copying.png", "previous_token.png", "composition.png", "positional_qk.png")

    def run(self, ctx: Context, input: None, options: WeightsOptions, events: Events | None = None) -> WeightsResult:
        options.verify()
        self.check_input(input)
        return weights(ctx, options, events)

    def files(self, result: WeightsResult, figures: bool = True) -> dict:
        return files(result, figures)

    def lines(self, r: WeightsResult) -> list[str]:
        b = r.baseline
        out = [f"{r.model}: {r.n_layers} layers x {r.n_heads} heads; ln_1 and ln_f scales folded, LayerNorm "
               f"centring and biases left out",
               "  copying score: " + _tops(r.top_heads(r.copying, 3)),
               f"  previous-token from weights ({r.options.positions} positions): "
               + _tops(r.top_heads(r.previous_token, 3))]
        if r.n_layers < 2:
            out.append("  composition: none (one layer)")
        else:
            out.append(f"  composition, random baseline {b['mean']:.3f} ± {b['std']:.3f}:")
            for k in KINDS:
                out.append(f"    {k.upper()}: " + ", ".join(f"{p['sender']}->{p['receiver']} {p['score']:.3f}"
                                                       for p in r.top_pairs(k, 3)))
        for row in r.rows:
            top = ", ".join(repr(r.token_text(i)) for i, _ in row.ov[:3])
            out.append(f"  {head_name(*row.head)} attending to {row.token!r} raises {top} "
                       f"(itself: rank {row.ov_self_rank})")
        return out

    def folder_name(self, ctx: Context, input: None, options: WeightsOptions) -> str:
        return f"weights-{slug(ctx.name, 50)}"

    columns = ("copying", "previous-token", "K-composition")  # a batch's summary.md: the strongest of each

    def summary(self, r: WeightsResult) -> dict:
        return {"top_copying": r.top_heads(r.copying, 1), "top_previous_token": r.top_heads(r.previous_token, 1),
                "top_k_composition": r.top_pairs("k", 1), "baseline": r.baseline["mean"]}

    def cells(self, r: WeightsResult) -> list[str]:
        k = r.top_pairs("k", 1)
        return [_tops(r.top_heads(r.copying, 1)), _tops(r.top_heads(r.previous_token, 1)),
                f"{k[0]['sender']}->{k[0]['receiver']} {k[0]['score']:.3f} (baseline {r.baseline['mean']:.3f})"
                if k else "none"]


def _tops(top: list[dict]) -> str:
    return ", ".join(f"L{t['layer']}H{t['index']} {t['score']:.3f}" for t in top)
