"""Fault injection: the 22 findings of issue 11, one test each (test_NN_...), plus the output policy.

Each test breaks something on purpose (a user's folder at --out, damaged checkpoints, YAML bombs,
closed pipes, SIGTERM, a full disk via a mocked ENOSPC, wrong types through the Python API) and
checks that patch-run answers with one line and a non-zero exit, or with correct output, and that
nothing a user wrote is touched. Everything runs offline on the 2-layer `tiny_ckpt`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import assert_close

import patching.analyses.patch.report
import patching.core.painter
import patching.study.batch
from mingpt.errors import ConfigError, WeightsError, quote
from mingpt.model import GPT
from patching import analyses, cli
from patching.analyses.patch import PatchOptions, Patching
from patching.api import ModelSpec, Pair, PatchingError, load, run
from patching.core.serial import json_text
from patching.study.batch import Batch, Experiment, unique_names
from patching.cli import main
from patching.io.files import MARKER, claim, read_marker, write_folder


REPO = Path(__file__).resolve().parents[1]
CLEAN = "Michelle Jones was a top-notch student. Michelle"
CORRUPT = "Michelle Smith was a top-notch student. Michelle"
PAIR = ["--clean", CLEAN, "--corrupt", CORRUPT, "--target", "Jones", "--foil", "Smith"]
MICHELLE = {"clean": CLEAN, "corrupt": CORRUPT, "target": "Jones", "foil": "Smith"}
JONES, SMITH = 5437, 4176


def run_main(argv: list[str]) -> dict:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main([*argv, "--device", "cpu"] if argv else [])
    return {"rc": rc, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def one_line(r: dict, *parts: str, rc: int = 1):
    """Exit status rc, exactly one 'patch-run: error:' line on stderr holding every part, no traceback."""
    assert r["rc"] == rc, r
    assert "Traceback" not in r["stderr"]
    lines = r["stderr"].splitlines()
    assert len(lines) == 1 and lines[0].startswith("patch-run: error: "), r["stderr"]
    for p in parts:
        assert p in lines[0], (p, lines[0])


def snapshot(root: Path) -> dict:
    """Every path under root with its bytes (files) or None (folders, links as their target)."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = os.readlink(p) if p.is_symlink() else (p.read_bytes() if p.is_file() else None)
    return out


def write_yaml(path: Path, doc) -> Path:
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


def summary(out: Path) -> list[dict]:
    def no_constants(name):
        raise AssertionError(f"summary.json holds bare {name}: not JSON")
    return json.loads((out / "summary.json").read_text(), parse_constant=no_constants)["experiments"]


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_weights(folder: Path, edit):
    sd = load_file(str(folder / "model.safetensors"))
    edit(sd)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


def edit_config(folder: Path, **changes) -> Path:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    return str(tiny_ckpt)


@pytest.fixture(scope="module")
def loaded(tiny_ckpt):
    return load(ModelSpec(model=str(tiny_ckpt), device="cpu"))


# ----------------------------------------------------------------------------- data loss


def test_01_out_with_user_files_is_refused(tiny, tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "thesis.txt").write_text("four years of work\n")
    (d / "sub" / "notes.md").write_text("notes\n")
    before = snapshot(tmp_path)
    one_line(run_main(["--model", tiny, *PAIR, "--out", str(d)]), "did not write", "'sub', 'thesis.txt'")
    one_line(run_main(["--model", tiny, *PAIR, "--out", str(d), "--overwrite"]), "did not write")
    one_line(run_main(["--model", tiny, *PAIR, "--out", tiny]), "did not write")  # the model's own folder
    assert snapshot(tmp_path) == before
    assert (Path(tiny) / "model.safetensors").is_file()


