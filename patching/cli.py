"""patch-run: the command line, a thin layer over patching.api and patching.batch.

    patch-run [patch] --clean TEXT --corrupt TEXT --target WORD --foil WORD [--model gpt2|FOLDER] [--out DIR]
    patch-run [patch] --batch FILE.yaml [--model ...] [--out DIR]
    patch-run COMMAND ...          (see COMMANDS; `patch` is the default, so its flags work bare)

Every subcommand is a module with `HELP: str`, `add_arguments(ap)` and `command(args, say) -> int`,
listed in COMMANDS (`register`); each also gets the shared options (--model, --device, --dtype,
--out, --overwrite, --quiet). `say(...)` prints unless --quiet; `say.result(...)` always prints
(the paths written). User mistakes end in one line on stderr and exit status 1 (2 for bad flags
or no arguments), never a traceback. Results are written before anything is printed, so a closed
pipe (`patch-run ... | head`) loses nothing: output stops quietly and the exit status is the run's.
SIGTERM is treated like Ctrl-C (exit 143 and 130).
"""
from __future__ import annotations

import argparse
import gc
import importlib
import os
import signal
import sys
import time
from dataclasses import fields

from mingpt.sites import SITES
from patching.attribution import METHODS, check_lines
from patching.api import DIRECTIONS, USER_ERRORS, PatchingError, Settings, load, prepare, run
from patching.engines import ENGINES, METRICS
from patching.files import claim, expand
from patching.report import (default_folder, describe_cell, experiment_files, slug, strongest, token_table,
                             topk_table)

# name -> module path; a module plugs in with HELP, add_arguments(ap) and command(args, say) -> int.
COMMANDS: dict[str, str] = {"patch": __name__}  # this module ("__main__" under python -m)
COMMANDS.update({name: f"patching.{name}" for name in ("lens", "dla", "attention", "heads", "ablate")})  # issue 14
COMMANDS["path"] = "patching.path"  # issue 15
COMMANDS["merge"] = "patching.merge"  # issue 16: combine the shards of a study
DEFAULT = "patch"

HELP = "activation patching of every (layer, position) of the residual stream (the default command)"


def register(name: str, module: str):
    """Add a subcommand: `module` (a dotted path) defines HELP, add_arguments(ap) and command(args, say)."""
    COMMANDS[name] = module


def shared_options() -> argparse.ArgumentParser:
    """Options every subcommand takes (a parent parser)."""
    sp = argparse.ArgumentParser(add_help=False)
    g = sp.add_argument_group("shared options")
    g.add_argument("--model", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, demo-names, demo-induction, "
                   "a Hub id or a local folder [gpt2]")
    g.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="[auto]")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="half precision is for GPUs [float32]")
    g.add_argument("--out", help="output folder (~ is expanded) [a new folder under outputs/]")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an earlier patch-run output folder at --out (never a folder patch-run did not write)")
    g.add_argument("--quiet", action="store_true", help="print only the output paths")
    return sp


def add_arguments(ap: argparse.ArgumentParser):
    what = ap.add_argument_group("one experiment")
    what.add_argument("--clean", help="the clean prompt")
    what.add_argument("--corrupt", help="the corrupted prompt (same number of tokens)")
    what.add_argument("--target", help="the word the clean prompt predicts (looked up with a leading space; "
                      "=TEXT takes TEXT exactly, e.g. =. for the token '.')")
    what.add_argument("--foil", help="the word the corrupt prompt predicts (same rules as --target)")
    ap.add_argument("--batch", metavar="FILE.yaml", help="run every experiment of a YAML file instead")
    how = ap.add_argument_group("settings (defaults in brackets; in a batch they override its defaults)")
    how.add_argument("--metric", choices=list(METRICS), help="what to measure at the last position [logit-diff]")
    how.add_argument("--top-k", dest="top_k", type=int, help="rows of the next-token tables [20]")
    how.add_argument("--engine", choices=ENGINES, help="fast (exact, batched) or loop (one forward per patch) [fast]")
    how.add_argument("--max-rows", dest="max_rows", type=int, help="fast engine chunk size in token rows [8192]")
    how.add_argument("--site", choices=list(SITES), help="the activation patched, named as in TransformerLens: "
                     "resid_pre/resid_mid/resid_post, attn_out, mlp_out by (layer, position); q, k, v, z, "
                     "pattern by (layer, head, position) [resid_post]")
    how.add_argument("--direction", choices=list(DIRECTIONS), help="denoise: clean values into the corrupt run "
                     "(sufficient?); noise: corrupt values into the clean run (necessary?) [denoise]")
    how.add_argument("--all-positions", dest="all_positions", action="store_const", const=True,
                     help="head sites: patch each head at every position at once (axes layer, head)")
    how.add_argument("--prepend-bos", dest="prepend_bos", action="store_const", const=True,
                     help="put <|endoftext|> before both prompts as position 0 (TransformerLens's default) [off]")
    how.add_argument("--method", choices=list(METHODS), help="exact: patch every cell; attribution: estimate every "
                     "cell from one backward pass, (source - base) . gradient [exact]")
    how.add_argument("--no-qk-fix", dest="qk_fix", action="store_const", const=False,
                     help="attribution at q/k: linearise through the softmax too (AtP*'s fix is on by default)")
    how.add_argument("--check", action="store_const", const=True, help="attribution: also run the exact sweep and "
                     "report correlation, largest error and top-10 recall, with a scatter plot")
    ap.add_argument("--dry-run", action="store_true", help="print the sweep's plan (patches, chunks, memory) and stop")
    study = ap.add_argument_group("studies (patching/study.py): many pairs, statistics, shards")
    study.add_argument("--pairs", metavar="FILE.jsonl|.csv", help="run a study of these pairs (clean, corrupt, target, "
                       "foil per row)")
    study.add_argument("--shard", metavar="K/N", help="run the K-th of N deterministic slices of a study; "
                       "combine the shards with patch-run merge")
    study.add_argument("--bootstrap", type=int, metavar="N", help="bootstrap resamples of a study's 95%% intervals [1000]")


