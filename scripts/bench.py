"""Benchmarks of patch-run: the sweep against the loop oracle, the floor and TransformerLens; start-up.

    python scripts/bench.py [--sizes 11 35 128] [--device cpu] [--long 1024] [--tl-python PY ...] [--json FILE]
    python scripts/bench.py --dtype bfloat16 --versus float32 [--sizes 11 35]
    python scripts/bench.py --startup [--runs 5] [--threads 2] [--src DIR]
    python scripts/bench.py --top [--threads 1] [--top-batches 20] [--top-batch 4] [--top-window 512] [--top-k 20]

Sweep benchmark. Model: GPT-2 small's real weights when they are in the Hugging Face cache, otherwise
a random-weight checkpoint of exactly GPT-2 small's shape saved by transformers with GPT-2's vocabulary
(timings do not depend on the weights' values). For each prompt length n the corrupt prompt differs
from the clean one at position 1 (as in the seed pair). Reported per n: seconds per full 12 x n sweep
for each engine (the loop is extrapolated from a timed sample of layers when a full sweep would take
minutes; marked `~`), peak extra memory during the fast sweep, and two FLOP counts against this
machine's matmul peak measured in the same run (GPT-2 small's MLP shape, best of 12, at the start and
after each size; the fastest of torch.matmul and mingpt.model.dense, oneDNN on x86, which the model's
layers use, from a plain weight and from one packed in oneDNN's layout):
- "useful" (no savings): for patch (l, p), blocks l+1.. over positions p..T-1, plus two unembedding
  columns;
- "floor": the same after the two exact savings (`floor_flops`): at the first recomputed block only
  row p needs its q, k, v; at the last block only row T-1 needs more than its k and v. The floor time
  is floor FLOP / matmul peak; "% of floor" is floor time / fast time. The fast time is the best sweep
  inside GPT.packed() (as a batch or study runs); the first of those (which packs) and the best sweep
  outside it (as one CLI run sweeps) are reported beside it.
The header names the CPU's vector extensions and the kernel that runs the products (oneDNN's own name
for it, from its log); each size adds where one more sweep's time goes: the products (and their rate
against the peak), the attention kernel, the layer norms and the rest.
`--versus E` (with `--dtype D`) sweeps in both precisions in one process, alternating sweep by sweep
(a drifting machine then slows both alike), each against its own precision's peak.
TransformerLens runs in its own venv (`--tl-python /path/to/venv/bin/python`, repeatable: e.g. one
venv with TL 4.x, one with TL 3.9), as a subprocess running scripts/tl_baseline.py on the same
checkpoint, so patch-run's venv never needs it; TL's resid_pre rows 1..L-1 are compared with ours.
`--long N` sweeps the first chunks of an N-token prompt to show that memory stays bounded (the peak
is reached in the first chunks, which hold the longest suffixes) and projects the full sweep's time.

Start-up benchmark (`--startup`): the whole-process wall time of `patch-run --quiet` on the seed's
Michelle pair, for demo-names and for the GPT-2-small-shaped checkpoint, against a bare
`python -c "import torch"`; overhead = whole process - bare torch import - the run's own
sweep_seconds (targets 0.5 s and 0.6 s). Each figure is the minimum over --runs fresh processes,
run round-robin after one warm-up round (warm file cache, bytecode compiled); the breakdown by stage
comes from scripts/startup_stages.py, which repeats the CLI's steps with a clock between them.

`top --unit all` benchmark (`--top`): on the GPT-2-small-shaped checkpoint, the python-docs corpus cut
into windows and batched as `top` does (longest first); for each batch, a plain forward and the pass
`--unit all --site mlp_post` makes, with and without histograms (the same forward with every neuron's
bookkeeping folded in: top-k, density, mean, histogram, token sample; patching.analyses.top.index.Builder,
the code the command runs), the three in turn, each batch starting with the next one, so that the
shared machine's drift hits all alike. The first batch (which fills the top-k lists) is a warm-up and
not counted (--top-batches 0: the whole corpus). Reported: tokens/s of each by the wall clock and by
this process's CPU time (which other processes on a shared machine disturb less), the ratios to the
plain forward (target >= 0.9), the bookkeeping's CPU seconds per batch by part, the index state's size
and the process's peak resident memory over the timed batches.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the cache or nothing: never wait on an unreachable Hub
import numpy as np  # noqa: E402
import torch  # noqa: E402

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
sys.path.insert(0, str(ROOT))
import mingpt.linear  # noqa: E402
from mingpt import ragged  # noqa: E402
from mingpt.bpe import gpt2_vocabulary  # noqa: E402
from mingpt.model import GPT, GPTConfig, Linear, dense  # noqa: E402
from patching.core import engines  # noqa: E402
from patching.core.metrics import metric_values  # noqa: E402

MICHELLE = ("Michelle Jones was a top-notch student. Michelle", "Michelle Smith was a top-notch student. Michelle",
            "Jones", "Smith")
TARGET, FOIL = 5437, 4176  # " Jones", " Smith"


class PeakRSS:
    """The rise of this process's resident memory over a block, `.peak_mb`. On Linux the kernel's own
    high-water mark is reset on entry (/proc/self/clear_refs) and read on exit, so nothing runs beside
    the timed work; elsewhere a thread samples every 2 ms (it then competes with the work it measures)."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self.stop, self.thread = device, 0, threading.Event(), None

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @staticmethod
    def high_water() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the peak resident set becomes the current one
        except OSError:
            self.thread = threading.Thread(target=self._watch, daemon=True)
        self.start = self.peak = self.rss()
        if self.thread:
            self.thread.start()
        return self

    def _watch(self):
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc):
        if self.thread:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, self.rss())
        else:
            self.peak = self.high_water()
        self.peak_total_mb = self.peak / 2**20  # the whole process: model, recordings, sweep
        if self.device.type == "cuda":
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.peak_mb = (self.peak - self.start) / 2**20


