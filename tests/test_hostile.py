"""Hostile and careless input to studies, merge, pair files and the output policy, grouped by class.

Each test reproduces one way a user (careless or hostile) broke patch-run: names that walk out of
--out, signals in every phase of a study, --overwrite on a study with a user's file inside, a merge
into its own input, a shard whose summary.json points elsewhere, pair files with byte-order marks,
quoted newlines and duplicate keys, damaged shards. Every refusal is one line on stderr with a
non-zero exit, and nothing outside --out is touched: the tests compare the parent folder's listing
before and after. Everything runs offline on the 2-layer `tiny_ckpt`.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

import patching.study.run
import patching.study.stats
from patching import cli
from patching.analyses.patch import PatchOptions
from patching.io.files import MARKER, claim, read_marker
from patching.study.pairs import read_pairs_file

NAMES = ["Michelle", "Jessica", "John", "Mary", "Jones", "Smith", "Brown", "Wilson"]
MICHELLE = {"clean": "Michelle Jones was a top-notch student. Michelle",
            "corrupt": "Michelle Smith was a top-notch student. Michelle", "target": "Jones", "foil": "Smith"}


def run(argv: list[str]) -> dict:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = cli.main([*argv, "--device", "cpu"])
    return {"rc": rc, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def one_line(r: dict, *parts: str, rc: int = 1):
    """Exit status rc, exactly one 'patch-run: error:' line on stderr holding every part, no traceback."""
    assert r["rc"] == rc, r
    lines = r["stderr"].splitlines()
    assert "Traceback" not in r["stderr"] and len(lines) == 1 and lines[0].startswith("patch-run: error: "), r
    for p in parts:
        assert p in lines[0], (p, lines[0])


def listing(root: Path) -> list[str]:
    """Every path under root (what a run may have created or left behind)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def study_yaml(path: Path, model: Path, **extra) -> Path:
    patch = (extra.get("analysis") or {}).get("kind", "patch") == "patch"  # top_k is the patch analysis's option
    doc = {"defaults": {"model": str(model), "device": "cpu", **({"top_k": 3} if patch else {})},
           "study": {"bootstrap": 20}, **extra}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def generator(n=4, seed=3) -> dict:
    return {"clean": "{first} {last} was a top-notch student. {first}",
            "corrupt": "{first} {other} was a top-notch student. {first}", "target": "{last}", "foil": "{other}",
            "n": n, "seed": seed, "slots": {"first": list(NAMES), "last": "first", "other": "first"}}


@pytest.fixture(scope="module")
def tiny(tiny_ckpt) -> str:
    return str(tiny_ckpt)