def test_01_batch_never_replaces_a_users_folder_or_summary(tiny, tmp_path):
    out = tmp_path / "out"
    spec = write_yaml(tmp_path / "b.yaml", {"defaults": {"model": tiny},
                                            "experiments": [{"name": "mine", **MICHELLE}, {"name": "other", **MICHELLE}]})
    assert run_main(["--batch", str(spec), "--out", str(out), "--quiet"])["rc"] == 0
    # the user keeps working in the folder: their own 'mine2' folder, and a file inside an experiment
    (out / "mine2").mkdir()
    (out / "mine2" / "data.csv").write_text("1,2\n")
    (out / "other" / "my-notes.txt").write_text("keep\n")
    spec2 = write_yaml(tmp_path / "b2.yaml", {"defaults": {"model": tiny}, "experiments": [
        {"name": "mine2", **MICHELLE}, {"name": "other", **MICHELLE}, {"name": "mine", **MICHELLE}]})
    one_line(run_main(["--batch", str(spec2), "--out", str(out)]), "--overwrite")  # an earlier batch: not without it
    r = run_main(["--batch", str(spec2), "--out", str(out), "--overwrite"])
    rows = summary(out)
    assert r["rc"] == 1 and [x["status"] for x in rows] == ["failed", "failed", "ok"], rows
    assert "did not write" in rows[0]["reason"] and "did not write" in rows[1]["reason"]
    assert (out / "mine2" / "data.csv").read_text() == "1,2\n"
    assert (out / "other" / "my-notes.txt").read_text() == "keep\n"
    assert (out / "other" / "results.json").is_file()  # the earlier result is kept too


# ----------------------------------------------------------------------------- the output policy itself


def test_policy_overwrite_replaces_only_our_folder(tiny, tmp_path):
    out = tmp_path / "x"
    assert run_main(["--model", tiny, *PAIR, "--out", str(out), "--quiet"])["rc"] == 0
    assert read_marker(out)["kind"] == "experiment"
    first = (out / "results.json").read_text()
    one_line(run_main(["--model", tiny, *PAIR, "--out", str(out), "--metric", "prob-diff"]), "--overwrite")
    assert (out / "results.json").read_text() == first
    r = run_main(["--model", tiny, *PAIR, "--out", str(out), "--metric", "prob-diff", "--overwrite", "--quiet"])
    assert r["rc"] == 0 and json.loads((out / "results.json").read_text())["metric"] == "prob-diff"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no staging or lock files left beside it


def test_policy_write_folder_is_complete_or_absent(tmp_path):
    dest = tmp_path / "f"

    def boom(path):
        path.write_text("half")
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(PatchingError, match="cannot write to output folder"):
        write_folder(dest, {"a.txt": "a", "b.txt": boom}, kind="lens")
    assert list(tmp_path.iterdir()) == []
    assert write_folder(dest, {"a.txt": "a", "b.bin": b"\x00", "c.txt": lambda p: p.write_text("c")}, kind="lens") == dest
    assert sorted(p.name for p in dest.iterdir()) == [MARKER, "a.txt", "b.bin", "c.txt"]
    with pytest.raises(PatchingError, match="not a lens|results, not a"):
        write_folder(dest, {"a.txt": "b"}, kind="experiment", overwrite=True)  # another kind is never replaced
    write_folder(dest, {"a.txt": "new"}, kind="lens", overwrite=True)
    assert sorted(p.name for p in dest.iterdir()) == [MARKER, "a.txt"] and (dest / "a.txt").read_text() == "new"
    with pytest.raises(PatchingError, match="plain file names"):
        write_folder(tmp_path / "g", {"../escape": "x"}, kind="lens")
    # an empty folder (a mount point, the current directory) is filled in place, not replaced
    empty = tmp_path / "empty"
    empty.mkdir()
    ino = empty.stat().st_ino
    write_folder(empty, {"a.txt": "a"}, kind="lens")
    assert empty.stat().st_ino == ino and (empty / "a.txt").read_text() == "a"


# ----------------------------------------------------------------------------- 2, 3


def test_02_default_folders_never_collide(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["--metric", "prob-diff"], []):
        assert run_main(["--model", tiny, *PAIR, "--quiet", *extra])["rc"] == 0
    folders = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert len(folders) == 3, folders
    assert any(f.endswith("-logit-diff") for f in folders) and any(f.endswith("-prob-diff") for f in folders)
    assert any(f.endswith("-logit-diff-2") for f in folders)
    assert all(Path(tiny).name in f for f in folders)  # the model is in the name