def matmul_peaks(device: torch.device, dtype=torch.float32) -> dict[str, float]:
    """GFLOP/s of a large matmul of the shape a GPT-2-small MLP uses, best of 12, by each kernel the
    sweep could use: torch.matmul (BLAS: MKL on x86) and mingpt.model.dense, the model's layers without
    gradients (oneDNN on x86 CPUs in float32, else F.linear), from a plain weight and from one packed
    in oneDNN's layout (GPT.packed). The floor takes the fastest."""
    a = torch.randn(2048, 768, device=device, dtype=dtype)
    b = torch.randn(768, 3072, device=device, dtype=dtype)
    w = b.t().contiguous()  # (out, in), as nn.Linear holds it
    lin = Linear(768, 3072, bias=False, device=device, dtype=dtype)
    lin.weight.data.copy_(w)
    lin.keep_packed = True  # the weight in oneDNN's layout, as a sweep uses it (GPT.packed)
    kernels = {"torch.matmul": lambda: a @ b, "dense": lambda: dense(a, w, None), "dense (packed)": lambda: lin(a)}
    peaks = {}
    with torch.no_grad():
        for name, fn in kernels.items():
            best = float("inf")
            for _ in range(12):
                t = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t)
            peaks[name] = 2 * 2048 * 768 * 3072 / best / 1e9
    return peaks


def packed_mb(model: GPT) -> float:
    """MiB of the weights the model holds in oneDNN's layout now (inside GPT.packed())."""
    packs = [t for m in model.modules() if isinstance(m, Linear) for _, t in getattr(m, "_packs", {}).values()]
    return sum(t.numel() * t.element_size() for t in packs) / 2**20


def changed_positions(rc, rk) -> list[int]:
    """The positions where the two recordings' residual streams differ at some layer: the live columns
    of a sweep (the rest are no-ops and cost nothing)."""
    return [p for p in range(rc.resid.shape[2]) if not torch.equal(rc.resid[:, 0, p], rk.resid[:, 0, p])]


def useful_flops(config: GPTConfig, T: int, positions: list[int]) -> float:
    """FLOPs of the sweep without the two savings: for patch (l, p), blocks l+1.. over positions
    p..T-1 (weights and attention), plus two unembedding columns. Columns identical in both runs
    need nothing."""
    C, L = config.n_embd, config.n_layer
    per_token = 2 * (4 * C * C + 2 * C * config.n_inner)  # c_attn, c_proj, c_fc, c_proj
    total = 0.0
    for l in range(L):
        for p in positions:
            rows = T - p
            attn = sum(4 * C * (t + 1) for t in range(p, T))  # q.k and weights.v over t+1 keys
            total += (L - 1 - l) * (rows * per_token + attn) + 2 * 2 * C
    return total


def floor_flops(config: GPTConfig, T: int, positions: list[int]) -> float:
    """FLOPs no exact sweep can skip (multiply-add = 2): for patch (l, p), blocks l+1..L-1 over rows
    p..T-1, where a row needs
    - its q (2C^2) and its k, v (4C^2) unless it is past p in block l+1: there its input, and so its
      q, k and v, are the base run's;
    - attention (4C per visible key), c_proj (2C^2) and the MLP (4CF) unless block L-1 is the last
      and the row is not T-1: only position T-1's output is read, so the others give only k and v
      (and in block L-1, rows past p that also start there need nothing);
    plus two unembedding columns per patch (4C); l = L-1 costs only its final norm. Columns where
    both runs agree at every layer are no-ops and cost nothing."""
    C, F, L = config.n_embd, config.n_inner, config.n_layer
    total = 0.0
    for l in range(L):
        for p in positions:
            total += 2 * 2 * C
            for k in range(l + 1, L):
                for i in range(p, T):
                    kv = k > l + 1 or i == p  # else the base run's keys and values serve
                    out = k < L - 1 or i == T - 1  # else nothing reads this row's output
                    total += kv * 4 * C * C + (kv and out) * 2 * C * C
                    total += out * (2 * C * C + 4 * C * F + 4 * C * (i + 1))
    return total


def save_checkpoint(folder: Path) -> str:
    """Real GPT-2 small from the HF cache if present (offline check), else random weights of its shape,
    saved by transformers in Hub layout with GPT-2's vocabulary; returns what it is."""
    from transformers import GPT2Config, GPT2LMHeadModel
    try:
        hf = GPT2LMHeadModel.from_pretrained("openai-community/gpt2", attn_implementation="eager")
        kind = "gpt2 (real weights from the HF cache)"
    except Exception:
        torch.manual_seed(0)
        hf = GPT2LMHeadModel(GPT2Config(attn_implementation="eager"))
        kind = "random weights, GPT-2 small shape (12 layers, 768 wide, 50257 vocab)"
    hf.eval().save_pretrained(folder)
    add_vocabulary(folder)
    return kind


def add_vocabulary(folder: Path):
    """GPT-2's vocabulary beside a saved checkpoint, in Hub layout (the same files under the Hub's names)."""
    encoder, merges = gpt2_vocabulary()
    shutil.copyfile(encoder, folder / "vocab.json")
    shutil.copyfile(merges, folder / "merges.txt")


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


def isa() -> str:
    """The CPU's vector extensions that the sweep's kernels can use (Linux flags; x86)."""
    flags = mingpt.linear.cpu_flags()
    if flags is None:
        return "unknown ISA"
    have = [name for flag, name in (("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512"),
                                    ("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16")) if flag in flags]
    return " ".join(have) or "no AVX"


def machine() -> str:
    """CPU model and ISA, the ATen kernel family torch uses, threads and load: what every figure depends on."""
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{cpu} ({isa()}), {os.cpu_count()} cores, kernels {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} threads; sweep attention: {ragged.status()}; load average {load}")


PATH_PROBE = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from mingpt.linear import Linear
x = torch.randn(64, 768, dtype=getattr(torch, sys.argv[2]))
lin = Linear(768, 768, dtype=x.dtype)
lin.keep_packed = True
with torch.no_grad():
    lin(x)
