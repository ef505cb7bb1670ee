"""`patch-run merge SHARD_DIR... --out DIR`: the shards of one study (`--shard K/N`) as one study.

Each shard folder holds its pairs' folders, summary.json (the study hash, the shard K/N, every pair's
row) and the tidy results.csv (every metric of every cell, floats written exactly). The merge checks
that all shards carry the same study hash (same pairs, settings, analysis and statistics), are
complete, and are each of the N shards exactly once; then it copies the pairs' folders and computes
summary, aggregate and index.html from the union, exactly as an unsharded run would.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from patching import stats
from patching.api import PatchingError
from patching.files import claim, expand
from patching.study import finish

HELP = "combine the shard folders of one study (--shard K/N runs) into one study folder"


def add_arguments(ap):
    """The shard folders; --out (required here), --overwrite and --quiet come with the shared options."""
    ap.add_argument("shards", nargs="+", metavar="SHARD_DIR", help="folders written by --shard K/N runs of one study")


def read_shard(folder: Path) -> tuple[dict, list[dict]]:
    """(summary, tidy rows) of one shard folder; PatchingError if it is not a complete study shard."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
        a = summary["analysis"]
        metrics, tidy = stats.read_tidy((folder / "results.csv").read_text(), a["axes"], a.get("labels"))
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise PatchingError(f"{folder} is not a study folder with summary.json and results.csv ({exc}).") from None
    if summary.get("kind") != "study":
        raise PatchingError(f"{folder}/summary.json is not a study's summary: merge only folders of --shard runs.")
    if not summary.get("complete"):
        raise PatchingError(f"{folder} is an interrupted shard: run its --shard {summary.get('shard')} again first.")
    return summary, tidy


def merge(shards: list[Path], out: Path, say: Callable[[str], None] = print, overwrite: bool = False) -> dict:
    """Check the shards belong together, copy their pairs, and write the merged study's files."""
    read = [(expand(f), *read_shard(expand(f))) for f in shards]
    first = read[0][1]
    for folder, s, _ in read[1:]:
        if s["study"] != first["study"]:
            raise PatchingError(f"{folder} is shard of study {s['study']} but {read[0][0]} of study {first['study']}: "
                                f"their pairs or settings differ, so they cannot be merged.")
    n = int(first["shard"].split("/")[1])
    seen = sorted(int(s["shard"].split("/")[0]) for _, s, _ in read)
    if seen != list(range(1, n + 1)):
        dup = sorted({k for k in seen if seen.count(k) > 1})
        missing = sorted(set(range(1, n + 1)) - set(seen))
        raise PatchingError(f"the shards must be 1..{n} of {n} once each: "
                            + (f"shard {dup[0]}/{n} is given twice" if dup else f"shard {missing[0]}/{n} is missing") + ".")
    rows = [r for _, s, _ in read for r in s["pairs"]]
    tidy = [t for _, _, ts in read for t in ts]
    meta = {k: v for k, v in first.items() if k not in ("pairs", "counts", "timing")}
    meta.update(shard=f"merged from {n}", complete=True,
                timing={"shards_pairs_seconds": sum(s["timing"].get("pairs_seconds", 0.0) for _, s, _ in read)})
    with claim(out, kind="study", overwrite=overwrite) as dest:  # checked and locked before the copying
        summary, files = finish(meta, rows, tidy, say=say)

        def pairs(path: Path):  # each pair's folder, as its shard wrote it
            path.mkdir()
            for folder, s, _ in read:
                for r in s["pairs"]:
                    if r.get("folder"):
                        shutil.copytree(folder / r["folder"], path / Path(r["folder"]).name)
        files["pairs"] = pairs
        dest.write(files)
    return summary


def command(args, say) -> int:
    if not args.out:
        raise PatchingError("merge needs --out DIR: the folder of the merged study.")
    summary = merge(args.shards, expand(args.out), say=say, overwrite=args.overwrite)
    c = summary["counts"]
    getattr(say, "result", print)(f"wrote {args.out}/index.html, aggregate.json, aggregate.csv, results.csv, "
                                  f"summary.json ({len(args.shards)} shards, {c['ok']} pairs)")
    return 1 if c["failed"] or not c["ok"] else 0
