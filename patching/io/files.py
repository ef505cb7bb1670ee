"""The output policy: patch-run never deletes or overwrites a file it did not write.

Every folder patch-run writes holds a marker, `.patch-run.json` (kind, version, the names it wrote).
- A destination that is absent or empty is written; one that holds anything without our marker is
  refused with one line, and so is a symbolic link, a file, or a folder of another kind.
- Replacing a folder of ours needs `overwrite=True` (`--overwrite`), and then only the names its
  marker lists are removed; a folder a user added files to is refused rather than touched.
- A whole folder is written into a hidden staging folder beside it and moved into place, so it is
  complete or absent; the staging folder is removed on any failure or Ctrl-C.
- A lock file beside the destination (`fcntl.flock`, removed afterwards) makes a second run into
  the same folder fail at once instead of racing the first; a default folder (`fresh=True`) takes
  the next free name instead. Whoever holds the lock is the only writer of that folder, so staging
  folders of it left by a killed run are stale: the holder removes them (and puts back an earlier
  folder that a killed --overwrite had set aside).
- Subfolders are ours when they carry a marker that lists every entry in them (a study's pairs/),
  recursively: --overwrite removes exactly those trees, and refuses a folder holding anything else.
- `claim()` does every check and takes the lock before any computing, so a refusal costs nothing.

    write_folder(Path("outputs/x"), {"a.json": text, "b.png": lambda p: fig.savefig(p)}, kind="lens")

    with claim(Path("outputs/x"), kind="experiment", overwrite=False) as dest:   # checks, locks
        result = compute()
        dest.write({"results.json": ...})                                        # all or nothing
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Union

from patching.core.errors import PatchingError
from patching.core.serial import expand, versions  # noqa: F401  (expand: re-exported)

MARKER = ".patch-run.json"
Content = Union[str, bytes, Callable[[Path], None]]


def replace_file(path: Path, write: Callable[[Path], None]):
    """Replace `path` atomically: write(tmp) fills a hidden file beside it, which os.replace then puts in
    its place; written and renamed, failed or interrupted, no temporary file stays."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_marker(folder: Path) -> dict | None:
    """The marker of a folder patch-run wrote, or None when there is none (or it is damaged)."""
    try:
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("kind"), str) or not isinstance(data.get("files"), list):
        return None
    return data


def marker_text(kind: str, names) -> str:
    return json.dumps({"written_by": "patch-run", "version": versions()["patch-run"], "kind": kind,
                       "files": sorted(set(names))}, indent=1) + "\n"


def free_name(base: Path, taken=()) -> Path:
    """base, or base-2, base-3, ...: the first that does not exist and is not in `taken` (default
    folders never collide)."""
    path, n = base, 2
    while os.path.lexists(path) or path in taken:
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return path


def article(word: str) -> str:
    """'a study', 'an experiment'."""
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def foreign(folder: Path, listed) -> list[str]:
    """Entries under `folder` (relative paths) that patch-run did not write, given the names its marker
    lists: unlisted names, links, and inside listed subfolders whatever their own markers do not list.
    A listed subfolder without a marker (a study's pairs/ before pairs carried one) is ours when every
    entry in it is a folder of ours."""
    out = []
    try:
        entries = sorted(os.listdir(folder))
    except OSError:
        return ["."]
    for e in entries:
        p = folder / e
        if e == MARKER:
            continue
        if e not in listed or p.is_symlink():
            out.append(e)
        elif p.is_dir():
            out += [f"{e}/{x}" for x in _foreign_tree(p)]
        elif not p.is_file():
            out.append(e)
    return out


def _foreign_tree(folder: Path) -> list[str]:
    mark = read_marker(folder)
    if mark is not None:
        return foreign(folder, mark["files"])
    try:  # no marker: every entry must be a marked folder of ours
        entries = sorted(os.listdir(folder))
    except OSError:
        return ["."]
    out = []
    for e in entries:
        p = folder / e
        if p.is_symlink() or not p.is_dir() or read_marker(p) is None:
            out.append(e)
        else:
            out += [f"{e}/{x}" for x in foreign(p, read_marker(p)["files"])]
    return out


