"""patch-run: the command line, a thin layer over the analyses' registry and the study layer.

    patch-run [patch] --clean TEXT --corrupt TEXT --target WORD --foil WORD [--model gpt2|FOLDER] [--out DIR]
    patch-run [COMMAND] --batch FILE.yaml | --pairs FILE [--shard K/N] [--bootstrap N]
    patch-run [COMMAND] --batch FILE.yaml | --pairs FILE --slurm N [--slurm-... ] [--wait] [--resume]
    patch-run COMMAND ...          (every registered analysis; `patch` is the default, so its flags work bare)
    patch-run merge SHARD_DIR... --out DIR

Every analysis's subcommand is built from its declaration (patching.analyses.base): its input flags
(--clean/--corrupt/--target/--foil, or --prompt/--target/--foil), a flag per option field, and the
shared options (--model, --device, --dtype, --out, --overwrite, --quiet); one generic command runs it
once, over a YAML batch, or as a study. User mistakes end in one line on stderr and exit status 1 (2
for bad flags or no arguments), never a traceback. Results are written before anything is printed,
so a closed pipe (`patch-run ... | head`) loses nothing. SIGTERM is treated like Ctrl-C (exit 143, 130).
"""
from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import threading
import time

from patching import analyses
from patching.analyses.base import NOTHING, PAIR, Analysis, Events
from patching.core.context import ModelSpec, load
from patching.core.errors import USER_ERRORS, PatchingError
from patching.core.prompts import Pair, Prompt
from patching.core.serial import slug
from patching.io.files import claim, expand
from patching.study import batch as batches
from patching.study import merge, run as studies, slurm

DEFAULT = analyses.DEFAULT
INPUT_FLAGS = ("clean", "corrupt", "target", "foil", "prompt")  # every input flag of every analysis
MANY = ("batch", "pairs", "shard", "bootstrap", "slurm")  # flags that make a command run many inputs


def commands() -> list[str]:
    return [*analyses.names(), "merge"]


def shared_options() -> argparse.ArgumentParser:
    """Options every subcommand takes (a parent parser)."""
    sp = argparse.ArgumentParser(add_help=False)
    g = sp.add_argument_group("shared options")
    ModelSpec.add_arguments(g)
    g.add_argument("--out", help="output folder (~ is expanded) [a new folder under outputs/]")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an earlier patch-run output folder at --out (never a folder patch-run did not write)")
    g.add_argument("--quiet", action="store_true", help="print only the output paths")
    return sp


def add_arguments(ap: argparse.ArgumentParser, analysis: Analysis):
    """An analysis's flags: its input, its options, --dry-run where it plans, batches and studies."""
    what = ap.add_argument_group("one run")
    if analysis.takes == PAIR:
        what.add_argument("--clean", help="the clean prompt")
        what.add_argument("--corrupt", help="the corrupted prompt (same number of tokens)")
        what.add_argument("--target", help="the word the clean prompt predicts (looked up with a leading space; "
                          "=TEXT takes TEXT exactly, e.g. =. for the token '.')")
        what.add_argument("--foil", help="the word the corrupt prompt predicts (same rules as --target)")
    elif analysis.takes != NOTHING:
        need = " (required)" if analysis.answer else " (give --foil too)"
        what.add_argument("--prompt", help="the text to analyse")
        if analysis.words:
            what.add_argument("--target", help=f"the word the model should predict{need}")
            what.add_argument("--foil", help=f"the competing word{need if analysis.answer else ' (give --target too)'}")
    analysis.Options.add_arguments(ap.add_argument_group("options (defaults in brackets; in a batch or study they "
                                                         "override its file's)"))
    if analysis.plans:
        ap.add_argument("--dry-run", action="store_true", help="print the plan (patches, chunks, memory) and stop")
    many = ap.add_argument_group("many runs: batches and studies (docs/batches.md, docs/studies.md)")
    many.add_argument("--batch", metavar="FILE.yaml", help="run every experiment of a YAML file (a study if it has "
                      "pairs, analysis or study)")
    if analysis.studyable:
        many.add_argument("--pairs", metavar="FILE.jsonl|.csv", help="run a study of these pairs (clean, corrupt, "
                          "target, foil per row)")
        many.add_argument("--shard", metavar="K/N", help="run the K-th of N deterministic slices of a study; "
                          "combine the shards with patch-run merge")
        many.add_argument("--bootstrap", type=int, metavar="N", help="bootstrap resamples of a study's 95%% intervals "
                          "[1000]")
        slurm.add_arguments(ap)  # the study's, so every studyable analysis has it


def subparser(subs, name: str, shared: argparse.ArgumentParser):
    if name == "merge":
        ap = subs.add_parser(name, parents=[shared], help=merge.HELP, description=merge.HELP)
        ap.add_argument("shards", nargs="+", metavar="SHARD_DIR", help="folders written by --shard K/N runs of one study")
        return
    analysis = analyses.get(name)
    add_arguments(subs.add_parser(name, parents=[shared], help=analysis.help, description=analysis.help), analysis)


def parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or (`only`) just one subcommand's, which imports only that analysis."""
    ap = argparse.ArgumentParser(
        prog="patch-run", description="Activation patching and the analyses around it, for GPT-2: which part of "
        "the model makes it predict TARGET rather than FOIL, and how?",
        epilog=f"Without a command, {DEFAULT} runs: `patch-run --clean ...` is `patch-run {DEFAULT} --clean ...`. "
        "`patch-run COMMAND --help` lists a command's options.")
    subs = ap.add_subparsers(dest="command", metavar="COMMAND")
    shared = shared_options()
    for name in ([only] if only else commands()):
        subparser(subs, name, shared)
    return ap


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
                sys.stderr.write(f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} "
                                 f"{time.perf_counter() - self.t0:.1f}s")
                if done >= total:
                    sys.stderr.write("\n")
                sys.stderr.flush()
            except OSError:  # a closed terminal must not stop the work
                self.on = False


