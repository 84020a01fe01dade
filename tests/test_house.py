"""The house rules, checked on the source: one namespace, one-way imports, no circle, short functions, no
citation of a file the repository does not hold, and each name list written once (data_schemas.vocab).

Everything here reads the source with `ast`; nothing is imported, so a rule broken by a module that fails to
import is still reported by name.
"""
from __future__ import annotations

import ast
import graphlib
import re
import tomllib
from pathlib import Path

import pytest

from prefcurate.data_schemas import vocab

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("data_schemas", "curation", "training", "flows", "evaluation", "cli")
# Which of our packages each package may import (the one-way flow of the README's "Layout").
MAY_IMPORT = {
    "data_schemas": {"data_schemas"},
    "curation": {"data_schemas", "curation"},
    "training": {"data_schemas", "training"},
    "evaluation": {"data_schemas", "curation", "training", "evaluation"},
    "flows": {"data_schemas", "curation", "training", "evaluation", "flows"},
    "cli": {"data_schemas", "curation", "training", "evaluation", "flows", "cli"},
}
MAX_FUNCTION_LINES = 80


def _sources() -> dict[str, Path]:
    """dotted module name (without the prefcurate. prefix) -> file, for every module of our packages."""
    out = {}
    for top in PACKAGES:
        for path in sorted((REPO / top).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


SOURCES = _sources()
TREES = {name: ast.parse(path.read_text(encoding="utf-8"), str(path)) for name, path in SOURCES.items()}


def _imports(tree: ast.AST) -> list[tuple[str, int]]:
    """Every absolute import in the module (top level or inside functions): (dotted name, line)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _module_of(dotted: str) -> str | None:
    """Our module a dotted import name lands in (`prefcurate.curation.store.lake.Lake` -> `curation.store.lake`)."""
    if not dotted.startswith("prefcurate."):
        return None
    name = dotted[len("prefcurate."):]
    while name and name not in SOURCES:
        name = name.rpartition(".")[0]
    return name or None


def _our_targets(tree: ast.AST) -> set[str]:
    """Our modules this module imports. `from pkg import sub` where sub is a module counts as an import of sub
    alone (the package is only being initialised), an imported name that is not a module as its module."""
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets |= {_module_of(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                targets.add(_module_of(sub) if sub[len("prefcurate."):] in SOURCES else _module_of(node.module))
    return targets - {None}


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"prefcurate." + ".".join(p.parent.relative_to(REPO).parts)
               for top in PACKAGES for p in (REPO / top).rglob("__init__.py")}
    assert folders - set(config["packages"]) == set(), "add these to [tool.setuptools] packages"
    assert set(config["packages"]) - folders - {"prefcurate"} == set(), "listed but not a package folder"
    assert all(config["package-dir"][f"prefcurate.{top}"] == top for top in PACKAGES)


def test_imports_use_the_namespace_and_flow_one_way():
    bad = []
    for name, tree in TREES.items():
        top = name.split(".")[0]
        for imported, line in _imports(tree):
            root = imported.split(".")[0]
            if root in PACKAGES:
                bad.append(f"{SOURCES[name]}:{line}: `{imported}` (use prefcurate.{imported})")
            elif root == "prefcurate" and imported.count(".") >= 1:
                target = imported.split(".")[1]
                if target in PACKAGES and target not in MAY_IMPORT[top]:
                    bad.append(f"{SOURCES[name]}:{line}: {top} may not import {target}")
            elif root == "prefect" and top != "flows":
                bad.append(f"{SOURCES[name]}:{line}: Prefect lives only in flows/")
    assert bad == []


def test_no_import_circle():
    graph = {name: _our_targets(tree) - {name} for name, tree in TREES.items()}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as err:
        pytest.fail(f"import circle: {' -> '.join(err.args[1])}")


# The tests and benchmarks: they import the namespace too and keep their functions short.
OTHER_TREES = {path: ast.parse(path.read_text(encoding="utf-8"), str(path))
               for path in [*REPO.glob("tests/*.py"), *REPO.glob("benchmarks/**/*.py")]}


def test_no_function_over_80_lines():
    trees = [*((SOURCES[name], tree) for name, tree in TREES.items()), *OTHER_TREES.items()]
    long = [f"{path}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, tree in trees for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_tests_and_benchmarks_import_the_namespace():
    bad = [f"{path}:{line}: `{name}`" for path, tree in OTHER_TREES.items() for name, line in _imports(tree)
           if name.split(".")[0] in PACKAGES]
    assert bad == []


CITED_FILE = re.compile(r"(?<![\w/.:-])((?:\.\./|[\w-]+/)*([\w-]+\.md))\b`?(\s*§)?")
# The names of notes a comment may point a reader at; other .md names in the code are files it writes
# (eval.md, results.md) or paths in other repositories (examples/.../README.md), unless a § follows them.
NOTE_NAMES = {"methods.md", "data-and-scorers.md", "environment.md", "style.md", "SOURCES.md", "README.md",
              "BENCHMARKS.md"}


def _cited_files():
    """(file, line, cited path) for every note cited in our sources, tests, benchmarks and Markdown."""
    tests = [p for p in REPO.glob("tests/*.py") if p.name != "test_house.py"]  # this file names them as rules
    files = [*SOURCES.values(), *tests, *REPO.glob("benchmarks/**/*.py"), *REPO.glob("*.md"), *REPO.glob("docs/*.md")]
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in CITED_FILE.finditer(re.sub(r"https?://\S+", "", line)):
                named_note = match.group(2) in NOTE_NAMES and (match.group(1) == match.group(2)
                                                               or match.group(1).startswith(("docs/", "../")))
                if match.group(3) or named_note:
                    yield path, number, match.group(1)


def test_every_cited_file_is_in_the_repository():
    missing = []
    for path, number, cited in _cited_files():
        if cited.startswith("../shared/"):  # the licence-bound data folder beside the clone (tests/shared_data.py)
            continue
        if not any((base / cited).is_file() for base in (REPO, path.parent)):
            missing.append(f"{path.relative_to(REPO)}:{number}: {cited}")
    assert missing == []
    assert sum(1 for _ in _cited_files()) > 40  # the check sees the citations (about 50 point into docs/)


@pytest.mark.parametrize("name", ["LOSS_TYPES", "SNAPSHOT_POLICIES", "INPUT_FORMATS", "WEIGHT_FREE_SCORERS"])
def test_name_lists_are_written_once(name):
    """No module keeps its own literal copy of a vocab list (in any order): they import it from vocab."""
    wanted = set(getattr(vocab, name))
    copies = [f"{SOURCES[mod]}:{node.lineno}" for mod, tree in TREES.items() if mod != "data_schemas.vocab"
              for node in ast.walk(tree) if isinstance(node, (ast.Tuple, ast.List, ast.Set))
              and len(node.elts) == len(wanted) and all(isinstance(e, ast.Constant) for e in node.elts)
              and {e.value for e in node.elts} == wanted]
    assert copies == []
