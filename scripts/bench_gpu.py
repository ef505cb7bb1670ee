"""GPU benchmark of the exact sweep against TransformerLens on the same GPU and weights, with the floor.

    python scripts/bench_gpu.py [--shapes small xl] [--sizes 11 35 256] [--dtypes float32 bfloat16]
        [--sites resid_post z] [--budget 4] [--tl-budget 3] [--deadline 330] [--out DIR]

For each model shape (random weights of GPT-2 small's or GPT-2 XL's shape, saved by transformers in
Hub layout: timings do not depend on the weights' values), precision, prompt length n and site, the
Michelle-shaped pair of scripts/bench.py (the prompts differ at position 1) is swept at every cell:
`resid_post` (layer, position) and `z` (layer, head, position), with patching.core.engines.sweep as
`patch-run --site ...` runs it. Reported per row:
- ours: the best of the sweeps that fit in --budget seconds (at least one after a warm-up); a sweep
  that cannot finish in the budget is stopped after its first chunks and projected from them by
  floor FLOPs (the chunks hold the longest suffixes first) — marked `~`;
- floor: the FLOPs no exact sweep can skip (scripts/bench.py's floor, per cell, vectorised here;
  a z cell adds its own row's c_proj and MLP in its block) over the GPU's matmul peak in that
  precision, measured in the same run (the best of a few large products of the model's shapes and a
  square one); % of floor = floor / ours;
- TransformerLens (the GPU's own Python, scripts/tl_baseline.py in a subprocess, its
  `generic_activation_patch`, one patched forward per cell): the whole sweep when it fits in
  --tl-budget seconds, else a random sample of 24 cells timed and projected (`~`); its values are
  compared with ours on the cells it ran (largest difference over the largest |value|).
Float32 products run as float32 (torch's default: TF32 off), bfloat16 ones on the tensor cores.
Rows are run smallest first; once --deadline seconds have passed the rest are skipped (said so).
Results go to OUT/gpu.json and OUT/gpu.md as each row finishes.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
import bench  # noqa: E402  (puts the repository on sys.path)
from mingpt.model import GPT  # noqa: E402
from patching.core import engines  # noqa: E402

SHAPES = {"small": dict(n_layer=12, n_head=12, n_embd=768), "xl": dict(n_layer=48, n_head=25, n_embd=1600),
          "tiny": dict(n_layer=2, n_head=4, n_embd=64)}  # tiny: a dry run of this script on a CPU


class OutOfTime(Exception):
    pass


def floor_cells(config, T: int, site: str) -> np.ndarray:
    """Floor FLOPs of each cell (layer, [head,] position), scripts/bench.py's floor_flops per (l, p) in
    closed form: blocks l+1..L-1 over rows p..T-1, where the first of them needs only row p's k and v
    and the last only row T-1's output (the others give k and v), plus two unembedding columns; a
    z cell adds its own row's c_proj and MLP in block l (when anything reads that row)."""
    C, F, L = config.n_embd, config.n_inner, config.n_layer
    G, KV, Q = 2 * C * C + 4 * C * F, 4 * C * C, 2 * C * C  # row output (c_proj + MLP); k and v; q
    lay, pos = np.meshgrid(np.arange(L), np.arange(T), indexing="ij")
    n = T - pos  # rows p..T-1
    att = 4 * C * (T * (T + 1) - pos * (pos + 1)) / 2  # sum over rows of 4C * visible keys
    K = L - 1 - lay  # blocks after l
    total = np.full(lay.shape, 4.0 * C)
    mid = np.maximum(K - 1, 0)  # blocks l+1..L-2, each with every row's output
    first_mid = (K >= 2)  # the first of them (l+1) needs only row p's k, v and q
    total += first_mid * (6 * C * C + n * G + att) + np.maximum(mid - 1, 0) * (n * 6 * C * C + n * G + att)
    last = K >= 1  # block L-1: only row T-1's output; k and v for row p alone when it is also l+1
    total += last * np.where(K == 1, KV + Q * (pos == T - 1) + G + 4 * C * T, n * KV + Q + G + 4 * C * T)
    if site == "z":
        total += G * ((lay < L - 1) | (pos == T - 1))
        total = np.repeat(total[:, None, :], config.n_head, axis=1)
    return total


def check_floor():
    """The closed form against scripts/bench.py's loops, on small shapes (a wrong floor flatters)."""
    from mingpt.config import GPTConfig
    for L, T in ((1, 5), (2, 1), (3, 7), (4, 9)):
        cfg = GPTConfig(n_layer=L, n_head=2, n_embd=8, vocab_size=11, block_size=16)
        for p0 in (0, 1, T - 1):
            want = bench.floor_flops(cfg, T, list(range(p0, T)))
            got = floor_cells(cfg, T, "resid_post")[:, p0:].sum()
            assert abs(got - want) <= 1e-9 * want, (L, T, p0, got, want)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak(device, dtype, C: int) -> float:
    """GFLOP/s: the best of 10 of large products of the model's shapes (8192 rows through c_fc and
    the MLP's c_proj) and an 8192-square one, after a warm-up each."""
    best = 0.0
    size = 8192 if device.type == "cuda" else 512
    for m, k, n in ((size, C, 4 * C), (size, 4 * C, C), (size, size, size)):
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        a @ b
        for _ in range(10):
            sync(device)
            t = time.perf_counter()
            a @ b
            sync(device)
            best = max(best, 2 * m * k * n / (time.perf_counter() - t) / 1e9)
    return best


