"""STAND-IN for patching/files.py (issue 11), which is not on main yet: the lead replaces every
`from patching._files_shim import write_folder` by `from patching.files import write_folder` when
merging, and deletes this file. Same signature; only the behaviour the study code relies on:
the folder is written into a staging folder beside it and renamed into place (complete or absent),
and an existing folder is refused unless overwrite=True and it is a patch-run folder of this kind.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

from patching.api import PatchingError

MARK = ".patch-run.json"  # names what wrote the folder, so only our own folders are ever replaced


def write_folder(folder: Path, files: dict[str, str | bytes | Callable[[Path], None]], *, kind: str,
                 overwrite: bool = False) -> Path:
    folder = Path(folder)
    if folder.exists():
        mark = folder / MARK
        ours = mark.is_file() and json.loads(mark.read_text()).get("kind") == kind
        if not (overwrite and ours):
            raise PatchingError(f"{folder} already exists: pass --overwrite to replace a patch-run {kind} folder, "
                                f"or choose another --out.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    stage = folder.parent / f".{folder.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        (stage / MARK).write_text(json.dumps({"kind": kind}) + "\n")
        for name, content in files.items():
            path = stage / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if callable(content):
                content(path)
            elif isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            folder.rename(old)
            stage.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            stage.rename(folder)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return folder
