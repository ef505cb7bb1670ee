"""TransformerLens's own patching sweeps, for scripts/bench.py; run in a venv that has TransformerLens.

    /path/to/tl-venv/bin/python scripts/tl_baseline.py REQUEST.json RESULT.json

patch-run's venv stays free of TransformerLens: bench.py writes a request, runs this file with
another venv's python (`--tl-python`), and reads the result. Nothing here imports patch-run.

REQUEST: {"checkpoint": a folder in Hugging Face layout, "target": id, "foil": id, "device": "cpu" (default)
          or "cuda", "jobs": [{"sweep": "resid_pre", "clean": [ids], "corrupt": [ids],
          "dtype": "float32" (default) or "bfloat16", "budget": seconds (optional)}, ...]}
RESULT:  {"transformer_lens": version, "torch": version, "model": how it was built,
          "jobs": [{"sweep": ..., "seconds": the sweep call alone, "matrix": [[...], ...]}, ...]}

A resid_post or z job with a budget whose whole sweep would take longer (timed on a sample of its patched forwards,
which all cost the same: each runs the whole model) is not run whole: TL's own
`generic_activation_patch` runs a random sample of its cells (`index_df`), and the result has
"seconds" projected to every cell, "projected": true, and "cells"/"values" (patch-run's axis order)
instead of "matrix".

The model is built from the same checkpoint patch-run loads, with no weight processing (no LayerNorm
folding or centering), so its residual stream is numerically GPT-2's:
- TransformerLens >= 4: `TransformerBridge.boot_transformers(folder)` (raw Hugging Face weights);
- TransformerLens 2.x/3.x: a `HookedTransformer` configured by hand, weights converted with TL's
  `convert_gpt2_weights` (`HookedTransformer` was removed in 4.0).

Sweeps (metric logit(foil) - logit(target) at the last position; a new one is one more SWEEPS entry):
- "resid_pre": `transformer_lens.patching.get_act_patch_resid_pre`, one patched forward per
  (layer, position). Row l patches the input of block l, i.e. the output of block l-1: TL's rows
  1..L-1 are patch-run's rows 0..L-2 (its row 0, the embeddings, has no patch-run counterpart).
- "resid_post": `generic_activation_patch` with TL's `layer_pos_patch_setter` at `resid_post` (row l is
  block l's output, as patch-run's).
- "z": `get_act_patch_attn_head_out_by_pos`, one patched forward per (layer, head, position),
  returned in patch-run's axis order (layer, head, position) to compare with `--site z`.
- "edges" (TransformerLens >= 4.3): `tools.analysis.attribution_patching.attribution_patch` at edge
  granularity (its EAP, one score per edge and position, summed over positions here under patch-run's
  edge names) and its `faithfulness` of the circuit the job names (each edge at every position).
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from importlib.metadata import version

import torch


def tl_major() -> int:
    return int(version("transformer-lens").split(".")[0])


def load_model(folder: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, description) for the checkpoint folder, with unprocessed weights, eval mode."""
    if tl_major() >= 4:
        from transformer_lens.model_bridge import TransformerBridge
        model = TransformerBridge.boot_transformers(folder, device=device, dtype=dtype)
        return model.eval(), "TransformerBridge.boot_transformers (raw weights)"
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    model = hooked_from_hf(hf).to(device, print_details=False).to(dtype, print_details=False)  # one at a time in 3.x
    return model, "HookedTransformer (convert_gpt2_weights, no processing)"