# ----------------------------------------------------------------------------- the generic command


def given(args, analysis: Analysis) -> dict:
    """The settings typed on the command line: what to load and the analysis's options."""
    return {**ModelSpec.given(args), **analysis.Options.given(args)}


def input_of(args, analysis: Analysis):
    """The run's input from its flags (a Pair, a Prompt or None), or the sentence saying what is missing."""
    flags = analysis.input_keys()
    required = [f for f in flags if not (analysis.takes != PAIR and f in ("target", "foil"))]
    missing = [f"--{f}" for f in required if getattr(args, f, None) is None]
    if missing:
        names = ", ".join(f"--{f}" for f in required)
        raise PatchingError(f"missing {', '.join(missing)}: give {names}, or --batch FILE.")
    values = [getattr(args, f) for f in flags]
    return Pair(*values) if analysis.takes == PAIR else Prompt(*values) if flags else None


def command(args, say, analysis: Analysis, named: bool) -> int:
    """One run, a batch or a study of `analysis`; `named`: the subcommand was typed (not the default)."""
    on_slurm = slurm.SlurmOptions.from_args(args)  # checked first: --wait without --slurm is a mistake anywhere
    if any(getattr(args, k, None) is not None for k in MANY) and studies.wanted(args):
        clash = [f"--{k}" for k in INPUT_FLAGS if getattr(args, k, None) is not None]
        if clash:
            raise PatchingError(f"a study runs the pairs of its files: drop {', '.join(clash)}.")
        if on_slurm is not None:
            return slurm.command(args, on_slurm, given(args, analysis), say, analysis.name if named else None)
        return studies.command(args, given(args, analysis), say, analysis.name if named else None)
    if args.batch:
        clash = [f"--{k}" for k in INPUT_FLAGS if getattr(args, k, None) is not None]
        if clash:
            raise PatchingError(f"--batch runs the experiments of its file: drop {', '.join(clash)}.")
        return batch(args, say, analysis)
    return single(args, say, analysis)


def single(args, say, analysis: Analysis) -> int:
    input = analysis.check_input(input_of(args, analysis))  # before the model loads: a mistake costs nothing
    spec, options = analysis.settings(given(args, analysis), "the command line")
    ctx = load(spec)
    if getattr(args, "dry_run", False):
        try:
            analysis.run(ctx, input, options, Events(plan=_stop_after_plan(say)))
        except _Planned:
            return 0
    out = expand(args.out) if args.out else expand("outputs") / analysis.folder_name(ctx, input, options)
    # checked and locked before the work; a default folder takes the first free name
    with claim(out, kind=analysis.kind, overwrite=args.overwrite, fresh=not args.out) as dest:
        result = analysis.run(ctx, input, options, Events(progress=Bar(analysis.name), plan=lambda p: say(p.describe())))
        files = analysis.files(result)
        folder = dest.write(files)
    # everything is on disk: only now print, so a closed pipe or a full terminal loses nothing
    for line in analysis.lines(result):
        say(line)
    say.result(f"wrote {folder}/{analysis.written(result, list(files))}")
    return 0


class _Planned(Exception):
    """--dry-run: the plan is printed; stop before the work."""


def _stop_after_plan(say):
    def stop(plan):
        say.result(plan.describe())
        raise _Planned()
    return stop


def batch(args, say, analysis: Analysis) -> int:
    path = expand(args.batch)
    spec = batches.read_batch(path, given(args, analysis), analysis)
    out = expand(args.out) if args.out else expand("outputs") / slug(path.stem)
    rows, out = batches.run_batch(spec, out, say=say, progress_for=Bar, overwrite=args.overwrite, fresh=not args.out)
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
        parser(DEFAULT).print_usage(sys.stderr)
        print("patch-run: error: no arguments: give --clean, --corrupt, --target and --foil, or --batch FILE "
              "(patch-run --help lists everything).", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):  # the commands, then the default command's own options
        default = argparse.ArgumentParser(prog=f"patch-run [{DEFAULT}]", parents=[shared_options()])
        add_arguments(default, analyses.get(DEFAULT))
        Say().result(parser().format_help() + "\n" + default.format_help())
        return 0
    if argv[0] not in commands() and not argv[0].startswith("-"):  # a word where a command goes
        print(f"patch-run: error: unknown command {argv[0][:40]!r}: use one of {', '.join(commands())} "
              f"(or flags alone for {DEFAULT}).", file=sys.stderr)
        return 2
    named = argv[0] in commands()
    if not named:
        argv = [DEFAULT, *argv]
    try:
        args = parser(argv[0]).parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage and the error (or the help)
        return exc.code if isinstance(exc.code, int) else 2
    except BrokenPipeError:  # `patch-run patch --help | head`
        Say().mute()
        return 0
    say = Say(args.quiet)
    term = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        if args.command == "merge":
            return merge.command(args.shards, args.out, say, overwrite=args.overwrite)
        return command(args, say, analyses.get(args.command), named)
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
    return threading.current_thread() is threading.main_thread()


def program() -> int:
    """main() with the garbage collector kept off torch's objects. Every collection of the oldest
    generation walks the million objects importing torch made, and the interpreter's last one at exit
    costs ~0.7 s on a 2-core CPU; frozen objects are skipped (they live until exit anyway). Not in
    main(): callers in Python keep their GC as it is."""
    gc.freeze()  # what the imports made so far
    code = main()
    gc.freeze()  # and what the run made (matplotlib's modules, the model), before the exit
    return code


if __name__ == "__main__":
    sys.exit(program())