def pairs_args(tiny: str, file: Path, out: Path, *extra: str) -> list[str]:
    return ["--pairs", str(file), "--model", tiny, "--bootstrap", "20", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def shards(tiny_ckpt, tmp_path_factory) -> Path:
    """Two complete shards of one 4-pair study, to be copied (never edited in place) by each test."""
    root = tmp_path_factory.mktemp("shards")
    spec = study_yaml(root / "s.yaml", tiny_ckpt, pairs=generator())
    for k in (1, 2):
        assert run(["--batch", str(spec), "--shard", f"{k}/2", "--out", str(root / f"sh{k}"), "--quiet"])["rc"] == 0
    return root


def copy_shards(shards: Path, dest: Path) -> list[Path]:
    return [Path(shutil.copytree(shards / f"sh{k}", dest / f"sh{k}", symlinks=True)) for k in (1, 2)]


# ============================================================================ data safety


def test_pair_names_never_lead_outside_out(tiny, tmp_path):
    """A pair's name is its folder under pairs/: slugged, like a batch's, from JSONL, CSV and YAML alike."""
    evil = ["x/../../../../../escaped2", "../../up", "sub/dir", "/abs/path", "..", "a\\..\\b"]
    jsonl(tmp_path / "trav.jsonl", [{**MICHELLE, "name": n} for n in evil])
    with open(tmp_path / "trav.csv", "w", newline="") as f:
        w = csv.DictWriter(f, [*MICHELLE, "name"])
        w.writeheader()
        w.writerows({**MICHELLE, "name": n} for n in evil)
    spec = study_yaml(tmp_path / "trav.yaml", Path(tiny), experiments=[{**MICHELLE, "name": n} for n in evil])
    before = listing(tmp_path)
    for k, argv in enumerate((pairs_args(tiny, tmp_path / "trav.jsonl", tmp_path / "deep/a/b/st1"),
                              pairs_args(tiny, tmp_path / "trav.csv", tmp_path / "deep/a/b/st2"),
                              ["--batch", str(spec), "--out", str(tmp_path / "deep/a/b/st3")])):
        assert run([*argv, "--quiet"])["rc"] == 0
        out = tmp_path / f"deep/a/b/st{k + 1}"
        pairs = sorted(p.name for p in (out / "pairs").iterdir() if p.name != MARKER)
        assert len(pairs) == len(evil) and all(p.is_dir() and read_marker(p) for p in (out / "pairs").iterdir()
                                                if p.name != MARKER)
        assert all("/" not in n and ".." not in n for n in pairs), pairs
    after = listing(tmp_path)
    assert [p for p in after if p not in before and not p.startswith("deep")] == []  # nothing beside deep/
    assert not list(tmp_path.rglob("escaped2")) and not list(tmp_path.rglob("up"))


@pytest.mark.parametrize("signal_class", [KeyboardInterrupt, cli.Terminated])
def test_a_signal_during_the_statistics_keeps_every_finished_pair(tiny, tmp_path, monkeypatch, signal_class):
    """Ctrl-C or SIGTERM after every pair finished, while the bootstrap runs: the study folder is written
    with its pairs and a summary that says 'complete': false, and no staging folder is left behind."""
    jsonl(tmp_path / "p.jsonl", [MICHELLE, {**MICHELLE, "name": "second"}])

    def interrupted(*args, **kwargs):
        raise signal_class()
    monkeypatch.setattr(patching.study.stats, "aggregate", interrupted)
    r = run(pairs_args(tiny, tmp_path / "p.jsonl", tmp_path / "out"))
    assert r["rc"] == (143 if signal_class is cli.Terminated else 130) and "Traceback" not in r["stderr"]
    assert "2 finished pairs are kept in" in r["stderr"] and '"complete": false' in r["stderr"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["complete"] is False and "statistics" in summary["interrupted"]
    assert [p["status"] for p in summary["pairs"]] == ["ok", "ok"]
    assert all((tmp_path / "out" / p["folder"] / "results.json").is_file() for p in summary["pairs"])
    assert not (tmp_path / "out" / "aggregate.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "p.jsonl"]  # no .out.pairs-*, no lock


def test_an_interrupt_before_any_pair_says_nothing_was_kept(tiny, tmp_path, monkeypatch):
    jsonl(tmp_path / "p.jsonl", [MICHELLE])
    monkeypatch.setattr(patching.study.run, "load", lambda spec: (_ for _ in ()).throw(cli.Terminated()))
    r = run(pairs_args(tiny, tmp_path / "p.jsonl", tmp_path / "out"))
    assert r["rc"] == 143 and "finished" not in r["stderr"] and "nothing" in r["stderr"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


def test_overwrite_replaces_a_studys_pairs_and_refuses_a_users_file(tiny, tmp_path, shards):
    jsonl(tmp_path / "a.jsonl", [{**MICHELLE, "name": "first"}, {**MICHELLE, "name": "second"}])
    jsonl(tmp_path / "b.jsonl", [{**MICHELLE, "name": "third"}])
    out = tmp_path / "out"
    assert run(pairs_args(tiny, tmp_path / "a.jsonl", out, "--quiet"))["rc"] == 0
    for _ in range(2):  # every rerun replaces the old pairs: no out-kept, out-kept-2, ...
        assert run(pairs_args(tiny, tmp_path / "b.jsonl", out, "--overwrite", "--quiet"))["rc"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "out"]
    assert sorted(p.name for p in (out / "pairs").iterdir()) == [MARKER, "0001-third"]
    (out / "pairs" / "my-notes.txt").write_text("keep\n")
    (out / "pairs" / "0001-third" / "plot.svg").write_text("<svg/>")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    one_line(run(pairs_args(tiny, tmp_path / "a.jsonl", out, "--overwrite")), "did not write", "pairs/0001-third/plot.svg")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # merge --overwrite follows the same rule
    sh1, sh2 = copy_shards(shards, tmp_path)
    merged = tmp_path / "merged"
    for _ in range(2):
        assert run(["merge", str(sh1), str(sh2), "--out", str(merged), "--overwrite", "--quiet"])["rc"] == 0
    assert not list(tmp_path.glob("merged-kept*"))
    (merged / "pairs" / "mine.txt").write_text("x")
    one_line(run(["merge", str(sh1), str(sh2), "--out", str(merged), "--overwrite"]), "did not write", "pairs/mine.txt")
    assert (merged / "pairs" / "mine.txt").read_text() == "x"


def test_merge_never_writes_into_its_own_input(tmp_path, shards):
    sh1, sh2 = copy_shards(shards, tmp_path / "work")
    before = {p: p.read_bytes() for p in (tmp_path / "work").rglob("*") if p.is_file()}
    for out in (sh1, sh1 / "sub", tmp_path / "work"):
        one_line(run(["merge", str(sh1), str(sh2), "--out", str(out), "--overwrite"]), "shard")
    one_line(run(["merge", str(sh1), str(sh2), "--out", str(sh1)]), "is, contains or lies inside the shard")
    assert {p: p.read_bytes() for p in (tmp_path / "work").rglob("*") if p.is_file()} == before


def _edit_summary(shard: Path, edit):
    s = json.loads((shard / "summary.json").read_text())
    edit(s)
    (shard / "summary.json").write_text(json.dumps(s))


@pytest.mark.parametrize("folder", ["/etc/ssl", "pairs/../../secret", "pairs/../sh2/pairs/x", "../secret", "pairs/"])
def test_merge_copies_only_a_shards_own_pairs(tmp_path, shards, folder):
    sh1, sh2 = copy_shards(shards, tmp_path)
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key.txt").write_text("TOP SECRET")
    _edit_summary(sh1, lambda s: s["pairs"][0].update(folder=folder))
    one_line(run(["merge", str(sh1), str(sh2), "--out", str(tmp_path / "m")]), str(sh1), "damaged")
    assert not (tmp_path / "m").exists()


def test_merge_does_not_follow_links_inside_a_pair(tmp_path, shards):
    sh1, sh2 = copy_shards(shards, tmp_path)
    (tmp_path / "secret.txt").write_text("TOP SECRET")
    pair = next(p for p in (sh1 / "pairs").iterdir() if p.is_dir())
    (pair / "results.csv").unlink()
    (pair / "results.csv").symlink_to(tmp_path / "secret.txt")
    assert run(["merge", str(sh1), str(sh2), "--out", str(tmp_path / "m"), "--quiet"])["rc"] == 0
    copied = tmp_path / "m" / "pairs" / pair.name
    assert copied.is_dir() and not (copied / "results.csv").exists()
    assert "TOP SECRET" not in "".join(p.read_text(errors="replace") for p in (tmp_path / "m").rglob("*") if p.is_file())


def test_a_reference_file_is_named_not_embedded(tiny, tmp_path):
    (tmp_path / "ref.txt").write_text("root:x:0:0:TOPSECRET:/root:/bin/bash\nMary went home.\n")
    spec = study_yaml(tmp_path / "s.yaml", Path(tiny), experiments=[MICHELLE],
                      analysis={"kind": "ablate", "ablation": "mean", "reference": str(tmp_path / "ref.txt")})
    assert run(["--batch", str(spec), "--out", str(tmp_path / "out"), "--quiet"])["rc"] == 0
    for name in ("summary.json", "aggregate.json", "index.html"):
        text = (tmp_path / "out" / name).read_text()
        assert "TOPSECRET" not in text and "ref.txt" in text, name
    ref = json.loads((tmp_path / "out" / "summary.json").read_text())["analysis"]["reference"]
    assert ref["n_prompts"] == 2 and len(ref["sha256"]) == 64


def test_a_killed_runs_staging_and_lock_are_cleared_by_the_next(tiny, tmp_path):
    """After SIGKILL: the next run into the same folder holds its lock, so every staging folder named
    after it is stale and is removed; a folder a killed --overwrite had set aside goes back in place."""
    jsonl(tmp_path / "p.jsonl", [MICHELLE])
    out = tmp_path / "out"
    for leftover in (".out.pairs-424242-1", ".out.partial-424242-2"):
        (tmp_path / leftover / "0001-x").mkdir(parents=True)
        (tmp_path / leftover / "0001-x" / "results.json").write_text("{}")
    (tmp_path / ".out.patch-run.lock").write_text("")
    assert run(pairs_args(tiny, tmp_path / "p.jsonl", out, "--quiet"))["rc"] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "p.jsonl"]
    # killed between setting the old study aside and moving the new one in: the old one comes back
    first = (out / "summary.json").read_bytes()
    os.rename(out, tmp_path / ".out.old-424242-3")
    one_line(run(pairs_args(tiny, tmp_path / "p.jsonl", out)), "--overwrite")  # it is back, so: not without it
    assert (out / "summary.json").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "p.jsonl"]


def test_default_folders_of_simultaneous_runs_do_not_collide(tiny, tmp_path, monkeypatch):
    """A run whose default folder another run holds (locked, not yet written) takes the next name."""
    monkeypatch.chdir(tmp_path)
    jsonl(tmp_path / "p.jsonl", [MICHELLE])
    with claim(tmp_path / "outputs" / "p", kind="study"):  # the first run is still computing
        r = run(["--pairs", "p.jsonl", "--model", tiny, "--bootstrap", "20", "--quiet"])
        assert r["rc"] == 0, r
        assert "outputs/p-2/" in r["stdout"]
    assert (tmp_path / "outputs" / "p-2" / "summary.json").is_file()
    with claim(tmp_path / "outputs" / "michelle", kind="experiment"):
        r = run(["--model", tiny, "--clean", MICHELLE["clean"], "--corrupt", MICHELLE["corrupt"], "--target", "Jones",
                 "--foil", "Smith", "--quiet"])
        assert r["rc"] == 0
    with claim(tmp_path / "outputs" / "x", kind="experiment") as held:  # an explicit --out stays refused
        one_line(run(["--model", tiny, "--clean", MICHELLE["clean"], "--corrupt", MICHELLE["corrupt"], "--target",
                      "Jones", "--foil", "Smith", "--out", str(held.folder)]), "another patch-run is writing")


def test_out_through_a_linked_parent_is_the_links_target_but_a_linked_out_is_refused(tiny, tmp_path):
    """The promise covers --out itself (never a link, never a foreign folder); its parents are a path
    the user chose, resolved as the OS resolves it (documented in the file policy)."""
    (tmp_path / "real").mkdir()
    (tmp_path / "lnk").symlink_to(tmp_path / "real")
    jsonl(tmp_path / "p.jsonl", [MICHELLE])
    assert run(pairs_args(tiny, tmp_path / "p.jsonl", tmp_path / "lnk" / "sub", "--quiet"))["rc"] == 0
    assert (tmp_path / "real" / "sub" / "summary.json").is_file()
    (tmp_path / "real" / "other").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "real" / "other")
    one_line(run(pairs_args(tiny, tmp_path / "p.jsonl", tmp_path / "linked")), "symbolic link")


# ============================================================================ wrong results from pair files


def test_quoted_newlines_in_a_csv_field_are_kept(tmp_path):
    rows = [{**MICHELLE, "clean": "Michelle Jones\nwas a top-notch student. Michelle", "name": "nl"},
            {**MICHELLE, "clean": "Michelle Jones\u0085was a top-notch student. Michelle", "name": "nel"},
            {**MICHELLE, "clean": "Michelle Jones\r\nwas a top-notch student. Michelle", "name": "crlf"},
            {**MICHELLE, "name": "plain"}]
    with open(tmp_path / "p.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, [*MICHELLE, "name"])
        w.writeheader()
        w.writerows(rows)
    got = read_pairs_file(tmp_path / "p.csv")
    assert [p.clean for p in got] == [r["clean"] for r in rows] and [p.name for p in got] == ["nl", "nel", "crlf", "plain"]


def test_a_jsonl_line_holding_a_raw_line_separator_is_one_row(tmp_path):
    row = {**MICHELLE, "clean": "Michelle Jones was a top\u2028notch student\u2029 Michelle\x1c\x1d\x1e", "name": "ls"}
    (tmp_path / "p.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\r\n" + json.dumps(MICHELLE) + "\n",
                                      encoding="utf-8")
    got = read_pairs_file(tmp_path / "p.jsonl")
    assert len(got) == 2 and got[0].error is None and got[0].clean == row["clean"] and got[1].error is None


# ============================================================================ tracebacks and unclear messages


def test_a_nul_byte_in_a_pair_name_is_one_rows_business(tiny, tmp_path):
    jsonl(tmp_path / "p.jsonl", [{**MICHELLE, "name": "bad\x00name"}, {**MICHELLE, "name": "good"}])
    r = run(pairs_args(tiny, tmp_path / "p.jsonl", tmp_path / "out", "--quiet"))
    assert r["rc"] == 0 and r["stderr"] == "", r
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [p["status"] for p in summary["pairs"]] == ["ok", "ok"] and summary["complete"] is True


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.update(shard="x"), "not K/N"),
    (lambda s: s.update(shard="1/0"), "not one of 1..N"),
    (lambda s: s.update(shard=[1, 2]), "not K/N"),
    (lambda s: s.update(pairs=None), "not a list"),
    (lambda s: s.update(pairs=[{"index": "1"}]), "not a list"),
    (lambda s: s.pop("analysis"), "does not parse"),
    (lambda s: s.update(analysis={"axes": 5}), "does not parse"),
])
def test_a_damaged_shard_is_named_in_one_line(tmp_path, shards, edit, words):
    sh1, sh2 = copy_shards(shards, tmp_path)
    _edit_summary(sh1, edit)
    before = listing(tmp_path)
    one_line(run(["merge", str(sh1), str(sh2), "--out", str(tmp_path / "m")]), str(sh1), words)
    assert listing(tmp_path) == before