"""


def matmul_path(device: torch.device, dtype) -> str:
    """Which kernel runs the model's products in `dtype`: oneDNN's implementation as its own log names it
    for one packed product (e.g. brg_matmul:avx512_core, ..._amx in bfloat16; the log is switched on by
    ONEDNN_VERBOSE before oneDNN starts, so in a child process), or F.linear."""
    x = torch.randn(64, 768, device=device, dtype=dtype)
    with torch.no_grad():
        used = mingpt.linear.onednn(x, torch.empty(768, 768, device=device, dtype=dtype))
    if not used:
        return "F.linear" + (" (cuBLAS)" if device.type == "cuda" else "")
    env = dict(os.environ, ONEDNN_VERBOSE="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, "-c", PATH_PROBE, str(ROOT), str(dtype).split(".")[-1]],
                          env=env, capture_output=True, text=True)
    lines = [line.split(",") for line in proc.stdout.splitlines() if line.startswith("onednn_verbose")]
    impl = next((f[6] for f in lines if len(f) > 7 and f[3] == "exec" and f[5] in ("inner_product", "matmul")), None)
    version = next((f[3].split("(")[0].strip() for f in lines if len(f) > 3 and f[3].startswith("oneDNN")), "oneDNN")
    isa_ = next((f[4].split(":", 1)[1] for f in lines if len(f) > 4 and f[2] == "info" and f[4].startswith("isa:")), "")
    where = f" (oneDNN's ISA: {isa_})" if isa_ else ""
    return f"{version} {impl}, weights packed{where}" if impl else "oneDNN (its log named no product)"


def time_parts(sweep, device: torch.device) -> dict[str, float]:
    """One sweep with a clock around each part: the products (mingpt.linear.dense, with their FLOPs), the
    attention kernel (ragged.attend) and the layer norms; the rest (indexing, sums, Python) by difference.
    A separate sweep from the timed ones: the clocks cost a little (on a GPU each waits for the device)."""
    parts = dict(products=0.0, product_flop=0.0, attention=0.0, layer_norms=0.0)
    real = (mingpt.linear.dense, ragged.attend, torch.nn.functional.layer_norm)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def clocked(name, fn, flop=None):
        def run(*a, **kw):
            sync()
            t = time.perf_counter()
            out = fn(*a, **kw)
            sync()
            parts[name] += time.perf_counter() - t
            if flop:
                parts["product_flop"] += flop(*a)
            return out
        return run

    mingpt.linear.dense = clocked("products", real[0], lambda x, w, *_: 2 * x.numel() * w.shape[0])
    ragged.attend = clocked("attention", real[1])
    torch.nn.functional.layer_norm = clocked("layer_norms", real[2])
    try:
        t = time.perf_counter()
        sweep()
        sync()
        parts["total"] = time.perf_counter() - t
    finally:
        mingpt.linear.dense, ragged.attend, torch.nn.functional.layer_norm = real
    parts["rest"] = parts["total"] - parts["products"] - parts["attention"] - parts["layer_norms"]
    return parts


def describe_parts(parts: dict[str, float], peak: float) -> str:
    """time_parts as one line: each part's share of the sweep, and the products' rate against the peak
    (their rate times their share is the most of the floor a sweep at that rate could reach)."""
    total, rate = parts["total"], parts["product_flop"] / parts["products"] / 1e9
    return (f"products {1e3 * parts['products']:.1f} ms ({parts['products'] / total:.0%} of the sweep) at "
            f"{rate:.0f} GFLOP/s = {rate / peak:.0%} of the peak; attention kernel {1e3 * parts['attention']:.1f} ms "
            f"({parts['attention'] / total:.0%}); layer norms {1e3 * parts['layer_norms']:.1f} ms "
            f"({parts['layer_norms'] / total:.0%}); the rest (indexing, sums, Python) {1e3 * parts['rest']:.1f} ms "
            f"({parts['rest'] / total:.0%})")


# ----------------------------------------------------------------------------- TransformerLens


def run_tl(python: str, folder: Path, jobs: list[dict], device: str = "cpu") -> dict:
    """Run scripts/tl_baseline.py with another venv's python on `jobs`; its result, or {"error": ...}."""
    with tempfile.TemporaryDirectory() as tmp:
        request, result = Path(tmp) / "request.json", Path(tmp) / "result.json"
        request.write_text(json.dumps({"checkpoint": str(folder), "target": TARGET, "foil": FOIL, "device": device,
                                       "jobs": jobs}))
        env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), TQDM_DISABLE="1")
        proc = subprocess.run([python, str(SCRIPTS / "tl_baseline.py"), str(request), str(result)],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
        return json.loads(result.read_text())


# ----------------------------------------------------------------------------- the sweep


def sweep_bench(args):
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    tmp = tempfile.TemporaryDirectory()
    folder = Path(tmp.name)
    kind = save_checkpoint(folder)
    model = GPT.from_pretrained(str(folder)).to(device=device, dtype=dtype)
    peaks = matmul_peaks(device, dtype)
    peak = max(peaks.values())
    path = matmul_path(device, dtype)
    print(f"# patch-run sweep benchmark\nmodel: {kind}\nmachine: {machine()}\ndevice: {device}, {args.dtype}; products: {path}; "
          f"torch {torch.__version__}; matmul peak {peak:.1f} GFLOP/s (best of "
          f"{', '.join(f'{k} {v:.1f}' for k, v in peaks.items())})\n")
    rows, L = [], model.config.n_layer
    for T in args.sizes:
        clean, corrupt = (t.to(device) for t in prompts(T))
        rc, rk = engines.record(model, clean), engines.record(model, corrupt)
        rises = []

        def sweeps(budget_s: float):
            """The best of at least --repeats sweeps and of budget_s of them (at most 20 s, 30 sweeps): as the
            peak is the best of 12, short sweeps get as many tries at a quiet moment of the machine."""
            times = []
            while (len(times) < args.repeats or sum(times) < budget_s) and sum(times) < 20 and len(times) < 30:
                with PeakRSS(device) as mem:
                    out, s = timed(lambda: engines.fast_sweep(model, rk, rc, TARGET, FOIL, False), device)
                times.append(s)
                rises.append((mem.peak_mb, mem.peak_total_mb))  # the largest: the first's; later ones reuse its heap
            return out, times

        _, single = sweeps(1)  # as one CLI run sweeps: plain weights, packed by the sweep only if it has chunks
        with model.packed():  # as a batch or a study holds it: the first sweep reorders the weights for all
            fast, fast_times = sweeps(3)
            packs = packed_mb(model)
            parts = time_parts(lambda: engines.fast_sweep(model, rk, rc, TARGET, FOIL, False), device)
        mem_rise, process_peak = (max(r[i] for r in rises) for i in (0, 1))
        s_fast = min(fast_times)
        for k, v in matmul_peaks(device, dtype).items():  # again after each size: the floor takes the best seen
            peaks[k] = max(peaks[k], v)
        peak = max(peaks.values())
        positions = changed_positions(rc, rk)
        useful = useful_flops(model.config, T, positions) / 1e9
        floor = floor_flops(model.config, T, positions) / 1e9
        loop, s_loop, loop_est = (None, float("nan"), False) if args.fast_only else \
            sample_loop(model, corrupt, rc, TARGET, FOIL, device, args.loop_budget)
        fast_m = metric_values("logit-diff", fast, fast[0, 0], fast[0, 0]).cpu().double()
        diff_loop = (metric_values("logit-diff", loop, loop[0, 0], loop[0, 0]).double() - fast_m).abs().max().item() \
            if loop is not None else None
        rows.append(dict(n=T, fast_s=s_fast, first_s=fast_times[0], single_s=min(single), loop_s=s_loop, loop_extrapolated=loop_est, fast_peak_mb=mem_rise,
                         process_peak_mb=process_peak, useful_gflop=useful, floor_gflop=floor,
                         floor_s=floor / peak, peak_gflops=peak, max_diff_vs_loop=diff_loop, tl={}, parts=parts,
                         _fast_matrix=fast_m, _ids=(clean[0].tolist(), corrupt[0].tolist())))
        print(f"n={T}: fast {s_fast:.3f}s (first sweep {fast_times[0]:.3f}s, single run {min(single):.3f}s), floor {floor / peak:.3f}s ({100 * floor / peak / s_fast:.0f}% of floor), "
              f"loop {'~' if loop_est else ''}{s_loop:.2f}s, memory +{mem_rise:.0f} MB (process peak "
              f"{process_peak:.0f} MB; packed weights {packs:.0f} MB), useful {useful:.1f} GFLOP, floor {floor:.1f} GFLOP", flush=True)
        print("  " + describe_parts(parts, peak), flush=True)

    tl_names = []
    if not args.fast_only and device.type == "cpu" and dtype == torch.float32:
        for python in args.tl_python:
            todo = [r for r in rows if r["n"] <= args.tl_max_n]
            jobs = [{"sweep": "resid_pre", "clean": r["_ids"][0], "corrupt": r["_ids"][1]} for r in todo]
            res = run_tl(python, folder, jobs)
            if "error" in res:
                print(f"TransformerLens with {python}: failed ({res['error']})")
                continue
            name = f"TL {res['transformer_lens']}"
            tl_names.append(name)
            print(f"{name} ({res['model']}, torch {res['torch']}, {res['threads']} threads, {python})")
            for r, job in zip(todo, res["jobs"]):
                m = torch.tensor(job["matrix"], dtype=torch.float64)
                diff = (m[1:] - r["_fast_matrix"][:L - 1]).abs().max().item()  # TL's resid_pre row l+1 = our row l
                r["tl"][name] = {"seconds": job["seconds"], "max_diff": diff}
                print(f"  n={r['n']}: {job['seconds']:.2f}s, max diff vs fast (rows 1..L-1) {diff:.1e}", flush=True)
    tmp.cleanup()

    for r in rows:  # every row against the best peak of the whole run
        r["floor_s"], r["peak_gflops"] = r["floor_gflop"] / peak, peak
    tl_head = "".join(f" {n} | {n} / fast | {n} / floor |" for n in tl_names)
    print(f"\nmachine: {machine()}; products: {path}; matmul peak {peak:.1f} GFLOP/s (best seen in this run: "
          f"{', '.join(f'{k} {v:.1f}' for k, v in peaks.items())}); {time.strftime('%Y-%m-%d')}")
    print("| tokens | fast engine | first sweep | single run | floor | % of floor | loop (oracle) | loop / fast |" + tl_head +
          " memory rise (process peak) | useful GFLOP (no savings) | floor GFLOP | max diff vs loop" +
          "".join(f" / {n}" for n in tl_names) + " |")
    print("|---" * (12 + 3 * len(tl_names)) + "|")
    for r in rows:
        tl_cells = ""
        for n in tl_names:
            t = r["tl"].get(n)
            tl_cells += (f" {t['seconds']:.2f} s | {t['seconds'] / r['fast_s']:.1f}x | {t['seconds'] / r['floor_s']:.1f}x |"
                         if t else " — | — | — |")
        diffs = " / ".join("—" if d is None else f"{d:.1e}" for d in
                           [r["max_diff_vs_loop"]] + [r["tl"].get(n, {}).get("max_diff") for n in tl_names])
        print(f"| {r['n']} | {r['fast_s']:.3f} s | {r['first_s']:.3f} s | {r['single_s']:.3f} s | {r['floor_s']:.3f} s | {100 * r['floor_s'] / r['fast_s']:.0f} % "
              f"| {'~' if r['loop_extrapolated'] else ''}{r['loop_s']:.2f} s | {r['loop_s'] / r['fast_s']:.1f}x |"
              f"{tl_cells} +{r['fast_peak_mb']:.0f} MB ({r['process_peak_mb']:.0f} MB) | {r['useful_gflop']:.1f} "
              f"| {r['floor_gflop']:.1f} | {diffs} |")
    print("fast engine = best sweep of the run, inside GPT.packed() as in a batch or study; first sweep = the "
          "first, which also reorders the weights for oneDNN; single run = best sweep outside it, as one CLI run "
          "sweeps (plain weights unless the sweep has several chunks); floor = floor GFLOP / matmul peak; % of floor = "
          "floor time / fast time; X / floor = how far exact patching could go at most against X")
    for r in rows:
        print(f"n={r['n']}, where one sweep's time goes: {describe_parts(r['parts'], peak)}")

    long = None
    if args.long:
        T = min(args.long, model.config.block_size)
        clean, corrupt = (t.to(device) for t in prompts(T, seed=1))
        rc, rk = engines.record(model, clean), engines.record(model, corrupt)
        chunks = engines.plan_chunks(L, T, list(range(1, T)), engines.MAX_ROWS)
        vals = rc.resid
        with model.packed(), PeakRSS(device) as mem:  # a sweep of several chunks packs its weights (engines)
            t0 = time.perf_counter()
            done_flops = 0.0
            for layers, pos in chunks[:args.long_chunks]:
                model.forward_patched(rk, layers, pos, vals[layers][:, 0][:, pos], torch.tensor([TARGET, FOIL]))
                done_flops += sum(useful_flops(model.config, T, [p]) for p in pos) * len(layers) / L
            if device.type == "cuda":
                torch.cuda.synchronize()
            s = time.perf_counter() - t0
            packs = packed_mb(model)
        total_flops = useful_flops(model.config, T, list(range(1, T)))
        long = dict(n=T, chunks_run=args.long_chunks, chunks=len(chunks), seconds=s, peak_mb=mem.peak_mb,
                    process_peak_mb=mem.peak_total_mb, packed_weights_mb=packs,
                    projected_s=s * total_flops / done_flops, gflops_per_s=done_flops / s / 1e9)
        print(f"\nlong prompt: n={T}, {len(chunks)} chunks of <= {engines.MAX_ROWS} rows; ran the first {args.long_chunks} "
              f"(the longest suffixes) in {s:.1f} s at {done_flops / s / 1e9:.1f} useful GFLOP/s, memory +{mem.peak_mb:.0f} MB "
              f"(packed weights {packs:.0f} MB; the heap reuses what earlier sweeps freed) "
              f"(process peak {mem.peak_total_mb:.0f} MB); whole sweep {total_flops / 1e12:.1f} TFLOP useful, "
              f"projected {long['projected_s'] / 60:.0f} min")
    if args.json:
        clean_rows = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
        Path(args.json).write_text(json.dumps({"model": kind, "machine": machine(), "device": str(device),
                                               "products": path, "rows": clean_rows, "long": long}, indent=1))


def head_bench(args):
    """--heads: the Michelle-shaped pair at every head site, 1,584 patches at 11 tokens for `z`; z against
    TransformerLens's get_act_patch_attn_head_out_by_pos on the same weights."""
    tmp = tempfile.TemporaryDirectory()
    folder = Path(tmp.name)
    kind = save_checkpoint(folder)
    model = GPT.from_pretrained(str(folder))
    print(f"# patch-run head sweeps\nmodel: {kind}\nmachine: {machine()}; torch {torch.__version__}; "
          f"{time.strftime('%Y-%m-%d')}\n")
    for T in args.sizes:
        clean, corrupt = prompts(T)
        sites = ("z", "q", "k", "v", "pattern")
        rc, rk = engines.record(model, clean, sites), engines.record(model, corrupt, sites)
        ours = {}
        for site in sites:
            best = float("inf")
            for _ in range(args.repeats):
                out, s = timed(lambda: engines.sweep(model, corrupt, rk, rc[site][:, 0], site, TARGET, FOIL, False),
                               torch.device("cpu"))
                best = min(best, s)
            ours[site] = (out[..., 1] - out[..., 0]).double(), best
            print(f"n={T} {site}: {out.shape[0] * out.shape[1] * out.shape[2]} patches, {best:.3f} s", flush=True)
        for python in args.tl_python:
            res = run_tl(python, folder, [{"sweep": "z", "clean": clean[0].tolist(), "corrupt": corrupt[0].tolist()}])
            if "error" in res:
                print(f"TransformerLens with {python}: failed ({res['error']})")
                continue
            job = res["jobs"][0]
            diff = (torch.tensor(job["matrix"], dtype=torch.float64) - ours["z"][0]).abs().max().item()
            print(f"n={T} z: TL {res['transformer_lens']} {job['seconds']:.2f} s = {job['seconds'] / ours['z'][1]:.1f}x "
                  f"patch-run's {ours['z'][1]:.3f} s; max diff {diff:.1e}", flush=True)
    tmp.cleanup()


# ----------------------------------------------------------------------------- start-up


def child_env(src: Path, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(src), HF_HUB_OFFLINE="1")
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # a warm start has its bytecode compiled, as after an install
    return env


def wall(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """Seconds from spawning `cmd` to its exit, its CPU seconds (user + system, all threads; less
    sensitive to other load than wall time) and its stdout; a failure stops the benchmark."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=env["PYTHONPATH"])  # -m: cwd first
    s = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed:\n{proc.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return s, cpu, proc.stdout


def startup_bench(args):
    src = Path(args.src).resolve() if args.src else ROOT
    env = child_env(src, args.threads)
    py = sys.executable
    clean, corrupt, target, foil = MICHELLE
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        small = tmp / "gpt2-small-shaped"
        kind = save_checkpoint(small)
        models = {"demo-names": "demo-names", "gpt2-small-shaped": str(small)}
        load_before = os.getloadavg()
        entry = "patching" if (src / "patching" / "__main__.py").exists() else "patching.cli"  # older checkouts: no helper
        bare, bare_frozen, whole, stages = [], [], {m: [] for m in models}, {m: [] for m in models}
        for i in range(args.runs + 1):  # round 0 warms the caches (bytecode, fonts, files) and is not kept
            keep = i > 0
            s, cpu, _ = wall([py, "-c", "import torch"], env)
            bare += [(s, cpu)] * keep
            s, _, _ = wall([py, "-c", "import gc, torch; gc.freeze()"], env)  # the same quick exit as patch-run's
            bare_frozen += [s] * keep
            for name, model in models.items():
                out = tmp / f"out-{name}-{i}"  # a new folder: patch-run does not overwrite without --overwrite
                s, cpu, _ = wall([py, "-m", entry, "--model", model, "--quiet", "--clean", clean, "--corrupt", corrupt,
                             "--target", target, "--foil", foil, "--out", str(out)], env)
                sweep = json.loads((out / "results.json").read_text())["timing"]["sweep_seconds"]
                whole[name] += [(s, sweep, cpu)] * keep
                s, _, stdout = wall([py, str(SCRIPTS / "startup_stages.py"), model, str(tmp / f"stages-{name}"),
                                  clean, corrupt, target, foil], env)
                got = json.loads(stdout.strip().splitlines()[-1])
                stages[name] += [(dict(got["wall"], whole_process=s), got["cpu"])] * keep
        load_after = os.getloadavg()

    base, base_cpu = min(s for s, _ in bare), min(c for _, c in bare)
    targets = {"demo-names": 0.5, "gpt2-small-shaped": 0.6}
    report = {"source": str(src), "checkpoint": kind, "runs": args.runs, "threads": args.threads,
              "load_before": load_before, "load_after": load_after, "bare_import_torch": base, "models": {}}
    names = list(models)
    print(f"# patch-run start-up, {args.runs} runs each (fresh processes, minimum), {args.threads} threads, "
          f"source {src}\nmachine: {machine()}; load average before {' '.join(f'{x:.2f}' for x in load_before)}, "
          f"after {' '.join(f'{x:.2f}' for x in load_after)}\ngpt2-small-shaped: {kind}\n")
    print(f"| stage (scripts/startup_stages.py): wall (CPU, all threads) | {' | '.join(names)} |\n"
          f"|---|{'---|' * len(names)}")
    keys = list(stages[names[0]][0][0])
    for key in keys:
        cells = []
        for n in names:
            cpu = [c[key] for _, c in stages[n] if key in c]
            cells.append(f"{min(w[key] for w, _ in stages[n]):.3f} s" + (f" ({min(cpu):.3f})" if cpu else ""))
        print(f"| {key} | {' | '.join(cells)} |")
    print(f"\n| whole process | {' | '.join(names)} |\n|---|{'---|' * len(names)}")
    print(f"| bare `python -c \"import torch\"` | {' | '.join(f'{base:.3f} s' for _ in names)} |")
    rows = {n: min(whole[n], key=lambda ws: ws[0] - ws[1]) for n in names}  # the run with the least overhead
    print(f"| `patch-run --quiet` (Michelle pair) | {' | '.join(f'{rows[n][0]:.3f} s' for n in names)} |")
    print(f"| its sweep_seconds | {' | '.join(f'{rows[n][1]:.3f} s' for n in names)} |")
    cells = []
    for n in names:
        over = rows[n][0] - rows[n][1] - base
        cells.append(f"**{over:.3f} s** (target <= {targets[n]} s: {'met' if over <= targets[n] else 'NOT met'})")
        report["models"][n] = {"whole_process": rows[n][0], "sweep_seconds": rows[n][1], "overhead": over,
                               "target": targets[n], "stages": {k: min(w[k] for w, _ in stages[n]) for k in keys},
                               "cpu_whole_process": min(c for _, _, c in whole[n])}
    print(f"| overhead = whole - bare torch - sweep | {' | '.join(cells)} |")
    frozen = min(bare_frozen)
    print(f"| bare `import gc, torch; gc.freeze()` (patch-run's quick exit, ~{base - frozen:.2f} s less teardown) "
          f"| {' | '.join(f'{frozen:.3f} s' for _ in names)} |")
    print(f"| overhead against that baseline | "
          f"{' | '.join(f'{rows[n][0] - rows[n][1] - frozen:.3f} s' for n in names)} |")
    report["bare_import_torch_frozen"] = frozen
    cpu = [report["models"][n]["cpu_whole_process"] for n in names]
    print(f"| CPU seconds, all threads (bare torch: {base_cpu:.3f} s) | {' | '.join(f'{c:.3f} s' for c in cpu)} |")
    report["bare_import_torch_cpu"] = base_cpu
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


# ----------------------------------------------------------------------------- circuits


def edge_flops(config: GPTConfig, graph, T: int, first: int) -> float:
    """FLOPs of exact edge patching without shortcuts beyond the resumable engine's: for each edge, its
    reader's new value and everything after it over rows first..T-1 (positions before the first
    differing token are the base run's in every edge run): for a head reader at layer l, block l's
    c_proj and MLP and blocks l+1.. whole; for an MLP reader, its MLP and blocks l+1..; the logits
    reader two unembedding columns."""
    C, F, L = config.n_embd, config.n_inner, config.n_layer
    rows = T - first
    block = rows * 2 * (4 * C * C + 2 * C * F) + sum(4 * C * (t + 1) for t in range(first, T))
    tail = rows * 2 * (C * C + 2 * C * F)  # c_proj and the MLP of the reader's own block
    mlp = rows * 2 * 2 * C * F
    total = 0.0
    for reader, n in zip(graph.readers, graph.adjacency.sum(1)):
        if reader == "logits":
            total += n * 4 * C
            continue
        l = int(reader[1:].split(".")[0].split("<")[0])
        total += n * ((tail if "<" in reader else mlp) + (L - 1 - l) * block)
    return total


def circuit_bench(args):
    """Exact edge patching of every edge and EAP on a GPT-2-small-shaped checkpoint (the Michelle pair,
    11 tokens), against TransformerLens 4.3's edge attribution patching and faithfulness."""
    from patching.analyses.circuit.graph import Graph
    from patching.api import ModelSpec, Pair, load, run
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2-small-shaped"
        kind = save_checkpoint(folder)
        ctx = load(ModelSpec(model=str(folder), device=args.device))
        pair = Pair("Michelle Jones was a top-notch student. Michelle", "Michelle Smith was a top-notch student. Michelle",
                    "Jones", "Smith")
        clean, corrupt = (ctx.tok.encode(t) for t in (pair.clean, pair.corrupt))
        T, graph = len(clean), Graph.of(ctx.config)
        first = next(i for i, (a, b) in enumerate(zip(clean, corrupt)) if a != b)
        peak = max(matmul_peaks(device).values())
        flops = edge_flops(ctx.config, graph, T, first)
        print(f"{machine()}; {kind}; {graph.describe()}, {T} tokens; matmul peak {peak:.0f} GFLOP/s; "
              f"torch threads {torch.get_num_threads()}")
        out = {}
        for method in ("eap", "exact"):
            best = None
            for _ in range(args.circuit_repeats if method == "eap" else 1):
                r = run("circuit", ctx, pair, method=method)
                best = r if best is None or r.timing["scores_seconds"] < best.timing["scores_seconds"] else best
            out[method] = best
            t = best.timing["scores_seconds"]
            line = f"{method}: scores {t:.2f} s, faithfulness curve and circuit search {best.timing['faithfulness_seconds']:.2f} s"
            if method == "exact":
                line += (f"; useful {flops / 1e9:.0f} GFLOP, floor {flops / 1e9 / peak:.1f} s at the peak, "
                         f"share of floor {flops / 1e9 / peak / t:.0%}")
            print(line, flush=True)
        exact = out["exact"].summed
        err = np.abs(out["eap"].summed - exact)
        print(f"eap vs exact: max |error| {err.max():.4g} (largest exact score {np.abs(exact).max():.4g}), "
              f"pearson {np.corrcoef(out['eap'].summed, exact)[0, 1]:.4f}")
        top = [graph.names[i] for i in out["exact"].ranking[:out["exact"].circuit["n_edges"]]]
        for python in args.tl_python:
            res = run_tl(python, folder, [{"sweep": "edges", "clean": clean, "corrupt": corrupt, "circuit": top}])
            if "error" in res:
                print(f"TransformerLens ({python}): {res['error']}")
                continue
            job = res["jobs"][0]
            theirs = np.array([job["edge_scores"].get(n, np.nan) for n in graph.names])
            print(f"TL {res['transformer_lens']} attribution_patch (edge): {job['seconds']:.2f} s for "
                  f"{job['n_edges_per_position']:,} edges x positions; summed over positions vs our exact: max |error| "
                  f"{np.nanmax(np.abs(theirs - exact)):.4g}, vs our eap: {np.nanmax(np.abs(theirs - out['eap'].summed)):.3g}")
            print(f"TL faithfulness of our exact circuit ({len(top)} edges at every position): {job['faithfulness_seconds']:.2f} s, "
                  f"recovered {job['faithfulness']:.4f} (ours: f = {out['exact'].circuit['value']:.4f}, the whole curve "
                  f"and search {out['exact'].timing['faithfulness_seconds']:.2f} s)")


# ----------------------------------------------------------------------------- top --unit all


def top_bench(args):
    """--top: tokens/s of `top --unit all`'s pass, with and without histograms, over a plain forward of the
    same batches (module doc)."""
    from patching.analyses.top import corpus as corpora
    from patching.analyses.top.index import Builder
    from patching.analyses.top.scan import make_batch
    from patching.core.context import ModelSpec, load
    torch.set_num_threads(args.threads)
    names = ("plain", "--unit all", "--no-histograms")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2-small-shaped"
        kind = save_checkpoint(folder)
        ctx = load(ModelSpec(model=str(folder), device="cpu"))
        corpus = corpora.tokenize(ctx.tok, "python-docs", corpora.documents("python-docs"), ctx.config.vocab_size)
        wins = corpora.windows(corpus, args.top_window, False)
        groups = corpora.batches(wins, args.top_batch)
        groups = groups[:args.top_batches + 1] if args.top_batches else groups
        profiles: dict = {name: {} for name in names[1:]}
        builders = {name: Builder(ctx, corpus, "mlp_post", args.top_k, 0.0, False, name == "--unit all",
                                  profile=profiles[name]) for name in names[1:]}
        cfg = ctx.config
        print(f"# patch-run top --unit all (mlp_post: {cfg.n_layer} x {cfg.n_inner} = {cfg.n_layer * cfg.n_inner:,} "
              f"neurons, k {args.top_k}), with and without histograms, against a plain forward\nmodel: {kind}\n"
              f"machine: {machine()}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}\ncorpus: python-docs, "
              f"{corpus.n_tokens:,} tokens; {len(groups) - 1} timed batches of {args.top_batch} x {args.top_window} "
              f"(+1 warm-up), the three passes in turn, each batch starting with the next\n")
        wall = {name: 0.0 for name in names}
        cpu = {name: 0.0 for name in names}
        ratios: dict = {name: [] for name in names[1:]}
        tokens = 0
        with torch.no_grad(), PeakRSS(torch.device("cpu")) as mem:
            for i, members in enumerate(groups):
                b = make_batch(corpus, wins, members, False, cfg.vocab_size - 1, ctx.device)
                runs = {"plain": lambda: ctx.model(b.ids, last_only=True),
                        **{name: (lambda bd=bd: bd.step(b)) for name, bd in builders.items()}}
                got, used = {}, {}
                for name in names[i % 3:] + names[:i % 3]:  # rotate: drift on the shared machine hits all alike
                    t, c = time.perf_counter(), time.process_time()
                    runs[name]()
                    got[name], used[name] = time.perf_counter() - t, time.process_time() - c
                n = int(b.valid.sum())
                line = ", ".join(f"{name} {got[name]:.2f} s ({used[name]:.2f} s CPU)" for name in names)
                if i == 0:  # warm-up: the first fold fills every top-k list
                    for p in profiles.values():
                        p.clear()
                    print(f"warm-up: {line}", flush=True)
                    continue
                tokens += n
                for name in names:
                    wall[name] += got[name]
                    cpu[name] += used[name]
                for name in names[1:]:
                    ratios[name].append(got["plain"] / got[name])
                print(f"batch {i}: {n} tokens, {line}", flush=True)
    nb = len(ratios[names[1]])
    print()
    for name in names:
        print(f"{name:16s} {tokens / wall[name]:6,.0f} tokens/s ({wall[name] / nb:.2f} s a batch), by CPU time "
              f"{tokens / cpu[name]:6,.0f} tokens/s" + ("" if name == "plain" else
              f"; ratio {wall['plain'] / wall[name]:.3f} (CPU {cpu['plain'] / cpu[name]:.3f}; batch by batch median "
              f"{float(np.median(ratios[name])):.3f}, range {min(ratios[name]):.3f}-{max(ratios[name]):.3f})"))
    print("target: ratio >= 0.9")
    for name in names[1:]:
        parts = ", ".join(f"{k} {v / nb * 1000:.0f} ms" for k, v in profiles[name].items())
        print(f"{name}: CPU time a batch by part: {parts}; beyond the plain forward in all "
              f"{(cpu[name] - cpu['plain']) / nb * 1000:.0f} ms CPU, {(wall[name] - wall['plain']) / nb * 1000:.0f} ms wall")
    sizes = {name: sum(v.nbytes for v in bd.arrays().values()) / 2**20 for name, bd in builders.items()}
    print(f"index state: {sizes['--unit all']:.0f} MiB with histograms, {sizes['--no-histograms']:.0f} MiB without; "
          f"peak resident memory of this process (model, both states, a batch) over the timed batches: "
          f"{mem.peak_total_mb:,.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "model": kind, "batches": nb, "tokens": tokens,
                                               "wall_s": wall, "cpu_s": cpu, "ratios": ratios,
                                               "parts_cpu_s": profiles, "state_mb": sizes,
                                               "peak_mb": mem.peak_total_mb}, indent=1))


