"""`patch-run weights` against TransformerLens on the same random GPT-2-small-shaped checkpoint.

    python scripts/tl_weights.py --tl-python /work/venv-tl4/bin/python [--threads 1] [--unit-ln] [--json FILE]
    /path/to/tl-venv/bin/python scripts/tl_weights.py --tl-side REQUEST.json RESULT.json   (run by the first)

A comparison, not a test. As scripts/bench.py does, patch-run's venv never imports TransformerLens:
this file, in patch-run's venv, saves the checkpoint (`bench.save_checkpoint`), runs
`run("weights", ctx, None)`, then runs itself with the TL venv's python in `--tl-side` mode (which
imports only torch and transformer_lens) and compares.

The checkpoint: save_checkpoint's random GPT-2-small-shaped weights. Its LayerNorms come out of
Hugging Face's initialisation with scale 1 and bias 0, so folding their scales would change nothing;
unless --unit-ln, every LayerNorm's scale is redrawn from U(0.5, 1.5) and its bias from N(0, 0.1^2)
(seed 0) and the checkpoint saved again, so that folding (or not) shows in the numbers.

TransformerLens side (`TransformerBridge.boot_transformers(folder, device="cpu", dtype=float32)`),
one fresh bridge, in its own process, per weight convention:
- raw: the bridge as booted (TL 4's default: Hugging Face weights, nothing folded or centred);
- fold_ln: `process_weights(fold_ln=True, center_writing_weights=False, center_unembed=False,
  fold_value_biases=False)`: ln_1's scale folded into W_Q, W_K, W_V and then those centred over
  d_model (LayerNorm's centring folded in too), ln_f's scale into W_U and W_U centred over d_model;
- processed: `process_weights()` with its defaults, i.e. HookedTransformer's load-time processing
  and `enable_compatibility_mode()`'s: fold_ln as above, plus W_E, W_pos, W_O (and W_out) centred
  over d_model and W_U centred over the vocabulary.
For each: `all_composition_scores(mode)` for Q, K and V (every pair of the 144 heads, l1 < l2 kept) and
the copying score of TransformerLens's demos, Re(sum lambda) / sum |lambda| of
`(W_E @ OV @ W_U).eigenvalues` (FactoredMatrix, all heads at once), each timed.

patch-run side: the analysis itself (ln_1 and ln_f scales folded, nothing centred), and, to show
agreement where TransformerLens's conventions differ, the same functions of
patching/analyses/weights.py (`copying_scores`, `composition_factors`, `composition_scores`) applied
here to the weights in each of TransformerLens's three conventions.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
CONVENTIONS = ("raw", "fold_ln", "processed")
KINDS = ("q", "k", "v")
DESCRIBE = {
    "raw": "no processing (TL 4 bridge default): nothing folded, nothing centred",
    "fold_ln": "process_weights(fold_ln only): LN scales folded, W_Q/W_K/W_V and W_U centred over d_model",
    "processed": "process_weights() defaults (= HookedTransformer / compatibility mode): fold_ln + W_E, W_pos, "
                 "W_O centred over d_model + W_U centred over the vocabulary",
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------- TransformerLens side


def tl_side(request_path: str, result_path: str):
    """Runs in the TL venv: imports torch and transformer_lens only."""
    import torch
    from importlib.metadata import version

    from transformer_lens.model_bridge import TransformerBridge

    req = json.loads(Path(request_path).read_text())
    torch.set_num_threads(req["threads"])
    out = {"transformer_lens": version("transformer-lens"), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "conventions": {}}
    for conv in req["conventions"]:
        t0 = time.perf_counter()
        model = TransformerBridge.boot_transformers(req["checkpoint"], device="cpu", dtype=torch.float32).eval()
        t1 = time.perf_counter()
        if conv == "fold_ln":
            model.process_weights(fold_ln=True, center_writing_weights=False, center_unembed=False,
                                  fold_value_biases=False)
        elif conv == "processed":
            model.process_weights()
        t2 = time.perf_counter()
        res = {"boot_seconds": t1 - t0, "process_seconds": t2 - t1, "composition": {}, "seconds": {},
               "peak_rss_mb_before_composition": peak_rss_mb()}
        with torch.no_grad():
            for kind in KINDS:
                t = time.perf_counter()
                s = model.all_composition_scores(kind.upper()).scores  # (L, H, L, H), 0 where l1 >= l2
                res["seconds"][f"composition_{kind}"] = time.perf_counter() - t
                res["composition"][kind] = s.double().tolist()
            res["peak_rss_mb_before_copying"] = peak_rss_mb()
            t = time.perf_counter()
            full_ov = model.W_E @ model.OV @ model.W_U  # FactoredMatrix (L, H, d_vocab, d_vocab)
            lam = full_ov.eigenvalues  # (L, H, d_head): those of BA, d_head x d_head
            copying = lam.sum(-1).real / lam.abs().sum(-1)
            res["seconds"]["copying"] = time.perf_counter() - t
            del full_ov, lam
        res["copying"] = copying.double().tolist()
        res["peak_rss_mb"] = peak_rss_mb()
        out["conventions"][conv] = res
        del model
    Path(result_path).write_text(json.dumps(out))


# ----------------------------------------------------------------------------- patch-run side


def perturb_layer_norms(folder: Path, seed: int = 0):
    """Redraw every LayerNorm's scale (U(0.5, 1.5)) and bias (N(0, 0.1^2)) of the checkpoint and save it again."""
    import torch
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, mod in hf.named_modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(0.5 + torch.rand(mod.weight.shape, generator=g))
                mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
    hf.eval().save_pretrained(folder)


