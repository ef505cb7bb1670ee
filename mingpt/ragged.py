"""Causal attention over ragged row groups in one compiled call: the inner loop of mingpt.resume.

mingpt.resume runs the patched copies of a prompt's suffixes as one batch of row groups; a row of
group (p, start, S) attends to the base run's keys before position p and to its own group's rows up
to itself. In torch ops that is many small batched matmuls over buckets of groups, padded and masked
(at 11 tokens over 4x the scores needed, in ~40 calls per sweep), and on a CPU it costs ~5% of a
GPT-2-small sweep. ragged.c visits only the visible keys, for every slab, head and row, in one call.

The kernel is compiled on first use with the system's C compiler (CC, else cc, gcc or clang) for
this CPU (-march=native, OpenMP: torch's own threads once torch is loaded) into a per-user cache
(PATCH_RUN_CACHE, else $XDG_CACHE_HOME/patch-run or ~/.cache/patch-run), one file per source,
compiler, flags and CPU, loaded with ctypes (no Python headers needed), and checked once per process
against torch on small cases. Where there is no compiler, or no build loads or passes the check,
`attend` returns False and mingpt.resume computes the same attention with torch ops; `status()` says
which runs and why. PATCH_RUN_ATTENTION=torch turns the kernel off.
"""
from __future__ import annotations

import atexit
import ctypes
import hashlib
import math
import os
import platform
import shlex
import shutil
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("ragged.c")
FLAGS = (("-O3", "-march=native", "-fopenmp"), ("-O3", "-march=native"), ("-O3",))  # tried in order
MAX_HEAD = 256  # ragged.c's MAX_CHUNKS * 16

enabled = os.environ.get("PATCH_RUN_ATTENTION", "c") != "torch"


def status() -> str:
    """Which attention mingpt.resume uses here, in a few words (with the reason when it is torch's)."""
    if not enabled:
        return "torch ops (PATCH_RUN_ATTENTION=torch)"
    return _kernel()[1]


def table(groups) -> ctypes.Array:
    """The groups [(p, start, S), ...] as ragged.c reads them: all positions, all starts, all sizes."""
    return (ctypes.c_int64 * (3 * len(groups)))(*(g[i] for i in range(3) for g in groups))


def attend(q, k, v, prefix, groups: ctypes.Array, z, last_only: bool = False) -> bool:
    """Write z (n, rows, nh, hs) <- softmax(q k^T / sqrt(hs)) v over each row's visible keys, with
    q, k, v (n, nh, R, hs) and prefix the base run's (keys, values), (nh, T, hs) each; groups from
    table(). With last_only, q and z hold each group's last row only ((n, nh, G, hs), (n, G, nh, hs)).
    Returns False where the kernel is off or missing, the tensors are not float32 CPU tensors whose
    last dimension is contiguous, or it could not run: the caller then uses torch ops (z is rewritten)."""
    tensors = (q, k, v, *prefix, z)
    # checked before the kernel is built: half precision and GPUs never need it
    if not enabled or q.shape[-1] > MAX_HEAD or any(
            t.device.type != "cpu" or t.dtype != torch.float32 or t.stride(-1) != 1 for t in tensors):
        return False
    run = _kernel()[0]
    return run is not None and _call(run, q, k, v, prefix, groups, z, last_only) == 0  # 1: no scratch memory


def _call(run, q, k, v, prefix, groups: ctypes.Array, z, last_only: bool) -> int:
    """ragged_attend's return code for attend's arguments (checked there): sizes, strides and
    torch's thread count in one int64 array, then the groups and the tensors' data."""
    n, nh, _, hs = q.shape
    pk, pv = prefix
    meta = (ctypes.c_int64 * 22)(n, nh, hs, len(groups) // 3, int(last_only), *q.stride()[:3], *k.stride()[:3],
                                 *v.stride()[:3], *pk.stride()[:2], *pv.stride()[:2], *z.stride()[:3],
                                 torch.get_num_threads())
    return run(meta, groups, *(t.data_ptr() for t in (q, k, v, pk, pv, z)), 1.0 / math.sqrt(hs))


_LOCK = threading.Lock()  # one build at a time in a process


@lru_cache(maxsize=1)
def _kernel():
    """(the loaded ragged_attend, or None; the status line). Never raises: anything that goes wrong
    here leaves torch ops in charge, with the reason in the status."""
    with _LOCK:
        try:
            return _load()
        except Exception as e:  # noqa: BLE001 - a missing source, an odd cache, a decoding error: torch runs
            return None, f"torch ops (no usable C kernel: {type(e).__name__}: {e})"


