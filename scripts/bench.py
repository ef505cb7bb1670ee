"""Benchmark of the patching sweep: loop (oracle) vs fast engine vs TransformerLens, same weights.

    python scripts/bench.py [--sizes 11 35 128] [--device cpu] [--long 1024] [--json FILE]

Model: GPT-2 small's real weights when they are in the Hugging Face cache, otherwise a random-weight
checkpoint of exactly GPT-2 small's shape (timings do not depend on the weights' values). For each
prompt length n the corrupt prompt differs from the clean one at position 1 (as in the seed pair).
Reported per n: seconds per full 12 x n sweep for each engine (the loop and TransformerLens are
extrapolated from a timed sample of patches when a full sweep would take minutes; marked `~`),
ratios, peak extra memory during the fast sweep, the fast engine's useful GFLOP/s against this
machine's measured matmul peak, and the largest difference between engines.
`--long N` sweeps the first chunks of an N-token prompt to show that memory stays bounded (the peak
is reached in the first chunks, which hold the longest suffixes) and projects the full sweep's time.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the cache or nothing: never wait on an unreachable Hub
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mingpt.model import GPT, GPTConfig  # noqa: E402
from patching import engines  # noqa: E402


class PeakRSS:
    """Samples this process's resident memory in a thread; `.peak_mb` is the rise over the start."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self.stop = device, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        self.start = self.peak = self.rss()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self):
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.rss())
        self.peak_total_mb = self.peak / 2**20  # the whole process: model, recordings, sweep
        if self.device.type == "cuda":
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.peak_mb = (self.peak - self.start) / 2**20


