"""Path patching against a plain loop of transformers runs with hooks, written here independently.

The oracle runs GPT2LMHeadModel three times per sender, with forward hooks: run 1 records the input of
every attn.c_proj (all heads' z side by side) and every MLP's output; run 2 replaces each c_proj
input by the base run's, with the sender's slice from the source run (and each MLP output by the base
run's with --freeze-mlps), and records what the receivers read: attn.c_attn's output (q | k | v) or the
input of ln_f; run 3 replaces only the receiver head's slice of c_attn's output (or ln_f's input).
Also: no path gives the base value exactly; with frozen, zeroed MLPs sender -> logits is the z patch.
"""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch

from conftest import assert_close, hf_model, make_checkpoint
from mingpt.bpe import BPETokenizer
from mingpt.model import GPT
from patching.core import engines
from patching.cli import main
from patching.analyses.path import PathOptions, Receiver, path
from patching.core.context import Context, ModelSpec
from patching.core.prompts import Pair

CLEAN, CORRUPT = "Michelle Jones was a top-notch student. Michelle", "Michelle Smith was a top-notch student. Michelle"
JONES, SMITH = 5437, 4176


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """A 3-layer, 4-head random checkpoint: ours and transformers' on the same weights."""
    folder = make_checkpoint(tmp_path_factory.mktemp("three"), n_layer=3, n_head=4, n_embd=32, seed=5, init_std=0.2)
    return folder, GPT.from_pretrained(str(folder)), BPETokenizer(str(folder)), hf_model(folder)


def oracle(hf, base_ids, src_ids, sender, receivers: list[Receiver], freeze_mlps: bool) -> float:
    """logit(Smith) - logit(Jones) after path patching, by transformers hooks (see the docstring)."""
    blocks, C = hf.transformer.h, hf.config.n_embd
    hs = C // hf.config.n_head
    sl = lambda h: slice(h * hs, (h + 1) * hs)  # noqa: E731  head h's columns of z, or of q/k/v

    def forward(ids, pre=None, post=None):
        handles = []
        for name, fn in (pre or {}).items():
            handles.append(hf.get_submodule(name).register_forward_pre_hook(fn))
        for name, fn in (post or {}).items():
            handles.append(hf.get_submodule(name).register_forward_hook(fn))
        try:
            with torch.no_grad():
                return hf(ids).logits[0, -1]
        finally:
            for h in handles:
                h.remove()

    def keep(store, key, post=True):
        def hook(mod, args, out=None):
            store[key] = (out if post else args[0]).detach().clone()
        return hook

    rec = {}
    for tag, ids in (("base", base_ids), ("src", src_ids)):  # run 1
        forward(ids, pre={f"transformer.h.{l}.attn.c_proj": keep(rec, (tag, "z", l), post=False) for l in range(len(blocks))},
                post={f"transformer.h.{l}.mlp": keep(rec, (tag, "mlp", l)) for l in range(len(blocks))})

    def frozen_z(l):
        def hook(mod, args):
            z = rec["base", "z", l].clone()
            if l == sender[0]:
                z[..., sl(sender[1])] = rec["src", "z", l][..., sl(sender[1])]
            return (z,)
        return hook

    pre = {f"transformer.h.{l}.attn.c_proj": frozen_z(l) for l in range(len(blocks))}
    post = {f"transformer.h.{l}.mlp": (lambda l: lambda m, a, o: rec["base", "mlp", l])(l)
            for l in range(len(blocks))} if freeze_mlps else {}
    seen = {}
    if receivers[0].input == "logits":
        pre["transformer.ln_f"] = keep(seen, "final", post=False)
    else:
        for r in receivers:
            post[f"transformer.h.{r.layer}.attn.c_attn"] = keep(seen, r.layer)
    forward(base_ids, pre, post)  # run 2

    if receivers[0].input == "logits":  # run 3
        logits = forward(base_ids, pre={"transformer.ln_f": lambda m, a: (seen["final"],)})
    else:
        def put(layer):
            def hook(mod, args, out):
                out = out.clone()
                for r in receivers:
                    if r.layer == layer:
                        off = "qkv".index(r.input) * C
                        cols = slice(off + r.head * hs, off + (r.head + 1) * hs)
                        out[..., cols] = seen[layer][..., cols]
                return out
            return hook
        logits = forward(base_ids, post={f"transformer.h.{l}.attn.c_attn": put(l) for l in {r.layer for r in receivers}})
    return float(logits[SMITH] - logits[JONES])


def options(sender, receivers, freeze=False, direction="denoise", metric="logit-diff"):
    return PathOptions(sender, receivers, freeze, metric, direction)


def run_path(model, tok, options):
    """patching's path patching of the Michelle pair on this model."""
    return path(Context(model, tok, ModelSpec(model="test")), Pair(CLEAN, CORRUPT, "Jones", "Smith"), options)


CASES = [(["logits"], False), (["logits"], True), (["1.2:q"], False), (["2.0:k"], False), (["2.3:v"], True),
         (["1.1:k", "2.0:v", "2.2:q"], False)]


