"""The documentation works as written: README.md and docs/*.md.

1. Every ```bash / ```sh block runs, as shown, and exits 0: one bash script per block (so `P="..."`
   assignments and backslash continuations work as in a terminal), in a fresh temporary folder that
   holds a copy of `examples/` (and `scripts/` for the commands that run one), with `patch-run` and
   `python` resolved to this interpreter, offline (HF_HUB_OFFLINE=1, an empty Hugging Face cache),
   OMP_NUM_THREADS=1. Whatever a block writes into `outputs/` lands in that folder, never in the
   repository's committed `outputs/` (checked). Blocks that cannot run here are listed, by name,
   in SKIP below with their reason and reported as skipped (`pytest -rs`). Usage lines with
   placeholders (FILE.yaml, [--model gpt2]) belong in ```text blocks, which are not run.
2. Every relative link and image points to an existing file (and a `#section` of a Markdown file to
   an existing heading).
3. README.md has at most 300 lines, and its test command is the one `.ci/run` runs.
4. Every ```python block of the Python API page runs as written, in the same kind of folder.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300
BLOCK_TIMEOUT_S = 300

# The one skip table: (page, text that names the block: a unique substring of its commands) -> reason.
# Every entry must match exactly one block (test_skip_table_is_current), so it cannot go stale.
SKIP: dict[tuple[str, str], str] = {
    ("README.md", "pip install torch==2.13.0"):
        "installs packages with pip and runs the whole test suite (the set-up commands)",
    ("README.md", "patch-run --clean \"Michelle Jones"):
        "needs the Hugging Face Hub: no --model, so GPT-2 small is downloaded",
    ("docs/testing.md", "python -m pytest -q"):
        "the test suite itself",
    ("docs/demo-models.md", "train_demo.py induction --out induction-stage1"):
        "retraining the demo models (hours on a CPU; writes into mingpt/demo/)",
    ("docs/studies.md", "seq 1 8 | xargs -P 8"):
        "8 parallel processes of a generic study.yaml (the sharding itself runs in the --shard 1/2 example)",
    ("docs/studies.md", "#SBATCH --array=1-16"):
        "a Slurm job script (needs sbatch, GPUs and gpt2-xl from the Hub)",
    ("docs/studies.md", "patch-run merge shards/{1..16}"):
        "merges the 16 shards of the Slurm array above, which does not run here",
    ("docs/path.md", "scripts/tl_direct_path.py"):
        "a benchmark against TransformerLens, which needs its own virtual environment ($TL4_PYTHON)",
    ("docs/attribution.md", "scripts/bench_attribution.py"):
        "a benchmark (minutes of GPT-2-small-shaped sweeps)",
    ("docs/speed.md", "bench.py --sizes 11 35"):
        "a benchmark against TransformerLens, which needs its own virtual environments",
    ("docs/speed.md", "bench.py --heads"):
        "a benchmark against TransformerLens, which needs its own virtual environment",
    ("docs/speed.md", "bench.py --startup"):
        "a benchmark (start-up timings of many fresh processes)",
}


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository, e.g. "docs/patch.md"
    line: int  # line of the opening fence
    text: str  # the block's content

    @property
    def commands(self) -> list[str]:
        """Command lines: backslash continuations joined, comments and blank lines dropped."""
        out, pending = [], ""
        for raw in self.text.splitlines():
            line = raw.rstrip()
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            out.append(" ".join((pending + line).split()))
            pending = ""
        if pending:
            out.append(" ".join(pending.split()))
        return out

    @property
    def id(self) -> str:
        first = next((c for c in self.commands if not re.match(r"^\w+=", c)), self.commands[0] if self.commands else "")
        words = re.sub(r'"[^"]*"', '"..."', first).split(" # ")[0].split()
        return f"{self.page}:{self.line} {' '.join(words[:6])}"[:100]


FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


def fenced_blocks(page: Path) -> list[tuple[str, int, str]]:
    """(language, line of the opening fence, content) of every fenced block of a Markdown page."""
    blocks, lines, i = [], page.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start, body = m.group(2), m.group(3).lower(), i + 1, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        blocks.append((lang, start, "\n".join(body)))
        i += 1
    return blocks


def shell_blocks() -> list[Block]:
    return [Block(str(p.relative_to(ROOT)), line, text)
            for p in PAGES for lang, line, text in fenced_blocks(p) if lang in ("bash", "sh", "shell")]


BLOCKS = shell_blocks()


def skip_reason(block: Block) -> str | None:
    for (page, name), reason in SKIP.items():
        if page == block.page and name in block.text:
            return reason
    return None


def test_pages_exist():
    assert (ROOT / "README.md").is_file() and len(PAGES) > 1, "README.md and docs/*.md"
    assert BLOCKS, "no ```bash blocks found"


def test_skip_table_is_current():
    """Each skip entry names exactly one block of its page: a renamed or removed block fails here."""
    for (page, name), reason in SKIP.items():
        hits = [b for b in BLOCKS if b.page == page and name in b.text]
        assert len(hits) == 1, f"skip entry ({page!r}, {name!r}) matches {len(hits)} shell blocks, not 1"
        assert reason.strip(), f"skip entry ({page!r}, {name!r}) has no reason"


# ----------------------------------------------------------------------------- 1. the commands run


def _snapshot(folder: Path) -> str:
    """A digest of a folder's tree (names, sizes, modification times): did anything write there?"""
    h = hashlib.sha256()
    if folder.exists():
        for p in sorted(folder.rglob("*")):
            st = p.lstat()
            h.update(f"{p.relative_to(folder)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _wrapper(path: Path, argv: str):
    path.write_text(f'#!/bin/sh\nexec {argv} "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


@pytest.fixture(scope="module")
def shell_env(tmp_path_factory):
    """PATH with `patch-run` and `python` as this interpreter first; offline; one thread."""
    base = tmp_path_factory.mktemp("docs-env")
    bin_dir = base / "bin"
    bin_dir.mkdir()
    py = sys.executable
    _wrapper(bin_dir / "patch-run", f'"{py}" -m patching')
    for name in ("python", "python3"):
        _wrapper(bin_dir / name, f'"{py}"')
    (base / "hf-home").mkdir()
    env = dict(os.environ)
    for key in [k for k in env if k.startswith(("PYTEST_", "COV_"))]:
        env.pop(key)
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HOME=str(base / "hf-home"), OMP_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONDONTWRITEBYTECODE="1")
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    return env


_passed: dict[str, str] = {}  # block text -> id of the block that already ran it (identical blocks run once)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_shell_block_runs(block: Block, shell_env, tmp_path):
    reason = skip_reason(block)
    if reason:
        pytest.skip(f"{block.id}: {reason}")
    commands = block.commands
    assert commands, f"{block.id}: an empty shell block"
    for c in commands:  # usage lines are not commands: put them in a ```text block
        assert not re.search(r"\[--|FILE\b|FILE\.|my-pairs|SHARD_DIR|\bK/N\b", c), \
            f"{block.id}: {c!r} is a usage line with placeholders; use a ```text block (or add it to SKIP)"
    if block.text in _passed:
        return  # the same commands, shown on another page, already ran and passed
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(ROOT / "examples", work / "examples")
    if "scripts/" in block.text:
        (work / "scripts").symlink_to(ROOT / "scripts", target_is_directory=True)
    if "mingpt/" in block.text:  # a copy: nothing a command does can touch the shipped models
        shutil.copytree(ROOT / "mingpt" / "demo", work / "mingpt" / "demo")
    script = work.parent / "block.sh"
    script.write_text("set -euo pipefail\ntrap 'echo \"failed: $BASH_COMMAND\" >&2' ERR\n" + block.text + "\n")
    before = _snapshot(ROOT / "outputs")
    try:
        proc = subprocess.run(["bash", str(script)], cwd=work, env=shell_env, capture_output=True, text=True,
                              timeout=BLOCK_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{block.id}: still running after {BLOCK_TIMEOUT_S} s\n{e.stderr or ''}")
    assert _snapshot(ROOT / "outputs") == before, f"{block.id}: wrote into the repository's outputs/"
    assert proc.returncode == 0, (f"{block.id}: exit status {proc.returncode}\n--- stdout (end)\n"
                                  f"{proc.stdout[-3000:]}\n--- stderr (end)\n{proc.stderr[-3000:]}")
    _passed[block.text] = block.id


PYTHON_PAGES = [ROOT / "docs" / "python-api.md"]  # pages whose ```python blocks are whole programs
PY_BLOCKS = [Block(str(p.relative_to(ROOT)), line, text)
             for p in PYTHON_PAGES for lang, line, text in fenced_blocks(p) if lang == "python"]


@pytest.mark.parametrize("block", PY_BLOCKS, ids=[b.id for b in PY_BLOCKS])
def test_python_block_runs(block: Block, shell_env, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "block.py").write_text(block.text + "\n")
    before = _snapshot(ROOT / "outputs")
    proc = subprocess.run([sys.executable, "block.py"], cwd=work, env=shell_env, capture_output=True, text=True,
                          timeout=BLOCK_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert _snapshot(ROOT / "outputs") == before, f"{block.id}: wrote into the repository's outputs/"
    assert proc.returncode == 0, f"{block.id}: exit status {proc.returncode}\n{proc.stderr[-3000:]}"


def test_python_blocks_found():
    assert len(PY_BLOCKS) >= 3


# ----------------------------------------------------------------------------- 2. links resolve

LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose(text: str) -> str:
    """The page without fenced blocks and inline code spans (links there are examples, not links)."""
    out, fence = [], None
    for line in text.splitlines():
        m = FENCE.match(line)
        if fence:
            if line.strip().startswith(fence):
                fence = None
            continue
        if m:
            fence = m.group(2)
            continue
        out.append(re.sub(r"(`+)(?:(?!\1).)+?\1", "", line))
    return "\n".join(out)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to dashes."""
    text = re.sub(r"`", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _heading_texts(page: Path) -> list[str]:
    """Headings with their inline code kept (the anchor includes it)."""
    out, fence = [], None
    for line in page.read_text(encoding="utf-8").splitlines():
        m = FENCE.match(line)
        if fence:
            if line.strip().startswith(fence):
                fence = None
            continue
        if m:
            fence = m.group(2)
            continue
        h = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if h:
            out.append(h.group(1))
    return out


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in _heading_texts(page):
        base = _slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    return LINK.findall(_prose(page.read_text(encoding="utf-8")))


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page: Path):
    bad = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no such file")
            continue
        if ROOT not in dest.parents and dest != ROOT:
            bad.append(f"{target}: outside the repository")
            continue
        if fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            bad.append(f"{target}: no heading #{fragment} in {dest.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: broken links:\n" + "\n".join(bad)


def test_link_checker_finds_links():
    """The checker sees the README's heatmap and its links into docs/ (so an empty scan cannot pass)."""
    found = links(ROOT / "README.md")
    assert "outputs/demo-michelle/heatmap.png" in found
    assert any(t.startswith("docs/") for t in found)


# ----------------------------------------------------------------------------- 3. README's shape


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines; the manuals belong in docs/ (at most {README_MAX_LINES})"


def test_readme_test_command_is_ci_s():
    """`.ci/run` runs README's test command (the second set-up command): keep the two in step."""
    ci = ROOT / ".ci" / "run"
    if not ci.exists():
        pytest.skip(".ci/run is not in this checkout")
    setup = next(b for b in BLOCKS if b.page == "README.md" and "pip install" in b.text)
    test_command = setup.commands[-1]
    ci_commands = [line.strip() for line in ci.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert test_command in ci_commands, f"README's test command {test_command!r} is not what .ci/run runs"