def convention_weights(model, conv: str):
    """Per block, the head matrices of patching.analyses.weights.layer_heads (float64: q, k, v (H, C, hs),
    o (H, hs, C)) and W_U W_E (C x C), in one of TransformerLens's conventions, or ours ("ours": ln
    scales folded, nothing centred)."""
    import torch
    from patching.analyses.weights import VOCAB_CHUNK
    tr = model.transformer
    H = model.config.n_head
    e = tr.wte.weight.detach().double()  # (V, C); GPT-2's unembedding is W_E^T
    V, C = e.shape
    hs = C // H
    ete = torch.zeros(C, C, dtype=torch.float64)
    for s in range(0, V, VOCAB_CHUNK):
        ete += e[s:s + VOCAB_CHUNK].T @ e[s:s + VOCAB_CHUNK]
    fold = conv != "raw"
    centre = conv in ("fold_ln", "processed")
    if conv == "processed":  # W_U centred over the vocabulary: W_E^T (I - 11^T / V) W_E
        mean = e.mean(0)
        ete = ete - V * torch.outer(mean, mean)
    ue = ete
    if fold:
        ue = tr.ln_f.weight.detach().double()[:, None] * ue  # diag(gamma_f) W_E^T ...
    if centre:
        ue = ue - ue.mean(0, keepdim=True)  # P diag(gamma_f) W_E^T ...: W_U centred over d_model
    if conv == "processed":
        ue = ue - ue.mean(1, keepdim=True)  # ... W_E P: W_E centred over d_model
    blocks = []
    for block in tr.h:
        w_all = block.attn.c_attn.weight.detach().double()  # (3C, C): x @ w.T
        gamma = block.ln_1.weight.detach().double() if fold else torch.ones(C, dtype=torch.float64)
        w = {}
        for i, name in enumerate(KINDS):
            m = (gamma[:, None] * w_all[i * C:(i + 1) * C].T).view(C, H, hs).permute(1, 0, 2)  # (H, C, hs)
            w[name] = m - m.mean(1, keepdim=True) if centre else m
        o = block.attn.c_proj.weight.detach().double().T.reshape(H, hs, C)
        w["o"] = o - o.mean(-1, keepdim=True) if conv == "processed" else o
        blocks.append(w)
    return blocks, ue


