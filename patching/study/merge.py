"""`patch-run merge SHARD_DIR... --out DIR`: the shards of one study (`--shard K/N`) as one study.

Each shard folder holds its pairs' folders, summary.json (the study hash, the shard K/N, every pair's
row) and the tidy results.csv (every metric of every cell, floats written exactly). The merge checks
that all shards carry the same study hash (same pairs, settings, analysis and statistics), are
complete, and are each of the N shards exactly once; then it copies the pairs' folders and computes
summary, aggregate and index.html from the union, exactly as an unsharded run would.

A shard folder is read as data, never trusted as a map of the disk: a pair's folder is copied only as
`pairs/NAME` inside that shard (a plain name, no link), and only the regular files its marker lists.
`--out` may not be a shard, lie inside one, or contain one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from patching.core.errors import PatchingError
from patching.io.files import MARKER, claim, expand, marker_text, read_marker
from patching.study import stats
from patching.study.run import finish

HELP = "combine the shard folders of one study (--shard K/N runs) into one study folder"


def read_shard(folder: Path) -> tuple[dict, list[dict]]:
    """(summary, tidy rows) of one shard folder; PatchingError naming it if it is not a complete,
    well-formed study shard."""
    damaged = lambda why: PatchingError(f"shard {folder} is damaged ({why}): run that shard again.")  # noqa: E731
    try:
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        a = summary["analysis"]
        metrics, tidy = stats.read_tidy((folder / "results.csv").read_text(encoding="utf-8"), a["axes"], a.get("labels"))
    except (OSError, UnicodeDecodeError) as exc:
        raise PatchingError(f"{folder} is not a study folder with summary.json and results.csv "
                            f"({getattr(exc, 'strerror', None) or exc}).") from None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise damaged(f"summary.json or results.csv does not parse: {type(exc).__name__}: {str(exc)[:60]}") from None
    if not isinstance(summary, dict) or summary.get("kind") != "study":
        raise PatchingError(f"{folder}/summary.json is not a study's summary: merge only folders of --shard runs.")
    if not isinstance(summary.get("shard"), str) or not re.fullmatch(r"\d{1,7}/\d{1,7}", summary["shard"]):
        raise damaged(f"its shard is {str(summary.get('shard'))[:20]!r}, not K/N")
    k, n = map(int, summary["shard"].split("/"))
    if not 1 <= k <= n:
        raise damaged(f"its shard {k}/{n} is not one of 1..N")
    rows = summary.get("pairs")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("index"), int)
                                              and isinstance(r.get("name"), str) for r in rows):
        raise damaged("its pairs are not a list of rows with index and name")
    if not isinstance(summary.get("study"), str) or not isinstance(summary.get("timing", {}), dict):
        raise damaged("it has no study hash")
    if not summary.get("complete"):
        raise PatchingError(f"{folder} is an interrupted shard: run its --shard {summary['shard']} again first.")
    for r in rows:  # every folder a row names must be this shard's own pairs/NAME, present
        if r.get("folder") is None:
            continue
        name = r["folder"].removeprefix("pairs/") if isinstance(r["folder"], str) else ""
        pair = folder / "pairs" / name
        if (r["folder"] != f"pairs/{name}" or not name or name in (".", "..") or "/" in name or "\\" in name
                or "\0" in name):
            raise damaged(f"pair {r['index']} names the folder {str(r['folder'])[:60]!r}, not pairs/NAME")
        if pair.is_symlink() or not pair.is_dir() or read_marker(pair) is None:
            raise damaged(f"its pairs/{name[:60]} is missing or not a folder patch-run wrote")
    return summary, tidy


def overlapping(out: Path, shards: list[Path]) -> Path | None:
    """The first shard that --out is, lies inside, or contains (the merge would write over its input)."""
    o = Path(os.path.realpath(out))
    for s in shards:
        r = Path(os.path.realpath(s))
        if o == r or r in o.parents or o in r.parents:
            return s
    return None


def copy_pair(src: Path, dest: Path):
    """A pair's folder as its shard wrote it: the regular files its marker lists, and the marker."""
    dest.mkdir()
    mark = read_marker(src)
    for name in mark["files"]:
        p = src / name
        if isinstance(name, str) and "/" not in name and not p.is_symlink() and p.is_file():
            shutil.copyfile(p, dest / name)
    shutil.copyfile(src / MARKER, dest / MARKER)