def _remove_ours(folder: Path, listed) -> bool:
    """Delete exactly what foreign() calls ours under `folder` (files listed, subfolders of ours), then
    the folder if it is empty; returns whether it is gone (something else appeared: it stays)."""
    for e in listed:
        if not isinstance(e, str) or "/" in e or e in ("", ".", ".."):
            continue
        p = folder / e
        if p.is_symlink() or not os.path.lexists(p):
            continue
        if p.is_file():
            p.unlink()
        elif p.is_dir():
            mark = read_marker(p)
            names = mark["files"] if mark is not None else [x for x in os.listdir(p) if read_marker(p / x) is not None]
            if mark is None:  # a marker-less folder of marked folders
                for x in names:
                    _remove_ours(p / x, read_marker(p / x)["files"])
                _rmdir_quiet(p)
            else:
                _remove_ours(p, names)
    (folder / MARKER).unlink(missing_ok=True)
    return _rmdir_quiet(folder)


def _rmdir_quiet(folder: Path) -> bool:
    try:
        folder.rmdir()
        return True
    except OSError:
        return False


def _fail(folder: Path, exc: OSError) -> PatchingError:
    hint = "free some space or pass another --out" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "pass a writable --out"
    return PatchingError(f"cannot write to output folder {folder} ({exc.strerror or exc.__class__.__name__}): {hint}.")


