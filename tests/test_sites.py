"""The site seam: recording and patching every site, the fast engine against the loop oracle for
every site, both directions and all-positions patches, and patches against transformers hooks.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mingpt.model import GPT
from mingpt.sites import HEAD_SITES, SITES, Edit, Patch, Recording
from patching.core import engines
from conftest import assert_close, hf_model, random_gpt

CONFIGS = {  # name: (GPTConfig kwargs, seed)
    "1L1H8": (dict(n_layer=1, n_head=1, n_embd=8, vocab_size=37, block_size=64), 0),
    "2L2H16": (dict(n_layer=2, n_head=2, n_embd=16, vocab_size=53, block_size=80), 1),
    "3L4H32i": (dict(n_layer=3, n_head=4, n_embd=32, vocab_size=97, block_size=64, n_inner=48), 2),
}


def model_of(name: str) -> GPT:
    """A random GPT with O(1) activations (large init std), so patches move the logits visibly."""
    return random_gpt(*CONFIGS[name])


def pair(model: GPT, T: int, differ: list[int], seed: int):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, model.config.vocab_size, (1, T), generator=g)
    corrupt = clean.clone()
    for p in differ:
        corrupt[0, p] = (clean[0, p] + 1 + p) % model.config.vocab_size
    return clean, corrupt


def close(a: torch.Tensor, b: torch.Tensor, exact: bool = False):
    """The suite's tolerance rule (conftest.assert_close); `exact` where equality holds by construction."""
    if exact:
        assert torch.equal(a, b)
    else:
        assert_close(a, b)


# ----------------------------------------------------------------------------- recording