def save(shape: str, folder: Path, device) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    with torch.device(device):  # initialising 1.5 B weights on the GPU takes seconds, not minutes
        hf = GPT2LMHeadModel(GPT2Config(attn_implementation="eager", **SHAPES[shape]))
    hf.eval().save_pretrained(folder)
    del hf
    bench.add_vocabulary(folder)


def our_sweep(model, T: int, site: str, budget: float, max_rows: int):
    """(best seconds, projected?, readouts (None when projected), the live cells' floor FLOPs, (clean
    ids, corrupt ids)): module docstring."""
    device = next(model.parameters()).device
    clean, corrupt = (t.to(device) for t in bench.prompts(T))
    rc, rk = engines.record(model, clean, [site]), engines.record(model, corrupt, [site])
    source = rc[site][:, 0]
    noop = engines.noop_cells(rk, source, site, False)  # (slabs, T)
    cell_floor = floor_cells(model.config, T, site).reshape(noop.shape)
    live_floor = float(cell_floor[~noop.cpu().numpy()].sum())
    chunks = engines.chunk_cells(noop, T, False, max_rows, False)
    done_at = np.cumsum([len(r) * len(p) for r, p in chunks])
    chunk_flop = [float(cell_floor[np.ix_(r, p)].sum()) for r, p in chunks]

    def once(limit: float):
        t0 = time.perf_counter()
        seen = {"flop": 0.0}

        def progress(done, total):
            seen["flop"] = sum(f for f, d in zip(chunk_flop, done_at) if d <= done)
            if time.perf_counter() - t0 > limit and done < total:
                raise OutOfTime
        try:
            out = engines.sweep(model, corrupt, rk, source, site, bench.TARGET, bench.FOIL, False,
                                max_rows=max_rows, progress=progress)
            sync(device)
            return out, time.perf_counter() - t0, False
        except OutOfTime:
            sync(device)
            return None, (time.perf_counter() - t0) * live_floor / seen["flop"], True

    out, s, projected = once(budget)  # a first sweep: cuBLAS picks its kernels for these shapes
    best = s
    if not projected:
        spent = s
        while spent < budget:
            out, s, _ = once(float("inf"))
            best, spent = min(best, s), spent + s
    return best, projected, out, live_floor, (clean[0].tolist(), corrupt[0].tolist())


def compare(ours: torch.Tensor, job: dict) -> float:
    """Largest |TL - ours| over the cells TL ran, over the largest |ours|."""
    m = (ours[..., 1] - ours[..., 0]).double()  # logit(foil) - logit(target), TL's metric
    if "matrix" in job:
        diff = (torch.tensor(job["matrix"], dtype=torch.float64) - m).abs().max()
    else:
        cells = torch.tensor(job["cells"])
        diff = (torch.tensor(job["values"], dtype=torch.float64) - m[tuple(cells.T)]).abs().max()
    return float(diff / m.abs().max())