def plugin(name: str):
    return importlib.import_module(COMMANDS[name])


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="patch-run", description="Activation patching for GPT-2: which (layer, position) of the clean run "
        "makes the model predict TARGET rather than FOIL?",
        epilog=f"Without a command, {DEFAULT} runs: `patch-run --clean ...` is `patch-run {DEFAULT} --clean ...`. "
        "`patch-run COMMAND --help` lists a command's options.")
    subs = ap.add_subparsers(dest="command", metavar="COMMAND")
    shared = shared_options()
    for name in COMMANDS:
        mod = plugin(name)
        mod.add_arguments(subs.add_parser(name, parents=[shared], help=mod.HELP, description=mod.HELP))
    return ap


def given_settings(args) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(Settings) if getattr(args, f.name, None) is not None}


# ----------------------------------------------------------------------------- terminal output


class Say:
    """print() that survives a closed pipe: the first BrokenPipeError silences stdout for good (the
    reader has gone; the files are already written) instead of ending the run with a traceback.
    Calling it prints unless --quiet; result() always prints."""

    def __init__(self, quiet: bool = False):
        self.quiet, self.broken = quiet, False

    def __call__(self, *parts):
        if not self.quiet:
            self.result(*parts)

    def result(self, *parts):
        if self.broken:
            return
        try:
            print(*parts, flush=True)
        except BrokenPipeError:
            self.mute()

    def mute(self):
        self.broken = True
        # point fd 1 at /dev/null so the interpreter's final flush cannot fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


class Bar:
    """A one-line progress display on a terminal's stderr; silent when stderr is not a terminal."""

    def __init__(self, label: str):
        self.label, self.t0, self.on = label, time.perf_counter(), sys.stderr.isatty()

    def __call__(self, done: int, total: int):
        if self.on:
            width = 30
            fill = int(width * done / max(total, 1))
            try:
                sys.stderr.write(f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} patches "
                                 f"{time.perf_counter() - self.t0:.1f}s")
                if done >= total:
                    sys.stderr.write("\n")
                sys.stderr.flush()
            except OSError:  # a closed terminal must not stop the sweep
                self.on = False


# ----------------------------------------------------------------------------- the patch command


def command(args, say) -> int:
    if args.batch or args.pairs or args.shard or args.bootstrap is not None:
        from patching import study  # only where a file is read: a single run never imports YAML
        if study.wanted(args):
            return study.command(args, given_settings(args), say)
    if args.batch:
        clash = [f"--{k}" for k in ("clean", "corrupt", "target", "foil") if getattr(args, k) is not None]
        if clash:
            raise PatchingError(f"--batch runs the experiments of its file: drop {', '.join(clash)}.")
        return batch(args, say)
    return single(args, say)


def single(args, say) -> int:
    missing = [f"--{k}" for k in ("clean", "corrupt", "target", "foil") if getattr(args, k) is None]
    if missing:
        raise PatchingError(f"missing {', '.join(missing)}: give --clean, --corrupt, --target and --foil, or --batch FILE.")
    settings = Settings(**given_settings(args))
    model, tok = load(settings)
    prep = prepare(tok, args.clean, args.corrupt, args.target, args.foil, model.config.block_size,
                   model.config.vocab_size, settings.prepend_bos)
    experiment = (model, tok, args.clean, args.corrupt, args.target, args.foil, settings)
    if args.dry_run:
        try:
            run(*experiment, plan=_stop_after_plan(say))
        except _Planned:
            return 0
    out = expand(args.out) if args.out else expand("outputs") / default_folder(prep, settings)
    # checked and locked before the sweep; a default folder takes the first free name
    with claim(out, kind="experiment", overwrite=args.overwrite, fresh=not args.out) as dest:
        result = run(*experiment, Bar("sweep"), plan=lambda p: say(p.describe()))
        folder = dest.write(experiment_files(result))
    # everything is on disk: only now print, so a closed pipe or a full terminal loses nothing
    say(f"model {model.name}: {model.config.n_layer} layers, {len(prep.clean_ids)} tokens"
        f"{' (position 0 is the <|endoftext|> added by --prepend-bos)' if settings.prepend_bos else ''}; "
        f"positions that differ: {', '.join(map(str, prep.differing))}")
    say(token_table(prep))
    say("")
    say(topk_table("clean run: next token after the last position", result.clean, prep))
    say("")
    say(topk_table("corrupt run: next token after the last position", result.corrupt, prep))
    say("")
    say(f"{settings.metric} = {METRICS[settings.metric]}: clean {result.clean.value:.4f}, "
        f"corrupt {result.corrupt.value:.4f}; sweep of {result.timing['patches']} patches at {settings.site} "
        f"({settings.direction}: {DIRECTIONS[settings.direction]}) took {result.timing['sweep_seconds']:.3f} s "
        f"({'attribution estimate' if settings.method == 'attribution' else f'{settings.engine} engine'}, "
        f"{result.timing['device']})")
    for entry in strongest(result):
        say(f"  strongest: {describe_cell(result, entry)}: {entry[-1]:.4f}")
    for line in check_lines(result):
        say(line)
    say.result(f"wrote {folder}/results.json, results.csv, heatmap.png, "
               f"{'exact.csv, exact-heatmap.png, scatter.png, ' if result.check else ''}report.html")
    return 0


