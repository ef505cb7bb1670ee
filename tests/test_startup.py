"""Start-up: what a run imports and how the model is built, checked in fresh interpreters.

A run should import only what it uses (no pyplot, no Hub client for local models, no YAML outside
batches, never transformers) and load weights without reaching torch's compiler stack (torch._dynamo,
which building modules on the meta device imports). The faster construction must give the same model.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from mingpt.checkpoint import read_weights
from mingpt.model import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]
NEVER_ON_START = ("matplotlib.pyplot", "huggingface_hub", "yaml", "transformers", "torch._dynamo")


def modules_after(code: str) -> set[str]:
    """The names in sys.modules after running `code` in a fresh interpreter (this checkout first)."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1"))
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_importing_the_cli_pulls_in_nothing_a_run_may_not_need():
    loaded = modules_after("import patching.cli")
    assert "patching.cli" in loaded and "torch" in loaded  # the probe did import it
    assert sorted(loaded & {*NEVER_ON_START, "matplotlib", "safetensors"}) == []


def test_loading_and_a_whole_run_never_import_the_compiler_stack(tiny_ckpt, tmp_path):
    load = modules_after(f"from mingpt.model import GPT\nGPT.from_pretrained({str(tiny_ckpt)!r})")
    assert "safetensors" in load  # it did read the weights
    assert sorted(load & set(NEVER_ON_START)) == []
    run = modules_after(
        "from patching.cli import main\n"
        f"assert main(['--model', {str(tiny_ckpt)!r}, '--quiet', '--clean', 'Michelle Jones was here', '--corrupt', "
        f"'Michelle Smith was here', '--target', 'and', '--foil', 'but', '--out', {str(tmp_path / 'o')!r}]) == 0")
    assert (tmp_path / "o" / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "matplotlib.figure" in run  # the heatmap was drawn, without pyplot
    assert sorted(run & set(NEVER_ON_START)) == []


def test_fast_construction_equals_the_meta_device_one(tiny_ckpt):
    """from_pretrained now skips torch.nn.init instead of building on the meta device: same model."""
    fast = GPT.from_pretrained(str(tiny_ckpt))
    config = fast.config
    with torch.device("meta"):  # the previous construction path, rebuilt here as the reference
        old = GPT(config)
    old = old.to_empty(device="cpu")
    old.lm_head.weight = old.transformer.wte.weight
    old.load_hf_state_dict(read_weights(Path(tiny_ckpt) / "model.safetensors"))
    old.eval()
    assert fast.lm_head.weight is fast.transformer.wte.weight  # still tied
    a, b = fast.state_dict(), old.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    idx = torch.randint(0, config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fast(idx)[0], old(idx)[0])  # same weights, same kernels: bit for bit


def test_random_init_still_works_after_a_load(tiny_ckpt):
    """Skipping init is scoped to from_pretrained: a model built afterwards is initialised as before."""
    GPT.from_pretrained(str(tiny_ckpt))
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=1000, block_size=16)
    model = GPT(config)
    torch.manual_seed(0)
    again = GPT(config)
    w = model.transformer.h[0].mlp.c_fc.weight
    assert torch.equal(w, again.transformer.h[0].mlp.c_fc.weight)  # seeded init, not uninitialised memory
    assert abs(w.std().item() - 0.02) < 0.004 and model.transformer.h[0].mlp.c_fc.bias.abs().max() == 0
    assert torch.equal(model.transformer.ln_f.weight, torch.ones(32))


def test_the_executable_freezes_the_gc_before_exit_and_main_does_not():
    """program() (the patch-run executable) returns main()'s status after gc.freeze(), which spares the
    interpreter's final collection; main() called from Python leaves the caller's GC alone."""
    from patching.cli import main
    frozen = gc.get_freeze_count()
    assert main(["--model", "no-such-model-here", "--clean", "a", "--corrupt", "b", "--target", "c", "--foil", "d"]) == 1
    assert gc.get_freeze_count() == frozen
    probe = ("import gc, sys\nfrom patching.cli import program\nsys.argv = ['patch-run', '--model', 'no-such-model-here',"
             " '--clean', 'a', '--corrupt', 'b', '--target', 'c', '--foil', 'd']\n"
             "code = program()\nprint(code, gc.get_freeze_count() > 0)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1"))
    assert out.stdout.split() == ["1", "True"] and "unknown model" in out.stderr