def _load():
    cc = shlex.split(os.environ.get("CC", "")) or [next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), "")]
    if not cc[0]:
        return None, "torch ops (no C compiler found: set CC to one)"
    code, cache, why = SOURCE.read_bytes(), _cache_dir(), "no build was tried"
    for flags in FLAGS:
        key = hashlib.sha256(b"\0".join([code, " ".join(cc).encode(), " ".join(flags).encode(), _cpu().encode()]))
        lib = cache / f"ragged-{key.hexdigest()[:16]}.so"
        failed = lib.with_suffix(".failed")  # the compiler rejected it once: not retried by every process
        if failed.exists():
            why = failed.read_text(errors="replace")
            continue
        if not lib.exists():
            why, rejected = _compile(cc, flags, lib)
            if why:
                if rejected:
                    _write(failed, why)
                continue
        try:
            run = ctypes.CDLL(str(lib)).ragged_attend
        except (OSError, AttributeError) as e:
            why = f"{lib} did not load: {e}"
            continue
        run.restype, run.argtypes = ctypes.c_int, [ctypes.c_void_p] * 8 + [ctypes.c_float]
        if not _agrees(run):
            why = f"{lib} disagreed with torch"
            continue
        return run, f"C kernel ({' '.join([Path(cc[0]).name, *cc[1:], *flags])})"
    return None, f"torch ops (no usable C kernel: {why})"


def _compile(cc: list[str], flags, lib: Path) -> tuple[str | None, bool]:
    """Build lib from SOURCE: (None, False), or (the first complaint, whether the compiler itself
    rejected the build: a failure to start it or a timeout may pass and is not remembered)."""
    import subprocess  # only here: most runs load the cached build

    # built under a unique name, then renamed into place: a concurrent build never sees half a file
    handle, tmp = tempfile.mkstemp(dir=lib.parent, prefix=lib.stem + ".", suffix=".tmp")
    os.close(handle)
    try:
        done = subprocess.run([*cc, *flags, "-shared", "-fPIC", "-o", tmp, str(SOURCE)],
                              capture_output=True, text=True, errors="replace", timeout=300)
        if done.returncode:
            lines = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines() or ["?"]
            return f"{' '.join(cc)} {' '.join(flags)}: {lines[0].strip()}", True
        os.replace(tmp, lib)
        return None, False
    except (OSError, subprocess.SubprocessError) as e:
        return f"{' '.join(cc)}: {e}", False
    finally:
        Path(tmp).unlink(missing_ok=True)


def _cache_dir() -> Path:
    """The per-user build cache, or a temporary folder (removed at exit) where that cannot be written."""
    base = os.environ.get("PATCH_RUN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "patch-run"
    try:
        Path(base).mkdir(parents=True, exist_ok=True)
        if os.access(base, os.W_OK):
            return Path(base)
    except OSError:
        pass
    folder = tempfile.mkdtemp(prefix="patch-run-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # a loaded library outlives its file on POSIX
    return Path(folder)


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError:
        pass  # only a cache: the build is tried again next time


def _cpu() -> str:
    """What -march=native depends on: the CPU's feature flags (Linux), else its name."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {flags or platform.processor()}"  # processor() starts a process: only if needed


def _agrees(run) -> bool:
    """The freshly loaded kernel against torch on small cases: head sizes of whole vectors (GPT-2's
    64) and with a scalar tail, groups of several lengths, all rows and last rows only."""
    g = torch.Generator().manual_seed(0)
    groups, T, R, n, nh = [(0, 0, 5), (2, 5, 3), (4, 8, 1)], 5, 9, 2, 2
    # (R, T + R): row r of group (p, start, S) sees base keys < p and its group's rows start..r
    sees = torch.zeros(R, T + R, dtype=torch.bool)
    for p, start, S in groups:
        for r in range(start, start + S):
            sees[r, :p] = True
            sees[r, T + start:T + r + 1] = True
    ok = True
    for hs in (64, 20):
        qkv = torch.randn(n, R, 3, nh, hs, generator=g)  # (n, R, q|k|v, nh, hs): strided views, as resume passes
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (n, nh, R, hs)
        prefix = [torch.randn(nh, T, hs, generator=g) for _ in range(2)]
        keys, values = (torch.cat([b[None].expand(n, -1, -1, -1), own], dim=2) for b, own in zip(prefix, (k, v)))
        w = (q @ keys.transpose(-2, -1) / math.sqrt(hs)).masked_fill(~sees, float("-inf")).softmax(-1)
        want = (w @ values).transpose(1, 2)  # (n, R, nh, hs)
        for last in (False, True):
            rows = [start + S - 1 for _, start, S in groups] if last else list(range(R))
            z = torch.full((n, len(rows), nh, hs), float("nan"))
            if _call(run, q[:, :, rows], k, v, prefix, table(groups), z, last):
                return False
            ok &= bool(((z - want[:, rows]).abs().max() <= 1e-5 * want.abs().max()).item())
    return ok