def test_recording_has_every_site_with_its_layout():
    model = model_of("2L2H16")
    L, nh, C = 2, 2, 16
    idx = pair(model, 7, [2], 0)[0]
    rec = Recording(sites=SITES)
    logits, _ = model(idx, record=rec)
    shapes = {"btc": (L, 1, 7, C), "bhtd": (L, 1, nh, 7, C // nh), "bhts": (L, 1, nh, 7, 7)}
    for site, layout in SITES.items():
        assert rec[site].shape == shapes[layout], site
        assert not rec[site].requires_grad
    # identities of the residual stream, and the pattern is a causal distribution
    close(rec["resid_mid"], rec["resid_pre"] + rec["attn_out"])
    close(rec["resid_post"], rec["resid_mid"] + rec["mlp_out"])
    close(rec["resid_pre", 1], rec["resid_post", 0], exact=True)
    close(rec["pattern"].sum(-1), torch.ones(L, 1, nh, 7))
    assert float(rec["pattern"].triu(1).abs().max()) == 0.0
    # z is the pattern applied to v
    close(rec["z"], rec["pattern"] @ rec["v"])
    assert rec.resid is rec["resid_post"] and Recording().keys is None


def test_explicit_softmax_equals_fused_attention():
    """Recording `pattern` switches attention to an explicit softmax: same logits."""
    model = model_of("3L4H32i")
    idx = pair(model, 29, [3], 1)[0]
    fused, _ = model(idx)
    explicit, _ = model(idx, record=Recording(sites=("pattern",)))
    close(explicit, fused)


@pytest.mark.parametrize("site", list(SITES))
def test_patching_a_run_with_its_own_values_changes_nothing(site):
    model = model_of("2L2H16")
    idx = pair(model, 9, [1], 2)[0]
    rec = Recording(sites=(site,))  # (recording the pattern would switch every block to the explicit softmax)
    want, _ = model(idx, record=rec)
    for l in range(2):
        for p in (0, 4, 8):
            head = 1 if site in HEAD_SITES else None
            value = rec[site, l][0, head, p] if head is not None else rec[site, l][0, p]
            got, _ = model(idx, patch=Patch(l, p, value, site=site, head=head))
            close(got, want, exact=site != "pattern")  # the same value put back: the same tensors flow on
        got, _ = model(idx, patch=Patch(l, None, rec[site, l][0], site=site))  # every position and head
        close(got, want, exact=site != "pattern")  # (a patched pattern takes the explicit softmax)


def test_patch_list_applies_all():
    model = model_of("2L2H16")
    clean, corrupt = pair(model, 6, [1, 3], 3)
    rc = Recording(sites=SITES)
    want, _ = model(clean, record=rc)
    patches = [Patch(0, p, rc["resid_post", 0][0, p]) for p in range(6)]
    got, _ = model(corrupt, patch=patches)
    close(got, want)


# ----------------------------------------------------------------------------- fast == loop


def _sweep_both(model, T, differ, seed, site, direction, every, lse=False, max_rows=8192):
    clean, corrupt = pair(model, T, differ, seed)
    rc, rx = engines.record(model, clean, [site]), engines.record(model, corrupt, [site])
    base_ids, base, src = (corrupt, rx, rc) if direction == "denoise" else (clean, rc, rx)
    args = dict(target_id=3, foil_id=5, lse=lse, all_positions=every)
    loop = engines.sweep(model, base_ids, base, src[site][:, 0], site, engine="loop", **args)
    fast = engines.sweep(model, base_ids, base, src[site][:, 0], site, engine="fast", max_rows=max_rows, **args)
    return loop, fast


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("site", list(SITES))
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_fast_equals_loop_every_site(name, site, direction):
    model = model_of(name)
    loop, fast = _sweep_both(model, 11, [2, 7], 10, site, direction, False)
    L, H = model.config.n_layer, model.config.n_head
    assert loop.shape == ((L, 11, 3) if SITES[site] == "btc" else (L, H, 11, 3))
    close(fast[..., :2], loop[..., :2])
    if L > 1:  # with one block, only the last position's query/pattern/z could matter, and it is equal
        assert float((loop[..., 1] - loop[..., 0]).std()) > 0  # the patches do move the metric


@pytest.mark.parametrize("site", HEAD_SITES)
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_fast_equals_loop_all_positions(site, direction):
    model = model_of("3L4H32i")
    loop, fast = _sweep_both(model, 11, [0, 5], 11, site, direction, True)
    assert loop.shape == (3, 4, 3)
    close(fast[..., :2], loop[..., :2])


@pytest.mark.parametrize("T", [1, 2, 64])
@pytest.mark.parametrize("site", ["resid_pre", "attn_out", "k", "pattern", "z"])
def test_fast_equals_loop_lengths(T, site):
    model = model_of("2L2H16")
    differ = [0] if T < 3 else [1, 40, 63]
    loop, fast = _sweep_both(model, T, differ, 12 + T, site, "denoise", False, lse=True, max_rows=50)
    close(fast, loop)


# ----------------------------------------------------------------------------- against transformers


@pytest.fixture(scope="module")
def both(tiny_ckpt):
    return GPT.from_pretrained(str(tiny_ckpt)), hf_model(tiny_ckpt)


def _hooked(hf, idx, module, fn, pre=False):
    handle = (module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn))
    try:
        with torch.no_grad():
            return hf(idx).logits
    finally:
        handle.remove()


def test_sites_match_transformers_hooks(both):
    """attn_out, mlp_out, z and resid_pre patches equal the same edit made with hooks in HF."""
    ours, hf = both
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 50257, (1, 10), generator=g)
    l, p, h = 1, 4, 2
    hs = ours.config.n_embd // ours.config.n_head
    value = torch.randn(ours.config.n_embd, generator=g)
    block = hf.transformer.h[l]

    def out_hook(mod, args, out):
        o = out[0] if isinstance(out, tuple) else out
        o = o.clone()
        o[:, p] = value
        return (o, *out[1:]) if isinstance(out, tuple) else o

    def z_hook(mod, args):
        z = args[0].clone()
        z[:, p, h * hs:(h + 1) * hs] = value[:hs]
        return (z,)

    def pre_hook(mod, args):
        x = args[0].clone()
        x[:, p] = value
        return (x, *args[1:])

    cases = [("attn_out", block.attn, out_hook, False, value, None),
             ("mlp_out", block.mlp, out_hook, False, value, None),
             ("z", block.attn.c_proj, z_hook, True, value[:hs], h),
             ("resid_pre", block, pre_hook, True, value, None)]
    for site, module, fn, pre, v, head in cases:
        want = _hooked(hf, idx, module, fn, pre)
        with torch.no_grad():
            got, _ = ours(idx, patch=Patch(l, p, v, site=site, head=head))
        close(got, want)
        assert float((want - hf(idx).logits.detach()).abs().max()) > 1e-3  # the edit matters