def test_03_concurrent_runs_into_one_folder_fail_clearly(tiny, tmp_path):
    out = tmp_path / "out"
    with claim(out, kind="experiment") as held:  # another run holds the folder
        one_line(run_main(["--model", tiny, *PAIR, "--out", str(out)]), "another patch-run is writing")
        spec = write_yaml(tmp_path / "b.yaml", {"defaults": {"model": tiny}, "experiments": [MICHELLE]})
        one_line(run_main(["--batch", str(spec), "--out", str(out)]), "another patch-run is writing")
        held.write({"a.txt": "first"})
    assert (out / "a.txt").read_text() == "first"
    assert not list(tmp_path.glob(".*lock*"))  # the lock file goes with the lock


# ----------------------------------------------------------------------------- 4 closed pipe (a real process)


def test_04_closed_stdout_keeps_the_files(tiny, tmp_path):
    out, bout = tmp_path / "single", tmp_path / "batch"
    spec = write_yaml(tmp_path / "b.yaml", {"defaults": {"model": tiny}, "experiments": [
        {"name": "a", **MICHELLE}, {"name": "b", **MICHELLE}]})
    script = ("import os, sys\nfrom patching.cli import main\n"
              "codes = [main(sys.argv[1:9] + ['--model', sys.argv[9], '--device', 'cpu', '--out', sys.argv[10]]),\n"
              "         main(['--batch', sys.argv[11], '--device', 'cpu', '--out', sys.argv[12]])]\n"
              "print(codes, file=sys.stderr)\n")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before anything is printed (`| head -0`)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", script, *PAIR, tiny, str(out), str(spec), str(bout)],
                       stdout=write, stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    os.close(write)
    assert p.returncode == 0 and "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr
    assert p.stderr.strip() == "[0, 0]"  # the runs' own status: quiet, nothing lost
    assert json.loads((out / "results.json").read_text())["n_layers"] == 2
    assert [x["status"] for x in summary(bout)] == ["ok", "ok"]


# ----------------------------------------------------------------------------- 5


def test_05_symlinked_out_is_refused_before_computing(tiny, tmp_path, monkeypatch):
    real = tmp_path / "real"
    real.mkdir()
    (real / "keep.txt").write_text("keep\n")
    link, dangling = tmp_path / "link", tmp_path / "dangling"
    link.symlink_to(real)
    dangling.symlink_to(tmp_path / "nowhere")
    before = snapshot(tmp_path)
    monkeypatch.setattr(Patching, "run", lambda *a, **k: pytest.fail("computed before refusing"))
    one_line(run_main(["--model", tiny, *PAIR, "--out", str(link)]), "symbolic link")
    one_line(run_main(["--model", tiny, *PAIR, "--out", str(dangling)]), "symbolic link")
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- 6 SIGTERM


def test_06_sigterm_during_a_batch_is_ctrl_c(tiny, tmp_path, monkeypatch):
    spec = write_yaml(tmp_path / "three.yaml", {"defaults": {"model": tiny}, "experiments": [
        {"name": "first", **MICHELLE}, {"name": "second", **MICHELLE}, {"name": "third", **MICHELLE}]})
    real, calls = Patching.run, []

    def term_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler main() installed raises here
            time.sleep(5)
            pytest.fail("SIGTERM did not interrupt")
        return real(*args, **kwargs)

    monkeypatch.setattr(Patching, "run", term_on_second)
    out = tmp_path / "out"
    r = run_main(["--batch", str(spec), "--out", str(out)])
    assert r["rc"] == 143 and "SIGTERM" in r["stderr"] and "Traceback" not in r["stderr"]
    rows = summary(out)
    assert [(x["name"], x["status"]) for x in rows] == [("first", "ok"), ("second", "interrupted"), ("third", "interrupted")]
    assert "SIGTERM" in rows[1]["reason"]
    assert [p.name for p in tmp_path.rglob("*") if "partial" in p.name or "lock" in p.name or ".tmp" in p.name] == []
    assert signal.getsignal(signal.SIGTERM) is not cli._on_sigterm  # main() put the old handler back


# ----------------------------------------------------------------------------- silent wrong answers


