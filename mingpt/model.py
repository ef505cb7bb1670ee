"""GPT-2 (small to xl) written from scratch, with a record/patch seam for activation patching.

The network is OpenAI's GPT-2: token + position embeddings, n_layer pre-LayerNorm blocks (causal
self-attention, then a 4x MLP with the tanh GELU, each added back to the residual stream), a final
LayerNorm and an unembedding tied to the token embedding. Parameter names follow OpenAI/Hugging Face
(`transformer.wte`, `transformer.h.{i}.attn.c_attn`, `transformer.ln_f`, ...) so loading a checkpoint
is a name-aligned copy; HF stores the four Conv1D weights as (in, out), which we transpose once, in
`_hf_to_ours`/`_ours_to_hf`.

Activation patching needs two things from forward(), and nothing else of the model's inside
(mingpt.sites): every block visits each named site once (`x = at("attn_out", x)`, names as in
TransformerLens), and `at` belongs to one call:
- `record=Recording(sites=...)` keeps detached copies of those sites at every block and position
  (block outputs by default; `Recording(kv=True)` adds keys and values), plus the last logits.
- `patch=Patch(layer, pos, value, site=..., head=...)`, or a list of them, replaces a site's value
  at one position (or every position) of one block, for one head or all of them.

`forward_patched` (mingpt.resume) is the same patch, many at once and exactly: a patch in block l at
position p cannot change earlier blocks or positions, so it resumes inside block l from the
recording, recomputes positions >= p only, and unembeds selected columns.
"""
from __future__ import annotations

import contextlib
import json
import math
import pickle
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mingpt.errors import ConfigError, InputError, WeightsError, quote
from mingpt.hub import locate
from mingpt.sites import NO_SITES, At, Patch, Recording, views  # noqa: F401  (Patch, Recording: re-exported)

# ----------------------------------------------------------------------------- configuration

PRESETS = {  # name: (n_layer, n_head, n_embd); all share GPT-2's 50257 tokens and 1024 positions
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}
ACTIVATIONS = {
    "gelu_new": partial(F.gelu, approximate="tanh"),  # GPT-2's tanh approximation
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}
FUSED = {"gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh"), "gelu": ("gelu", "none"),
         "relu": ("relu", "")}  # the same activations as oneDNN post-ops: (attr, algorithm)


def _onednn() -> Callable | None:
    try:  # oneDNN's matmul with fused bias and activation (x86 builds of torch; inductor's CPU linear)
        return torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


_LINEAR_POINTWISE = _onednn()
_REORDER = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None) if _LINEAR_POINTWISE else None


def onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `dense` computes x @ weight.T with oneDNN: no gradients, float32, on the CPU."""
    return (_LINEAR_POINTWISE is not None and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == torch.float32 and weight.dtype == torch.float32 and torch.backends.mkldnn.enabled)


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str | None = None,
          packed: torch.Tensor | None = None) -> torch.Tensor:
    """act(x @ weight.T + bias), act one of ACTIVATIONS or None. Without gradients, in float32 on the
    CPU, oneDNN computes it in one pass (~10-20% faster than BLAS then a separate activation pass),
    from `packed` (the same weight in oneDNN's layout, see Linear) if given; otherwise F.linear. The
    two differ only in float32 rounding."""
    if onednn(x, weight):
        attr, algorithm = FUSED[act] if act else ("none", "")
        return _LINEAR_POINTWISE(x, weight if packed is None else packed, bias, attr, [], algorithm)
    y = F.linear(x, weight, bias)
    return ACTIVATIONS[act](y) if act else y


def free_memory() -> int | None:
    """Bytes of memory available to this process on the CPU (Linux), or None where we cannot tell."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) computed by `dense`, optionally with an activation and
    for some output features only (`rows`, a slice of the weight's rows).

    Inside `GPT.packed()`, the weight is also kept in oneDNN's blocked layout, made on first use and
    made again if the weight changes: with a plain weight oneDNN reorders it on every call, which
    costs as much as the product itself for a few dozen rows (weights edited through `.data` are not
    seen; edit them outside the context)."""

    keep_packed = False  # set per module by GPT.packed()

    def forward(self, x: torch.Tensor, act: str | None = None, rows: slice = slice(None)) -> torch.Tensor:
        w, b = self.weight[rows], None if self.bias is None else self.bias[rows]
        # one row takes oneDNN's matrix-vector path, which rounds differently with a packed weight: plain
        # then, so that packing never changes a result (with more rows the two agree to the bit)
        pack = self.keep_packed and _REORDER is not None and x.numel() > x.shape[-1] and onednn(x, w)
        packed = self._packed(w, rows) if pack else None
        return dense(x, w, b, act, packed)

    def _packed(self, w: torch.Tensor, rows: slice) -> torch.Tensor:
        """w (the weight's `rows`) in oneDNN's layout, remade when the weight is another tensor or was
        changed in place (its version counter moved)."""
        packs = self.__dict__.setdefault("_packs", {})
        stamp = (self.weight.data_ptr(), self.weight._version, rows.start, rows.stop)
        hit = packs.get((rows.start, rows.stop))
        if hit is None or hit[0] != stamp:
            hit = packs[rows.start, rows.stop] = (stamp, _REORDER(w.contiguous()))
        return hit[1]

    def drop_packed(self):
        self.__dict__.pop("_packs", None)

    def __getstate__(self):  # copies and pickles never carry the packed weights (a cache)
        return {k: v for k, v in self.__dict__.items() if k != "_packs"}


@dataclass
class GPTConfig:
    """Hyper-parameters of a GPT-2; defaults are GPT-2 small."""

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257
    block_size: int = 1024  # context length (HF: n_positions)
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    activation: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.0  # one rate for embeddings, attention and residuals (0 for analysis)

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"config {name} must be a positive integer, got {quote(value)}.")
        if self.n_embd % self.n_head:
            raise ConfigError(f"config n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}).")
        if self.n_inner is None:
            self.n_inner = 4 * self.n_embd
        if not isinstance(self.n_inner, int) or isinstance(self.n_inner, bool) or self.n_inner < 1:
            raise ConfigError(f"config n_inner must be a positive integer or null (4 * n_embd), got {quote(self.n_inner)}.")
        if not isinstance(self.activation, str) or self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation {quote(self.activation)} is not supported: use one of {', '.join(ACTIVATIONS)}.")
        eps = self.layer_norm_epsilon
        if not self._real(eps) or not 0.0 < eps < 1.0:  # eps <= 0 divides by zero (NaN everywhere) on a constant row
            raise ConfigError(f"config layer_norm_epsilon must be a number in (0, 1) (GPT-2: 1e-5), got {quote(eps)}.")
        if not self._real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"config dropout must be in [0, 1), got {quote(self.dropout)}.")

    @staticmethod
    def _real(x) -> bool:
        """A finite int or float that is not a bool (JSON true would pass isinstance(x, int))."""
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

    def n_params(self) -> int:
        """Parameters this config describes (the tied unembedding counted once)."""
        C, I, L = self.n_embd, self.n_inner, self.n_layer
        block = (C * 3 * C + 3 * C) + (C * C + C) + (C * I + I) + (I * C + C) + 4 * C  # attn, proj, mlp, 2 LNs
        return (self.vocab_size + self.block_size) * C + L * block + 2 * C

    def check_weights(self, shapes: dict[str, tuple], where: str):
        """Compare what config.json claims with the tensors of the weights file, before any model is
        built: a config saying n_layer 1000000 (or a huge vocab_size, n_positions or n_inner) must fail
        at once, not after minutes of allocating. load_hf_state_dict later checks every tensor by name."""
        shapes = {k.removeprefix("transformer."): tuple(v) for k, v in shapes.items()}
        blocks = {int(k.split(".")[1]) for k in shapes if k.startswith("h.") and k.split(".")[1].isdigit()}
        found = {"n_layer": max(blocks) + 1 if blocks else 0}
        if len(shapes.get("wte.weight", ())) == 2:
            found["vocab_size"] = shapes["wte.weight"][0]
        if len(shapes.get("wpe.weight", ())) == 2:
            found["block_size"] = shapes["wpe.weight"][0]
        for name, n in found.items():
            if getattr(self, name) > n:  # fewer than claimed: building the model would allocate for nothing
                hf = {"block_size": "n_positions"}.get(name, name)
                raise WeightsError(f"config.json says {hf} {getattr(self, name)} but {where} holds {n}: the config "
                                   f"does not belong to these weights; use the checkpoint's own config.json.")
        held = sum(math.prod(s) for k, s in shapes.items() if k != "lm_head.weight")
        if self.n_params() > 4 * held:  # widths (n_embd, n_inner) far beyond the file
            raise WeightsError(f"config.json describes {self.n_params():,} parameters but {where} holds {held:,}: the "
                               f"config does not belong to these weights; use the checkpoint's own config.json.")

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}.")
        n_layer, n_head, n_embd = PRESETS[name]
        return cls(n_layer=n_layer, n_head=n_head, n_embd=n_embd, **overrides)

    @classmethod
    def from_hf(cls, hf: dict) -> "GPTConfig":
        """Read a Hugging Face config.json dict, refusing options our forward does not implement."""
        if not isinstance(hf, dict):
            raise ConfigError("config.json is not a JSON object of settings: it is not a GPT-2 config.")
        if hf.get("model_type", "gpt2") != "gpt2":
            raise ConfigError(f"config.json describes a {hf.get('model_type')!r} model: only GPT-2 checkpoints load.")
        unsupported = {"scale_attn_by_inverse_layer_idx": True, "add_cross_attention": True,
                       "scale_attn_weights": False, "tie_word_embeddings": False}
        for key, bad in unsupported.items():
            if hf.get(key) is bad:
                raise ConfigError(f"config.json sets {key}={bad}, which this GPT-2 does not implement.")
        try:
            return cls(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                       vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_inner=hf.get("n_inner"),
                       activation=hf.get("activation_function", "gelu_new"),
                       layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))
        except KeyError as missing:
            raise ConfigError(f"config.json lacks {missing}: it is not a GPT-2 config.") from None
        except TypeError as exc:  # e.g. a list where a number belongs, compared inside __post_init__
            raise ConfigError(f"config.json holds a value of the wrong type ({str(exc)[:80]}): it is not a GPT-2 config.") from None

    def to_hf(self) -> dict:
        """The config.json that transformers' GPT2LMHeadModel reads back into this same network."""
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": self.n_layer,
                "n_head": self.n_head, "n_embd": self.n_embd, "vocab_size": self.vocab_size,
                "n_positions": self.block_size, "n_ctx": self.block_size, "n_inner": self.n_inner,
                "activation_function": self.activation, "layer_norm_epsilon": self.layer_norm_epsilon,
                "resid_pdrop": self.dropout, "embd_pdrop": self.dropout, "attn_pdrop": self.dropout,
                "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True}


# ----------------------------------------------------------------------------- the network


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, at: At = NO_SITES, mix: Callable | None = None) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C). `mix` replaces causal attention over the rows (mingpt.resume)."""
        q, k, v = (at(name, t) for name, t in zip("qkv", self.heads(self.c_attn(x))))  # (B, nh, T, hs) each
        z = at("z", (mix or self.causal)(q, k, v, at))  # (B, nh, T, hs)
        return self.resid_drop(self.c_proj(z.transpose(1, 2).flatten(-2)))  # (B, T, C)

    def heads(self, qkv: torch.Tensor) -> list[torch.Tensor]:
        """(B, T, 3C) -> q, k, v, each (B, nh, T, hs)."""
        return [self.split(t) for t in qkv.split(self.n_embd, dim=-1)]

    def split(self, t: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, nh, T, hs)."""
        return t.unflatten(-1, (self.n_head, self.n_embd // self.n_head)).transpose(1, 2)  # (B, nh, T, hs)

    def causal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, at: At = NO_SITES) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        if at.wants("pattern"):  # the pattern must exist as a tensor to be recorded or patched
            T = q.shape[-2]
            return self.attend(q, k, v, torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), at)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)  # (B, nh, T, hs)

    def attend(self, q, k, v, mask: torch.Tensor, at: At, offset: int = 0) -> torch.Tensor:
        """Explicit softmax attention; mask (Tq, Tk) is True where a query may look. The pattern's
        rows are rows offset.. of the site's sequence axis (mingpt.resume visits row groups)."""
        w = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, nh, Tq, Tk)
        w = torch.softmax(w.masked_fill(~mask, float("-inf")), dim=-1)
        w = at("pattern", w, offset, q.shape[-2])
        if self.training and self.dropout:
            w = F.dropout(w, self.dropout)
        return w @ v  # (B, nh, Tq, hs)