def scores_in(model, conv: str) -> dict:
    """Copying (L, H) and composition (3, L, H, L, H) with patch-run's functions, in convention `conv`."""
    import numpy as np
    import torch
    from patching.analyses.weights import composition_factors, composition_scores, copying_scores
    t = time.perf_counter()
    blocks, ue = convention_weights(model, conv)
    L, H, hs, C = len(blocks), *blocks[0]["o"].shape
    copying = np.stack([copying_scores(w, ue).numpy() for w in blocks])
    t_copy = time.perf_counter()
    lefts = torch.empty(L, H, hs, C, dtype=torch.float32)
    rights = torch.empty(L, C, 3, H, hs, dtype=torch.float32)
    for l, w in enumerate(blocks):
        left, right = composition_factors(w)
        lefts[l], rights[l] = left.float(), right.float()
    comp = composition_scores(lefts, rights, None)
    return {"copying": copying, "composition": comp, "seconds": time.perf_counter() - t,
            "copying_seconds": t_copy - t, "composition_seconds": time.perf_counter() - t_copy}


def run_tl(python: str, folder: Path, threads: int) -> dict:
    """One TL-side process per convention (so that each one's peak memory is its own); the results merged."""
    out: dict = {"conventions": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for conv in CONVENTIONS:
            request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
            request.write_text(json.dumps({"checkpoint": str(folder), "threads": threads, "conventions": [conv]}))
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TQDM_DISABLE="1")
            t = time.perf_counter()
            proc = subprocess.run([python, str(Path(__file__).resolve()), "--tl-side", str(request), str(result)],
                                  env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t
            if proc.returncode != 0:
                raise SystemExit(f"TransformerLens side ({conv}) failed:\n{proc.stderr[-3000:]}")
            one = json.loads(result.read_text())
            one["conventions"][conv]["process_wall_seconds"] = wall
            out.update({k: v for k, v in one.items() if k != "conventions"})
            out["conventions"].update(one["conventions"])
    return out


def diff(a, b, mask=None) -> tuple[float, float]:
    """(max |a - b|, mean |a - b|) over the finite entries (or `mask`)."""
    import numpy as np
    d = np.abs(np.asarray(a) - np.asarray(b))
    d = d[mask] if mask is not None else d[np.isfinite(d)]
    return float(d.max()), float(d.mean())


def compare(args):
    import numpy as np
    import torch
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(SCRIPTS))
    from bench import machine, save_checkpoint
    from patching.api import ModelSpec, load, run
    torch.set_num_threads(args.threads)
    report: dict = {"date": time.strftime("%Y-%m-%d"), "machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2-small-shaped"
        kind = save_checkpoint(folder)
        if not args.unit_ln and kind.startswith("random"):
            perturb_layer_norms(folder)
            kind += "; LayerNorm scales U(0.5, 1.5), biases N(0, 0.1^2), seed 0"
        report["checkpoint"] = kind
        print(f"{report['machine']}\ncheckpoint: {kind}; torch threads {torch.get_num_threads()}", flush=True)

        ctx = load(ModelSpec(model=str(folder), device="cpu"))
        t = time.perf_counter()
        res = run("weights", ctx, None)
        ours_wall = time.perf_counter() - t
        ours = {"copying": res.copying, "composition": np.stack([res.composition[k] for k in KINDS])}
        print(f"patch-run weights: {ours_wall:.2f} s in all for 144 heads (per-head scores "
              f"{res.seconds['per_head']:.2f} s, copying among them; composition product "
              f"{res.seconds['composition']:.2f} s; random baseline {res.seconds['baseline']:.2f} s); "
              f"mean K-composition {np.nanmean(ours['composition'][1]):.4f}, baseline {res.baseline['mean']:.4f}",
              flush=True)
        report["ours"] = {"wall_seconds": ours_wall, "seconds": res.seconds}

        again = scores_in(ctx.model, "ours")  # sanity: this script's weights in our convention = the analysis
        report["self_check"] = {"copying": diff(again["copying"], ours["copying"]),
                                "composition": diff(again["composition"], ours["composition"])}
        print(f"self-check, this script's route in our convention vs the analysis: copying max |diff| "
              f"{report['self_check']['copying'][0]:.2g}, composition {report['self_check']['composition'][0]:.2g}")

        tl = run_tl(args.tl_python, folder, args.threads)
        print(f"TransformerLens {tl['transformer_lens']} (torch {tl['torch']}, {tl['threads']} thread), one process "
              f"per convention", flush=True)
        report["transformer_lens"] = {"version": tl["transformer_lens"], "conventions": {}}
        L, H = res.copying.shape
        upper = np.zeros((L, H, L, H), dtype=bool)
        for a in range(L):
            upper[a, :, a + 1:, :] = True
        for conv in CONVENTIONS:
            t_res = tl["conventions"][conv]
            theirs = {"copying": np.array(t_res["copying"]),
                      "composition": np.stack([np.array(t_res["composition"][k]) for k in KINDS])}
            same = scores_in(ctx.model, conv)
            s = t_res["seconds"]
            comp_s = sum(s[f"composition_{k}"] for k in KINDS)
            print(f"\n[{conv}] {DESCRIBE[conv]}\n  TL: process {t_res['process_wall_seconds']:.1f} s wall; boot "
                  f"{t_res['boot_seconds']:.1f} s, processing "
                  f"{t_res['process_seconds']:.1f} s; all_composition_scores Q/K/V {s['composition_q']:.1f} / "
                  f"{s['composition_k']:.1f} / {s['composition_v']:.1f} s (= {comp_s:.1f} s); copying (W_E @ OV @ W_U)"
                  f".eigenvalues {s['copying']:.1f} s; peak RSS (MiB) before the composition scores "
                  f"{t_res['peak_rss_mb_before_composition']:.0f}, after them "
                  f"{t_res['peak_rss_mb_before_copying']:.0f}, after the copying score {t_res['peak_rss_mb']:.0f}\n"
                  f"  ours in this convention (same functions, float64 weights, float32 composition product): "
                  f"{same['seconds']:.1f} s (W_U W_E and copying {same['copying_seconds']:.1f} s, composition "
                  f"factors and product {same['composition_seconds']:.1f} s)")
            rec = {"tl_seconds": s, "tl_boot_seconds": t_res["boot_seconds"],
                   "tl_process_wall_seconds": t_res["process_wall_seconds"],
                   "tl_peak_rss_mb": {k: t_res[k] for k in ("peak_rss_mb_before_composition",
                                                            "peak_rss_mb_before_copying", "peak_rss_mb")},
                   "tl_process_seconds": t_res["process_seconds"],
                   "ours_same_convention_seconds": {k: same[k] for k in ("seconds", "copying_seconds",
                                                                         "composition_seconds")}}
            for name in ("copying", "q", "k", "v"):
                if name == "copying":
                    a, b, c, m = theirs["copying"], same["copying"], ours["copying"], None
                else:
                    i = KINDS.index(name)
                    a, b, c, m = theirs["composition"][i], same["composition"][i], ours["composition"][i], upper
                match, gap = diff(a, b, m), diff(a, c, m)
                rec[name] = {"vs_same_convention": match, "vs_patch_run_weights": gap}
                label = "copying" if name == "copying" else f"{name.upper()}-composition"
                print(f"  {label:15s} TL vs ours, same convention: max |diff| {match[0]:.2g} (mean {match[1]:.2g});"
                      f"  TL vs `patch-run weights`: max {gap[0]:.3g} (mean {gap[1]:.3g})")
            report["transformer_lens"]["conventions"][conv] = rec
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tl-side", nargs=2, metavar=("REQUEST", "RESULT"), help=argparse.SUPPRESS)
    ap.add_argument("--tl-python", default="/work/venv-tl4/bin/python", help="python of a venv with TransformerLens 4")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of both sides [1]")
    ap.add_argument("--unit-ln", action="store_true", help="keep save_checkpoint's LayerNorms (scale 1, bias 0)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    if args.tl_side:
        return tl_side(*args.tl_side)
    compare(args)


if __name__ == "__main__":
    main()
