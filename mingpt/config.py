"""GPT-2's hyper-parameters: GPTConfig, checked when made, and the presets of the four released sizes.

Reading and writing Hugging Face's config.json is checkpoint I/O (mingpt.checkpoint).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from mingpt.errors import ConfigError, quote
from mingpt.linear import ACTIVATIONS

PRESETS = {  # name: (n_layer, n_head, n_embd); all share GPT-2's 50257 tokens and 1024 positions
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
}


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

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}.")
        n_layer, n_head, n_embd = PRESETS[name]
        return cls(n_layer=n_layer, n_head=n_head, n_embd=n_embd, **overrides)
