"""Tests of mingpt.model against transformers' GPT-2 (the reference), offline, on random checkpoints.

Covers: logits and loss parity (tiny configs and GPT-2 small's exact shapes, safetensors and .bin),
old Hub-style checkpoints, the record/patch seam, forward_patched, save_pretrained, generate, and
the user-facing errors for bad names, folders, weight files, configs and prompts.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import assert_close, hf_model, make_checkpoint
from mingpt.errors import ConfigError, InputError, ModelNotFoundError, WeightsError
from mingpt.model import GPT, GPTConfig, Patch, Recording

VOCAB = 50257


def ids(T: int, B: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (B, T), generator=g)


# ----------------------------------------------------------------------------- checkpoints and models


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_ckpt, small_ckpt) -> dict[str, Path]:
    """Named checkpoints: tiny (conftest), two more tiny configs (one as pytorch_model.bin), small."""
    root = tmp_path_factory.mktemp("model_ckpts")
    return {
        "tiny": tiny_ckpt,
        "tiny3x2": make_checkpoint(root / "tiny3x2", n_layer=3, n_head=2, n_embd=48, n_positions=64,
                                   seed=3, init_std=0.5, vocab=False),
        "tiny_bin": make_checkpoint(root / "tiny_bin", n_layer=1, n_head=1, n_embd=16, n_positions=32,
                                    seed=4, init_std=0.1, vocab=False, safe=False),
        "small": small_ckpt,
    }


@pytest.fixture(scope="module")
def models(ckpts):
    """Lazily loaded (ours, reference) pairs, each loaded once per module."""
    cache: dict[str, tuple[GPT, object]] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = (GPT.from_pretrained(str(ckpts[name])), hf_model(ckpts[name]))
        return cache[name]

    return get


# ----------------------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("name, T, B", [("tiny", 17, 2), ("tiny3x2", 64, 1), ("tiny_bin", 9, 3), ("small", 20, 1)])
def test_logits_and_loss_match_transformers(models, name, T, B):
    ours, ref = models(name)
    assert (ours.config.block_size, ours.config.n_layer) == (ref.config.n_positions, ref.config.n_layer)
    idx = ids(T, B, seed=T)
    with torch.no_grad():
        logits, loss = ours(idx)
        ref_out = ref(idx, labels=idx)
    assert logits.shape == (B, T, VOCAB)
    assert_close(logits, ref_out.logits, what="logits vs transformers")
    assert loss is None
    # HF shifts labels inside: its loss predicts idx[t+1] from position t over T-1 positions.
    # Ours takes targets aligned with the input: targets[t] = idx[t+1], -1 where there is none.
    targets = torch.cat([idx[:, 1:], torch.full((B, 1), -1)], dim=1)
    with torch.no_grad():
        _, loss = ours(idx, targets)
    assert_close(loss, ref_out.loss, what="loss vs transformers")
    # and it is the plain mean cross-entropy of our own logits
    assert_close(loss, F.cross_entropy(logits[:, :-1].flatten(0, 1), idx[:, 1:].flatten()), what="loss")


def test_loads_untied_bin_with_equal_head(ckpts):
    """The .bin fixture stores lm_head.weight (equal to wte); it must be accepted, not double-counted."""
    sd = torch.load(ckpts["tiny_bin"] / "pytorch_model.bin", weights_only=True)
    assert "lm_head.weight" in sd
    model = GPT.from_pretrained(str(ckpts["tiny_bin"]))
    assert model.lm_head.weight is model.transformer.wte.weight
    torch.testing.assert_close(model.lm_head.weight, sd["lm_head.weight"], atol=0, rtol=0)  # a copy: exact


def test_old_hub_style_checkpoint(tmp_path, ckpts, models):
    """The Hub's gpt2 has GPT2Model keys (no `transformer.` prefix) and h.{i}.attn.bias mask buffers."""
    sd = load_file(str(ckpts["tiny"] / "model.safetensors"))
    n_layer, T = 2, 128
    old = {k.removeprefix("transformer."): v for k, v in sd.items()}
    assert not any(k.startswith("transformer.") for k in old) and "wte.weight" in old
    for i in range(n_layer):
        old[f"h.{i}.attn.bias"] = torch.tril(torch.ones(T, T, dtype=torch.uint8)).view(1, 1, T, T)
        old[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(old, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(ckpts["tiny"] / "config.json", tmp_path / "config.json")
    model = GPT.from_pretrained(str(tmp_path))
    ours, _ = models("tiny")
    idx = ids(11, 2)
    with torch.no_grad():  # the same weights through the same code and shapes: bit-identical
        torch.testing.assert_close(model(idx)[0], ours(idx)[0], atol=0, rtol=0)


# ----------------------------------------------------------------------------- record and patch


@pytest.fixture(scope="module", params=["tiny", "small"])
def pair(request, models):
    return models(request.param)


@pytest.fixture(scope="module")
def model(pair) -> GPT:
    return pair[0]


def test_recording_is_faithful_and_detached(model, pair):
    L, C = model.config.n_layer, model.config.n_embd
    idx = ids(13, 2, seed=1)
    plain, _ = model(idx)  # with autograd on: the recording must still be detached
    rec = Recording(kv=True)
    logits, _ = model(idx, record=rec)
    assert logits.requires_grad
    assert torch.equal(logits, plain)  # recording does not change the run
    assert rec.resid.shape == (L, 2, 13, C)
    assert rec.keys.shape == rec.values.shape == (L, 2, model.config.n_head, 13, C // model.config.n_head)
    for t in (rec.resid, rec.keys, rec.values, rec.last_logits):
        assert not t.requires_grad and t.grad_fn is None
    assert torch.equal(rec.last_logits, plain[:, -1].detach())
    # the residual stream really is block l's output: compare with transformers' hidden states
    ref = pair[1]
    with torch.no_grad():
        hidden = ref(idx, output_hidden_states=True).hidden_states  # embeddings, blocks 0..L-2, ln_f(block L-1)
        for l in range(L - 1):
            assert_close(rec.resid[l], hidden[l + 1], what=f"block {l} output vs transformers")
        assert_close(model.transformer.ln_f(rec.resid[-1]), hidden[L], what="ln_f output vs transformers")
        # keys of block 1 are c_attn(ln_1(output of block 0)) split into heads
        blk = model.transformer.h[1]
        k = blk.attn.heads(blk.attn.c_attn(blk.ln_1(rec.resid[0])))[1]
        assert_close(rec.keys[1], k, what="block 1 keys")
    # copies, not views: later runs and edits of the input leave the recording alone
    saved = rec.resid.clone(), rec.keys.clone(), rec.last_logits.clone()
    idx[:] = ids(13, 2, seed=2)
    with torch.no_grad():
        model(idx)
    logits.detach().zero_()  # the recorded run's own output
    assert torch.equal(rec.resid, saved[0]) and torch.equal(rec.keys, saved[1])
    assert torch.equal(rec.last_logits, saved[2])
    rec2 = Recording()
    with torch.no_grad():
        model(idx, record=rec2)
    assert rec2.keys is None and rec2.resid.data_ptr() != rec.resid.data_ptr()
    assert not torch.equal(rec2.resid, rec.resid)


def test_patch_invariants(model):
    L = model.config.n_layer
    T = 9
    clean, corrupt = ids(T, seed=10), ids(T, seed=11)
    rc, rx = Recording(), Recording()
    with torch.no_grad():
        clean_logits, _ = model(clean, record=rc)
        corrupt_logits, _ = model(corrupt, record=rx)
        # exact by construction below: a patch that writes back the recorded value, or rows computed
        # by the same ops on the same shapes from bit-identical inputs, give bit-identical outputs
        # patching a position with its own recorded value changes nothing
        for l, p in [(0, 0), (L // 2, 4), (L - 1, T - 1)]:
            same, _ = model(corrupt, patch=Patch(l, p, rx.resid[l, 0, p]))
            assert torch.equal(same, corrupt_logits), (l, p)
        # the last block's output at the last position is all the last logits depend on
        out, _ = model(corrupt, patch=Patch(L - 1, T - 1, rc.resid[L - 1, 0, T - 1]))
        assert torch.equal(out[:, -1], clean_logits[:, -1])
        torch.testing.assert_close(out[:, :-1], corrupt_logits[:, :-1], atol=0, rtol=0)
        assert not torch.allclose(clean_logits[:, -1], corrupt_logits[:, -1], atol=1e-3)
        # a patch at position p leaves earlier positions alone and does change later ones
        rp = Recording()
        out, _ = model(corrupt, patch=Patch(0, 3, rc.resid[0, 0, 3]), record=rp)
        assert torch.equal(out[:, :3], corrupt_logits[:, :3])
        assert torch.equal(rp.resid[0, 0, 3], rc.resid[0, 0, 3])  # the recording sees the patched stream
        assert torch.equal(rp.resid[:, 0, :3], rx.resid[:, 0, :3])
        assert not torch.allclose(out[:, 3:], corrupt_logits[:, 3:], atol=1e-4)


def test_batched_patch_equals_single_patches(model):
    L, C, T = model.config.n_layer, model.config.n_embd, 7
    layers = torch.tensor([0, L - 1, -1, L // 2, 1])
    pos = torch.tensor([0, T - 1, 3, 2, 5])
    B = len(layers)
    g = torch.Generator().manual_seed(5)
    values = torch.randn(B, C, generator=g)
    idx = ids(T, B, seed=6)
    idx[1] = idx[3]  # two rows with the same prompt but different patches
    with torch.no_grad():
        batched, _ = model(idx, patch=Patch(layers, pos, values))
        for b in range(B):
            patch = None if layers[b] < 0 else Patch(int(layers[b]), int(pos[b]), values[b])
            single, _ = model(idx[b:b + 1], patch=patch)
            assert_close(batched[b], single[0], what=f"row {b}")
        unpatched, _ = model(idx)
    assert_close(batched[2], unpatched[2], what="unpatched row")
    assert not torch.allclose(batched[1], unpatched[1], atol=1e-3)


def test_last_only_equals_last_row(model):
    idx = ids(12, 2, seed=7)
    answer = torch.tensor([[5], [-1]])  # the second row's answer is ignored
    with torch.no_grad():
        full, _ = model(idx)
        last, loss = model(idx, answer, last_only=True)
        assert model(idx, last_only=True)[1] is None
    assert last.shape == (2, 1, VOCAB)
    assert_close(last, full[:, -1:], what="last_only logits")
    assert_close(loss, F.cross_entropy(full[:1, -1], answer[0]), what="last_only loss")
    with pytest.raises(InputError, match=r"targets have shape \(2, 12\) but logits cover \(2, 1\)"):
        model(idx, idx, last_only=True)
    with pytest.raises(InputError, match="targets have shape"):
        model(idx, idx[:, 1:])


def _check_forward_patched(model: GPT, T: int, layers: list[int], positions: list[int], seed: int):
    C = model.config.n_embd
    idx = ids(T, seed=seed)
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(len(layers), len(positions), C, generator=g) * 2
    token_ids = torch.tensor([0, 50256, 13, 1234, 7])
    base = Recording(kv=True)
    with torch.no_grad():
        model(idx, record=base)
        got = model.forward_patched(base, layers, positions, values, token_ids)
        assert got.shape == (len(layers), len(positions), len(token_ids))
        for i, l in enumerate(layers):
            for j, p in enumerate(positions):
                want, _ = model(idx, patch=Patch(l, p, values[i, j]))
                assert_close(got[i, j], want[0, -1, token_ids], scale=want[0, -1].abs().max(),
                             what=f"layer {l} pos {p}")
        every = model.forward_patched(base, layers, positions, values)  # token_ids=None: the whole vocabulary
        assert every.shape == (len(layers), len(positions), VOCAB)
        assert_close(every[..., token_ids], got, scale=every.abs().max(), what="full vocabulary")


@pytest.mark.parametrize("T, layers, positions", [
    (1, [1, 0], [0]),
    (2, [1, 0], [1, 0]),
    (2, [0], [1]),
    (10, [1, 0, 1], [9, 0, 4]),
])
def test_forward_patched_tiny(models, T, layers, positions):
    _check_forward_patched(models("tiny")[0], T, layers, positions, seed=T)


@pytest.mark.parametrize("T, layers, positions", [(1, [2, 0], [0]), (2, [1, 2, 0], [1, 0]), (8, [2, 0, 1], [5, 1])])
def test_forward_patched_three_layers(models, T, layers, positions):
    _check_forward_patched(models("tiny3x2")[0], T, layers, positions, seed=100 + T)


def test_forward_patched_small(models):
    _check_forward_patched(models("small")[0], 12, [11, 0, 6], [11, 3, 0], seed=12)


# ----------------------------------------------------------------------------- saving and generating


def test_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=3, n_embd=24, block_size=40, n_inner=40, layer_norm_epsilon=1e-3)
    model = GPT(config).eval()
    with torch.no_grad():  # fresh init leaves biases and LayerNorms trivial: make every tensor matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path))
    back = GPT.from_pretrained(str(tmp_path))
    assert back.config == config
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    ref = hf_model(tmp_path)
    assert ref.config.n_inner == 40 and ref.config.layer_norm_epsilon == 1e-3
    idx = ids(40, 2, seed=8)
    with torch.no_grad():
        want, _ = model(idx)
        torch.testing.assert_close(back(idx)[0], want, atol=0, rtol=0)  # same weights, same code: exact
        assert_close(ref(idx).logits, want, what="logits vs transformers")


def test_generate_greedy(models):
    model = models("tiny")[0]
    block = model.config.block_size
    for T in (5, block - 2):  # the second one runs past the context and must crop to it
        idx = ids(T, 2, seed=T)
        out = model.generate(idx, 4)
        assert out.shape == (2, T + 4) and torch.equal(out[:, :T], idx)
        with torch.no_grad():
            for t in range(T, T + 4):
                logits, _ = model(out[:, max(0, t - block):t])
                assert torch.equal(out[:, t], logits[:, -1].argmax(-1)), t


# ----------------------------------------------------------------------------- errors a user can make


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_unknown_model_name():
    with pytest.raises(ModelNotFoundError, match="unknown model 'gpt-17-turbo'"):
        GPT.from_pretrained("gpt-17-turbo")
    with pytest.raises(ModelNotFoundError, match="empty"):
        GPT.from_pretrained("  ")


def test_folder_without_config(tmp_path, ckpts):
    shutil.copyfile(ckpts["tiny"] / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        GPT.from_pretrained(str(tmp_path))


def test_folder_without_weights(tmp_path, ckpts):
    shutil.copyfile(ckpts["tiny"] / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelNotFoundError, match="model.safetensors or pytorch_model.bin"):
        GPT.from_pretrained(str(tmp_path))


def _edit_weights(folder: Path, edit):
    sd = load_file(str(folder / "model.safetensors"))
    edit(sd)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor(tmp_path, ckpts):
    folder = _copy(ckpts["tiny"], tmp_path / "m")
    _edit_weights(folder, lambda sd: sd.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(WeightsError, match=r"lacks tensor transformer\.h\.1\.mlp\.c_fc\.bias"):
        GPT.from_pretrained(str(folder))


def test_unexpected_tensor(tmp_path, ckpts):
    folder = _copy(ckpts["tiny"], tmp_path / "m")
    _edit_weights(folder, lambda sd: sd.__setitem__("transformer.h.0.attn.rotary.weight", torch.zeros(3)))
    with pytest.raises(WeightsError, match=r"unexpected tensor transformer\.h\.0\.attn\.rotary\.weight"):
        GPT.from_pretrained(str(folder))


def test_untied_head_refused(tmp_path, ckpts):
    folder = _copy(ckpts["tiny"], tmp_path / "m")
    _edit_weights(folder, lambda sd: sd.__setitem__("lm_head.weight", sd["transformer.wte.weight"] + 1))
    with pytest.raises(WeightsError, match="lm_head.weight"):
        GPT.from_pretrained(str(folder))


def test_misshaped_tensor_names_it_and_both_shapes(tmp_path, ckpts):
    folder = _copy(ckpts["tiny"], tmp_path / "m")  # n_embd 32 in the weights
    config = json.loads((folder / "config.json").read_text())
    config["n_embd"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError) as err:
        GPT.from_pretrained(str(folder))
    msg = str(err.value)
    # the first tensor in name order is c_attn.bias: (3 * 32,) stored, (3 * 64,) wanted
    assert "transformer.h.0.attn.c_attn.bias" in msg and "(96,)" in msg and "(192,)" in msg, msg


def test_misshaped_conv1d_weight_reports_checkpoint_shape(tmp_path, ckpts):
    folder = _copy(ckpts["tiny"], tmp_path / "m")
    _edit_weights(folder, lambda sd: sd.__setitem__("transformer.h.0.mlp.c_fc.weight", torch.zeros(32, 100)))
    with pytest.raises(WeightsError) as err:
        GPT.from_pretrained(str(folder))
    msg = str(err.value)
    assert "transformer.h.0.mlp.c_fc.weight" in msg and "(32, 128)" in msg  # what config.json needs
    assert "(32, 100)" in msg, msg  # what the file holds, in the file's own (in, out) layout


@pytest.mark.parametrize("ckpt, filename", [("tiny", "model.safetensors"), ("tiny_bin", "pytorch_model.bin")])
def test_truncated_weights(tmp_path, ckpts, ckpt, filename):
    folder = _copy(ckpts[ckpt], tmp_path / "m")
    data = (folder / filename).read_bytes()
    (folder / filename).write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        GPT.from_pretrained(str(folder))


class _RunsCode:
    """Unpickling this calls os.system: a checkpoint that would execute code when loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_bin_is_not_executed(tmp_path, ckpts, writer):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copyfile(ckpts["tiny_bin"] / "config.json", folder / "config.json")
    marker = tmp_path / "PWNED"
    sd = dict(torch.load(ckpts["tiny_bin"] / "pytorch_model.bin", weights_only=True))
    sd["transformer.h.0.ln_1.weight"] = _RunsCode(marker)
    if writer == "torch.save":
        torch.save(sd, folder / "pytorch_model.bin")
    else:
        with open(folder / "pytorch_model.bin", "wb") as f:
            pickle.dump(sd, f)
    assert not marker.exists()
    with pytest.raises(WeightsError, match="could run code"):
        GPT.from_pretrained(str(folder))
    assert not marker.exists()


def test_bin_without_state_dict(tmp_path, ckpts):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copyfile(ckpts["tiny_bin"] / "config.json", folder / "config.json")
    torch.save([torch.zeros(2)], folder / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="state dict"):
        GPT.from_pretrained(str(folder))


@pytest.mark.parametrize("text, needle", [
    ("{not json", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    ('{"model_type": "gpt2", "n_layer": 2}', "lacks 'n_head'"),
    ('{"model_type": "llama", "n_layer": 2}', "llama"),
    ('{"n_layer": 2, "n_head": 5, "n_embd": 32, "vocab_size": 50257, "n_positions": 128}', "divisible by n_head"),
    ('{"n_layer": 0, "n_head": 4, "n_embd": 32, "vocab_size": 50257, "n_positions": 128}', "n_layer must be a positive"),
    ('{"n_layer": 2, "n_head": 4, "n_embd": 32, "vocab_size": 50257, "n_positions": 128, '
     '"activation_function": "swish"}', "activation 'swish' is not supported"),
    ('{"n_layer": 2, "n_head": 4, "n_embd": 32, "vocab_size": 50257, "n_positions": 128, '
     '"scale_attn_by_inverse_layer_idx": true}', "scale_attn_by_inverse_layer_idx"),
])
def test_invalid_config(tmp_path, ckpts, text, needle):
    folder = _copy(ckpts["tiny"], tmp_path / "m")
    path = folder / "config.json"
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        GPT.from_pretrained(str(folder))


def test_config_json_not_an_object(tmp_path, ckpts):
    folder = _copy(ckpts["tiny"], tmp_path / "m")
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a JSON object"):
        GPT.from_pretrained(str(folder))


def test_bad_prompts(models):
    model = models("tiny")[0]
    block = model.config.block_size
    with pytest.raises(InputError, match=f"{block + 1} tokens .* holds {block}"):
        model(ids(block + 1))
    with pytest.raises(InputError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(InputError, match="LongTensor"):
        model(ids(4)[0])
    with pytest.raises(InputError, match="LongTensor"):
        model(ids(4).int())
    model(ids(block))  # exactly the context is fine


def test_out_of_vocabulary_ids(models):
    model = models("tiny")[0]
    with pytest.raises(InputError, match=f"token id {VOCAB} is outside"):
        model(torch.tensor([[1, VOCAB]]))
    with pytest.raises(InputError, match="token id -3 is outside"):
        model(torch.tensor([[1, -3]]))
