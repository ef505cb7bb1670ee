"""One patch-run experiment done step by step as `patch-run --quiet` does it, timing each step.

    python scripts/startup_stages.py MODEL OUT_DIR CLEAN CORRUPT TARGET FOIL

Prints {"wall": seconds per stage (with the run's own record and sweep seconds), "cpu": CPU seconds
per stage, all threads (the run's inner stages have wall figures only)}. Run by
`scripts/bench.py --startup` in a fresh process per measurement, so every stage, imports included,
costs what it costs in a real run. The steps mirror the CLI's single run; nothing is imported before
the clock starts but the standard library.
"""
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
    import gc
    from pathlib import Path

    from mingpt.bpe import BPETokenizer
    from mingpt.model import GPT
    from patching import analyses, cli  # noqa: F401  (cli: what the executable imports)
    from patching.core.context import DTYPES, Context, ModelSpec, resolve_device
    from patching.core.prompts import Pair, prepare
    gc.freeze()  # as the patch-run executable does
    mark("other imports")

    spec = ModelSpec(model=model_name)
    device = resolve_device(spec.device)
    model = GPT.from_pretrained(spec.model).to(device=device, dtype=DTYPES[spec.dtype])
    mark("model load")
    tok = BPETokenizer(spec.model)
    pair = Pair(clean, corrupt, target, foil)
    prepare(tok, pair, model.config.block_size, model.config.vocab_size)
    mark("vocabulary + tokenize")

    patch = analyses.get(analyses.DEFAULT)
    t = time.perf_counter()
    result = patch.run(Context(model, tok, spec), pair, patch.Options())
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
    for name, content in patch.files(result).items():  # the files the CLI writes, in its order (the heatmap's apart)
        content(folder / name) if callable(content) else (folder / name).write_text(content)
        mark("heatmap" if name == "heatmap.png" else "files")
    patch.lines(result)  # --quiet still builds the tables it does not print
    mark("tables")
    print(json.dumps({"wall": marks, "cpu": cpu}))


if __name__ == "__main__":
    main(*sys.argv[1:7])