MLP_ROWS = 1024  # rows per slice of a long inference batch: its hidden activation then stays in cache


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.n_inner)
        self.c_proj = Linear(config.n_inner, config.n_embd)
        self.act, self.activation = ACTIVATIONS[config.activation], config.activation
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x):
        rows = x.flatten(0, -2)  # (N, C)
        if torch.is_grad_enabled() or rows.shape[0] <= MLP_ROWS:
            return self.drop(self.c_proj(self.hidden(x)))
        # many rows (mingpt.resume's batches): a slice at a time, so that the 4x wider hidden activation
        # is still in cache when c_proj reads it
        out = rows.new_empty(rows.shape[0], self.c_proj.out_features)  # (N, C)
        for a in range(0, rows.shape[0], MLP_ROWS):
            out[a:a + MLP_ROWS] = self.c_proj(self.hidden(rows[a:a + MLP_ROWS]))
        return self.drop(out.view(x.shape[:-1] + (-1,)))  # (..., C)

    def hidden(self, x):
        """act(c_fc(x)), the activation fused into the matmul unless self.act was replaced."""
        if self.act is ACTIVATIONS[self.activation]:
            return self.c_fc(x, self.activation)
        return self.act(self.c_fc(x))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, at: At = NO_SITES, mix: Callable | None = None) -> torch.Tensor:
        x = at("resid_pre", x)
        a = at("attn_out", self.attn(self.ln_1(x), at, mix))
        x = at("resid_mid", x + a)
        m = at("mlp_out", self.mlp(self.ln_2(x)))
        return at("resid_post", x + m)


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Turns torch.nn.init's in-place initialisers into no-ops while a model is built, so modules get
    uninitialised (torch.empty) weights. Unlike building on the meta device, this never reaches torch's
    Python meta kernels, whose normal_ imports torch._dynamo (over a second of start-up)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", None) == "torch.nn.init" and func.__name__.endswith("_"):
            return args[0] if args else kwargs["tensor"]  # the tensor, untouched
        return func(*args, **(kwargs or {}))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # GPT-2 ties unembedding to embedding
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.name = "random"

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @contextlib.contextmanager
    def packed(self, reserve: int = 0):
        """Within this context the blocks' Linear layers keep their weights in oneDNN's layout once used
        (see Linear): a sweep, or a run of many, then reorders each weight once instead of on every call.
        The copy is as large as those weights; it is freed on leaving, and not made at all unless it
        fits in half of what is free after `reserve` bytes (the caller's own needs). Nests (the
        outermost context frees)."""
        linears = [m for m in self.transformer.h.modules() if isinstance(m, Linear)]
        outer = any(m.keep_packed for m in linears)
        size = sum(m.weight.numel() * m.weight.element_size() for m in linears)
        if not outer and 2 * size <= (free_memory() or 0) - reserve:
            for m in linears:
                m.keep_packed = True
        try:
            yield self
        finally:
            if not outer:
                for m in linears:
                    m.keep_packed = False
                    m.drop_packed()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                record: Recording | None = None, patch: Patch | Sequence[Patch] | None = None,
                last_only: bool = False):
        """idx (B, T) token ids -> (logits (B, T, vocab), loss or None).

        record: a Recording to fill (mingpt.sites); patch: a Patch, or a list applied together.
        last_only: compute logits at the last position only (B, 1, vocab); targets are then (B, 1).
        targets: next-token ids aligned with idx (targets[:, t] follows idx[:, t]); -1 is ignored.
        """
        self._check_ids(idx)
        T = idx.shape[1]
        pos = torch.arange(T, device=idx.device)
        at = views(self.config.n_layer, record, patch)  # this call's recording and patches, per block
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for l, block in enumerate(self.transformer.h):
            x = block(x, at[l])
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x[:, -1:] if last_only else x)  # (B, T or 1, vocab)
        if record is not None:
            record.last_logits = logits[:, -1].detach().clone()
        loss = None
        if targets is not None:  # targets (B, T), or (B, 1) for the last position with last_only
            if targets.shape != logits.shape[:2]:
                raise InputError(f"targets have shape {tuple(targets.shape)} but logits cover {tuple(logits.shape[:2])}.")
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    def damaged(self) -> str | None:
        """The name of the first parameter holding NaN or infinite values, or None. Run when outputs are
        not finite (checking every weight on each load would cost a pass over them all)."""
        for name, p in self.named_parameters():
            # a sum is non-finite if any term is (or, rarely, when finite terms overflow): confirm element-wise
            if not bool(torch.isfinite(p.detach().sum())) and not bool(torch.isfinite(p.detach()).all()):
                return name
        return None

    def _check_ids(self, idx: torch.Tensor):
        if idx.dim() != 2 or idx.dtype != torch.long:
            raise InputError(f"token ids must be a LongTensor of shape (batch, tokens), got {idx.dtype} {tuple(idx.shape)}.")
        T = idx.shape[1]
        if T == 0:
            raise InputError("the prompt is empty: give at least one token.")
        if T > self.config.block_size:
            raise InputError(f"the prompt has {T} tokens but this model's context holds {self.config.block_size}: shorten it.")
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise InputError(f"token id {lo if lo < 0 else hi} is outside this model's vocabulary of "
                             f"{self.config.vocab_size}: use ids from its tokenizer.")

    # ------------------------------------------------------------------------- many patches at once

    def forward_patched(self, base: Recording, layers: Sequence[int], positions: Sequence[int],
                        values: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Last-position logits of `token_ids` for the base run patched at every (layer, position) pair
        of block outputs: (len(layers), len(positions), K), equal to
        forward(idx, patch=Patch(l, p, values[i, j]))[0][0, -1, token_ids]. See mingpt.resume."""
        from mingpt.resume import forward_cells
        return forward_cells(self, base, "resid_post", [(l, None) for l in layers], list(positions), values, token_ids)

    # ------------------------------------------------------------------------- loading and saving

    @classmethod
    def from_pretrained(cls, name_or_dir: str, *, dtype: torch.dtype = torch.float32) -> "GPT":
        """Load GPT-2 weights from a Hub id (gpt2, gpt2-medium, ...), a demo name, or a local folder."""
        src = locate(name_or_dir)
        config_path = src.fetch("config.json")
        try:
            config = GPTConfig.from_hf(json.loads(config_path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ConfigError(f"{config_path} is not valid JSON: re-download or re-save the checkpoint.") from None
        weights = src.fetch("model.safetensors", "pytorch_model.bin")
        state = read_weights(weights)
        config.check_weights({k: v.shape for k, v in state.items()}, weights.name)  # before allocating a model
        with _SkipInit():  # no time on a random init that loading overwrites
            model = cls(config)
        model.load_hf_state_dict(state)  # fills every tensor, or raises naming the missing one
        model.name = str(name_or_dir)
        return model.to(dtype).eval()

    def load_hf_state_dict(self, hf_sd: dict[str, torch.Tensor]):
        """Copy a Hugging Face GPT-2 state dict in, checking every key and shape by name."""
        ours = self.state_dict()
        expected = {k for k in ours if k != "lm_head.weight"}  # tied to wte
        got = _hf_to_ours(hf_sd)
        if "lm_head.weight" in got:
            head = got.pop("lm_head.weight")
            wte = got.get("transformer.wte.weight")
            if wte is None or head.shape != wte.shape or not torch.equal(head, wte):
                raise WeightsError("lm_head.weight differs from the token embedding: untied GPT-2 heads are not supported.")
        missing, unexpected = sorted(expected - got.keys()), sorted(got.keys() - expected)
        if missing:
            raise WeightsError(f"the checkpoint lacks tensor {missing[0]}"
                               f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}: it does not match config.json.")
        if unexpected:
            raise WeightsError(f"the checkpoint has unexpected tensor {unexpected[0]}"
                               f"{f' and {len(unexpected) - 1} more' if len(unexpected) > 1 else ''}: it does not match config.json.")
        for k in sorted(expected):
            if got[k].shape != ours[k].shape:
                raise WeightsError(f"tensor {k} has shape {_to_hf_shape(k, got[k].shape)} in the checkpoint but "
                                   f"config.json needs {_to_hf_shape(k, ours[k].shape)}.")
        # copies (and the first reads of a memory-mapped file) release the GIL: run them on torch's threads,
        # largest first
        from concurrent.futures import ThreadPoolExecutor
        with torch.no_grad(), ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
            list(pool.map(lambda k: ours[k].copy_(got[k]), sorted(expected, key=lambda k: -got[k].numel())))

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Our weights under Hugging Face names and layouts (what save_pretrained writes)."""
        sd = {k: v for k, v in self.state_dict().items() if k != "lm_head.weight"}
        return _ours_to_hf(sd)

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype = torch.float32):
        """Write config.json + model.safetensors in Hub layout (readable by GPT2LMHeadModel too)."""
        from safetensors.torch import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.hf_state_dict().items()}
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(self.config.to_hf(), indent=2) + "\n")

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 do_sample: bool = False, top_k: int | None = None) -> torch.Tensor:
        """Append max_new_tokens tokens to idx (B, T), greedily or by sampling, cropping to the context."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size:], last_only=True)
            logits = logits[:, -1] / temperature  # (B, vocab)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs, 1) if do_sample else probs.argmax(-1, keepdim=True)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


# ----------------------------------------------------------------------------- checkpoint files

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # stored (in, out)
BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in older checkpoints, not weights


def _hf_to_ours(hf_sd: dict) -> dict:
    out = {}
    for k, v in hf_sd.items():
        if k.endswith(BUFFERS):
            continue
        if not k.startswith(("transformer.", "lm_head.")):
            k = "transformer." + k  # GPT2Model checkpoints (the Hub's gpt2) have no prefix
        out[k] = v.t() if k.endswith(CONV1D) else v
    return out


def _ours_to_hf(sd: dict) -> dict:
    return {k: (v.t() if k.endswith(CONV1D) else v) for k, v in sd.items()}


def _to_hf_shape(k: str, shape) -> tuple:
    return tuple(reversed(shape)) if k.endswith(CONV1D) else tuple(shape)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Read safetensors, or a .bin through torch.load(weights_only=True): never run pickled code."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            with warnings.catch_warnings():  # legacy-format notices would break the one-line error contract
                warnings.simplefilter("ignore")
                sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise WeightsError(f"{path} holds Python objects besides tensors and was not loaded (it could run code): "
                               f"use a safetensors checkpoint or one saved with plain tensors.") from None
        raise WeightsError(f"{path} is truncated or corrupt: delete it and download or save it again.") from None
    except Exception as exc:  # safetensors and zip readers raise their own types for damaged files
        raise WeightsError(f"{path} is truncated or corrupt ({exc.__class__.__name__}): "
                           f"delete it and download or save it again.") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors: save the model's state_dict().")
    return sd  # (non-finite values are looked for only when a run's outputs are not finite: GPT.damaged)