def test_pattern_and_z_match_transformers(both):
    ours, hf = both
    idx = torch.randint(0, 50257, (1, 12), generator=torch.Generator().manual_seed(6))
    rec = Recording(sites=("pattern", "z"))
    with torch.no_grad():
        ours(idx, record=rec)
        att = hf(idx, output_attentions=True).attentions
    for l, a in enumerate(att):
        close(rec["pattern", l], a)


# ----------------------------------------------------------------------------- the command line

MICHELLE = ["--clean", "Michelle Jones was a top-notch student. Michelle",
            "--corrupt", "Michelle Smith was a top-notch student. Michelle", "--target", "Jones", "--foil", "Smith"]


def cli(args, tmp_path=None, name="out"):
    import contextlib
    import io
    import json

    from patching.cli import main
    out = [] if tmp_path is None else ["--out", str(tmp_path / name)]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main([*args, "--device", "cpu", *out])
    written = tmp_path / name / "results.json" if tmp_path else None
    res = json.loads(written.read_text()) if rc == 0 and written and written.exists() else None
    return rc, stdout.getvalue(), stderr.getvalue(), res


@pytest.mark.parametrize("extra, axes, shape", [
    (["--site", "z"], ["layer", "head", "position"], (2, 4, 11)),
    (["--site", "k", "--direction", "noise"], ["layer", "head", "position"], (2, 4, 11)),
    (["--site", "pattern", "--all-positions"], ["layer", "head"], (2, 4)),
    (["--site", "mlp_out", "--metric", "recovery"], ["layer", "position"], (2, 11)),
])
def test_cli_sites_write_their_axes(tiny_ckpt, tmp_path, extra, axes, shape):
    import csv
    import io
    rc, stdout, stderr, res = cli(["--model", str(tiny_ckpt), *MICHELLE, *extra], tmp_path)
    assert rc == 0, stderr
    assert res["axes"] == axes and np.array(res["matrix"]).shape == shape
    assert res["site"] == extra[1] and res["direction"] == ("noise" if "noise" in extra else "denoise")
    assert "plan:" in stdout and f"at {extra[1]}" in stdout
    rows = list(csv.reader(io.StringIO((tmp_path / "out" / "results.csv").read_text())))
    assert len(rows) - 1 == int(np.prod(shape[:-1])) and len(rows[0]) - 1 == shape[-1]
    assert rows[0][0] == ("layer.head" if len(axes) == 3 else "layer")
    np.testing.assert_array_equal(np.array([[float(v) for v in r[1:]] for r in rows[1:]]),
                                  np.array(res["matrix"]).reshape(-1, shape[-1]))
    assert (tmp_path / "out" / "heatmap.png").stat().st_size > 1000


def test_noise_recovery_is_one_at_the_last_block_output(tiny_ckpt, tmp_path):
    """Noising the last block's output at the last position gives the corrupt run: recovery 1 there,
    and the clean run (the one patched) has recovery 0."""
    rc, _, stderr, res = cli(["--model", str(tiny_ckpt), *MICHELLE, "--direction", "noise", "--metric", "recovery"],
                             tmp_path)
    assert rc == 0, stderr
    m = np.array(res["matrix"])
    assert abs(m[-1, -1] - 1) < 1e-4 and abs(res["clean_value"]) < 1e-12 and res["corrupt_value"] == 1.0
    assert np.allclose(m[:, 0], 0)  # position 0 is the same token in both prompts: no-op, the clean value