@pytest.mark.parametrize("receivers,freeze", CASES)
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_every_sender_equals_the_transformers_hooks_oracle(three, receivers, freeze, direction):
    folder, model, tok, hf = three
    r = run_path(model, tok, options("all", receivers, freeze, direction))
    ids = [torch.tensor([r.prepared.clean_ids]), torch.tensor([r.prepared.corrupt_ids])]
    base_ids, src_ids = ids[::-1] if direction == "denoise" else ids
    first = min(3 if x == "logits" else int(x[0]) for x in receivers)
    want = np.full((3, 4), np.nan)
    for l in range(first):
        for h in range(4):
            want[l, h] = oracle(hf, base_ids, src_ids, (l, h), r.receivers, freeze)
    assert np.array_equal(np.isnan(r.matrix), np.isnan(want))  # not applicable: NaN, never 0
    assert np.array_equal(r.applicable, ~np.isnan(want))
    with torch.no_grad():
        logits = hf(base_ids).logits[0, -1]
    assert_close(r.matrix, want, scale=float(logits.abs().max()), what=f"path {receivers}")
    assert float(np.nanstd(r.matrix)) > 1e-3, "the senders must differ for the test to mean anything"
    one = run_path(model, tok, options("0.1", receivers, freeze, direction))  # one sender = its cell of the matrix
    assert_close(one.value, r.matrix[0, 1], scale=float(logits.abs().max()))


@pytest.mark.parametrize("freeze", [False, True])
def test_a_sender_that_writes_nothing_gives_exactly_the_base_value(tiny_ckpt, freeze):
    model, tok = GPT.from_pretrained(str(tiny_ckpt)), BPETokenizer(str(tiny_ckpt))
    hs = model.config.n_embd // model.config.n_head
    with torch.no_grad():
        model.transformer.h[0].attn.c_proj.weight[:, 2 * hs:3 * hs] = 0  # head 0.2's slice of c_proj
    for receivers in (["logits"], ["1.0:q", "1.1:k", "1.3:v"]):
        r = run_path(model, tok, options("0.2", receivers, freeze))
        assert r.value == r.base_value
        assert r.source_value != r.base_value
        other = run_path(model, tok, options("0.1", receivers, freeze))
        assert other.value != r.base_value  # a head that does write moves it


def test_frozen_zero_mlps_sender_to_logits_is_the_z_patch(tmp_path):
    """With every MLP zero and frozen, a last-layer head reaches the logits only directly."""
    folder = make_checkpoint(tmp_path / "m", n_layer=2, n_head=4, n_embd=32, seed=7, init_std=0.2)
    model, tok = GPT.from_pretrained(str(folder)), BPETokenizer(str(folder))
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_proj.weight.zero_()
            block.mlp.c_proj.bias.zero_()
    r = run_path(model, tok, options("all", ["logits"], freeze=True))
    clean, corrupt = torch.tensor([r.prepared.clean_ids]), torch.tensor([r.prepared.corrupt_ids])
    rc, rx = engines.record(model, clean, ["z"]), engines.record(model, corrupt, ["z"])
    got = engines.sweep(model, corrupt, rx, rc["z"][:, 0], "z", JONES, SMITH, False, all_positions=True)
    z_patch = (got[..., 1] - got[..., 0]).numpy()  # (L, H): each head patched at every position
    assert_close(r.matrix[1], z_patch[1], scale=float(rx.last_logits.abs().max()))
    assert float(np.abs(r.matrix[0] - z_patch[0]).max()) > 1e-4  # layer 0 also reaches layer 1's heads


# ----------------------------------------------------------------------------- CLI


def cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_cli_all_senders_writes_null_for_not_applicable(tiny_ckpt, tmp_path):
    rc, out, err = cli(["path", "--clean", CLEAN, "--corrupt", CORRUPT, "--target", "Jones", "--foil", "Smith",
                        "--model", str(tiny_ckpt), "--device", "cpu", "--sender", "all", "--receiver", "1.0:k",
                        "--out", str(tmp_path / "p")])
    assert rc == 0, err
    doc = json.loads((tmp_path / "p" / "results.json").read_text())
    assert doc["matrix"][1] == [None] * 4 and all(v is not None for v in doc["matrix"][0])
    assert doc["receivers"] == ["1.0:k"] and doc["axes"] == ["layer", "head"]
    csv = (tmp_path / "p" / "results.csv").read_text().splitlines()
    assert csv[0] == "sender,layer,head,logit-diff,applicable" and csv[5] == "1.0,1,0,,no"
    assert (tmp_path / "p" / "heatmap.png").stat().st_size > 0


@pytest.mark.parametrize("args,words", [
    (["--sender", "1.0", "--receiver", "1.0:k"], "layer 1"),
    (["--sender", "1.2", "--receiver", "0.1:q"], "pick a sender"),
    (["--sender", "5.0"], "does not exist"),
    (["--sender", "0.9", "--receiver", "1.0:q"], "does not exist"),
    (["--sender", "0.1", "--receiver", "1.0:x"], ":k or :v"),
    (["--sender", "zero"], "LAYER.HEAD"),
    (["--sender", "all", "--receiver", "0.0:v"], "block 0"),
    (["--sender", "0.1", "--receiver", "logits", "1.0:q"], "alone"),
])
def test_cli_bad_input_is_one_line(tiny_ckpt, tmp_path, args, words):
    rc, out, err = cli(["path", "--clean", CLEAN, "--corrupt", CORRUPT, "--target", "Jones", "--foil", "Smith",
                        "--model", str(tiny_ckpt), "--device", "cpu", *args, "--out", str(tmp_path / "bad")])
    assert rc == 1 and err.count("\n") == 1 and words in err and "Traceback" not in err, err
    assert not (tmp_path / "bad").exists()
