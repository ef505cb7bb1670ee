"""The package's shape, kept true by parsing every module of mingpt/ and patching/ with `ast`.

- No import circle among the project's modules, counting imports inside functions.
- Imports only go down the layers: mingpt < patching.core < patching.io < patching.analyses <
  patching.study < patching.cli < the entry points (patching.main, patching.api, patching.__main__).
- An import inside a function is for a third-party module's start-up cost (matplotlib, yaml,
  jinja2, ...) only; of the project's own modules exactly one is allowed, named below with its reason.
- No analysis is named outside its own module and the registry: generic code never compares a kind
  with "lens" (a string constant equal to an analysis's name), nor imports an analysis module.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["mingpt", "patching.core", "patching.io", "patching.analyses", "patching.study", "patching.cli",
          "patching.main", "patching.api", "patching.__main__"]  # each may import only from the ones before it
ENTRY = {"patching.main", "patching.api", "patching.__main__"}  # the top: nothing imports them
# the one function-local import of a project module, and why it is one
LOCAL_ALLOWED = {("patching.main", "patching.cli"): "the helper process is forked before torch's import"}
ANALYSES = ("patch", "lens", "dla", "attention", "heads", "ablate", "path", "circuit", "weights", "top")
# the executable decides whether to fork its heatmap helper before anything is imported, so it knows
# the default command's name (the registry's DEFAULT) by heart
NAMES_ALLOWED = {"patching.main": {"patch"}}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for pkg in ("mingpt", "patching") for p in sorted((ROOT / pkg).rglob("*.py"))}


def imports(name: str) -> list[tuple[str, bool, int]]:
    """(imported project module, inside a function?, line) for every import in the module."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    out = []

    def visit(node, local: bool):
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, inner, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                subs = [f"{child.module}.{a.name}" for a in child.names if f"{child.module}.{a.name}" in MODULES]
                # `from patching import cli` imports the module cli; `from patching.io.files import claim` its module
                out.extend((m, inner, child.lineno) for m in subs or [child.module])
            visit(child, inner)
    visit(tree, False)
    # keep the project's modules only (`from patching import analyses` names a module; `from x import f` not)
    return [(m, local, line) for m, local, line in out if m in MODULES]


def layer(name: str) -> int:
    return max(i for i, prefix in enumerate(LAYERS) if name == prefix or name.startswith(prefix + "."))


GRAPH = {name: imports(name) for name in MODULES}


def test_every_module_belongs_to_a_layer():
    assert "patching.analyses.patch" in MODULES and "mingpt.model" in MODULES  # the walk found the package
    for name in MODULES:
        if name != "patching":
            layer(name)  # raises if no layer claims it


def test_imports_only_go_down_the_layers():
    wrong = []
    for name, edges in GRAPH.items():
        if name == "patching":
            continue
        for target, _, line in edges:
            if target != "patching" and (layer(target) > layer(name) or (target in ENTRY and name not in ENTRY)):
                wrong.append(f"{name}:{line} imports {target}")
    assert wrong == []


def test_no_import_circle_counting_function_local_imports():
    colour: dict[str, int] = {}
    cycles = []

    def walk(node, path):
        colour[node] = 1
        for target, _, _ in GRAPH[node]:
            if target == node or target == "patching":
                continue
            if colour.get(target) == 1:
                cycles.append(path[path.index(target):] + [target])
            elif colour.get(target) is None:
                walk(target, path + [target])
        colour[node] = 2

    for name in MODULES:
        if name not in colour:
            walk(name, [name])
    assert cycles == []


def test_function_local_imports_are_for_start_up_cost_only():
    local = [(name, target, line) for name, edges in GRAPH.items() for target, inner, line in edges if inner]
    unexpected = [f"{n}:{line} imports {t} inside a function" for n, t, line in local if (n, t) not in LOCAL_ALLOWED]
    assert unexpected == []
    assert {(n, t) for n, t, _ in local} >= set(LOCAL_ALLOWED)  # the exception is still needed, or drop it


def analysis_of(name: str) -> str | None:
    """The analysis a module belongs to (its own module, or its package), if any."""
    parts = name.split(".")
    if parts[:2] == ["patching", "analyses"] and len(parts) > 2 and parts[2] in ANALYSES:
        return parts[2]
    return None


@pytest.mark.parametrize("name", [n for n in MODULES if n.startswith("patching") and n not in (
    "patching.analyses", "patching.analyses.base")])
def test_no_analysis_is_named_outside_its_own_module(name):
    """Generic code (CLI, batch, study, merge, pages, the protocol) works for any registered analysis:
    it never holds an analysis's name as a string nor imports an analysis module. The registry's lines
    (patching/analyses/__init__.py) are where names live; an analysis may name itself."""
    own = analysis_of(name)
    tree = ast.parse(MODULES[name].read_text())
    found = []
    for node in ast.walk(tree):  # inside an analysis, its words are its own business (results.json keys)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in ANALYSES \
                and own is None and node.value not in NAMES_ALLOWED.get(name, ()):
            found.append(f"line {node.lineno}: {node.value!r}")
    for target, _, line in GRAPH[name]:
        other = analysis_of(target)
        if other and other != own and not (own and other):  # analyses may share helpers with each other
            found.append(f"line {line}: imports {target}")
    assert found == []


def test_the_registry_names_every_analysis_module_once():
    from patching import analyses
    modules = {entry.split(":")[0] if isinstance(entry, str) else type(entry).__module__
               for entry in analyses.REGISTRY.values()}  # an entry is imported (an instance) once used
    on_disk = {n for n in MODULES if analysis_of(n) and n.count(".") == 2}
    assert modules == on_disk
    assert set(analyses.REGISTRY) == set(ANALYSES)  # and this test's list of names is complete