def hooked_from_hf(hf_model):
    """HookedTransformer (TransformerLens 2.x/3.x) with the same weights as a GPT2LMHeadModel."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    c = hf_model.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, d_head=c.n_embd // c.n_head,
        n_heads=c.n_head, d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, act_fn="gelu_new",
        normalization_type="LN", eps=c.layer_norm_epsilon, positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel", init_weights=False, device="cpu", dtype=torch.float32,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg)
    sd = {k: v.detach().float().clone() for k, v in convert_gpt2_weights(hf_model, cfg).items()}
    model.load_and_process_state_dict(sd, fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    return model.eval()


def resid_pre(model, clean: torch.Tensor, corrupt: torch.Tensor, metric) -> tuple[torch.Tensor, float]:
    """TL's resid_pre sweep: (n_layers, T) matrix and the seconds of the sweep call alone."""
    from transformer_lens.patching import get_act_patch_resid_pre
    _, cache = model.run_with_cache(clean, names_filter=lambda name: name.endswith("hook_resid_pre"))
    t0 = time.perf_counter()
    out = get_act_patch_resid_pre(model, corrupt, cache, metric)
    return out, time.perf_counter() - t0


def z(model, clean: torch.Tensor, corrupt: torch.Tensor, metric) -> tuple[torch.Tensor, float]:
    """TL's head sweep: `get_act_patch_attn_head_out_by_pos` patches each head's z at each position.
    TL returns (layer, position, head); transposed here to patch-run's (layer, head, position)."""
    from transformer_lens.patching import get_act_patch_attn_head_out_by_pos
    _, cache = model.run_with_cache(clean, names_filter=lambda name: name.endswith("hook_z"))
    t0 = time.perf_counter()
    out = get_act_patch_attn_head_out_by_pos(model, corrupt, cache, metric)
    return out.transpose(1, 2), time.perf_counter() - t0


def generic(model, clean: torch.Tensor, corrupt: torch.Tensor, metric, site: str, budget: float | None) -> dict:
    """TL's generic_activation_patch at `site` ("resid_post": (layer, pos); "z": (layer, pos, head)) over
    every cell, or, when that would outlast `budget` seconds, over a random sample of them (module
    docstring). Cells and matrices in patch-run's axis order (layer, [head,] position)."""
    import numpy as np
    from transformer_lens import patching as tp
    axes = ("layer", "pos") if site == "resid_post" else ("layer", "pos", "head")
    setter = tp.layer_pos_patch_setter if site == "resid_post" else tp.layer_pos_head_vector_patch_setter
    _, cache = model.run_with_cache(clean, names_filter=lambda name: name.endswith(f"hook_{site}"))
    sizes = {"layer": model.cfg.n_layers, "pos": clean.shape[1], "head": model.cfg.n_heads}
    every = tp.make_df_from_ranges([sizes[a] for a in axes], list(axes))

    def patch(index_df) -> tuple[torch.Tensor, float]:
        sync()
        t0 = time.perf_counter()
        out = tp.generic_activation_patch(model, corrupt, cache, metric, setter, site, index_df=index_df)
        out = out.detach().float().cpu()  # waits for the device
        return out, time.perf_counter() - t0

    sample = every.sample(n=min(len(every), 24), random_state=0).reset_index(drop=True)
    patch(sample.iloc[:2])  # warm-up: the first forwards of a model pay one-time costs
    values, s = patch(sample)
    per_cell = s / len(sample)
    if budget is None or per_cell * len(every) <= budget:
        full, s = patch(every)
        matrix = full.view(*[sizes[a] for a in axes])
        if site == "z":
            matrix = matrix.permute(0, 2, 1)  # (layer, pos, head) -> (layer, head, pos)
        return {"seconds": s, "projected": False, "matrix": matrix.double().tolist()}
    cells = sample[list(axes)].to_numpy()
    if site == "z":
        cells = cells[:, [0, 2, 1]]
    return {"seconds": per_cell * len(every), "projected": True, "sampled": len(sample),
            "cells": np.asarray(cells).tolist(), "values": values.double().tolist()}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def tl_node(name: str, position: int, n_layers: int, reader: bool):
    """One of patch-run's node names (MIB's) as TransformerLens 4's attribution-patching Node."""
    from transformer_lens.tools.analysis.attribution_patching import Node
    if name == "input":
        return Node(kind="embed", position=position)
    if name == "logits":
        return Node(kind="logits", layer=n_layers - 1, position=position)
    if name.startswith("m"):
        return Node(kind="mlp_in" if reader else "mlp_out", layer=int(name[1:]), position=position)
    head, _, inp = name.partition("<")
    layer, h = (int(x) for x in head[1:].split(".h"))
    kind = f"{inp[0]}_input" if inp else "attn_head_out"
    return Node(kind=kind, layer=layer, head=h, position=position)