def test_07_recovery_of_float_noise_is_refused(tiny_ckpt, tmp_path):
    folder = copy_ckpt(tiny_ckpt, tmp_path / "m")
    # " Smith"'s embedding = " Jones"'s plus 1e-6 noise: their logit difference is rounding, in both runs
    torch.manual_seed(0)

    def edit(sd):
        w = sd["transformer.wte.weight"]
        w[SMITH] = w[JONES] + 1e-6 * torch.randn_like(w[JONES])
    edit_weights(folder, edit)
    ctx = load(ModelSpec(model=str(folder), device="cpu"))
    res = run("patch", ctx, Pair(CLEAN, CORRUPT, "Jones", "Smith"))
    gap = abs(res.clean.value - res.corrupt.value)
    assert 0 < gap < 1e-4 * abs(res.clean.topk[0].logit) or gap == 0  # only noise separates the two runs
    with pytest.raises(PatchingError, match="recovery is undefined"):
        run("patch", ctx, Pair(CLEAN, CORRUPT, "Jones", "Smith"), metric="recovery")
    # a real difference still gives recovery, with the identities of the definition
    ctx = load(ModelSpec(model=str(tiny_ckpt), device="cpu"))
    res = run("patch", ctx, Pair(CLEAN, CORRUPT, "Jones", "Smith"), metric="recovery")
    assert res.clean.value == 1.0 and res.corrupt.value == 0.0  # (d - d0) / (d - d0) and (d0 - d0) / ...: exact
    logits = [abs(v) for r in (res.clean, res.corrupt) for v in (r.target_logit, r.foil_logit)]
    gap = (res.clean.foil_logit - res.clean.target_logit) - (res.corrupt.foil_logit - res.corrupt.target_logit)
    assert_close(res.matrix[-1, -1], 1.0, scale=max(logits) / abs(gap))  # the rule's scale for a ratio


@pytest.mark.parametrize("text, key, line", [
    ("experiments:\n  - {clean: a, corrupt: b, target: c, foil: d}\nexperiments:\n  - {clean: e}\n", "'experiments'", 3),
    ("experiments:\n  - clean: a\n    corrupt: b\n    target: Jones\n    foil: Smith\n    target: Smith\n", "'target'", 6),
])
def test_08_duplicate_yaml_keys_are_refused(tmp_path, text, key, line):
    spec = write_yaml(tmp_path / "dup.yaml", text)
    one_line(run_main(["--batch", str(spec), "--out", str(tmp_path / "out")]), "duplicate key", key, f"line {line}")
    assert not (tmp_path / "out").exists()


def test_09_nan_weight_and_negative_epsilon(tiny_ckpt, tiny, tmp_path, loaded):
    nan = copy_ckpt(tiny_ckpt, tmp_path / "nan")
    edit_weights(nan, lambda sd: sd["transformer.h.1.mlp.c_fc.weight"].view(-1).__setitem__(7, float("nan")))
    inf = copy_ckpt(tiny_ckpt, tmp_path / "inf")
    edit_weights(inf, lambda sd: sd["transformer.ln_f.weight"].__setitem__(0, float("inf")))
    eps = edit_config(copy_ckpt(tiny_ckpt, tmp_path / "eps"), layer_norm_epsilon=-1)
    one_line(run_main(["--model", str(nan), *PAIR, "--out", str(tmp_path / "o1")]), "c_fc.weight", "NaN or infinite")
    one_line(run_main(["--model", str(inf), *PAIR, "--out", str(tmp_path / "o2")]), "ln_f.weight", "NaN or infinite")
    one_line(run_main(["--model", str(eps), *PAIR, "--out", str(tmp_path / "o3")]), "layer_norm_epsilon", "-1")
    # damage after loading (the API path): the run itself says its outputs are not finite
    ctx = load(ModelSpec(model=tiny, device="cpu"))
    with torch.no_grad():
        ctx.model.transformer.ln_f.weight[0] = float("nan")
    with pytest.raises(PatchingError, match="not finite"):
        run("patch", ctx, Pair(CLEAN, CORRUPT, "Jones", "Smith"))
    # in a batch: a failed row, and a summary that is strict JSON
    spec = write_yaml(tmp_path / "b.yaml", {"experiments": [{"name": "nan", **MICHELLE, "overrides": {"model": str(nan)}},
                                                             {"name": "good", **MICHELLE, "overrides": {"model": tiny}}]})
    r = run_main(["--batch", str(spec), "--out", str(tmp_path / "b")])
    rows = summary(tmp_path / "b")
    assert r["rc"] == 1 and [x["status"] for x in rows] == ["failed", "ok"] and "NaN" in rows[0]["reason"]
    # and results.json never holds a bare NaN, whatever a value is
    assert "NaN" not in json_text({"a": float("nan"), "b": [float("inf"), 1.5]})


