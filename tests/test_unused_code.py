"""Dead code stays out: no unused module imports, no re-exports of names defined elsewhere, one load of the
model per ``ditq qat``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from ditq.cli import main
from ditq.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]


def unused_imports(path: Path) -> list[str]:
    """Names a module binds with a top-level ``import x`` / ``from m import x`` and never reads (the check
    pyflakes makes; ``__future__`` and names listed in ``__all__`` excepted)."""
    tree = ast.parse(path.read_text())
    bound = {}
    for node in tree.body:
        if isinstance(node, ast.Import):
            bound.update({(a.asname or a.name).split(".")[0]: node.lineno for a in node.names})
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            bound.update({a.asname or a.name: node.lineno for a in node.names})
    read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    read |= {n.value.id for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
    exported = {
        e.value
        for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets)
        for e in getattr(node.value, "elts", [])
    }
    return sorted(n for n in bound if n not in read and n not in exported)


PACKAGE_MODULES = sorted(str(f.relative_to(ROOT)) for d in ("ditq", "calib", "runtime", "graphs", "exporter") for f in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("module", PACKAGE_MODULES)
def test_a_module_imports_only_what_it_uses(module):
    assert unused_imports(ROOT / module) == []


@pytest.mark.parametrize(
    "module,name",
    [("ditq.calib.robuq", "MAX_ROTATION"), ("ditq.runtime.samplers", "NoiseSchedule"), ("ditq.models", "_read_json")],
)  # fmt: skip
def test_a_name_has_one_home(module, name):
    """``MAX_ROTATION`` lives in ditq.recipe, ``NoiseSchedule`` in ditq.schedule, JSON is read by
    ditq.untrusted.read_json: no second name for them elsewhere."""
    import importlib

    assert not hasattr(importlib.import_module(module), name)


def test_qat_with_mixed_bits_loads_the_model_once(tmp_path, monkeypatch, capsys):
    """``ditq qat --mixed`` measures the sensitivities on the model it trains: one ``load_model``."""
    from ditq.adapters import adapter_for
    from ditq.calib.robuq import MixedRecipe
    from ditq.workflows import export as export_workflow, qat as qat_workflow

    loads = []
    real = qat_workflow.load_model

    def counted(*args, **kwargs):
        loads.append(args)
        return real(*args, **kwargs)

    def fake_mixed(model, avg_bits, **_):  # the measurement itself is tested in test_mixed_recipe.py
        return MixedRecipe(Recipe.robuq(adapter_for(model).coverage, avg_bits), {}, {})

    monkeypatch.setattr(qat_workflow, "load_model", counted)
    monkeypatch.setattr(export_workflow, "mixed_recipe", fake_mixed)
    out = tmp_path / "q"
    code = main(["--quiet", "qat", "--mixed", "--steps", "1", "--batch-size", "4", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert loads == [("digits",)] and (out / "recipe.json").is_file()
