"""Our exact path patching against TransformerLens 4.x's `get_act_patch_direct_path`, same weights.

    python scripts/tl_direct_path.py --tl-python /work/venv-tl4/bin/python [--layers 3 --heads 4 --seed 5]

Builds a random-weight GPT-2 checkpoint (Hub layout), runs TL's direct path patching from every
sender head into every later head's q, k and v in TL's own venv (a subprocess, `--child`), and the
same paths with patch-run's path patching (patching/analyses/path.py) with --freeze-mlps (TL adds the sender's write to one
head's own pre-LayerNorm input: every other head and every MLP sees the base run, which is our
frozen-MLP path) and without it (MLPs recomputed: the IOI definition, paths through MLPs included).
Prints, per component, the largest difference from TL in each case.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CLEAN, CORRUPT = "Michelle Jones was a top-notch student. Michelle", "Michelle Smith was a top-notch student. Michelle"
JONES, SMITH = 5437, 4176


def child(folder: str, clean: list[int], corrupt: list[int]):
    """In TL's venv: {component: [src_layer][src_head][dst_layer][dst_head]} of logit(Smith) - logit(Jones)."""
    import torch
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.patching import get_act_patch_direct_path_all_sources
    model = TransformerBridge.boot_transformers(folder, device="cpu", dtype=torch.float32).eval()
    c, x = torch.tensor([clean]), torch.tensor([corrupt])
    _, clean_cache = model.run_with_cache(c)
    _, corrupt_cache = model.run_with_cache(x)
    metric = lambda logits: logits[0, -1, SMITH] - logits[0, -1, JONES]  # noqa: E731
    out = {comp: get_act_patch_direct_path_all_sources(model, x, clean_cache, corrupt_cache, metric, comp,
                                                       verbose=False).tolist() for comp in "qkv"}
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tl-python", default="/work/venv-tl4/bin/python")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--init-std", type=float, default=0.2)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], json.loads(args.child[1]), json.loads(args.child[2]))

    root = Path(__file__).resolve().parent.parent
    sys.path[:0] = [str(root), str(root / "tests")]
    import numpy as np
    from conftest import make_checkpoint
    from mingpt.bpe import BPETokenizer
    from mingpt.model import GPT
    from patching.analyses.path import PathOptions, path
    from patching.core.context import Context, ModelSpec
    from patching.core.prompts import Pair

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_checkpoint(Path(tmp), n_layer=args.layers, n_head=args.heads, n_embd=args.width,
                                 seed=args.seed, init_std=args.init_std)
        model, tok = GPT.from_pretrained(str(folder)), BPETokenizer(str(folder))
        clean, corrupt = tok.encode(CLEAN), tok.encode(CORRUPT)
        got = subprocess.run([args.tl_python, __file__, "--child", str(folder), json.dumps(clean), json.dumps(corrupt)],
                             capture_output=True, text=True, check=True)
        tl = {k: np.array(v) for k, v in json.loads(got.stdout.strip().splitlines()[-1]).items()}
        L, H = args.layers, args.heads
        print(f"random GPT-2, {L} layers x {H} heads, width {args.width}, init std {args.init_std}; "
              f"metric logit(Smith) - logit(Jones) on the Michelle pair")
        for comp in "qkv":
            worst = {}
            for freeze in (True, False):
                diffs = []
                for dl in range(1, L):
                    for dh in range(H):
                        r = path(Context(model, tok, ModelSpec(model=str(folder))), Pair(CLEAN, CORRUPT, "Jones", "Smith"),
                                 PathOptions("all", [f"{dl}.{dh}:{comp}"], freeze))
                        for sl in range(dl):
                            for sh in range(H):
                                diffs.append((abs(r.matrix[sl, sh] - tl[comp][sl, sh, dl, dh]),
                                              f"{sl}.{sh} -> {dl}.{dh}", r.matrix[sl, sh], tl[comp][sl, sh, dl, dh],
                                              r.base_value))
                worst[freeze] = max(diffs)
            spread = float(np.abs(tl[comp][tl[comp] != 0] - worst[True][4]).max())
            for freeze, (d, where, ours, theirs, base) in worst.items():
                print(f"  {comp}: {'--freeze-mlps' if freeze else 'MLPs recomputed'}: largest |ours - TL| {d:.3g} "
                      f"at {where} (ours {ours:.5f}, TL {theirs:.5f}, base {base:.5f}); "
                      f"largest TL path effect {spread:.3g}")


if __name__ == "__main__":
    main()