class Claim:
    """A checked, locked destination folder; use as a context manager (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, *, kind: str, overwrite: bool = False, fresh: bool = False):
        self.folder, self.kind, self.overwrite, self.fresh = expand(folder), kind, overwrite, fresh
        self._base = self.folder
        if fresh:  # a default folder: the first free name (another run may take it first: see _lock)
            self.folder = free_name(self.folder)
        self._lock_fd: int | None = None
        self._made: list[Path] = []  # parent folders this claim created (removed again if nothing is written)
        self.written = False

    @property
    def _lock_path(self) -> Path:
        return self.folder.parent / f".{self.folder.name[:200]}.patch-run.lock"

    def staging(self, what: str) -> Path:
        """A hidden folder beside the destination for this run's work in progress (`what`: partial, old,
        pairs): named after the destination, so the next holder of its lock can find it if we are killed."""
        return self.folder.parent / f".{self.folder.name[:200]}.{what}-{os.getpid()}-{time.monotonic_ns() % 10**9}"

    # ------------------------------------------------------------------ checks and lock

    def __enter__(self) -> "Claim":
        self.check()
        self._make_parents()
        self._lock()
        try:
            self._clear_stale()
            self.check()  # again under the lock: another run may have written it meanwhile
            if self.folder.is_dir():  # filled in place, or emptied of our old files: it must be writable
                probe = self.folder / f".patch-run-probe-{os.getpid()}"
                try:
                    probe.write_bytes(b"")
                    probe.unlink()
                except OSError as exc:
                    raise _fail(self.folder, exc) from None
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        if self._lock_fd is not None:
            try:
                os.unlink(self._lock_path)
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None
        if not self.written:
            for d in reversed(self._made):  # leave no empty folders behind a run that wrote nothing
                try:
                    d.rmdir()
                except OSError:
                    break
        return False

    def check(self):
        """Refuse, with one line, any destination we may not write; nothing is created here."""
        f = self.folder
        if len(f.name.encode()) > 200:
            raise PatchingError(f"the output folder name is {len(f.name.encode())} bytes long: pass an --out "
                                f"whose last part is at most 200 bytes.")
        if f.is_symlink():
            raise PatchingError(f"--out {f} is a symbolic link: pass the folder it points to, or another --out "
                                f"(patch-run never replaces links).")
        if not os.path.lexists(f):
            return
        if not f.is_dir():
            raise PatchingError(f"--out {f} is an existing file: pass a folder.")
        try:
            entries = sorted(os.listdir(f))
        except OSError as exc:
            raise _fail(f, exc) from None
        if not entries:
            return
        mark = read_marker(f)
        if mark is None:
            raise PatchingError(f"--out {f} already holds files patch-run did not write ({_names(entries)}): "
                                f"pass a new or empty folder.")
        if mark["kind"] != self.kind:
            raise PatchingError(f"--out {f} holds patch-run's {mark['kind']} results, not {article(self.kind)}: "
                                f"pass another --out.")
        if not self.overwrite:
            raise PatchingError(f"--out {f} holds an earlier patch-run {self.kind}: pass --overwrite to replace "
                                f"it, or another --out.")
        if self.kind != "batch":  # a batch folder is updated entry by entry (see put)
            extra = foreign(f, mark["files"])
            if extra:
                raise PatchingError(f"--out {f} holds files patch-run did not write ({_names(extra)}): move "
                                    f"them out of it or pass another --out; they are never deleted.")

    def _make_parents(self):
        missing = []
        for p in self.folder.parents:
            if os.path.lexists(p):
                break
            missing.append(p)
        try:
            for p in reversed(missing):
                p.mkdir()
                self._made.append(p)
        except OSError as exc:
            self.__exit__(None, None, None)
            raise _fail(self.folder, exc) from None
        if not self.folder.parent.is_dir():
            raise PatchingError(f"cannot write to output folder {self.folder}: {self.folder.parent} is not a folder; "
                                f"pass a writable --out.")

    def _lock(self):
        tried: set[Path] = set()
        while True:
            try:
                fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                self.__exit__(None, None, None)
                raise _fail(self.folder, exc) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                if self.fresh:  # a default folder another run is writing: take the next free name
                    tried.add(self.folder)
                    self.folder = free_name(self._base, tried)
                    continue
                self.__exit__(None, None, None)
                raise PatchingError(f"another patch-run is writing to {self.folder} right now (lock "
                                    f"{self._lock_path.name}): wait for it to finish, or pass another --out.") from None
            try:  # the previous holder may have removed the file between our open and our lock
                same = os.stat(self._lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same and self.fresh and os.path.lexists(self.folder):  # written meanwhile by a run that finished
                os.close(fd)
                tried.add(self.folder)
                self.folder = free_name(self._base, tried)
                continue
            if same:
                self._lock_fd = fd
                return
            os.close(fd)

    def _clear_stale(self):
        """Under the lock, this folder has no other writer: staging folders named after it were left by a
        killed run. Remove them; an earlier folder a killed --overwrite set aside goes back in place if
        the new one never arrived (else its files, which were to be deleted, are)."""
        prefix = f".{self.folder.name[:200]}."
        try:
            names = [n for n in os.listdir(self.folder.parent) if n.startswith(prefix)]
        except OSError:
            return
        for n in names:
            p, what = self.folder.parent / n, n[len(prefix):].split("-", 1)[0]
            if p.is_symlink() or not p.is_dir() or what not in ("partial", "old", "pairs"):
                continue
            try:
                if what == "old" and read_marker(p) is not None:
                    if not os.path.lexists(self.folder):
                        os.rename(p, self.folder)
                    elif not _remove_ours(p, read_marker(p)["files"]):
                        os.rename(p, free_name(self.folder.with_name(self.folder.name + "-kept")))
                elif what != "old":
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:  # cleaning up after another run must never stop this one
                pass

    # ------------------------------------------------------------------ writing

    def write(self, files: dict[str, Content]) -> Path:
        """Write every file into a staging folder, then move it into place: complete or absent."""
        for name in files:
            if not isinstance(name, str) or name in ("", ".", "..", MARKER) or "/" in name or "\0" in name:
                raise PatchingError(f"cannot write a file named {name!r}: output names are plain file names.")
        self.check()
        stage = self.staging("partial")
        try:
            stage.mkdir()
            for name, content in files.items():
                if callable(content):
                    content(stage / name)
                else:
                    (stage / name).write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
            (stage / MARKER).write_text(marker_text(self.kind, files))
            self._move_into_place(stage, list(files))
        except OSError as exc:
            raise _fail(self.folder, exc) from None
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)  # our own staging folder, nothing else
        self.written = True
        return self.folder

    def _move_into_place(self, stage: Path, names: list[str]):
        dest = self.folder
        if not os.path.lexists(dest):
            os.rename(stage, dest)
            return
        old = read_marker(dest)
        if old is None:  # an empty folder (checked just before): fill it, keeping the folder itself
            os.rename(stage / MARKER, dest / MARKER)  # ours from the first moment
            for name in names:
                os.rename(stage / name, dest / name)
            return
        # our earlier folder, holding only what it lists (checked): swap it for the new one, then delete
        # exactly what it listed from the old copy, subfolders of ours included
        aside = self.staging("old")
        os.rename(dest, aside)
        try:
            os.rename(stage, dest)
        except BaseException:
            os.rename(aside, dest)  # put it back untouched
            raise
        if not _remove_ours(aside, old["files"]):  # something appeared in it meanwhile: keep it, in plain sight
            os.rename(aside, free_name(dest.with_name(dest.name + "-kept")))

    # ------------------------------------------------------------------ a folder filled entry by entry (batches)

    def open(self) -> Path:
        """Make the folder ours (absent or empty) and return it; put() then adds entries one by one."""
        if not os.path.lexists(self.folder):
            try:
                self.folder.mkdir()
            except OSError as exc:
                raise _fail(self.folder, exc) from None
        if read_marker(self.folder) is None:
            self._set_marker([])
        self.written = True
        return self.folder

    def owns(self, name: str) -> bool:
        """Whether entry `name` of an opened folder may be replaced: absent, listed, or a folder of ours."""
        p = self.folder / name
        if not os.path.lexists(p):
            return True
        if p.is_symlink():
            return False
        mark = read_marker(self.folder)
        return bool(mark and name in mark["files"]) and (p.is_file() or read_marker(p) is not None)

    def claim_entries(self, names: list[str]):
        """List `names` in the marker before writing them, so a crash never leaves an unlisted entry of ours."""
        mark = read_marker(self.folder) or {"files": []}
        if not set(names) <= set(mark["files"]):
            self._set_marker([*mark["files"], *names])

    def put(self, name: str, text: str):
        """Replace one file of an opened folder atomically (write beside it, then os.replace)."""
        if not self.owns(name):
            raise PatchingError(f"{self.folder / name} was not written by patch-run: move it away, it is never replaced.")
        self.claim_entries([name])
        try:
            replace_file(self.folder / name, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        except OSError as exc:
            raise _fail(self.folder / name, exc) from None

    def _set_marker(self, names):
        try:
            replace_file(self.folder / MARKER, lambda tmp: tmp.write_text(marker_text(self.kind, names)))
        except OSError as exc:
            raise _fail(self.folder, exc) from None


def _names(entries: list[str], n: int = 3) -> str:
    shown = ", ".join(repr(e[:40]) for e in entries[:n])
    return shown + (f" and {len(entries) - n} more" if len(entries) > n else "")


def claim(folder: str | os.PathLike, *, kind: str, overwrite: bool = False, fresh: bool = False) -> Claim:
    """Check and lock a destination before computing; write it later with .write(files). fresh: `folder`
    is a default name, and the claim takes the first free one (folder, folder-2, ...) no run holds."""
    return Claim(folder, kind=kind, overwrite=overwrite, fresh=fresh)


def write_folder(folder: str | os.PathLike, files: dict[str, Content], *, kind: str, overwrite: bool = False) -> Path:
    """Write `files` as the folder `folder` (complete or absent) under the policy above; returns its path."""
    with claim(folder, kind=kind, overwrite=overwrite) as dest:
        return dest.write(files)
