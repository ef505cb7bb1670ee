"""GPT-2 (small to xl) written from scratch, with a record/patch seam for activation patching.

The network is OpenAI's GPT-2: token + position embeddings, n_layer pre-LayerNorm blocks (causal
self-attention, then a 4x MLP with the tanh GELU, each added back to the residual stream), a final
LayerNorm and an unembedding tied to the token embedding. Parameter names follow OpenAI/Hugging Face
(`transformer.wte`, `transformer.h.{i}.attn.c_attn`, `transformer.ln_f`, ...), so a checkpoint loads
by name (mingpt.checkpoint); the matrix products are mingpt.linear's.

Activation patching needs two things from forward(), and nothing else of the model's inside
(mingpt.sites): every block visits each named site once (`x = at("attn_out", x)`, names as in
TransformerLens), and `at` belongs to one call:
- `record=Recording(sites=...)` keeps detached copies of those sites at every block and position
  (block outputs by default; `Recording(kv=True)` adds keys and values), plus the last logits.
- `patch=Patch(layer, pos, value, site=..., head=...)`, or a list of edits, replaces a site's value
  at one position (or every position) of one block, for one head or all of them.

`forward_patched` (mingpt.resume) is the same patch, many at once and exactly: a patch in block l at
position p cannot change earlier blocks or positions, so it resumes inside block l from the
recording, recomputes positions >= p only, and unembeds selected columns. It runs the same blocks:
`Block.rest` (both residual lines after attention) is the one tail of a block for both.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mingpt import checkpoint
from mingpt.config import GPTConfig  # noqa: F401  (re-exported: GPT's own config)
from mingpt.errors import InputError
from mingpt.linear import ACTIVATIONS, Linear, dense, packed  # noqa: F401  (dense: re-exported)
from mingpt.resume import forward_cells
from mingpt.sites import NO_SITES, At, Edit, Patch, Recording, views  # noqa: F401  (Patch, Recording: re-exported)

# ----------------------------------------------------------------------------- the network


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, at: At = NO_SITES, attention: Callable | None = None) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        return self.project(self.mix(x, at, attention))

    def mix(self, x: torch.Tensor, at: At = NO_SITES, attention: Callable | None = None) -> torch.Tensor:
        """Every head's mix of values z, heads side by side before c_proj: (B, T, C) -> (B, T, C).
        `attention` replaces causal attention over the rows (mingpt.resume's row groups)."""
        q, k, v = (at(name, t) for name, t in zip("qkv", self.heads(self.c_attn(x))))  # (B, nh, T, hs) each
        z = at("z", (attention or self.causal)(q, k, v, at))  # (B, nh, T, hs)
        return z.transpose(1, 2).flatten(-2)  # (B, T, C)

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """The heads' z through c_proj: (B, T, C) -> (B, T, C)."""
        return self.resid_drop(self.c_proj(z))

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
HALF_MLP_ROWS = 4096  # in bfloat16 (AMX) c_proj runs far below its speed at 1,024 rows: slices 4x longer


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.n_inner)
        self.c_proj = Linear(config.n_inner, config.n_embd)
        self.act, self.activation = ACTIVATIONS[config.activation], config.activation
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, at: At = NO_SITES):
        rows = x.flatten(0, -2)  # (N, C)
        step = MLP_ROWS if x.dtype == torch.float32 else HALF_MLP_ROWS
        if torch.is_grad_enabled() or rows.shape[0] <= step or at.wants("mlp_post"):
            # whole when the hidden activation is recorded or edited: the site is (..., T, n_inner)
            return self.drop(self.c_proj(at("mlp_post", self.hidden(x))))
        # many rows (mingpt.resume's batches): a slice at a time, so that the 4x wider hidden activation
        # is still in cache when c_proj reads it
        out = rows.new_empty(rows.shape[0], self.c_proj.out_features)  # (N, C)
        for a in range(0, rows.shape[0], step):
            out[a:a + step] = self.c_proj(self.hidden(rows[a:a + step]))
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

    def forward(self, x: torch.Tensor, at: At = NO_SITES, attention: Callable | None = None) -> torch.Tensor:
        x = at("resid_pre", x)
        return self.rest(x, self.attn.mix(self.ln_1(x), at, attention), at)

    def rest(self, x: torch.Tensor, z: torch.Tensor, at: At = NO_SITES, room: int = 0) -> torch.Tensor:
        """The block after the heads' mix z (B, T, C): both residual lines, x + attention, + MLP. Without
        gradients each sum is made in place in the fresh sublayer output; `room` slabs more are left
        unwritten at the end of the output (mingpt.resume writes the next block's new slabs there)."""
        fresh = not torch.is_grad_enabled()  # large fresh buffers cost page faults; in place when autograd allows
        own = self.attn.project(z)
        a = at("attn_out", own)
        x = at("resid_mid", _plus(a, x, fresh and a is own))
        own = self.mlp(self.ln_2(x), at)
        m = at("mlp_out", own)
        if not room:
            return at("resid_post", _plus(m, x, fresh and m is own))
        assert fresh and not at.wants("resid_post"), "room is for mingpt.resume's unrecorded, unpatched sums"
        out = x.new_empty(len(x) + room, *x.shape[1:])  # (B + room, T, C)
        torch.add(m, x, out=out[:len(x)])
        return out


def _plus(out: torch.Tensor, x: torch.Tensor, mine: bool) -> torch.Tensor:
    """x + out, summed into out when it is a sublayer's own fresh output (never into a tensor an edit
    returned, which it may keep) and the sum keeps out's dtype and shape (not under autocast)."""
    if mine and out.dtype == torch.result_type(out, x) and out.shape == x.shape:
        return out.add_(x)
    return x + out


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
        (mingpt.linear): a sweep, or a run of many, then reorders each weight once instead of on every
        call. Skipped unless the copy fits in half of what is free after `reserve` bytes; nests."""
        with packed(self.transformer.h.modules(), reserve):
            yield self

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                record: Recording | None = None, patch: Edit | Sequence[Edit] | None = None,
                last_only: bool = False):
        """idx (B, T) token ids -> (logits (B, T, vocab), loss or None).

        record: a Recording to fill (mingpt.sites); patch: an Edit (a Patch, ...), or a list applied together.
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
        return forward_cells(self, base, "resid_post", [(l, None) for l in layers], list(positions), values, token_ids)

    # ------------------------------------------------------------------------- loading and saving

    @classmethod
    def from_pretrained(cls, name_or_dir: str, *, dtype: torch.dtype = torch.float32) -> "GPT":
        """Load GPT-2 weights from a Hub id (gpt2, gpt2-medium, ...), a demo name, or a local folder."""
        config, state = checkpoint.read(name_or_dir)  # config.json and the weights, checked against each other
        with _SkipInit():  # no time on a random init that loading overwrites
            model = cls(config)
        model.load_hf_state_dict(state)  # fills every tensor, or raises naming the missing one
        model.name = str(name_or_dir)
        return model.to(dtype).eval()

    def load_hf_state_dict(self, hf_sd: dict[str, torch.Tensor]):
        """Copy a Hugging Face GPT-2 state dict in, checking every key and shape by name."""
        checkpoint.load_state(self, hf_sd)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Our weights under Hugging Face names and layouts (what save_pretrained writes)."""
        return checkpoint.hf_state_dict(self)

    def save_pretrained(self, folder: str | Path, dtype: torch.dtype = torch.float32):
        """Write config.json + model.safetensors in Hub layout (readable by GPT2LMHeadModel too)."""
        checkpoint.save(self, folder, dtype)

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
