"""Causal attention over ragged row groups in one compiled call: the inner loop of mingpt.resume.

mingpt.resume runs the patched copies of a prompt's suffixes as one batch of row groups; a row of
group (p, start, S) attends to the base run's keys before position p and to its own group's rows up
to itself. In torch ops that is many small batched matmuls over buckets of groups, padded and masked
(at 11 tokens over 4x the scores needed, in ~40 calls per sweep), and on a CPU it costs ~5% of a
GPT-2-small sweep. ragged.c visits only the visible keys, for every slab, head and row, in one call.

The kernel is compiled on first use with the system's C compiler (CC, else cc, gcc or clang) for
this CPU (-march=native, OpenMP: torch's own threads once torch is loaded; clang builds it without, as
its OpenMP runtime is not torch's) into a per-user cache
(PATCH_RUN_CACHE, else $XDG_CACHE_HOME/patch-run or ~/.cache/patch-run), one file per source,
compiler, flags and CPU, loaded with ctypes (no Python headers needed), and checked once per process
against torch on small cases. Loading a library runs its code, so the cache is used only if it is our
folder, writable by us alone, under folders of ours or root's that nobody else can rename (ssh's rule;
a sticky /tmp passes); otherwise the kernel is built in a private temporary folder and the status says
why. Folders it makes are 0700, files 0600 (the library 0700), whatever the umask. A cached library is
loaded only if it is a plain file of ours (not a link) whose sha256 matches the record its build wrote
beside it (else it is built again): it is hashed through an open descriptor and loaded through that
same descriptor (/proc/self/fd/N), so the bytes checked are the bytes loaded. Where there is no
compiler, or no build loads or passes the check, `attend` returns False and mingpt.resume computes
the same attention with torch ops; `status()` says which runs and why. PATCH_RUN_ATTENTION=torch turns the kernel off.
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
import stat
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
            run, line = _load()
        except Exception as e:  # noqa: BLE001 - a missing source, an odd cache, a decoding error: torch runs
            run, line = None, f"torch ops (no usable C kernel: {type(e).__name__}: {e})"
        # one printable line whatever the paths or messages hold (a folder's name may hold a newline)
        return run, "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)


def compiler() -> list[str]:
    """The C compiler's command: CC split as a shell would, else the first of cc, gcc, clang ([""] if none)."""
    return shlex.split(os.environ.get("CC", "")) or [next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), "")]


def library_name(cc: list[str], flags) -> str:
    """The cache's file name for a build of ragged.c with this compiler and flags on this CPU."""
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(cc).encode(), " ".join(flags).encode(),
                                     _cpu().encode()]))
    return f"ragged-{key.hexdigest()[:16]}.so"


_OPEN: list[int] = []  # descriptors of loaded libraries: kept open so that no later load reuses their /proc name


def _load():
    cc = compiler()
    if not cc[0]:
        return None, "torch ops (no C compiler found: set CC to one)"
    cache, refused = _cache_dir()
    if cache is None:
        return None, f"torch ops (no safe folder to build the C kernel in: {refused})"
    why = "no build was tried"
    for flags in FLAGS:
        lib = cache / library_name(cc, flags)
        failed = _read_own(lib.with_suffix(".failed"))  # the compiler rejected it once: not retried by every process
        if failed is not None:
            why = failed.decode(errors="replace")
            continue
        fd = _open_cached(lib)  # None: absent, not ours, or not the bytes its record names: built again
        if fd is None:
            fd, why, rejected = _compile(cc, flags, lib)
            if fd is None:
                if rejected:
                    _write(lib.with_suffix(".failed"), why.encode())
                continue
        try:
            run = _entry(fd, lib)
        except (OSError, AttributeError) as e:
            why = f"{lib} did not load: {e}"
            continue
        if not _agrees(run):
            why = f"{lib} disagreed with torch"
            continue
        where = f", built in a private temporary folder because {refused}" if refused else ""
        return run, f"C kernel ({' '.join([Path(cc[0]).name, *cc[1:], *flags])}){where}"
    return None, f"torch ops (no usable C kernel: {why})"


def _entry(fd: int, lib: Path):
    """ragged_attend of the library open at fd (see _dlopen), typed as _call calls it."""
    run = _dlopen(fd, lib).ragged_attend
    run.restype, run.argtypes = ctypes.c_int, [ctypes.c_void_p] * 8 + [ctypes.c_float]
    return run