def merge(shards: list[Path], out: Path, say: Callable[[str], None] = print, overwrite: bool = False) -> dict:
    """Check the shards belong together, copy their pairs, and write the merged study's files."""
    folders = [expand(f) for f in shards]
    clash = overlapping(out, folders)
    if clash is not None:
        raise PatchingError(f"--out {out} is, contains or lies inside the shard {clash}: merge into a new folder.")
    read = [(f, *read_shard(f)) for f in folders]
    first = read[0][1]
    for folder, s, _ in read[1:]:
        if s["study"] != first["study"]:
            raise PatchingError(f"{folder} is shard of study {s['study']} but {read[0][0]} of study {first['study']}: "
                                f"their pairs or settings differ, so they cannot be merged.")
    n = int(first["shard"].split("/")[1])
    seen = sorted(int(s["shard"].split("/")[0]) for _, s, _ in read)
    if seen != list(range(1, n + 1)) or any(int(s["shard"].split("/")[1]) != n for _, s, _ in read):
        dup = sorted({k for k in seen if seen.count(k) > 1})
        missing = sorted(set(range(1, n + 1)) - set(seen))
        raise PatchingError(f"the shards must be 1..{n} of {n} once each: "
                            + (f"shard {dup[0]}/{n} is given twice" if dup else
                               f"shard {missing[0]}/{n} is missing" if missing else "they split the study differently")
                            + ".")
    rows = [r for _, s, _ in read for r in s["pairs"]]
    tidy = [t for _, _, ts in read for t in ts]
    meta = {k: v for k, v in first.items() if k not in ("pairs", "counts", "timing")}
    meta.update(shard=f"merged from {n}", complete=True,
                timing={"shards_pairs_seconds": sum(float(s["timing"].get("pairs_seconds", 0.0)) for _, s, _ in read)})
    with claim(out, kind="study", overwrite=overwrite) as dest:  # checked and locked before the copying
        summary, files = finish(meta, rows, tidy, say=say)

        def pairs(path: Path):  # each pair's folder, as its shard wrote it, and the list of them
            path.mkdir()
            names = []
            for folder, s, _ in read:
                for r in s["pairs"]:
                    if r.get("folder"):
                        name = Path(r["folder"]).name
                        copy_pair(folder / "pairs" / name, path / name)
                        names.append(name)
            (path / MARKER).write_text(marker_text("pairs", names))
        files["pairs"] = pairs
        dest.write(files)
    return summary


def wrote(out) -> str:
    """The line that names a merged study's files (`patch-run merge`, and --slurm once its merge ran)."""
    return f"wrote {out}/index.html, aggregate.json, aggregate.csv, results.csv, summary.json"


def exit_status(summary: dict) -> int:
    """`patch-run merge`'s exit status for a merged study: 1 when a pair failed or none ran."""
    c = summary["counts"]
    return 1 if c["failed"] or not c["ok"] else 0


def command(shards: list[str], out: str | None, say, overwrite: bool = False) -> int:
    """`patch-run merge SHARD_DIR... --out DIR`."""
    if not out:
        raise PatchingError("merge needs --out DIR: the folder of the merged study.")
    summary = merge(shards, expand(out), say=say, overwrite=overwrite)
    c = summary["counts"]
    getattr(say, "result", print)(f"{wrote(out)} ({len(shards)} shards, {c['ok']} pairs)")
    return exit_status(summary)
