"""One patch-run experiment done step by step as `patch-run --quiet` does it, timing each step.

    python scripts/startup_stages.py MODEL OUT_DIR CLEAN CORRUPT TARGET FOIL

Prints {"wall": seconds per stage (with the run's own record and sweep seconds), "cpu": CPU seconds
per stage, all threads (the run's inner stages have wall figures only)}. Run by
`scripts/bench.py --startup` in a fresh process per measurement, so every stage, imports included,
costs what it costs in a real run. The steps mirror patching.cli.single; nothing is imported before
the clock starts but the standard library.
"""
import inspect
import json
import shutil
import sys
import time

t0, c0 = time.perf_counter(), time.process_time()
marks, cpu = {}, {}  # wall seconds per stage; CPU seconds (all threads), which other load disturbs less


def mark(name: str):
    """Charge the time since the last mark to `name` (added up if it comes again)."""
    global t0, c0
    now, cnow = time.perf_counter(), time.process_time()
    marks[name], cpu[name] = marks.get(name, 0) + now - t0, cpu.get(name, 0) + cnow - c0
    t0, c0 = now, cnow


def main(model_name: str, out: str, clean: str, corrupt: str, target: str, foil: str):
    import torch  # noqa: F401  (the baseline that nothing can remove)
    mark("import torch")
    from pathlib import Path

    from mingpt.bpe import BPETokenizer
    from mingpt.model import GPT
    from patching import api, cli, report
    if hasattr(cli, "program"):  # as the patch-run executable does (older checkouts, --src, did not)
        import gc
        gc.freeze()
    mark("other imports")

    settings = cli.Settings(model=model_name)
    device = api.resolve_device(settings.device)
    model = GPT.from_pretrained(settings.model).to(device=device, dtype=api.DTYPES[settings.dtype])
    mark("model load")
    tok = BPETokenizer(settings.model)
    sizes = (model.config.block_size, model.config.vocab_size)
    n_sizes = len(inspect.signature(api.prepare).parameters) - 5  # older checkouts (--src) take block_size only
    prep = api.prepare(tok, clean, corrupt, target, foil, *sizes[:n_sizes])
    mark("vocabulary + tokenize")

    t = time.perf_counter()
    result = api.run(model, tok, clean, corrupt, target, foil, settings)
    whole = time.perf_counter() - t
    mark("run")
    record, sweep = result.timing["record_seconds"], result.timing["sweep_seconds"]
    del marks["run"], cpu["run"]
    marks["two recorded runs"] = record
    marks["sweep"] = sweep
    marks["tokenize + summaries + versions"] = whole - record - sweep

    folder = Path(out) / "files"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if hasattr(report, "experiment_files"):  # the files the CLI writes, in its order (the heatmap's apart)
        for name, content in report.experiment_files(result).items():
            content(folder / name) if callable(content) else (folder / name).write_text(content)
            mark("heatmap" if name == "heatmap.png" else "files")
    else:  # an older checkout (--src)
        report.heatmap(result, folder / "heatmap.png")
        mark("heatmap")
        report.write_experiment(result, folder / "rest", png=False)
        mark("files")
    report.token_table(prep)  # --quiet still builds the tables it does not print
    report.topk_table("clean", result.clean, prep)
    report.topk_table("corrupt", result.corrupt, prep)
    report.strongest(result)
    mark("tables")
    print(json.dumps({"wall": marks, "cpu": cpu}))


if __name__ == "__main__":
    main(*sys.argv[1:7])