def test_10_target_id_outside_the_model(tiny_ckpt, tmp_path):
    neg = copy_ckpt(tiny_ckpt, tmp_path / "neg")
    vocab = json.loads((neg / "vocab.json").read_text())
    vocab["ĠJones"] = -1
    (neg / "vocab.json").write_text(json.dumps(vocab))
    one_line(run_main(["--model", str(neg), *PAIR, "--out", str(tmp_path / "o1")]), "vocab.json", "integer ids from 0")
    big = copy_ckpt(tiny_ckpt, tmp_path / "big")
    vocab["ĠJones"] = 60000
    (big / "vocab.json").write_text(json.dumps(vocab))
    one_line(run_main(["--model", str(big), *PAIR, "--out", str(tmp_path / "o2")]), "target", "id 60000", "0..50256")


# ----------------------------------------------------------------------------- hangs and memory


def test_11_yaml_alias_bomb_is_refused_fast(tmp_path):
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + "experiments: *i\n"
    assert len(bomb) < 600
    spec = write_yaml(tmp_path / "bomb.yaml", bomb)
    t0 = time.perf_counter()
    one_line(run_main(["--batch", str(spec), "--out", str(tmp_path / "out")]), "aliases", "line 2")
    assert time.perf_counter() - t0 < 60  # a hang guard (the bomb took minutes), not a speed target
    # messages quote at most ~80 characters of a bad value, however big it is
    nested = [1]
    for _ in range(40):
        nested = [nested] * 9
    for value in (nested, "x" * 10**6, {i: "y" * 1000 for i in range(10**4)}):
        assert len(quote(value)) <= 80
    spec = write_yaml(tmp_path / "big.yaml", {"experiments": [{**MICHELLE, "target": list(range(10**4))}]})
    r = run_main(["--batch", str(spec), "--out", str(tmp_path / "out2")])
    assert len(summary(tmp_path / "out2")[0]["reason"]) < 200 and r["rc"] == 1


@pytest.mark.parametrize("change, what", [({"n_layer": 1_000_000}, "n_layer 1000000"),
                                          ({"vocab_size": 10**9}, "vocab_size"),
                                          ({"n_positions": 10**8}, "n_positions"),
                                          ({"n_inner": 10**8}, "parameters")])
def test_12_huge_config_fails_before_allocating(tiny_ckpt, tmp_path, change, what):
    folder = edit_config(copy_ckpt(tiny_ckpt, tmp_path / "m"), **change)
    t0 = time.perf_counter()
    with pytest.raises(WeightsError, match=what):
        GPT.from_pretrained(str(folder))
    assert time.perf_counter() - t0 < 60  # a hang guard (the bomb took minutes), not a speed target


def test_13_summary_is_written_in_linear_time(tmp_path, monkeypatch):
    n = 3000
    spec = write_yaml(tmp_path / "many.yaml", {"defaults": {"model": "unused"},
                                               "experiments": [{"clean": "a", "corrupt": "b", "target": "c"} for _ in range(n)]})
    writes = []
    real = patching.study.batch.write_summary
    monkeypatch.setattr(patching.study.batch, "write_summary", lambda *a: (writes.append(1), real(*a)))
    t0 = time.perf_counter()
    r = run_main(["--batch", str(spec), "--out", str(tmp_path / "out"), "--quiet"])
    elapsed = time.perf_counter() - t0
    rows = summary(tmp_path / "out")
    assert r["rc"] == 1 and len(rows) == n and {x["status"] for x in rows} == {"failed"}
    assert len(writes) <= 2 + elapsed / patching.study.batch.SUMMARY_EVERY + 1  # start, end, every 2 s: not per experiment
    assert elapsed < 120  # a hang guard (10,000 rewrites took 400 s), not a speed target


def test_13_dev_zero_is_not_read_without_bound(tmp_path):
    t0 = time.perf_counter()
    one_line(run_main(["--batch", "/dev/zero", "--out", str(tmp_path / "out")]), "larger than 1 MiB")
    assert time.perf_counter() - t0 < 60  # a hang guard (the bomb took minutes), not a speed target


# ----------------------------------------------------------------------------- tracebacks


