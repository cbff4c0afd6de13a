"""The package layout and its seams (docs/architecture.md), checked on the real import graph.

The contracts live in ``pyproject.toml`` (``[tool.importlinter]``) and are run here with
import-linter over the installed package: layers (each package imports only the ones below
it), a de-identification core without I/O modules, independent edges, and no import cycle.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp

import deidfs
from deidfs import errors

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(deidfs.__file__).resolve().parent


def _contracts() -> list[dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts: list[dict[str, object]] = config["tool"]["importlinter"]["contracts"]
    return contracts


def _layer_members() -> set[str]:
    (layers,) = [c for c in _contracts() if c["type"] == "layers"]
    members: set[str] = set()
    for layer in layers["layers"]:  # type: ignore[union-attr]
        members.update(m.strip() for m in str(layer).split("|"))
    return members


def test_import_contracts_are_kept() -> None:
    # In a process of its own: import-linter configures logging (it would disable the
    # loggers of deidfs for the tests that follow).
    code = (
        "import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(sys.argv[1], no_cache=True, no_logo=True))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "pyproject.toml")],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert f"Contracts: {len(_contracts())} kept, 0 broken." in out


def test_every_package_and_top_level_module_has_a_layer() -> None:
    # A new package left out of the layers would escape every seam.
    graph = grimp.build_graph("deidfs")
    children = graph.find_children("deidfs") - {"deidfs.__main__"}
    assert children, "no modules found"
    assert children <= _layer_members(), sorted(children - _layer_members())


def test_each_package_says_what_it_owns_and_may_import() -> None:
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert doc.strip(), f"{init.parent.name}: no docstring"
        assert "import" in doc, f"{init.parent.name}: does not say what it may import"


def test_the_core_imports_no_edge_at_any_depth() -> None:
    graph = grimp.build_graph("deidfs")
    edges = {"deidfs." + p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    for edge in sorted(edges - {"deidfs.deid"}):
        chain = graph.find_shortest_chain(importer="deidfs.deid", imported=edge)
        assert chain is None, chain


def test_exit_codes_are_the_sysexits_ones() -> None:
    # Spelled out in deidfs.errors so the core imports no os; they must stay the real ones.
    assert errors.EX_CONFIG == os.EX_CONFIG
    assert errors.EX_NOINPUT == os.EX_NOINPUT
    assert errors.EX_TEMPFAIL == os.EX_TEMPFAIL