def test_a_shard_without_its_pairs_is_named_not_the_output(tmp_path, shards):
    sh1, sh2 = copy_shards(shards, tmp_path)
    shutil.rmtree(sh2 / "pairs")
    r = run(["merge", str(sh1), str(sh2), "--out", str(tmp_path / "m")])
    one_line(r, str(sh2), "missing")
    assert "output folder" not in r["stderr"] and not (tmp_path / "m").exists()


def test_byte_order_marks_are_accepted_everywhere(tiny, tmp_path):
    bom = "\ufeff"
    (tmp_path / "p.jsonl").write_text(bom + json.dumps(MICHELLE) + "\n", encoding="utf-8")
    (tmp_path / "p.csv").write_text(bom + "clean,corrupt,target,foil\n" + ",".join(MICHELLE.values()) + "\n",
                                    encoding="utf-8")
    for name in ("p.jsonl", "p.csv"):
        (p,) = read_pairs_file(tmp_path / name)
        assert p.error is None and p.clean == MICHELLE["clean"], name
    (tmp_path / "ref.txt").write_text(bom + "Mary went home.\n", encoding="utf-8")
    spec = tmp_path / "s.yaml"
    spec.write_text(bom + yaml.safe_dump({"defaults": {"model": tiny}, "experiments": [MICHELLE], "analysis": {
        "kind": "ablate", "ablation": "mean", "reference": str(tmp_path / "ref.txt")}}), encoding="utf-8")
    study = patching.study.run.read_study(spec, {})
    assert list(study.options.reference) == ["Mary went home."]