def test_14_any_failure_is_one_row_and_the_rest_run(tiny_ckpt, tiny, tmp_path, monkeypatch):
    bad_inner = edit_config(copy_ckpt(tiny_ckpt, tmp_path / "inner"), n_inner="wide")
    spec = write_yaml(tmp_path / "b.yaml", "\n".join([
        f"defaults: {{model: {json.dumps(tiny)}}}",
        "experiments:",
        "  - {name: typed, clean: a b, corrupt: a c, target: x, foil: y, overrides: {metric: [a]}}",
        '  - {name: surrogate, clean: "Michelle J\\udce9nes was", corrupt: "Michelle Smith was", target: Jones, foil: Smith}',
        f"  - {{name: inner, clean: a b, corrupt: a c, target: x, foil: y, overrides: {{model: {json.dumps(str(bad_inner))}}}}}",
        "  - {name: crash, clean: " + json.dumps(CLEAN) + ", corrupt: " + json.dumps(CORRUPT) + ", target: Jones, foil: Smith}",
        "  - {name: good, clean: " + json.dumps(CLEAN) + ", corrupt: " + json.dumps(CORRUPT) + ", target: Jones, foil: Smith}",
    ]) + "\n")
    real = Patching.run

    def crash_once(*args, **kwargs):  # a bug of ours in one experiment: (self, ctx, pair, options, events)
        if args[2].clean == CLEAN and not getattr(crash_once, "done", False):
            crash_once.done = True
            raise RuntimeError("shape mismatch deep inside")
        return real(*args, **kwargs)

    monkeypatch.setattr(Patching, "run", crash_once)
    r = run_main(["--batch", str(spec), "--out", str(tmp_path / "out")])
    rows = summary(tmp_path / "out")
    assert r["rc"] == 1 and "Traceback" not in r["stderr"] and r["stderr"] == ""
    assert [x["status"] for x in rows] == ["failed", "failed", "failed", "failed", "ok"], rows
    reasons = [x.get("reason", "") for x in rows]
    assert "metric" in reasons[0] and "not one of" in reasons[0]
    assert "not UTF-8" in reasons[1]
    assert "n_inner" in reasons[2]
    assert "unexpected RuntimeError" in reasons[3] and "shape mismatch" in reasons[3]


def test_15_non_utf8_arguments(tiny, tmp_path):
    latin1 = "Michelle J\udce9nes was a top-notch student. Michelle"  # how Python receives Latin-1 bytes
    one_line(run_main(["--model", tiny, "--clean", latin1, *PAIR[2:], "--out", str(tmp_path / "o")]),
             "clean prompt", "not UTF-8", "character 10")
    one_line(run_main(["--model", tiny, *PAIR[:4], "--target", "J\udce9nes", "--foil", "Smith", "--out", str(tmp_path / "o")]),
             "target", "not UTF-8")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("content, parts", [
    (b"experiments:\n  - clean: Fran\xe7ois\n", ["not UTF-8", "0xe7"]),
    ("defaults: {metric: {a: 1}}\nexperiments: [{clean: a, corrupt: b, target: c, foil: d}]\n", ["metric", "not one of"]),
    ("defaults: [1, 2]\nexperiments: []\n", ["defaults must be a mapping"]),
    ("? [a, b]\n: 1\n", ["unhashable"]),
    ("[" * 5000 + "]" * 5000 + "\n", ["nests", "too deeply"]),
    ("experiments:\n  - clean: 2024-13-45\n", ["cannot read", "quote it"]),
])
def test_16_malformed_batch_files(tmp_path, content, parts):
    spec = tmp_path / "b.yaml"
    spec.write_bytes(content if isinstance(content, bytes) else content.encode())
    one_line(run_main(["--batch", str(spec), "--out", str(tmp_path / "out")]), *parts)


@pytest.mark.parametrize("change, parts", [
    ({"n_inner": "wide"}, ["n_inner", "'wide'"]),
    ({"n_inner": -5}, ["n_inner", "-5"]),
    ({"n_inner": True}, ["n_inner"]),
    ({"layer_norm_epsilon": "small"}, ["layer_norm_epsilon"]),
    ({"layer_norm_epsilon": 0}, ["layer_norm_epsilon"]),
    ({"activation_function": ["gelu"]}, ["activation"]),
    ({"n_layer": [2]}, ["n_layer"]),
])
def test_17_config_values_of_wrong_type_or_sign(tiny_ckpt, tmp_path, change, parts):
    folder = edit_config(copy_ckpt(tiny_ckpt, tmp_path / "m"), **change)
    one_line(run_main(["--model", str(folder), *PAIR, "--out", str(tmp_path / "o")]), *parts)
    with pytest.raises(ConfigError):
        GPT.from_pretrained(str(folder))


