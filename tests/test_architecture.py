"""The code base's own rules: imports flow one way without cycles (import-linter contracts in
pyproject.toml), files and functions stay small, every config dataclass says what it is."""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

import detrkit.config as config

SRC = Path(__file__).resolve().parents[1] / "src" / "detrkit"
PYPROJECT = SRC.parents[1] / "pyproject.toml"


def test_import_contracts_are_kept():
    from importlinter.cli import lint_imports

    assert lint_imports(config_filename=str(PYPROJECT), no_cache=True, no_logo=True) == 0


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_models_stay_small():
    total = sum(_lines(p) for p in (SRC / "models").glob("*.py"))
    assert total <= 2500, f"src/detrkit/models has {total} lines"


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_no_long_file_or_function(path):
    assert _lines(path) <= 400
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > 60
    ]
    assert not long


def test_every_config_dataclass_is_documented():
    classes = [
        obj
        for _, obj in inspect.getmembers(config, inspect.isclass)
        if dataclasses.is_dataclass(obj)
    ]
    assert len(classes) >= 15
    undocumented = [
        c.__name__ for c in classes if not c.__doc__ or c.__doc__.startswith(f"{c.__name__}(")
    ]
    assert not undocumented


def test_ci_runs_exactly_the_readme_test_command():
    readme = (SRC.parents[1] / "README.md").read_text()
    ci = (SRC.parents[1] / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci.startswith("python3 -m venv .venv && ") and f"\n{ci}\n" in readme
