"""What mingpt.ragged's build cache trusts: loading a shared library runs its code, so a library
planted in a folder that someone else can write (or owned by someone else, or a link, or without the
sha256 record of our own build) must never be loaded; the kernel is then built privately and the
sweeps stay right. And the normal path: one build, later processes load it without compiling.

Each test plants files under the exact names the cache uses (ragged.library_name), with a planted
library whose constructor writes a marker file: if it is ever loaded, the marker appears.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_close
from mingpt import ragged
from mingpt.model import GPT, GPTConfig
from patching.core import engines

ROOT = Path(__file__).resolve().parent.parent
HAS_CC = bool(os.environ.get("CC") or any(map(shutil.which, ("cc", "gcc", "clang"))))
pytestmark = pytest.mark.skipif(
    not HAS_CC or not ragged.enabled,
    reason="SKIPPED LOUDLY: no C compiler, or PATCH_RUN_ATTENTION=torch: the kernel cache is not used here")


@pytest.fixture
def kernel(monkeypatch):
    """ragged's build state reset (its cache set by each test), compiles counted; reset again after."""
    monkeypatch.setattr(ragged, "enabled", True)
    builds = []
    real = ragged._compile
    monkeypatch.setattr(ragged, "_compile", lambda *a: builds.append(a[2]) or real(*a))
    ragged._kernel.cache_clear()

    def use(cache: Path) -> list:
        monkeypatch.setenv("PATCH_RUN_CACHE", str(cache))
        ragged._kernel.cache_clear()
        return builds

    yield use
    ragged._kernel.cache_clear()


def names() -> list[str]:
    """The cache's file names for every flag set it tries, in this environment."""
    return [ragged.library_name(ragged.compiler(), flags) for flags in ragged.FLAGS]


def planted_library(tmp_path: Path) -> tuple[Path, Path]:
    """(a library whose constructor writes the marker file, the marker's path, absent so far)."""
    marker = tmp_path / "planted-code-ran"
    src = tmp_path / "planted.c"
    src.write_text("#include <stdio.h>\n"
                   "__attribute__((constructor)) static void planted(void) {\n"
                   f"    FILE *f = fopen({json.dumps(str(marker))}, \"w\");\n"
                   "    if (f) { fputs(\"ran\", f); fclose(f); }\n"
                   "}\n"
                   "int ragged_attend(void) { return 0; }\n")  # also looks like the kernel's entry point
    lib = tmp_path / "planted.so"
    subprocess.run([*ragged.compiler(), "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return lib, marker


def plant(cache: Path, lib: Path, record: str | None = None) -> None:
    """lib copied under every name the cache would load, with a .sha256 record when asked:
    "own" (the planted bytes' hash: a record that matches) or "other" (another hash)."""
    data = lib.read_bytes()
    for name in names():
        (cache / name).write_bytes(data)
        (cache / name).chmod(0o755)
        if record:
            digest = hashlib.sha256(data if record == "own" else b"something else").hexdigest()
            (cache / name).with_suffix(".sha256").write_text(digest + "\n")


def folder(path: Path, mode: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    return path


def chown_to_nobody(*paths: Path) -> None:
    try:
        for p in paths:
            os.chown(p, 65534, 65534, follow_symlinks=False)
    except PermissionError:
        pytest.skip("chown to another user (uid 65534) is not permitted here: run the suite as root to test this")


def assert_kernel_works():
    """The kernel runs (attend says True) and equals a plain per-row softmax; a sweep equals the loop."""
    groups = [(0, 0, 3), (2, 3, 4)]  # (p, start, S): group 1 sees base keys 0, 1 and its own rows
    g = torch.Generator().manual_seed(0)
    n, nh, hs, R, T = 2, 2, 16, 7, 6
    q, k, v = (torch.randn(n, nh, R, hs, generator=g) for _ in range(3))
    pk, pv = (torch.randn(nh, T, hs, generator=g) for _ in range(2))
    z = torch.full((n, R, nh, hs), float("nan"))
    assert ragged.attend(q, k, v, (pk, pv), ragged.table(groups), z), ragged.status()
    want = torch.empty_like(z)
    for p, start, S in groups:
        for r in range(start, start + S):
            keys = torch.cat([pk[None, :, :p].expand(n, -1, -1, -1), k[:, :, start:r + 1]], dim=2)
            vals = torch.cat([pv[None, :, :p].expand(n, -1, -1, -1), v[:, :, start:r + 1]], dim=2)
            w = torch.softmax(torch.einsum("nhd,nhkd->nhk", q[:, :, r], keys) / math.sqrt(hs), dim=-1)
            want[:, r] = torch.einsum("nhk,nhkd->nhd", w, vals)
    assert_close(z, want, scale=want.abs().max(), what="kernel vs per-row softmax")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=53, block_size=32)).eval()
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, 53, (1, 12), generator=g)
    corrupt = clean.clone()
    corrupt[0, 3] = (clean[0, 3] + 5) % 53
    rc, rk = engines.record(model, clean), engines.record(model, corrupt)
    fast = engines.sweep(model, corrupt, rk, rc.resid[:, 0], "resid_post", 3, 4, False)
    loop = engines.sweep(model, corrupt, rk, rc.resid[:, 0], "resid_post", 3, 4, False, engine="loop")
    assert_close(fast[..., :2], loop[..., :2], scale=loop[..., :2].abs().max())