def _compile(cc: list[str], flags, lib: Path) -> tuple[int | None, str | None, bool]:
    """Build lib from SOURCE: (a descriptor open on the built file, None, False), or (None, the first
    complaint, whether the compiler itself rejected the build: a failure to start it or a timeout
    may pass and is not remembered). The file's sha256 is recorded beside it for later processes."""
    import subprocess  # only here: most runs load the cached build

    # built under a unique name, then renamed into place: a concurrent build never sees half a file
    handle, tmp = tempfile.mkstemp(dir=lib.parent, prefix=lib.stem + ".", suffix=".tmp")
    os.close(handle)
    fd = None
    try:
        done = subprocess.run([*cc, *flags, "-shared", "-fPIC", "-o", tmp, str(SOURCE)],
                              capture_output=True, text=True, errors="replace", timeout=300)
        if done.returncode:
            lines = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines() or ["?"]
            return None, f"{' '.join(cc)} {' '.join(flags)}: {lines[0].strip()}", True
        # the linker recreates its output with the umask's mode: opened (never through a link) and made private
        fd = os.open(tmp, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        os.fchmod(fd, 0o700)
        digest = hashlib.sha256(_read_all(fd)).hexdigest()
        os.replace(tmp, lib)  # fd still reads the bytes just hashed, whatever later happens to the name
        _write(lib.with_suffix(".sha256"), f"{digest}\n".encode())
        fd, built = None, fd
        return built, None, False
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{' '.join(cc)}: {e}", False
    finally:
        if fd is not None:
            os.close(fd)
        Path(tmp).unlink(missing_ok=True)


def _open_cached(lib: Path) -> int | None:
    """A descriptor open on lib when it is a plain file of ours, writable by us only, whose bytes
    hash to its .sha256 record (itself ours and private); else None (and it is built again)."""
    record = _read_own(lib.with_suffix(".sha256"))
    if record is None:
        return None
    try:
        fd = os.open(lib, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)  # a link fails here
    except OSError:
        return None
    try:
        # hashed through the descriptor that dlopen reads: a file swapped after the check is not loaded
        if _ours(os.fstat(fd)) and hashlib.sha256(_read_all(fd)).hexdigest() == record.decode("ascii", "replace").strip():
            fd, ok = None, fd
            return ok
        return None
    except OSError:
        return None
    finally:
        if fd is not None:
            os.close(fd)


def _dlopen(fd: int, lib: Path) -> ctypes.CDLL:
    """Load the file open at fd: through /proc/self/fd on Linux (the very bytes checked), else by its
    name (in a folder only we can write). The descriptor is kept while the library lives."""
    proc = f"/proc/self/fd/{fd}"
    try:
        loaded = ctypes.CDLL(proc if os.path.exists(proc) else str(lib))
    except OSError:
        os.close(fd)
        raise
    _OPEN.append(fd)
    return loaded


def _read_own(path: Path) -> bytes | None:
    """path's bytes (up to 64 KiB) when it is a plain file of ours that only we can write, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)  # no link, no waiting on a FIFO
    except OSError:
        return None
    try:
        return os.read(fd, 1 << 16) if _ours(os.fstat(fd)) else None
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _who_else(st: os.stat_result) -> str | None:
    """Why someone besides us may have changed what st describes (None: nobody may have)."""
    if st.st_uid != os.geteuid():
        return f"owned by another user (uid {st.st_uid})"
    if st.st_mode & 0o022:
        return f"writable by {'others' if st.st_mode & 0o002 else 'its group'}"
    return None


def _ours(st: os.stat_result) -> bool:
    """A plain file that only we can have written."""
    return stat.S_ISREG(st.st_mode) and _who_else(st) is None


def _unsafe(folder: Path) -> str | None:
    """Why files in folder (a resolved path) could be planted or swapped by another user, else None.
    As ssh checks its own folders: the folder must be ours and writable by us only; each folder
    above it must belong to us or root and be writable by its owner only, or be sticky (like /tmp:
    then nobody else can rename the entry below it, which is ours or root's)."""
    try:
        st = os.lstat(folder)
        if not stat.S_ISDIR(st.st_mode):
            return f"the cache folder {folder} is not a folder"
        if why := _who_else(st):
            return f"the cache folder {folder} is {why}"
        for parent in folder.parents:
            st = os.lstat(parent)
            if stat.S_ISLNK(st.st_mode):  # it was resolved: a link here appeared since
                return f"the cache folder's parent {parent} is a symbolic link"
            if st.st_uid not in (0, os.geteuid()):
                return f"the cache folder's parent {parent} is owned by another user (uid {st.st_uid})"
            if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
                who = "others" if st.st_mode & 0o002 else "its group"
                return f"the cache folder's parent {parent} is writable by {who} and not sticky"
    except OSError as e:
        return f"the cache folder {folder} cannot be checked ({e.strerror})"
    return None


def _cache_dir() -> tuple[Path | None, str | None]:
    """(the per-user build cache, None), or (a private temporary folder removed at exit, why the
    cache was refused) where it cannot be written (None: not said) or someone else could write there;
    (None, why) if even the temporary folder is not private."""
    base = Path(os.environ.get("PATCH_RUN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "patch-run")
    try:
        _make_private(base.absolute())
        folder = Path(os.path.realpath(base))  # a link to the cache is followed: the folder it reaches is checked
        refused = _unsafe(folder)
        if refused is None and os.access(folder, os.W_OK):
            return folder, None
    except OSError:
        refused = None
    if refused:
        refused += ": chmod 700 it if it is yours, or set PATCH_RUN_CACHE to a folder that only you can write"
    folder = Path(tempfile.mkdtemp(prefix="patch-run-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)  # a loaded library outlives its file on POSIX
    if unsafe := _unsafe(Path(os.path.realpath(folder))):
        return None, unsafe
    return folder, refused


def _make_private(path: Path) -> None:
    """Create path's missing folders with mode 0700 whatever the umask (as XDG asks of ~/.cache)."""
    missing = [p for p in (path, *path.parents) if not os.path.lexists(p)]
    for p in reversed(missing):
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:
            continue  # made by a concurrent process: checked like any other folder
        fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)  # the folder just made, not a link put there
        try:
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)


def _write(path: Path, data: bytes) -> None:
    """path <- data, mode 0600, through a unique temporary name and a rename (never through a link)."""
    try:
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")  # 0600, ours
    except OSError:
        return  # only a cache: the build is tried again next time
    try:
        with os.fdopen(handle, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)


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
