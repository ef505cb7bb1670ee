"""Attribution patching against the exact fast sweep: time, and how close the estimate came.

    python scripts/bench_attribution.py [--sizes 11 35] [--sites resid_post z] [--repeats 3] [--json FILE]

Model: the GPT-2-small-shaped checkpoint of scripts/bench.py (real weights if cached, else random of
that shape). Prompts as in bench.py (the corrupt prompt differs at position 1). Per (site, length):
the exact sweep (fast engine) and the attribution estimate (one forward + one backward), each the
minimum of --repeats runs after a warm-up run, not counting the two recordings both need; the machine's load average is printed,
since shared machines slow everything down.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (sets HF_HUB_OFFLINE, puts the repository on sys.path)
import torch  # noqa: E402

from mingpt.model import GPT  # noqa: E402
from patching.analyses.patch import attribution  # noqa: E402
from patching.core import engines  # noqa: E402
from patching.core.metrics import readout  # noqa: E402


def best(fn, repeats: int) -> tuple[float, object]:
    """Minimum wall time of `repeats` calls after one untimed warm-up call."""
    times, out = [], fn()
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[11, 35])
    ap.add_argument("--sites", nargs="+", default=["resid_post", "z"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads (1: steadier on a shared machine)")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        kind = bench.save_checkpoint(Path(tmp))
        model = GPT.from_pretrained(tmp)
    print(f"model: {kind}; torch {torch.__version__}, {args.threads} threads; load average {os.getloadavg()}")
    rows = []
    for T in args.sizes:
        clean, corrupt = bench.prompts(T)
        for site in args.sites:
            sites = [site] + attribution.needed_sites(site, True)
            rc, rx = engines.record(model, clean, sites), engines.record(model, corrupt, sites)
            r_c, r_x = (readout(r.last_logits[0], bench.TARGET, bench.FOIL, True) for r in (rc, rx))
            src = rc[site][:, 0]
            t_exact, got = best(lambda: engines.sweep(model, corrupt, rx, src, site, bench.TARGET, bench.FOIL, False),
                                args.repeats)
            t_attr, est = best(lambda: attribution.estimate(model, corrupt, rx, src, site, "logit-diff", bench.TARGET,
                                                            bench.FOIL, r_c, r_x), args.repeats)
            exact = (got[..., 1] - got[..., 0]).double().numpy()
            base = float(r_x[1] - r_x[0])
            live = ~engines.noop_cells(rx, src, site, False).numpy().reshape(exact.shape)
            c = attribution.compare(exact, base + est.numpy(), base, live, ["layer", "position"] if site != "z"
                                    else ["layer", "head", "position"], [str(i) for i in range(T)],
                                    source_value=float(r_c[1] - r_c[0]))
            row = {"tokens": T, "site": site, "cells": int(exact.size), "exact_s": round(t_exact, 4),
                   "attribution_s": round(t_attr, 4), "speedup": round(t_exact / t_attr, 1),
                   "pearson": c["pearson"], "spearman": c["spearman"], "top10_recall": c["top_k_recall"],
                   "load": os.getloadavg()[0]}
            rows.append(row)
            print(f"T={T:3d} {site:>10}: {row['cells']:5d} cells, exact {t_exact:.3f} s, attribution {t_attr:.3f} s "
                  f"({row['speedup']}x); Pearson {c['pearson']:.3f}, top-10 recall {c['top_k_recall']:.1f}; "
                  f"load {row['load']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": kind, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