def assert_one_line(line: str):
    assert "\n" not in line and "\r" not in line and line.isprintable(), repr(line)


@pytest.mark.parametrize("name", ["cache", "a cache\nwith a newline"])
def test_planted_library_in_a_world_writable_cache_is_never_loaded(kernel, tmp_path, name):
    """A cache anyone can write is not used at all (not even with a record that matches the planted
    bytes): the kernel is built in a private temporary folder, and the status says why in one line."""
    cache = folder(tmp_path / name, 0o777)
    lib, marker = planted_library(tmp_path)
    plant(cache, lib, record="own")
    before = sorted(p.name for p in cache.iterdir())
    kernel(cache)
    line = ragged.status()
    assert not marker.exists(), "the planted library was loaded"
    assert line.startswith("C kernel (") and "built in a private temporary folder" in line, line
    assert "is writable by others" in line, line
    assert_one_line(line)
    assert sorted(p.name for p in cache.iterdir()) == before, "nothing is written into a refused cache"
    assert_kernel_works()
    assert not marker.exists()


@pytest.mark.parametrize("record", [None, "other"])
def test_planted_library_without_our_record_is_rebuilt(kernel, tmp_path, record):
    """In our own private folder, a library with no record of our build (or another hash) is built
    again over it and the rebuilt one is used; its record then names the new bytes."""
    cache = folder(tmp_path / "cache", 0o700)
    lib, marker = planted_library(tmp_path)
    plant(cache, lib, record=record)
    builds = kernel(cache)
    line = ragged.status()
    assert not marker.exists(), "the planted library was loaded"
    assert line.startswith("C kernel (") and "temporary" not in line, line
    assert builds, "the kernel was not rebuilt"
    built = builds[-1]
    assert built.read_bytes() != lib.read_bytes()
    assert built.with_suffix(".sha256").read_text().strip() == hashlib.sha256(built.read_bytes()).hexdigest()
    assert_kernel_works()
    assert not marker.exists()


def test_cache_folder_owned_by_another_user_is_refused(kernel, tmp_path):
    cache = folder(tmp_path / "cache", 0o755)
    lib, marker = planted_library(tmp_path)
    plant(cache, lib, record="own")
    chown_to_nobody(cache, *cache.iterdir())
    kernel(cache)
    line = ragged.status()
    assert not marker.exists(), "the planted library was loaded"
    assert "built in a private temporary folder" in line and "owned by another user (uid 65534)" in line, line
    assert_one_line(line)
    assert_kernel_works()


@pytest.mark.parametrize("change", ["library owned by nobody", "library writable by its group",
                                    "record owned by nobody", "record writable by others", "record is a link"])
def test_cached_files_someone_else_could_have_written_are_built_again(kernel, tmp_path, change):
    """A good build and record in our folder, then one file made untrustworthy: it is built again."""
    cache = folder(tmp_path / "cache", 0o700)
    builds = kernel(cache)
    assert ragged.status().startswith("C kernel ("), ragged.status()
    assert len(builds) == 1
    lib = builds[0]
    record = lib.with_suffix(".sha256")
    if change == "library owned by nobody":
        chown_to_nobody(lib)
    elif change == "library writable by its group":
        lib.chmod(0o770)
    elif change == "record owned by nobody":
        chown_to_nobody(record)
    elif change == "record writable by others":
        record.chmod(0o666)
    else:
        (tmp_path / "record").write_text(record.read_text())
        record.unlink()
        record.symlink_to(tmp_path / "record")
    ragged._kernel.cache_clear()
    assert ragged.status().startswith("C kernel ("), ragged.status()
    assert len(builds) == 2, "an untrustworthy cached file was used"
    assert _ours_only(lib) and _ours_only(record)
    assert_kernel_works()