class _Planned(Exception):
    """--dry-run: the plan is printed; stop before the sweep."""


def _stop_after_plan(say):
    def stop(plan):
        say.result(plan.describe())
        raise _Planned()
    return stop


def batch(args, say) -> int:
    from patching.batch import read_batch, run_batch
    path = expand(args.batch)
    spec = read_batch(path, given_settings(args))
    out = expand(args.out) if args.out else expand("outputs") / slug(path.stem)
    rows, out = run_batch(spec, out, say=say, progress_for=Bar, overwrite=args.overwrite, fresh=not args.out)
    failed = [r for r in rows if r["status"] != "ok"]
    say.result(f"wrote {out}/summary.json and summary.md: {len(rows) - len(failed)} ok, {len(failed)} failed")
    return 1 if failed else 0


# ----------------------------------------------------------------------------- main


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so it unwinds exactly like Ctrl-C."""

    signame = "SIGTERM"


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    for stream in (sys.stdout, sys.stderr):  # a token the terminal's encoding lacks prints escaped, not a crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    if not argv:
        parser().print_usage(sys.stderr)
        print("patch-run: error: no arguments: give --clean, --corrupt, --target and --foil, or --batch FILE "
              "(patch-run --help lists everything).", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):  # the commands, then the default command's own options
        default = argparse.ArgumentParser(prog=f"patch-run [{DEFAULT}]", parents=[shared_options()])
        plugin(DEFAULT).add_arguments(default)
        Say().result(parser().format_help() + "\n" + default.format_help())
        return 0
    if argv[0] not in COMMANDS and not argv[0].startswith("-"):  # a word where a command goes
        print(f"patch-run: error: unknown command {argv[0][:40]!r}: use one of {', '.join(COMMANDS)} "
              f"(or flags alone for {DEFAULT}).", file=sys.stderr)
        return 2
    if argv[0] not in COMMANDS:
        argv = [DEFAULT, *argv]
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage and the error (or the help)
        return exc.code if isinstance(exc.code, int) else 2
    except BrokenPipeError:  # `patch-run patch --help | head`
        Say().mute()
        return 0
    say = Say(args.quiet)
    term = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        return plugin(args.command).command(args, say)
    except USER_ERRORS as exc:
        print(f"patch-run: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        why = getattr(exc, "signame", "Ctrl-C")
        kept = getattr(exc, "kept", None) or "nothing half-written was kept"  # what is on disk, as its writer says
        print(f"\npatch-run: interrupted ({why}); {kept}.", file=sys.stderr)
        return 143 if why == "SIGTERM" else 130
    except MemoryError:
        print("patch-run: error: ran out of memory: use a smaller model, shorter prompts or a smaller --max-rows.",
              file=sys.stderr)
        return 1
    except Exception as exc:  # a bug of ours: one line, the traceback on request
        if os.environ.get("PATCH_RUN_DEBUG"):
            raise
        print(f"patch-run: internal error: {exc.__class__.__name__}: {str(exc)[:200]} (a bug in patch-run; "
              f"PATCH_RUN_DEBUG=1 shows the traceback; please report it).", file=sys.stderr)
        return 1
    finally:
        if term is not None:
            signal.signal(signal.SIGTERM, term)


def _main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def program() -> int:
    """The `patch-run` executable: main() with the garbage collector kept off torch's objects. Every
    collection of the oldest generation walks the million objects importing torch made, and the
    interpreter's last one at exit costs ~0.7 s on a 2-core CPU; frozen objects are skipped (they
    live until exit anyway). Not in main(): callers in Python keep their GC as it is."""
    gc.freeze()  # what the imports made so far
    code = main()
    gc.freeze()  # and what the run made (matplotlib's modules, the model), before the exit
    return code


if __name__ == "__main__":
    sys.exit(program())
