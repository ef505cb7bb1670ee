"""Checkpoint files in Hugging Face's GPT-2 layout: config.json, model.safetensors or pytorch_model.bin.

Parameter names follow OpenAI/Hugging Face (`transformer.wte`, `transformer.h.{i}.attn.c_attn`,
`transformer.ln_f`, ...), so loading is a name-aligned copy; HF stores the four Conv1D weights as
(in, out), which we transpose once here (`_hf_to_ours`, `_ours_to_hf`). Weights are read without
running code: safetensors, or a .bin through torch.load(weights_only=True). What config.json claims
is checked against the weights file before any model is allocated, and every tensor by name and
shape when it is copied in.
"""
from __future__ import annotations

import json
import math
import pickle
import warnings
from pathlib import Path

import torch

from mingpt.bpe import BOS
from mingpt.config import GPTConfig
from mingpt.errors import ConfigError, WeightsError
from mingpt.hub import locate

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # stored (in, out)
BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in older checkpoints, not weights


def read(name_or_dir: str) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """The config and the state dict (HF names) of a Hub id, a demo name or a local folder, checked
    against each other before any model is built."""
    src = locate(name_or_dir)
    config_path = src.fetch("config.json")
    try:
        config = config_from_hf(json.loads(config_path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{config_path} is not valid JSON: re-download or re-save the checkpoint.") from None
    weights = src.fetch("model.safetensors", "pytorch_model.bin")
    state = read_weights(weights)
    check_sizes(config, {k: v.shape for k, v in state.items()}, weights.name)
    return config, state


def config_from_hf(hf: dict) -> GPTConfig:
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
        return GPTConfig(n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                         vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_inner=hf.get("n_inner"),
                         activation=hf.get("activation_function", "gelu_new"),
                         layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))
    except KeyError as missing:
        raise ConfigError(f"config.json lacks {missing}: it is not a GPT-2 config.") from None
    except TypeError as exc:  # e.g. a list where a number belongs, compared inside __post_init__
        raise ConfigError(f"config.json holds a value of the wrong type ({str(exc)[:80]}): it is not a GPT-2 config.") from None


def config_to_hf(config: GPTConfig) -> dict:
    """The config.json that transformers' GPT2LMHeadModel reads back into this same network."""
    c = config
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": c.n_layer,
            "n_head": c.n_head, "n_embd": c.n_embd, "vocab_size": c.vocab_size,
            "n_positions": c.block_size, "n_ctx": c.block_size, "n_inner": c.n_inner,
            "activation_function": c.activation, "layer_norm_epsilon": c.layer_norm_epsilon,
            "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": c.dropout,
            "bos_token_id": BOS, "eos_token_id": BOS, "tie_word_embeddings": True}


def check_sizes(config: GPTConfig, shapes: dict[str, tuple], where: str):
    """Compare what config.json claims with the tensors of the weights file, before any model is
    built: a config saying n_layer 1000000 (or a huge vocab_size, n_positions or n_inner) must fail
    at once, not after minutes of allocating. load_state later checks every tensor by name."""
    shapes = {k.removeprefix("transformer."): tuple(v) for k, v in shapes.items()}
    blocks = {int(k.split(".")[1]) for k in shapes if k.startswith("h.") and k.split(".")[1].isdigit()}
    found = {"n_layer": max(blocks) + 1 if blocks else 0}
    if len(shapes.get("wte.weight", ())) == 2:
        found["vocab_size"] = shapes["wte.weight"][0]
    if len(shapes.get("wpe.weight", ())) == 2:
        found["block_size"] = shapes["wpe.weight"][0]
    for name, n in found.items():
        if getattr(config, name) > n:  # fewer than claimed: building the model would allocate for nothing
            hf = {"block_size": "n_positions"}.get(name, name)
            raise WeightsError(f"config.json says {hf} {getattr(config, name)} but {where} holds {n}: the config "
                               f"does not belong to these weights; use the checkpoint's own config.json.")
    held = sum(math.prod(s) for k, s in shapes.items() if k != "lm_head.weight")
    if config.n_params() > 4 * held:  # widths (n_embd, n_inner) far beyond the file
        raise WeightsError(f"config.json describes {config.n_params():,} parameters but {where} holds {held:,}: the "
                           f"config does not belong to these weights; use the checkpoint's own config.json.")


def load_state(model: torch.nn.Module, hf_sd: dict[str, torch.Tensor]):
    """Copy a Hugging Face GPT-2 state dict into `model`, checking every key and shape by name."""
    ours = model.state_dict()
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


def hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under Hugging Face names and layouts (what save writes)."""
    return _ours_to_hf({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"})


def save(model: torch.nn.Module, folder: str | Path, dtype: torch.dtype = torch.float32):
    """Write config.json + model.safetensors in Hub layout (readable by GPT2LMHeadModel too)."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in hf_state_dict(model).items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2) + "\n")


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