def test_a_study_where_no_pair_runs_is_an_error_even_when_quiet(tiny, tmp_path):
    bad = [{**MICHELLE, "corrupt": "Michelle Smith-Jones was a top-notch student. Michelle"} for _ in range(3)]
    jsonl(tmp_path / "p.jsonl", bad)
    one_line(run(pairs_args(tiny, tmp_path / "p.jsonl", tmp_path / "out", "--quiet")), "no pair of the study ran",
             "token counts differ: 3")
    assert (tmp_path / "out" / "summary.md").is_file()  # the reasons, one row each
    jsonl(tmp_path / "q.jsonl", [MICHELLE] * 12)
    before = listing(tmp_path)
    one_line(run(pairs_args(tiny, tmp_path / "q.jsonl", tmp_path / "o2", "--shard", "13/13", "--quiet")),
             "more shards than pairs", "12")
    one_line(run(pairs_args(tiny, tmp_path / "q.jsonl", tmp_path / "o3", "--shard", "99999999999999999999/1" + "0" * 20,
                            "--quiet")), "must be K/N")
    assert listing(tmp_path) == before


def test_a_key_given_twice_in_a_jsonl_row_is_an_invalid_row(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"clean": "a b", "clean": "' + MICHELLE["clean"] + '", "corrupt": "'
                                      + MICHELLE["corrupt"] + '", "target": "Jones", "foil": "Smith"}\n')
    (p,) = read_pairs_file(tmp_path / "p.jsonl")
    assert p.error is not None and "'clean' twice" in p.error


