"""The CUDA paths: every site's fast sweep on the GPU against the loop oracle on the CPU, and every
command on a demo model on the GPU against the same command on the CPU (every number of its
results.json). Skipped without a CUDA GPU.
"""
from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch

from conftest import random_gpt
from mingpt.model import GPT
from mingpt.sites import ALL_SITES
from patching.cli import main
from patching.core import engines

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CONFIG = (dict(n_layer=3, n_head=4, n_embd=32, vocab_size=97, block_size=64, n_inner=48), 2)


@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-3), (torch.bfloat16, 0.1)])
@pytest.mark.parametrize("site", list(ALL_SITES))
def test_every_site_fast_on_cuda_matches_the_cpu_loop(site, dtype, rtol):
    cpu = random_gpt(*CONFIG)
    g = torch.Generator().manual_seed(5)
    clean = torch.randint(0, 97, (1, 11), generator=g)
    corrupt = clean.clone()
    corrupt[0, [2, 7]] += 1
    rc, rx = engines.record(cpu, clean, [site]), engines.record(cpu, corrupt, [site])
    loop = engines.sweep(cpu, corrupt, rx, rc[site][:, 0], site, 3, 5, False, engine="loop")
    gpu = GPT(cpu.config)
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.to(device="cuda", dtype=dtype).eval()
    gc, gx = engines.record(gpu, clean.cuda(), [site]), engines.record(gpu, corrupt.cuda(), [site])
    fast = engines.sweep(gpu, corrupt.cuda(), gx, gc[site][:, 0], site, 3, 5, False, max_rows=50)
    assert fast.device.type == "cpu" and fast.shape == loop.shape
    scale = loop[..., :2].abs().max()
    assert (fast[..., :2] - loop[..., :2]).abs().max() <= rtol * scale


IOI = ["--model", "demo-ioi", "--clean", "When Mary and John went to the store, John gave a drink to",
       "--corrupt", "When Anne and Tom went to the store, Ben gave a drink to", "--target", "Mary", "--foil", "John"]
PROMPT = ["--model", "demo-ioi", "--prompt", "When Mary and John went to the store, John gave a drink to"]
COMMANDS = {
    "patch": ["patch", *IOI],
    "patch-z": ["patch", *IOI, "--site", "z"],
    "patch-attribution": ["patch", *IOI, "--site", "z", "--method", "attribution", "--check"],
    "lens": ["lens", *PROMPT, "--target", "Mary", "--foil", "John"],
    "dla": ["dla", *PROMPT, "--target", "Mary", "--foil", "John"],
    "attention": ["attention", *PROMPT],
    "ablate": ["ablate", *PROMPT, "--target", "Mary", "--foil", "John"],
    "path": ["path", *IOI, "--sender", "all", "--receiver", "logits", "--freeze-mlps"],
    "circuit": ["circuit", *IOI],
    "circuit-eap-ig": ["circuit", *IOI, "--method", "eap-ig-inputs"],
    "circuit-eap-ig-activations": ["circuit", *IOI, "--method", "eap-ig-activations", "--check"],
    "heads": ["heads", "--model", "demo-induction", "--n-seqs", "4", "--seq-len", "20"],
    "weights": ["weights", "--model", "demo-induction"],
    "top": ["top", "--model", "demo-names", "--corpus", "examples/corpus-names.txt", "--unit", "mlp_post:1.17", "--k", "5"],
}
SKIP = ("seconds", "time", "memory", "bytes", "mb", "versions", "device", "threads")  # not results
# top's quantile bands draw examples by rank, and near-equal activations swap ranks between devices: the
# bands' bounds are compared, the examples drawn from them are not
DRAWN = "examples"


def numbers(tree, path=""):
    """{path: number} of every number in a results.json, except timings and the like."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() if not any(s in key.lower() for s in SKIP)
                and not (key == DRAWN and "/quantiles[" in path)
                for k, v in numbers(sub, f"{path}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in numbers(sub, f"{path}[{i}]").items()}
    if isinstance(tree, (int, float)) and not isinstance(tree, bool):
        return {path: tree}
    return {}


def run(argv, out) -> dict:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main([*argv, "--out", str(out), "--quiet"])
    assert rc == 0, stderr.getvalue()
    return numbers(json.loads((out / "results.json").read_text()))


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_on_cuda_gives_the_cpu_numbers(name, tmp_path):
    cpu = run([*COMMANDS[name], "--device", "cpu"], tmp_path / "cpu")
    gpu = run([*COMMANDS[name], "--device", "cuda"], tmp_path / "gpu")
    assert cpu.keys() == gpu.keys()
    section = lambda k: k.split("/")[1].split("[")[0]  # noqa: E731 -- a path's top-level key
    scale = {}  # floats are compared against the largest of their top-level key; integers (ids, counts) exactly
    for k, v in cpu.items():
        if isinstance(v, float) and math.isfinite(v):
            scale[section(k)] = max(scale.get(section(k), 0.0), abs(v))

    def same(k):
        a, b = cpu[k], gpu[k]
        if isinstance(a, int) and isinstance(b, int):
            return a == b
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return abs(a - b) <= 1e-3 * max(scale.get(section(k), 0.0), 1e-6)

    bad = {k: (cpu[k], gpu[k]) for k in cpu if not same(k)}
    assert not bad, dict(list(bad.items())[:10])


def test_bfloat16_on_cuda_reports_its_error_against_float32(tmp_path):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main([*COMMANDS["patch-z"], "--device", "cuda", "--dtype", "bfloat16", "--out", str(tmp_path / "o")])
    assert rc == 0, stderr.getvalue()
    got = json.loads((tmp_path / "o" / "results.json").read_text())
    want = run([*COMMANDS["patch-z"], "--device", "cpu"], tmp_path / "cpu")
    assert "precision" in json.dumps(got) and "float32" in stdout.getvalue()
    scale = max(abs(v) for k, v in want.items() if k.startswith("/matrix"))
    diff = max(abs(v - want[k]) for k, v in numbers(got).items() if k.startswith("/matrix"))
    assert diff <= 0.1 * scale
