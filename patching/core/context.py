"""Loading a model once: which model, on which device, in which dtype (`ModelSpec`), and what a run
gets (`Context`: the model, its tokenizer, the device).

    ctx = load(ModelSpec(model="demo-names"))          # or load("demo-names")
    ctx.model, ctx.tok, ctx.device

Every analysis runs on a Context; a batch or study loads each ModelSpec once for all its runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mingpt.bpe import BPETokenizer
from mingpt.errors import quote
from mingpt.linear import cpu_bf16, free_memory
from mingpt.model import GPT
from patching.core.errors import PatchingError
from patching.core.options import Options, option

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda", "mps")


@dataclass(frozen=True)
class ModelSpec(Options):
    """What to load: every command's --model, --device and --dtype (a batch's or study's defaults)."""

    model: str = option("gpt2", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, demo-names, demo-induction, demo-ioi, "
                        "a Hub id or a local folder [gpt2]")
    device: str = option("auto", help="[auto]", choices=DEVICES)
    dtype: str = option("float32", help="bfloat16: GPUs and CPUs with AMX or AVX512-BF16; float16: GPUs [float32]",
                        choices=tuple(DTYPES))

    def validate(self):
        if not isinstance(self.model, str) or not self.model.strip():
            raise PatchingError(f"model must be a name or folder, got {quote(self.model)}.")


@dataclass
class Context:
    """A loaded model: what every analysis runs on."""

    model: GPT
    tok: BPETokenizer
    spec: ModelSpec

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def name(self) -> str:
        return getattr(self.model, "name", self.spec.model)

    @property
    def config(self):
        return self.model.config


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PatchingError("--device cuda was asked for but no CUDA GPU is visible to torch: use --device cpu.")
    if name == "mps" and not torch.backends.mps.is_available():
        raise PatchingError("--device mps was asked for but MPS is not available here: use --device cpu.")
    return torch.device(name)


def load(spec: ModelSpec | str) -> Context:
    """Load the model (weights + vocabulary) once, on the requested device and dtype."""
    spec = ModelSpec(model=spec) if isinstance(spec, str) else spec
    if not isinstance(spec, ModelSpec):
        raise PatchingError(f"load() takes a model name or a ModelSpec, got {type(spec).__name__}.")
    spec.verify()
    device = resolve_device(spec.device)
    if spec.dtype == "float16" and device.type == "cpu":
        raise PatchingError("--dtype float16 is for GPUs; on the CPU use float32 (or bfloat16 where the CPU has AMX "
                            "or AVX512-BF16).")
    if spec.dtype == "bfloat16" and device.type == "cpu" and cpu_bf16() is None:
        raise PatchingError("--dtype bfloat16 on the CPU needs native bfloat16 matrix products (AMX or AVX512-BF16), "
                            "which this CPU lacks (it would run slower than float32): use float32.")
    model = GPT.from_pretrained(spec.model)
    tok = BPETokenizer(spec.model)
    return Context(model.to(device=device, dtype=DTYPES[spec.dtype]), tok, spec)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a sweep on this device, or None where we cannot tell."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return free_memory()