def matmul_peak(device: torch.device, dtype=torch.float32) -> float:
    """GFLOP/s of a large fp32 matmul of the shapes a GPT-2-small MLP uses."""
    a = torch.randn(2048, 768, device=device, dtype=dtype)
    b = torch.randn(768, 3072, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(12):
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * 2048 * 768 * 3072 / best / 1e9


def useful_flops(config: GPTConfig, T: int, positions: list[int]) -> float:
    """FLOPs a sweep cannot avoid: for patch (l, p), blocks l+1.. over positions p..T-1 (weights and
    attention), plus two unembedding columns. Columns identical in both runs need nothing."""
    C, L = config.n_embd, config.n_layer
    per_token = 2 * (4 * C * C + 2 * C * config.n_inner)  # c_attn, c_proj, c_fc, c_proj
    total = 0.0
    for l in range(L):
        for p in positions:
            rows = T - p
            attn = sum(4 * C * (t + 1) for t in range(p, T))  # q.k and weights.v over t+1 keys
            total += (L - 1 - l) * (rows * per_token + attn) + 2 * 2 * C
    return total


def make_model(folder: Path):
    """Real GPT-2 small from the HF cache if present (offline check), else random weights of its shape."""
    from transformers import GPT2Config, GPT2LMHeadModel
    try:
        hf = GPT2LMHeadModel.from_pretrained("openai-community/gpt2", attn_implementation="eager")
        kind = "gpt2 (real weights from the HF cache)"
    except Exception:
        torch.manual_seed(0)
        hf = GPT2LMHeadModel(GPT2Config(attn_implementation="eager"))
        kind = "random weights, GPT-2 small shape (12 layers, 768 wide, 50257 vocab)"
    hf.eval().save_pretrained(folder)
    return GPT.from_pretrained(str(folder)), hf.eval(), kind


def prompts(T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(1000, 40000, (1, T), generator=g)
    corrupt = clean.clone()
    if T > 1:
        corrupt[0, 1] = (clean[0, 1] + 1) % 50257  # the seed pair differs at position 1
    return clean, corrupt


def timed(fn, device):
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def sample_loop(model, corrupt, rec_clean, target, foil, device, budget_s: float):
    """Time the oracle on whole layers until budget_s is spent.

    Returns (readouts or None, seconds per full sweep, whether that figure was extrapolated)."""
    L, T = model.config.n_layer, corrupt.shape[1]
    done, t0 = 0, time.perf_counter()

    def progress(d, total):
        nonlocal done
        done = d
        if time.perf_counter() - t0 > budget_s and d % T == 0 and d < total:
            raise TimeoutError

    try:
        out = engines.loop_sweep(model, corrupt, rec_clean, target, foil, False, progress)
        return out, time.perf_counter() - t0, False
    except TimeoutError:
        return None, (time.perf_counter() - t0) / done * L * T, True


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[11, 35, 128])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--long", type=int, default=1024, help="prompt length of the bounded-memory run (0: skip)")
    ap.add_argument("--long-chunks", type=int, default=3)
    ap.add_argument("--loop-budget", type=float, default=60.0, help="seconds before the loop is extrapolated")
    ap.add_argument("--tl-max-n", type=int, default=64, help="longest prompt to time TransformerLens on")
    ap.add_argument("--fast-only", action="store_true", help="skip the loop and TransformerLens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    from tl_baseline import tl_available, tl_resid_sweep
    with tempfile.TemporaryDirectory() as tmp:
        model, hf, kind = make_model(Path(tmp))
    model = model.to(device=device, dtype=dtype)
    peak = matmul_peak(device, dtype)
    has_tl = tl_available() and device.type == "cpu" and dtype == torch.float32
    print(f"# patch-run sweep benchmark\nmodel: {kind}\ndevice: {device} ({torch.get_num_threads()} threads), "
          f"{args.dtype}; torch {torch.__version__}; matmul peak {peak:.1f} GFLOP/s; TransformerLens: "
          f"{'yes' if has_tl else 'not installed'}\n")
    rows = []
    target, foil = 5437, 4176
    for T in args.sizes:
        clean, corrupt = (t.to(device) for t in prompts(T))
        rc, rk = engines.record(model, clean), engines.record(model, corrupt)
        fast_times = []
        while len(fast_times) < args.repeats and sum(fast_times) < 20:  # best of a few, unless each is long
            with PeakRSS(device) as mem:
                fast, s = timed(lambda: engines.fast_sweep(model, rk, rc, target, foil, False), device)
            fast_times.append(s)
        s_fast = min(fast_times)
        positions = [p for p in range(T) if not torch.equal(rc.resid[:, 0, p], rk.resid[:, 0, p])]
        gflops = useful_flops(model.config, T, positions) / 1e9
        loop, s_loop, loop_est = (None, float("nan"), False) if args.fast_only else \
            sample_loop(model, corrupt, rc, target, foil, device, args.loop_budget)
        fast_m = engines.metric_values("logit-diff", fast, fast[0, 0], fast[0, 0])
        diff_loop = (engines.metric_values("logit-diff", loop, loop[0, 0], loop[0, 0]) - fast_m).abs().max().item() \
            if loop is not None else None
        s_tl = diff_tl = None
        if has_tl and T <= args.tl_max_n and not args.fast_only:
            tl_matrix, s_tl = tl_resid_sweep(hf, clean.cpu(), corrupt.cpu(), target, foil)
            diff_tl = float((torch.as_tensor(tl_matrix, dtype=torch.float32) - fast_m.cpu()).abs().max())
        row = dict(n=T, fast_s=s_fast, loop_s=s_loop, loop_extrapolated=loop_est, tl_s=s_tl,
                   fast_peak_mb=mem.peak_mb, process_peak_mb=mem.peak_total_mb, useful_gflop=gflops, gflops_per_s=gflops / s_fast,
                   peak_gflops=peak, max_diff_vs_loop=diff_loop, max_diff_vs_tl=diff_tl)
        rows.append(row)
        print(f"n={T}: fast {s_fast:.3f}s, loop {'~' if loop_est else ''}{s_loop:.2f}s, "
              f"TL {'-' if s_tl is None else f'{s_tl:.2f}s'}, memory +{mem.peak_mb:.0f} MB "
              f"(process peak {mem.peak_total_mb:.0f} MB), "
              f"{gflops:.1f} GFLOP useful at {gflops / s_fast:.1f} GFLOP/s", flush=True)

    print("\n| tokens | fast engine | loop (oracle) | TransformerLens | loop / fast | TL / fast | memory rise (process peak) "
          "| useful GFLOP | GFLOP/s (% of matmul peak) | max diff vs loop / TL |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tl = f"{r['tl_s']:.2f} s" if r["tl_s"] is not None else "—"
        tl_ratio = f"{r['tl_s'] / r['fast_s']:.1f}x" if r["tl_s"] is not None else "—"
        diffs = " / ".join("—" if d is None else f"{d:.1e}" for d in (r["max_diff_vs_loop"], r["max_diff_vs_tl"]))
        print(f"| {r['n']} | {r['fast_s']:.3f} s | {'~' if r['loop_extrapolated'] else ''}{r['loop_s']:.2f} s | {tl} "
              f"| {r['loop_s'] / r['fast_s']:.1f}x | {tl_ratio} | +{r['fast_peak_mb']:.0f} MB ({r['process_peak_mb']:.0f} MB) "
              f"| {r['useful_gflop']:.1f} "
              f"| {r['gflops_per_s']:.1f} ({100 * r['gflops_per_s'] / r['peak_gflops']:.0f}%) | {diffs} |")

    long = None
    if args.long:
        T = min(args.long, model.config.block_size)
        clean, corrupt = (t.to(device) for t in prompts(T, seed=1))
        rc, rk = engines.record(model, clean), engines.record(model, corrupt)
        L = model.config.n_layer
        chunks = engines.plan_chunks(L, T, list(range(1, T)), 8192)
        vals = rc.resid
        with PeakRSS(device) as mem:
            t0 = time.perf_counter()
            done_flops = 0.0
            for layers, pos in chunks[:args.long_chunks]:
                model.forward_patched(rk, layers, pos, vals[layers][:, 0][:, pos], torch.tensor([target, foil]))
                done_flops += sum(useful_flops(model.config, T, [p]) for p in pos) * len(layers) / L
            if device.type == "cuda":
                torch.cuda.synchronize()
            s = time.perf_counter() - t0
        total_flops = useful_flops(model.config, T, list(range(1, T)))
        long = dict(n=T, chunks_run=args.long_chunks, chunks=len(chunks), seconds=s, peak_mb=mem.peak_mb,
                    process_peak_mb=mem.peak_total_mb,
                    projected_s=s * total_flops / done_flops, gflops_per_s=done_flops / s / 1e9)
        print(f"\nlong prompt: n={T}, {len(chunks)} chunks of <= 8192 rows; ran the first {args.long_chunks} "
              f"(the longest suffixes) in {s:.1f} s at {done_flops / s / 1e9:.1f} GFLOP/s, memory +{mem.peak_mb:.0f} MB "
              f"(process peak {mem.peak_total_mb:.0f} MB); whole sweep {total_flops / 1e12:.1f} TFLOP, projected {long['projected_s'] / 60:.0f} min")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": kind, "device": str(device), "rows": rows, "long": long}, indent=1))


if __name__ == "__main__":
    main()