def our_name(node) -> str:
    """A TransformerLens Node as patch-run's (MIB's) name, positions dropped."""
    if node.kind == "embed":
        return "input"
    if node.kind == "logits":
        return "logits"
    if node.kind in ("mlp_out", "mlp_in"):
        return f"m{node.layer}"
    if node.kind == "attn_head_out":
        return f"a{node.layer}.h{node.head}"
    return f"a{node.layer}.h{node.head}<{node.kind[0]}>"


def edges(model, clean: torch.Tensor, corrupt: torch.Tensor, metric, job: dict) -> dict:
    """TL 4's edge attribution patching (EAP, per position, summed here over positions) and its
    ablate-outside faithfulness of the circuit given by name (every position of each edge)."""
    from transformer_lens.tools.analysis import attribution_patching as ap
    t0 = time.perf_counter()
    with torch.enable_grad():
        res = ap.attribution_patch(model, clean, corrupt, metric, ap.EdgeAttributionConfig(granularity="edge"))
    seconds = time.perf_counter() - t0
    scores: dict[str, float] = {}
    for (w, r), v in res.edge_scores.items():
        key = f"{our_name(w)}->{our_name(r)}"
        scores[key] = scores.get(key, 0.0) + float(v)
    L, T = int(model.cfg.n_layers), clean.shape[1]
    circuit = [(tl_node(e.split("->")[0], p, L, False), tl_node(e.split("->")[1], p, L, True))
               for e in job.get("circuit", []) for p in range(T)]
    t1 = time.perf_counter()
    faith = ap.faithfulness(model, clean, corrupt, metric, circuit)
    return {"seconds": seconds, "edge_scores": scores, "n_edges_per_position": len(res.edge_scores),
            "faithfulness_seconds": time.perf_counter() - t1, "faithfulness": float(faith.recovered)}


SWEEPS = {"resid_pre": resid_pre, "z": z}


def main(request_path: str, result_path: str):
    req = json.loads(open(request_path).read())
    device = req.get("device", "cpu")
    target, foil = req["target"], req["foil"]
    models: dict[str, tuple] = {}

    def metric(logits):
        return logits[0, -1, foil] - logits[0, -1, target]

    jobs = []
    with torch.no_grad():
        for job in req["jobs"]:
            dtype = job.get("dtype", "float32")
            if dtype not in models:  # one model per precision, the last one freed first
                models.clear()
                models[dtype] = load_model(req["checkpoint"], device, getattr(torch, dtype))
            model, how = models[dtype]
            clean, corrupt = torch.tensor([job["clean"]], device=device), torch.tensor([job["corrupt"]], device=device)
            if job["sweep"] == "resid_post" or (job["sweep"] == "z" and "budget" in job):
                jobs.append({"sweep": job["sweep"], "dtype": dtype,
                             **generic(model, clean, corrupt, metric, job["sweep"], job.get("budget"))})
                continue
            if job["sweep"] == "edges":
                jobs.append({"sweep": "edges", **edges(model, clean, corrupt, metric, job)})
                continue
            matrix, seconds = SWEEPS[job["sweep"]](model, clean, corrupt, metric)
            jobs.append({"sweep": job["sweep"], "seconds": seconds, "matrix": matrix.detach().cpu().double().tolist()})
    result = {"transformer_lens": version("transformer-lens"), "torch": torch.__version__,
              "model": how if models else "none loaded",
              "threads": torch.get_num_threads(), "jobs": jobs}
    with open(result_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
