"""The model's matrix products: nn.Linear computed by oneDNN on the CPU, with its weights kept packed.

Without gradients, in float32 on an x86 CPU (and in bfloat16 on one that multiplies it natively: AMX or
AVX512-BF16), `dense` computes act(x @ W.T + b) with oneDNN's matmul
with the bias and the activation fused into it (the kernel torch's own inductor uses for CPU linears),
10-20% faster than BLAS followed by a separate activation pass; elsewhere it is F.linear. The two
differ only in float32 rounding. On a CPU without AVX-512, GPT-2's GELU (tanh) is torch's own, after
the product: there oneDNN's fused one is the slower (7-8 % of a c_fc call on a Zen 1 EPYC).

Given a plain weight, oneDNN reorders it into its blocked layout on every call, which costs as much as
the product itself for a few dozen rows. Inside `packed(modules)` (GPT.packed) each `Linear` keeps
that layout once made, and makes it again if the weight changes (its version counter moves or another
tensor takes its place). One row is never packed: oneDNN's matrix-vector path rounds differently with
a packed weight, so packing never changes a result.
"""
from __future__ import annotations

import contextlib
from functools import lru_cache, partial
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

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


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (x86 Linux), or None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return None


def cpu_bf16() -> str | None:
    """The CPU's native bfloat16 matmul ("AMX" or "AVX512-BF16", from its flags), or None where it has
    none (oneDNN would then emulate bfloat16, slower than float32) or we cannot tell."""
    flags = cpu_flags() or frozenset()
    return "AMX" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None


@lru_cache(maxsize=1)
def fuse_gelu() -> bool:
    """Whether oneDNN computes a GELU (tanh) inside the product: yes with AVX-512; on an AVX2-only CPU
    torch's GELU after it is faster (measured on a Zen 1 EPYC at 16 to 2,000 rows of GPT-2's c_fc)."""
    flags = cpu_flags()
    return flags is None or "avx512f" in flags


def onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `dense` computes x @ weight.T with oneDNN: no gradients, on the CPU, in float32, or in
    bfloat16 where the CPU multiplies it natively."""
    if _LINEAR_POINTWISE is None or torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != weight.dtype:
        return False
    return torch.backends.mkldnn.enabled and (x.dtype == torch.float32 or
                                              (x.dtype == torch.bfloat16 and cpu_bf16() is not None))


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str | None = None,
          packed: torch.Tensor | None = None) -> torch.Tensor:
    """act(x @ weight.T + bias), act one of ACTIVATIONS or None: oneDNN in one pass where `onednn` says
    so (from `packed`, the same weight in oneDNN's layout, given only where `onednn` holds), else F.linear."""
    if packed is not None or onednn(x, weight):  # a packed weight was made for oneDNN: checked then
        w = weight if packed is None else packed
        if act and FUSED[act][1] == "tanh" and not fuse_gelu():
            return ACTIVATIONS[act](_LINEAR_POINTWISE(x, w, bias, "none", [], ""))
        attr, algorithm = FUSED[act] if act else ("none", "")
        return _LINEAR_POINTWISE(x, w, bias, attr, [], algorithm)
    y = F.linear(x, weight, bias)
    return ACTIVATIONS[act](y) if act else y


def free_memory() -> int | None:
    """Bytes of memory available to this process on the CPU (Linux), or None where we cannot tell."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


_ALL = slice(None)


class Linear(nn.Linear):
    """nn.Linear (same parameters and names) computed by `dense`, optionally with an activation and
    for some output features only (`rows`, a slice of the weight's rows). Weights edited through
    `.data` inside `packed()` are not seen (edit them outside the context)."""

    keep_packed = False  # set per module by packed()

    def forward(self, x: torch.Tensor, act: str | None = None, rows: slice = slice(None)) -> torch.Tensor:
        w, b = self.weight, self.bias
        if rows != _ALL:  # some output features only
            w, b = w[rows], None if b is None else b[rows]
        # one row takes oneDNN's matrix-vector path, which rounds differently with a packed weight: plain
        # then, so that packing never changes a result (with more rows the two agree to the bit)
        pack = self.keep_packed and _REORDER is not None and x.numel() > x.shape[-1] and onednn(x, w)
        return dense(x, w, b, act, self._packed(w, rows) if pack else None)

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


@contextlib.contextmanager
def packed(modules: Iterable[nn.Module], reserve: int = 0):
    """Within this context the Linear layers among `modules` keep their weights in oneDNN's layout once
    used. The copy is as large as those weights; it is freed on leaving, and not made at all unless it
    fits in half of what is free after `reserve` bytes (the caller's own needs). Nests (the outermost
    context frees)."""
    linears = [m for m in modules if isinstance(m, Linear)]
    outer = any(m.keep_packed for m in linears)
    size = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    if not outer and 2 * size <= (free_memory() or 0) - reserve:
        for m in linears:
            m.keep_packed = True
    try:
        yield
    finally:
        if not outer:
            for m in linears:
                m.keep_packed = False
                m.drop_packed()