def test_18_out_dot_dotdot_long_names(tiny, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "paper.tex").write_text("x\n")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    monkeypatch.setattr(Patching, "run", lambda *a, **k: pytest.fail("computed before refusing"))
    one_line(run_main(["--model", tiny, *PAIR, "--out", "."]), "did not write", "paper.tex")
    one_line(run_main(["--model", tiny, *PAIR, "--out", ".."]), "did not write")
    one_line(run_main(["--model", tiny, *PAIR, "--out", "n" * 250]), "at most 200 bytes")
    assert snapshot(tmp_path) == before


def test_18_out_dot_in_an_empty_folder_writes_there(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_main(["--model", tiny, *PAIR, "--out", ".", "--quiet"])["rc"] == 0
    assert (tmp_path / "results.json").is_file() and Path.cwd() == tmp_path and os.path.samefile(".", tmp_path)


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_18_full_disk(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(patching.analyses.patch.report, "heatmap", _enospc)
    one_line(run_main(["--model", tiny, *PAIR, "--out", str(tmp_path / "o")]), "No space left", "free some space")
    assert list(tmp_path.iterdir()) == []  # no half folder, no staging, no lock


def test_18_full_disk_mid_batch(tiny, tmp_path, monkeypatch):
    real, calls = patching.analyses.patch.report.heatmap, []

    def full_on_second(*args, **kwargs):
        calls.append(1)
        return _enospc() if len(calls) == 2 else real(*args, **kwargs)

    monkeypatch.setattr(patching.analyses.patch.report, "heatmap", full_on_second)
    spec = write_yaml(tmp_path / "b.yaml", {"defaults": {"model": tiny}, "experiments": [
        {"name": n, **MICHELLE} for n in ("one", "two", "three")]})
    out = tmp_path / "out"
    r = run_main(["--batch", str(spec), "--out", str(out)])
    rows = summary(out)
    assert r["rc"] == 1 and [x["status"] for x in rows] == ["ok", "failed", "ok"]
    assert "No space left" in rows[1]["reason"] and not (out / "two").exists()
    assert not [p for p in tmp_path.rglob("*") if "partial" in p.name]


def test_19_python_api_types(loaded, tiny):
    ctx = loaded
    with pytest.raises(PatchingError, match="metric"):
        PatchOptions(metric=["x"])
    with pytest.raises(PatchingError, match="top_k"):
        PatchOptions(top_k="5")
    with pytest.raises(PatchingError, match="PatchOptions"):
        run("patch", ctx, Pair(CLEAN, CORRUPT, "Jones", "Smith"), {"metric": "logit-diff"})
    with pytest.raises(PatchingError, match="unknown key 'metrik'"):
        run("patch", ctx, Pair(CLEAN, CORRUPT, "Jones", "Smith"), metrik="logit-diff")
    with pytest.raises(PatchingError, match="clean prompt must be text"):
        run("patch", ctx, Pair(123, CORRUPT, "Jones", "Smith"))
    with pytest.raises(PatchingError, match="target must be text"):
        run("patch", ctx, Pair(CLEAN, CORRUPT, None, "Smith"))
    with pytest.raises(PatchingError, match="runs on Pair"):
        run("patch", ctx, (CLEAN, CORRUPT, "Jones", "Smith"))
    with pytest.raises(PatchingError, match="load"):
        run("patch", ctx.model, Pair(CLEAN, CORRUPT, "Jones", "Smith"))
    s = PatchOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.top_k = 0
    object.__setattr__(s, "top_k", -5)  # forced past the frozen dataclass: still checked at use
    with pytest.raises(PatchingError, match="top_k must be a positive integer, got -5"):
        run("patch", ctx, Pair(CLEAN, CORRUPT, "Jones", "Smith"), s)
    assert dataclasses.replace(PatchOptions(), top_k=3).top_k == 3


# ----------------------------------------------------------------------------- rough edges


def test_20_glyphs_missing_from_the_font_are_not_warned(loaded, tiny, tmp_path):
    import warnings
    res = run("patch", loaded, Pair(CLEAN, CORRUPT, "Jones", "Smith"), top_k=3)
    res.prepared.tokens[2] = "日本語 ✓"  # a label the default font cannot draw
    with warnings.catch_warnings(record=True) as control:  # the drawing itself, unfiltered
        warnings.simplefilter("always")
        patching.core.painter._draw(patching.analyses.patch.report.heatmap_spec(res), str(tmp_path / "control.png"))
    if not any("missing" in str(w.message) for w in control):
        pytest.skip("this matplotlib font draws CJK: nothing to silence")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        write_folder(tmp_path / "out", patching.analyses.patch.report.files(res), kind="experiment")
    assert not [w for w in seen if "missing" in str(w.message)]
    assert (tmp_path / "out" / "heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_21_identical_prompts(tiny, tmp_path):
    one_line(run_main(["--model", tiny, "--clean", CLEAN, "--corrupt", CLEAN, *PAIR[4:], "--out", str(tmp_path / "o")]),
             "same tokens", "nothing to patch")


def test_21_offline_fails_fast(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
           "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens there: the Hub is unreachable
    for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(v, None)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import patching.cli"], env=env, check=True, timeout=120)
    start = time.perf_counter() - t0  # this machine's start-up, measured now: the bound below is relative to it
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "patching.cli", "--model", "gpt2", *PAIR, "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.perf_counter() - t0
    one_line({"rc": p.returncode, "stderr": p.stderr}, "not in the Hugging Face cache")
    assert elapsed < 2 * start + 10, (elapsed, start)  # one 3 s check; huggingface_hub alone retries for ~25 s


def test_21_out_expands_home(tiny, tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert run_main(["--model", tiny, *PAIR, "--out", "~/x", "--quiet"])["rc"] == 0
    assert (home / "x" / "results.json").is_file() and list(work.iterdir()) == []


def test_21_token_without_leading_space(tiny, tmp_path):
    out = tmp_path / "o"
    r = run_main(["--model", tiny, *PAIR[:4], "--target", "=.", "--foil", "=,", "--out", str(out), "--quiet"])
    assert r["rc"] == 0, r
    res = json.loads((out / "results.json").read_text())
    assert res["target"] == {"text": ".", "id": 13} and res["foil"] == {"text": ",", "id": 11}
    r = run_main(["--model", tiny, *PAIR[:4], "--target", ".", "--foil", "Smith", "--out", str(tmp_path / "p"), "--quiet"])
    assert json.loads((tmp_path / "p" / "results.json").read_text())["target"] == {"text": " .", "id": 764}
    one_line(run_main(["--model", tiny, *PAIR[:4], "--target", "=", "--foil", "Smith", "--out", str(tmp_path / "q")]),
             "target is empty", "=TEXT")


def test_21_no_arguments_is_usage_and_exit_2():
    r = run_main([])
    assert r["rc"] == 2 and r["stderr"].startswith("usage: patch-run") and "Traceback" not in r["stderr"]


def test_22_explicit_names_are_kept():
    exp = lambda name=None: Experiment(Pair(**MICHELLE), name, label=MICHELLE["clean"])  # noqa: E731
    exps = [exp("run"), exp("run"), exp("run-2"), exp(), exp("01-michelle-jones-was-a-top-notch-student")]
    names = unique_names(Batch(analyses.get("patch"), {}, exps))
    assert names[0] == "run" and names[2] == "run-2" and names[4] == "01-michelle-jones-was-a-top-notch-student"
    assert len(set(names)) == len(names)
    assert names[1] == "run-3" and names[3].startswith("04-")


# ----------------------------------------------------------------------------- subcommands


def test_subcommand_patch_is_the_default(tiny, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_main(["--model", tiny, *PAIR, "--out", str(a), "--quiet"])["rc"] == 0
    assert run_main(["patch", "--model", tiny, *PAIR, "--out", str(b), "--quiet"])["rc"] == 0
    ma, mb = (np.array(json.loads((f / "results.json").read_text())["matrix"]) for f in (a, b))
    np.testing.assert_array_equal(ma, mb)