# ============================================================================ cosmetic


def test_aggregate_csv_writes_empty_cells_not_nan(tiny, tmp_path):
    jsonl(tmp_path / "p.jsonl", [MICHELLE])  # one pair: its SEM is undefined
    assert run(pairs_args(tiny, tmp_path / "p.jsonl", tmp_path / "out", "--quiet"))["rc"] == 0
    text = (tmp_path / "out" / "aggregate.csv").read_text()
    assert "nan" not in text.lower()
    head, first = list(csv.reader(io.StringIO(text)))[:2]
    assert first[head.index("sem")] == "" and first[head.index("mean")] != ""


def test_top_k_has_a_sane_cap(tiny, tmp_path):
    before = listing(tmp_path)
    one_line(run(["--model", tiny, *sum(([f"--{k}", v] for k, v in MICHELLE.items()), []), "--top-k", "999999",
                  "--out", str(tmp_path / "o")]), "top_k is at most 1000")
    assert listing(tmp_path) == before
    assert PatchOptions(top_k=1000).top_k == 1000


def test_the_kind_of_a_folder_is_named_with_its_article(tiny, tmp_path):
    jsonl(tmp_path / "p.jsonl", [MICHELLE])
    assert run(pairs_args(tiny, tmp_path / "p.jsonl", tmp_path / "st", "--quiet"))["rc"] == 0
    one_line(run(["--model", tiny, *sum(([f"--{k}", v] for k, v in MICHELLE.items()), []), "--out",
                  str(tmp_path / "st"), "--overwrite"]), "not an experiment")


def test_a_huge_generator_is_refused_at_once(tiny, tmp_path):
    spec = study_yaml(tmp_path / "s.yaml", Path(tiny), pairs={**generator(), "n": 100_000_000})
    before = listing(tmp_path)
    one_line(run(["--batch", str(spec), "--out", str(tmp_path / "out")]), "n is at most 100,000")
    assert listing(tmp_path) == before


def test_the_study_hash_covers_every_reference_prompt_not_its_path(tmp_path):
    """Two studies whose mean-ablation references differ only after prompt 20 are different studies
    (their shards must not merge); the same prompts read from two files are the same study."""
    from patching.analyses import get
    ablate = get("ablate")
    many = [f"Prompt number {i} is here." for i in range(25)]
    hashed = lambda ref: json.dumps(ablate.options(ablation="mean", reference=ref).hashed())  # noqa: E731
    assert hashed(many) != hashed(many[:24] + ["Another last prompt."])
    (tmp_path / "a").mkdir()
    for folder in (tmp_path, tmp_path / "a"):
        (folder / "ref.txt").write_text("\n".join(many) + "\n")
    assert hashed(str(tmp_path / "ref.txt")) == hashed(str(tmp_path / "a" / "ref.txt")) == hashed(many)
