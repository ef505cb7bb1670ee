"""TransformerLens activation-patching baseline (optional dependency).

Builds a ``HookedTransformer`` offline from an in-memory
``transformers.GPT2LMHeadModel`` (config written by hand, weights converted with
TL's ``convert_gpt2_weights``; no LayerNorm folding or weight centering, so the
residual stream is numerically the same as HF's) and runs TL's own patching
sweep over (layer, position).

Row correspondence of the returned matrix M (shape ``(n_layers, T)``):
``M[l, p]`` is the metric after patching the OUTPUT of block ``l`` at position
``p`` with its clean value, i.e. TL hook ``blocks.{l}.hook_resid_post``.
For ``l < n_layers - 1`` that equals TL's ``resid_pre`` of layer ``l + 1``
(``get_act_patch_resid_pre(...)[l + 1]``); TL has no ``get_act_patch_resid_post``,
so we call TL's ``generic_activation_patch`` with ``activation_name="resid_post"``
and the same patch setter as ``get_act_patch_resid_pre``: one sweep of exactly
``n_layers * T`` patched forwards.

Metric: ``logit(foil) - logit(target)`` at the last position. Requires
TransformerLens 2.x/3.x (``HookedTransformer`` was removed in 4.0); tested with
transformer-lens 3.9.0, torch 2.13.0, transformers 5.24.0.
"""

from __future__ import annotations

import time

import numpy as np
import torch


def tl_available() -> bool:
    """True if a TransformerLens with ``HookedTransformer`` can be imported."""
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
        from transformer_lens.patching import generic_activation_patch  # noqa: F401
    except Exception:
        return False
    return True


def hooked_from_hf(hf_model):
    """HookedTransformer with the same weights as a GPT2LMHeadModel (fp32, eval)."""
    import warnings

    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    c = hf_model.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions,
        d_head=c.n_embd // c.n_head, n_heads=c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size,
        act_fn="gelu_new", normalization_type="LN", eps=c.layer_norm_epsilon,
        positional_embedding_type="standard", original_architecture="GPT2LMHeadModel",
        init_weights=False, device="cpu", dtype=torch.float32,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg)
    sd = {k: v.detach().float().clone() for k, v in convert_gpt2_weights(hf_model, cfg).items()}
    model.load_and_process_state_dict(
        sd, fold_ln=False, center_writing_weights=False,
        center_unembed=False, fold_value_biases=False,
    )
    return model.eval()


def tl_resid_sweep(hf_model, clean_ids, corrupt_ids, target_id: int, foil_id: int):
    """Return (M, seconds): M[l, p] = metric with block l's output patched at p.

    ``seconds`` is the wall time of the TL sweep call alone (no conversion, no
    clean-cache run).
    """
    from transformer_lens.patching import generic_activation_patch, layer_pos_patch_setter

    model = hooked_from_hf(hf_model)

    def metric(logits):
        return logits[0, -1, foil_id] - logits[0, -1, target_id]

    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean_ids, names_filter=lambda n: n.endswith("hook_resid_post"))
        t0 = time.perf_counter()
        out = generic_activation_patch(
            model, corrupt_ids, clean_cache, metric,
            patch_setter=layer_pos_patch_setter, activation_name="resid_post",
            index_axis_names=("layer", "pos"),
        )
        seconds = time.perf_counter() - t0
    return out.detach().cpu().numpy().astype(np.float64), seconds
