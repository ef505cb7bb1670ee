"""The site seam: recording and patching every site, the fast engine against the loop oracle for
every site, both directions and all-positions patches, and patches against transformers hooks.
"""
from __future__ import annotations

import pytest
import torch

from mingpt.model import GPT, GPTConfig
from mingpt.sites import HEAD_SITES, SITES, Patch, Recording
from patching import engines

CONFIGS = {  # name: (GPTConfig kwargs, seed)
    "1L1H8": (dict(n_layer=1, n_head=1, n_embd=8, vocab_size=37, block_size=64), 0),
    "2L2H16": (dict(n_layer=2, n_head=2, n_embd=16, vocab_size=53, block_size=80), 1),
    "3L4H32i": (dict(n_layer=3, n_head=4, n_embd=32, vocab_size=97, block_size=64, n_inner=48), 2),
}
_MODELS: dict[str, GPT] = {}


def model_of(name: str) -> GPT:
    """A random GPT with O(1) activations (large init std), so patches move the logits visibly."""
    if name not in _MODELS:
        kwargs, seed = CONFIGS[name]
        torch.manual_seed(seed)
        model = GPT(GPTConfig(**kwargs)).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("weight") and p.dim() == 2:
                    p.normal_(0, 0.3)
                elif "ln" in n and n.endswith("weight"):
                    p.normal_(1, 0.2)
                else:
                    p.normal_(0, 0.2)
        _MODELS[name] = model
    return _MODELS[name]


def pair(model: GPT, T: int, differ: list[int], seed: int):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, model.config.vocab_size, (1, T), generator=g)
    corrupt = clean.clone()
    for p in differ:
        corrupt[0, p] = (clean[0, p] + 1 + p) % model.config.vocab_size
    return clean, corrupt


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5):
    """Equal up to float32 rounding of values this size (the suite's rule: tolerance scaled to them)."""
    a, b = a.detach(), b.detach()
    scale = max(1.0, float(b.abs().max()))
    assert float((a - b).abs().max()) <= rel * scale, f"max diff {float((a - b).abs().max()):.3g} at scale {scale:.3g}"


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
    close(rec["resid_pre", 1], rec["resid_post", 0], 0)
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
    rec = Recording(sites=SITES)
    want, _ = model(idx, record=rec)
    for l in range(2):
        for p in (0, 4, 8):
            head = 1 if site in HEAD_SITES else None
            value = rec[site, l][0, head, p] if head is not None else rec[site, l][0, p]
            got, _ = model(idx, patch=Patch(l, p, value, site=site, head=head))
            close(got, want, 1e-6)
        got, _ = model(idx, patch=Patch(l, None, rec[site, l][0], site=site))  # every position and head
        close(got, want, 1e-6)


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
    from tests.conftest import hf_model
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
        close(got, want, 1e-4)
        assert float((want - hf(idx).logits.detach()).abs().max()) > 1e-3  # the edit matters


def test_pattern_and_z_match_transformers(both):
    ours, hf = both
    idx = torch.randint(0, 50257, (1, 12), generator=torch.Generator().manual_seed(6))
    rec = Recording(sites=("pattern", "z"))
    with torch.no_grad():
        ours(idx, record=rec)
        att = hf(idx, output_attentions=True).attentions
    for l, a in enumerate(att):
        close(rec["pattern", l], a, 1e-5)