def _ours_only(path: Path) -> bool:
    st = os.lstat(path)
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def test_library_that_is_a_link_is_refused(kernel, tmp_path):
    """Even pointing to a private file of ours whose hash the record holds: a link is not followed."""
    cache = folder(tmp_path / "cache", 0o700)
    elsewhere = folder(tmp_path / "elsewhere", 0o700)
    lib, marker = planted_library(elsewhere)
    plant(cache, lib, record="own")
    for name in names():
        (cache / name).unlink()
        (cache / name).symlink_to(lib)
    builds = kernel(cache)
    line = ragged.status()
    assert not marker.exists(), "the planted library was loaded through a link"
    assert line.startswith("C kernel (") and builds, line
    assert not builds[-1].is_symlink() and _ours_only(builds[-1])  # the build replaced the link itself
    assert lib.read_bytes() != builds[-1].read_bytes()
    assert_kernel_works()


@pytest.mark.parametrize("target", ["world-writable", "private"])
def test_cache_folder_that_is_a_link_is_judged_by_what_it_reaches(kernel, tmp_path, target):
    lib, marker = planted_library(tmp_path)
    real = folder(tmp_path / "real", 0o777 if target == "world-writable" else 0o700)
    if target == "world-writable":
        plant(real, lib, record="own")
    link = tmp_path / "link"
    link.symlink_to(real)
    kernel(link)
    line = ragged.status()
    assert not marker.exists(), "the planted library was loaded"
    if target == "world-writable":
        assert f"the cache folder {real} is writable by others" in line, line
    else:
        assert line.startswith("C kernel (") and "temporary" not in line, line
        assert len(list(real.glob("ragged-*.so"))) == len(list(real.glob("ragged-*.sha256"))) == 1  # built there
    assert_kernel_works()


@pytest.mark.parametrize("mode", [0o777, 0o1777])
def test_parent_folders_must_not_be_writable_by_others_unless_sticky(kernel, tmp_path, mode):
    """A private cache inside a folder anyone can write could be renamed away and replaced, records
    and all: refused. Inside a sticky one (like /tmp) nobody else can rename it: used."""
    parent = folder(tmp_path / "open", mode)
    cache = folder(parent / "cache", 0o700)
    lib, marker = planted_library(tmp_path)
    if mode == 0o777:
        plant(cache, lib, record="own")
    kernel(cache)
    line = ragged.status()
    assert not marker.exists(), "the planted library was loaded"
    if mode == 0o777:
        assert f"parent {parent} is writable by others and not sticky" in line, line
    else:
        assert line.startswith("C kernel (") and "temporary" not in line, line
        assert len(list(cache.glob("ragged-*.so"))) == len(list(cache.glob("ragged-*.sha256"))) == 1
    assert_kernel_works()


@pytest.mark.parametrize("where", ["world-writable cache", "marker writable by others"])
def test_failure_markers_are_trusted_only_when_ours(kernel, tmp_path, where):
    """A planted .failed marker (which would turn the kernel off) is ignored the same way."""
    cache = folder(tmp_path / "cache", 0o777 if where == "world-writable cache" else 0o700)
    for name in names():
        failed = (cache / name).with_suffix(".failed")
        failed.write_text("cc: error: planted")
        failed.chmod(0o666)
    kernel(cache)
    line = ragged.status()
    assert line.startswith("C kernel ("), line
    assert_kernel_works()


def test_normal_cache_is_private_built_once_and_loaded_by_later_processes(kernel, tmp_path):
    """Whatever the umask, new cache folders are 0700, the library 0700 and its record 0600 (the
    library's sha256); a second process loads it without compiling, and leaves it as it was."""
    cache = tmp_path / "made" / "cache"
    old = os.umask(0o002)
    try:
        builds = kernel(cache)
        line = ragged.status()
    finally:
        os.umask(old)
    assert line.startswith("C kernel (") and "temporary" not in line, line
    assert len(builds) == 1
    for made in (cache, cache.parent):
        assert stat.S_IMODE(made.stat().st_mode) == 0o700, oct(made.stat().st_mode)
    lib, = cache.glob("ragged-*.so")
    record = lib.with_suffix(".sha256")
    assert stat.S_IMODE(lib.stat().st_mode) == 0o700 and stat.S_IMODE(record.stat().st_mode) == 0o600
    assert record.read_text().strip() == hashlib.sha256(lib.read_bytes()).hexdigest()
    assert sorted(p.name for p in cache.iterdir()) == sorted([lib.name, record.name])  # no temporary left
    stamps = [p.stat().st_mtime_ns for p in (lib, record)]
    code = ("import os, torch\nos.umask(0o002)\nfrom mingpt import ragged\n"
            "def again(*args): raise SystemExit('compiled again')\n"
            "ragged._compile = again\nprint(ragged.status())\n")
    env = {**os.environ, "PATCH_RUN_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == line, out.stdout + out.stderr
    assert [p.stat().st_mtime_ns for p in (lib, record)] == stamps
    assert_kernel_works()