def table(rows: list[dict], head: dict) -> str:
    out = [f"GPU: {head['gpu']}; torch {head['torch']}; TransformerLens {head.get('tl', '?')}; {head['date']}",
           "matmul peak (GFLOP/s): " + ", ".join(f"{k} {v:,.0f}" for k, v in head["peaks"].items()), "",
           "| model | dtype | site | tokens | cells | patch-run | floor | % of floor | TransformerLens | TL / patch-run | max diff vs TL |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tl = r.get("tl") or {}
        tl_s = f"{'~' if tl.get('projected') else ''}{tl['seconds']:.2f} s" if "seconds" in tl else tl.get("error", "—")
        ratio = f"{tl['seconds'] / r['seconds']:.0f}x" if "seconds" in tl else "—"
        diff = f"{tl['max_rel_diff']:.1e}" if "max_rel_diff" in tl else "—"
        out.append(f"| {r['shape']} | {r['dtype']} | {r['site']} | {r['n']} | {r['cells']:,} | "
                   f"{'~' if r['projected'] else ''}{r['seconds']:.3f} s | {r['floor_s']:.3f} s | "
                   f"{100 * r['floor_s'] / r['seconds']:.0f} % | {tl_s} | {ratio} | {diff} |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", nargs="+", default=["small", "xl"], choices=list(SHAPES))
    ap.add_argument("--sizes", type=int, nargs="+", default=[11, 35, 256])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--sites", nargs="+", default=["resid_post", "z"], choices=["resid_post", "z"])
    ap.add_argument("--budget", type=float, default=4.0, help="seconds of our sweeps per row")
    ap.add_argument("--tl-budget", type=float, default=3.0, help="TransformerLens: run whole below this many seconds")
    ap.add_argument("--no-tl", action="store_true")
    ap.add_argument("--tl-python", default=sys.executable, help="the Python that has TransformerLens")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script (with --shapes tiny)")
    ap.add_argument("--max-rows", type=int, default=engines.MAX_ROWS)
    ap.add_argument("--deadline", type=float, default=330.0, help="seconds after which the remaining rows are skipped")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    t_start = time.perf_counter()
    check_floor()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU (or --device cpu --shapes tiny for a dry run).")
    out = Path(args.out)
    if any((out / name).exists() for name in ("gpu.json", "gpu.md")):
        sys.exit(f"bench_gpu.py: {out} already holds gpu.json or gpu.md: give another --out (nothing is overwritten).")
    out.mkdir(parents=True, exist_ok=True)
    head = {"gpu": torch.cuda.get_device_name() if device.type == "cuda" else "none (a dry run on the CPU)", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "tf32": torch.backends.cuda.matmul.allow_tf32, "max_rows": args.max_rows, "peaks": {}}
    rows: list[dict] = []

    def write():
        (out / "gpu.json").write_text(json.dumps({"head": head, "rows": rows}, indent=1))
        (out / "gpu.md").write_text(table(rows, head))

    for dt in args.dtypes:
        head["peaks"][dt] = max(peak(device, getattr(torch, dt), SHAPES[s]["n_embd"]) for s in args.shapes)
    print(f"{head['gpu']}, torch {head['torch']}, peaks {head['peaks']}", flush=True)
    tmp = tempfile.TemporaryDirectory()
    for shape in args.shapes:
        if time.perf_counter() - t_start > args.deadline:
            print(f"skipped {shape}: past the deadline", flush=True)
            continue
        folder = Path(tmp.name) / shape
        t = time.perf_counter()
        save(shape, folder, device)
        model = GPT.from_pretrained(str(folder)).to(device).eval()
        print(f"{shape}: checkpoint saved and loaded in {time.perf_counter() - t:.1f} s", flush=True)
        mine, tl_jobs = [], []
        for dt in args.dtypes:
            model = model.to(getattr(torch, dt))
            for site in args.sites:  # a warm-up sweep per precision and site: CUDA and cuBLAS start-up
                our_sweep(model, min(args.sizes), site, 0.0, args.max_rows)
            for T in args.sizes:
                for site in args.sites:
                    if time.perf_counter() - t_start > args.deadline:
                        print(f"skipped {shape} {dt} {site} n={T}: past the deadline", flush=True)
                        continue
                    try:
                        s, projected, readouts, flop, ids = our_sweep(model, T, site, args.budget, args.max_rows)
                    except Exception as e:  # noqa: BLE001 -- a benchmark row that fails is reported, not fatal
                        print(f"{shape} {dt} {site} n={T}: failed: {type(e).__name__}: {e}", flush=True)
                        continue
                    cells = model.config.n_layer * (model.config.n_head if site == "z" else 1) * T
                    row = dict(shape=shape, dtype=dt, site=site, n=T, cells=cells, seconds=s, projected=projected,
                               floor_gflop=flop / 1e9, floor_s=flop / 1e9 / head["peaks"][dt])
                    rows.append(row)
                    mine.append((row, readouts))
                    tl_jobs.append({"sweep": site, "dtype": dt, "clean": ids[0], "corrupt": ids[1],
                                    "budget": args.tl_budget})
                    print(f"{shape} {dt} {site} n={T}: {'~' if projected else ''}{s:.3f} s, floor {row['floor_s']:.3f} s "
                          f"({100 * row['floor_s'] / s:.0f} %)", flush=True)
                    write()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if not args.no_tl and tl_jobs and time.perf_counter() - t_start < args.deadline + 60:
            t = time.perf_counter()
            res = bench.run_tl(args.tl_python, folder, tl_jobs, device.type)
            if "error" in res:
                print(f"TransformerLens on {shape}: failed ({res['error']})", flush=True)
            else:
                head["tl"] = res["transformer_lens"]
                for (row, readouts), job in zip(mine, res["jobs"]):
                    row["tl"] = {"seconds": job["seconds"], "projected": job["projected"]}
                    if readouts is not None:
                        row["tl"]["max_rel_diff"] = compare(readouts, job)
                print(f"TransformerLens {res['transformer_lens']} on {shape}: {time.perf_counter() - t:.0f} s", flush=True)
            write()
        shutil.rmtree(folder, ignore_errors=True)
    write()
    print(table(rows, head), flush=True)


if __name__ == "__main__":
    main()
