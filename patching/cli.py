"""patch-run: the command line, a thin layer over patching.api and patching.batch.

    patch-run --clean TEXT --corrupt TEXT --target WORD --foil WORD [--model gpt2|FOLDER] [--out DIR]
    patch-run --batch FILE.yaml [--model ...] [--out DIR]

User mistakes end in one line on stderr and exit status 1 (2 for bad flags), never a traceback.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from pathlib import Path

from patching.api import USER_ERRORS, PatchingError, Settings, load, prepare, run
from patching.engines import ENGINES, METRICS
from patching.report import (check_writable, default_folder, show, strongest, token_table, topk_table,
                             write_experiment)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="patch-run", description="Activation patching for GPT-2: which (layer, position) of the clean run "
        "makes the model predict TARGET rather than FOIL?")
    what = ap.add_argument_group("one experiment")
    what.add_argument("--clean", help="the clean prompt")
    what.add_argument("--corrupt", help="the corrupted prompt (same number of tokens)")
    what.add_argument("--target", help="the word the clean prompt predicts (looked up with a leading space)")
    what.add_argument("--foil", help="the word the corrupt prompt predicts")
    ap.add_argument("--batch", metavar="FILE.yaml", help="run every experiment of a YAML file instead")
    how = ap.add_argument_group("settings (defaults in brackets; in a batch they override its defaults)")
    how.add_argument("--model", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, demo-names, demo-induction, "
                     "a Hub id or a local folder [gpt2]")
    how.add_argument("--metric", choices=list(METRICS), help="what to measure at the last position [logit-diff]")
    how.add_argument("--top-k", dest="top_k", type=int, help="rows of the next-token tables [20]")
    how.add_argument("--engine", choices=ENGINES, help="fast (exact, batched) or loop (one forward per patch) [fast]")
    how.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="[auto]")
    how.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="half precision is for GPUs [float32]")
    how.add_argument("--max-rows", dest="max_rows", type=int, help="fast engine chunk size in token rows [8192]")
    study = ap.add_argument_group("studies (patching/study.py): many pairs, statistics, shards")
    study.add_argument("--pairs", metavar="FILE.jsonl|.csv", help="run a study of these pairs (clean, corrupt, target, foil per row)")
    study.add_argument("--shard", metavar="K/N", help="run the K-th of N deterministic slices; combine with patch-run merge")
    study.add_argument("--bootstrap", type=int, metavar="N", help="bootstrap resamples of the 95%% interval [1000]")
    ap.add_argument("--out", help="output folder [outputs/<prompts>/, or outputs/<batch file name>/]")
    ap.add_argument("--quiet", action="store_true", help="print only the output paths")
    return ap


def given_settings(args) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(Settings) if getattr(args, f.name, None) is not None}


class Bar:
    """A one-line progress display on a terminal's stderr; silent when stderr is not a terminal."""

    def __init__(self, label: str):
        self.label, self.t0, self.on = label, time.perf_counter(), sys.stderr.isatty()

    def __call__(self, done: int, total: int):
        if self.on:
            width = 30
            fill = int(width * done / max(total, 1))
            sys.stderr.write(f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} patches "
                             f"{time.perf_counter() - self.t0:.1f}s")
            if done >= total:
                sys.stderr.write("\n")
            sys.stderr.flush()


def single(args, say) -> int:
    missing = [f"--{k}" for k in ("clean", "corrupt", "target", "foil") if getattr(args, k) is None]
    if missing:
        raise PatchingError(f"missing {', '.join(missing)}: give --clean, --corrupt, --target and --foil, or --batch FILE.")
    settings = Settings(**given_settings(args))
    model, tok = load(settings)
    prep = prepare(tok, args.clean, args.corrupt, args.target, args.foil, model.config.block_size)
    out = Path(args.out) if args.out else Path("outputs") / default_folder(prep)
    check_writable(out.parent)  # before the sweep, so no work is lost to an unwritable folder
    if out.exists() and not out.is_dir():
        raise PatchingError(f"--out {out} is an existing file: pass a folder.")
    say(f"model {model.name}: {model.config.n_layer} layers, {len(prep.clean_ids)} tokens; "
        f"positions that differ: {', '.join(map(str, prep.differing)) or 'none'}")
    say(token_table(prep))
    result = run(model, tok, args.clean, args.corrupt, args.target, args.foil, settings, Bar("sweep"))
    say("")
    say(topk_table("clean run: next token after the last position", result.clean, prep))
    say("")
    say(topk_table("corrupt run: next token after the last position", result.corrupt, prep))
    say("")
    say(f"{settings.metric} = {METRICS[settings.metric]}: clean {result.clean.value:.4f}, "
        f"corrupt {result.corrupt.value:.4f}; sweep of {result.timing['patches']} patches took "
        f"{result.timing['sweep_seconds']:.3f} s ({settings.engine} engine, {result.timing['device']})")
    for l, p, v in strongest(result):
        say(f"  strongest: layer {l}, position {p} ({show(prep.tokens[p])}): {v:.4f}")
    folder = write_experiment(result, out)
    print(f"wrote {folder}/results.json, results.csv, heatmap.png")
    return 0


def batch(args, say) -> int:
    from patching.batch import read_batch, run_batch
    path = Path(args.batch)
    spec = read_batch(path, given_settings(args))
    out = Path(args.out) if args.out else Path("outputs") / path.stem
    check_writable(out)
    rows = run_batch(spec, out, say=say, progress_for=Bar)
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"wrote {out}/summary.json and summary.md: {len(rows) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0


def subcommand(argv: list[str]) -> int | None:
    """`patch-run merge ...` (until the subcommand parser lands, issue 14); None for the plain command."""
    if not argv or argv[0] != "merge":
        return None
    from patching import merge
    ap = argparse.ArgumentParser(prog="patch-run merge", description=merge.HELP)
    merge.add_arguments(ap)
    args = ap.parse_args(argv[1:])
    try:
        return merge.command(args, print)
    except USER_ERRORS as exc:
        print(f"patch-run: error: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rc = subcommand(argv)
    if rc is not None:
        return rc
    args = parser().parse_args(argv)
    say = (lambda *_: None) if args.quiet else print
    try:
        from patching import study
        if args.pairs or args.shard or args.bootstrap is not None or study.is_study(args.batch):
            return study.command(args, given_settings(args), say)
        if args.batch:
            clash = [f"--{k}" for k in ("clean", "corrupt", "target", "foil") if getattr(args, k) is not None]
            if clash:
                raise PatchingError(f"--batch runs the experiments of its file: drop {', '.join(clash)}.")
            return batch(args, say)
        return single(args, say)
    except USER_ERRORS as exc:
        print(f"patch-run: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\npatch-run: interrupted; finished experiments are complete, nothing half-written was kept.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