def test_prepend_bos_is_position_zero(tiny_ckpt, tmp_path):
    rc, stdout, _, res = cli(["--model", str(tiny_ckpt), *MICHELLE, "--prepend-bos"], tmp_path)
    assert rc == 0 and res["prepend_bos"] is True
    assert res["clean_ids"][0] == 50256 and res["tokens"][0] == "<|endoftext|>" and len(res["tokens"]) == 12
    assert res["differing_positions"] == [2]


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_ckpt, tmp_path):
    rc, stdout, stderr, _ = cli(["--model", str(tiny_ckpt), *MICHELLE, "--site", "v", "--dry-run"], tmp_path, "never")
    assert rc == 0, stderr
    assert stdout.startswith("plan: 88 patches at v (") and "chunk" in stdout and "MiB" in stdout
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("args, message", [
    (["--site", "attn_out", "--all-positions"], "needs a head site"),
    (["--site", "nowhere"], "invalid choice"),
])
def test_bad_site_flags_are_one_line(tiny_ckpt, tmp_path, args, message):
    rc, _, stderr, _ = cli(["--model", str(tiny_ckpt), *MICHELLE, *args], tmp_path)
    assert rc in (1, 2) and message in stderr and "Traceback" not in stderr


def test_pattern_sweep_that_cannot_fit_is_refused(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setattr(engines, "available_memory", lambda device: 2**12)  # a machine with 4 KiB free
    rc, _, stderr, _ = cli(["--model", str(tiny_ckpt), *MICHELLE, "--site", "pattern"], tmp_path)
    assert rc == 1 and "pattern sweep needs about" in stderr and "shorten the prompt" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_unknown_command_is_one_line(capsys):
    from patching.cli import main
    assert main(["lenz", "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown command 'lenz'" in err[0] and "lens" in err[0]


@pytest.mark.parametrize("site", ["q", "v", "z"])
def test_forward_cells_all_heads_at_once(site):
    """A head site with head None patches every head of the cell at once, as Patch(head=None) does."""
    from mingpt.resume import forward_cells
    model = model_of("3L4H32i")
    clean, corrupt = pair(model, 9, [2, 5], 20)
    rc, rx = engines.record(model, clean, [site]), engines.record(model, corrupt, [site])
    positions = [2, 5, 8]
    values = rc[site][:, 0][:, :, positions].transpose(1, 2)  # (L, P, nh, hs)
    got = forward_cells(model, rx, site, [(l, None) for l in range(3)], positions, values)
    for l in range(3):
        for j, p in enumerate(positions):
            want, _ = model(corrupt, patch=Patch(l, p, values[l, j], site=site))
            close(got[l, j], want[0, -1])


def test_patch_and_recording_refuse_bad_sites_with_one_sentence():
    from mingpt.errors import InputError
    with pytest.raises(InputError, match="unknown site 'nope': use one of resid_pre"):
        Patch(0, 0, torch.zeros(3), site="nope")
    with pytest.raises(InputError, match="head= is for head sites"):
        Patch(0, 0, torch.zeros(3), site="attn_out", head=1)
    with pytest.raises(InputError, match="unknown site"):
        Recording(sites=("resid_post", "mlp_in"))


class _Kept(Edit):  # an edit (the public protocol) that returns a tensor it keeps
    def __init__(self, site: str, value: torch.Tensor):
        self.site, self.layer, self.value = site, 0, value

    def apply(self, x, layer, offset=0, length=None):
        return self.value if layer == self.layer else x


@pytest.mark.parametrize("site", ["attn_out", "mlp_out"])
def test_an_edit_that_returns_a_kept_tensor_is_never_written_into(site):
    model = model_of("2L2H16")
    idx = torch.randint(0, 53, (1, 5), generator=torch.Generator().manual_seed(0))
    kept = torch.zeros(1, 5, 16)
    with torch.no_grad():
        first, _ = model(idx, patch=_Kept(site, kept))
        second, _ = model(idx, patch=_Kept(site, kept))
    assert kept.abs().max() == 0  # the model summed the residual line elsewhere
    close(second, first, exact=True)


def test_the_residual_stream_keeps_float32_under_autocast():
    """The in-place sums must not turn the float32 residual into the sublayer's bfloat16."""
    model = model_of("2L2H16")
    idx = torch.randint(0, 53, (2, 6), generator=torch.Generator().manual_seed(1))
    dtypes = {}
    for grad in (False, True):
        rec = Recording(sites=("resid_mid", "resid_post"))
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
            model(idx, record=rec)
        dtypes[grad] = (rec["resid_mid"].dtype, rec["resid_post"].dtype)
    assert dtypes[False] == dtypes[True] == (torch.float32, torch.float32), dtypes