def versus_bench(args):
    """--dtype D --versus E: the same sweeps in two precisions in one process, alternating sweep by sweep
    (this machine's speed drifts by minutes, and a second run would meet another machine), each against
    the matmul peak of its own precision measured in the same run."""
    device = torch.device(args.device)
    dtypes = [getattr(torch, args.dtype), getattr(torch, args.versus)]
    tmp = tempfile.TemporaryDirectory()
    kind = save_checkpoint(Path(tmp.name))
    base = GPT.from_pretrained(tmp.name)
    models = {dt: copy.deepcopy(base).to(device=device, dtype=dt) for dt in dtypes}
    del base
    names = {dt: str(dt).split(".")[-1] for dt in dtypes}
    paths = {dt: matmul_path(device, dt) for dt in dtypes}
    peaks = {dt: max(matmul_peaks(device, dt).values()) for dt in dtypes}
    print(f"# patch-run sweep benchmark, {names[dtypes[0]]} against {names[dtypes[1]]}\nmodel: {kind}\n"
          f"machine: {machine()}\n" + "\n".join(f"{names[dt]}: products {paths[dt]}" for dt in dtypes) + "\n")
    rows = []
    with contextlib.ExitStack() as stack:
        for m in models.values():
            stack.enter_context(m.packed())  # as a batch or study holds them
        for T in args.sizes:
            clean, corrupt = (t.to(device) for t in prompts(T))
            recs = {dt: (engines.record(m, clean), engines.record(m, corrupt)) for dt, m in models.items()}
            sweep = {dt: (lambda dt=dt: engines.fast_sweep(models[dt], recs[dt][1], recs[dt][0], TARGET, FOIL, False))
                     for dt in dtypes}
            for dt in dtypes:
                sweep[dt]()  # packs the weights
            best, spent = {dt: float("inf") for dt in dtypes}, 0.0
            for i in range(30):
                for dt in dtypes:
                    _, t = timed(sweep[dt], device)
                    best[dt], spent = min(best[dt], t), spent + t
                if i + 1 >= args.repeats and spent > 6 or spent > 40:
                    break
            for dt in dtypes:  # again after each size: each floor takes the best peak seen
                peaks[dt] = max(peaks[dt], *matmul_peaks(device, dt).values())
            positions = changed_positions(*recs[dtypes[1]])
            floor = floor_flops(models[dtypes[0]].config, T, positions) / 1e9
            rows.append(dict(n=T, seconds={names[dt]: best[dt] for dt in dtypes}, floor_gflop=floor, sweeps=i + 1))
            print(f"n={T}: " + ", ".join(f"{names[dt]} {best[dt]:.3f}s" for dt in dtypes) +
                  f"; {names[dtypes[0]]} is {best[dtypes[1]] / best[dtypes[0]]:.2f}x as fast ({i + 1} sweeps each)", flush=True)
    tmp.cleanup()
    a, b = dtypes
    print(f"\nmachine: {machine()}; matmul peaks " + ", ".join(f"{names[dt]} {peaks[dt]:.0f} GFLOP/s" for dt in dtypes) +
          f"; {time.strftime('%Y-%m-%d')}")
    print(f"| tokens | {names[b]} | {names[a]} | {names[a]} / {names[b]} | % of floor ({names[b]} / {names[a]}) |")
    print("|---|---|---|---|---|")
    for r in rows:
        sa, sb = r["seconds"][names[a]], r["seconds"][names[b]]
        share = " / ".join(f"{100 * r['floor_gflop'] / peaks[dt] / r['seconds'][names[dt]]:.0f} %" for dt in (b, a))
        print(f"| {r['n']} | {sb:.3f} s | {sa:.3f} s | {sb / sa:.1f}x faster | {share} |")
    print("each figure: the best of the sweeps, the two precisions alternating sweep by sweep inside GPT.packed(); "
          "floor = floor GFLOP / the matmul peak of that precision")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": kind, "machine": machine(), "products": {names[dt]: paths[dt] for dt in dtypes},
                                               "peaks": {names[dt]: peaks[dt] for dt in dtypes}, "rows": rows}, indent=1))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--startup", action="store_true", help="benchmark a whole run's start-up instead of the sweep")
    ap.add_argument("--heads", action="store_true", help="benchmark the head sites (z against TransformerLens)")
    ap.add_argument("--circuit", action="store_true", help="benchmark exact edge patching and EAP (every edge of "
                    "GPT-2 small's graph) against TransformerLens")
    ap.add_argument("--circuit-repeats", type=int, default=3, help="--circuit: EAP runs (the best is kept)")
    ap.add_argument("--top", action="store_true", help="benchmark top --unit all (every neuron's bookkeeping) "
                    "against a plain forward of the same batches")
    ap.add_argument("--top-batches", type=int, default=20, help="--top: timed batches after one warm-up (0: the "
                    "whole corpus)")
    ap.add_argument("--top-batch", type=int, default=4, help="--top: windows per batch")
    ap.add_argument("--top-window", type=int, default=512, help="--top: tokens per window")
    ap.add_argument("--top-k", type=int, default=20, help="--top: top examples per neuron")
    ap.add_argument("--runs", type=int, default=5, help="--startup: fresh processes per figure (the minimum is kept)")
    ap.add_argument("--threads", type=int, default=2, help="--startup: OMP_NUM_THREADS of every process; --top: "
                    "torch threads")
    ap.add_argument("--src", help="--startup: the source tree to run (default: this one), e.g. an older checkout")
    ap.add_argument("--sizes", type=int, nargs="+", default=[11, 35, 128])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--versus", choices=["float32", "bfloat16", "float16"], help="also sweep in this precision, "
                    "alternating with --dtype's sweeps in one process, and compare the two")
    ap.add_argument("--long", type=int, default=1024, help="prompt length of the bounded-memory run (0: skip)")
    ap.add_argument("--long-chunks", type=int, default=3)
    ap.add_argument("--loop-budget", type=float, default=60.0, help="seconds before the loop is extrapolated")
    ap.add_argument("--tl-python", action="append", default=[], metavar="PY",
                    help="python of a venv with TransformerLens (4.x or 3.9); repeatable")
    ap.add_argument("--tl-max-n", type=int, default=64, help="longest prompt to time TransformerLens on")
    ap.add_argument("--fast-only", action="store_true", help="skip the loop and TransformerLens")
    ap.add_argument("--repeats", type=int, default=5,
                    help="timed sweeps per size, at least (and at least 3 s of them; the best is kept; at most ~20 s)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.circuit:
        return circuit_bench(args)
    if args.top:
        return top_bench(args)
    if args.versus:
        return versus_bench(args)
    startup_bench(args) if args.startup else head_bench(args) if args.heads else sweep_bench(args)


if __name__ == "__main__":
    main()
