"""The layers, enforced: every import between ditq modules goes to the importer's own layer or a lower one,
no module imports form a cycle, and the ONNX Runtime side never imports torch.

    L5  workflows   ditq.workflows.*, ditq.cli, ditq (the Python API)
    L4  exporter    tracing through a family adapter, the PyTorch reference, graph building
    L3  graphs      ONNX passes, targets
    L2  calib       numerics, quantizers, the quantized linear, GPTQ, RobuQ, calibration, search, training
    L1  runtime     torch-free: sessions, samplers, sampling, metrics, images
    L0  ditq core   errors, files, untrusted input, manifest, recipe, schedule, pipeline, file format,
                    weights, model loading, model-family adapters

Imports inside functions are allowed only in the modules of :data:`LAZY_OK`, each for the reason given
there (keeping torch and diffusers off the ONNX Runtime path); anywhere else they would hide a layering
problem. The checker runs on the source files (AST), so a test of the test runs it on a copy of the tree
with an upward import added.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"ditq": "ditq", "calib": "ditq.calib", "runtime": "ditq.runtime", "graphs": "ditq.graphs", "exporter": "ditq.exporter"}

CORE = 0
LAYERS = {  # module (or package prefix) -> layer; the longest prefix that matches a module wins
    "ditq.errors": CORE, "ditq.files": CORE, "ditq.untrusted": CORE, "ditq.manifest": CORE,
    "ditq.patterns": CORE, "ditq.options": CORE, "ditq.recipe": CORE, "ditq.schedule": CORE, "ditq.flow": CORE,
    "ditq.pipeline": CORE, "ditq.fileformat": CORE, "ditq.weights": CORE, "ditq.models": CORE,
    "ditq.adapters": CORE, "ditq.families": CORE, "ditq.presets": CORE, "ditq.dpm_solver": CORE, "ditq.text": CORE, "ditq.encoders": CORE,
    "ditq.runtime": 1,
    "ditq.calib": 2,
    "ditq.graphs": 3,
    "ditq.exporter": 4,
    "ditq.workflows": 5, "ditq.cli": 5, "ditq.cli_args": 5, "ditq": 5,
}  # fmt: skip
NAMES = {0: "ditq core", 1: "runtime", 2: "calib", 3: "graphs", 4: "exporter", 5: "workflows"}

# Modules that import ditq modules inside functions, and why (the only reason accepted: an ONNX Runtime
# path must not pay for torch, or a torch-free module reaches torch only when a torch caller asks).
LAZY_OK = {
    "ditq": "the Python API: `import ditq` (and so ditq.runtime) must not import torch; each function imports its workflow",
    "ditq.cli": "`ditq sample` runs with ONNX Runtime alone: each handler imports only what its command needs",
}
# The ONNX Runtime side and what it may import: these import neither torch nor diffusers when loaded.
TORCH_FREE = ("ditq.runtime", "ditq.errors", "ditq.files", "ditq.untrusted", "ditq.manifest", "ditq.patterns",
              "ditq.options", "ditq.recipe", "ditq.schedule", "ditq.flow", "ditq.pipeline", "ditq.fileformat", "ditq.weights", "ditq.families", "ditq.presets", "ditq.dpm_solver", "ditq.text")  # fmt: skip
TORCH_MODULES = ("torch", "diffusers", "torchvision", "transformers")


def module_files(root: Path) -> dict[str, Path]:
    """Every module of the ditq namespace under ``root`` (the folders as pyproject.toml maps them)."""
    found = {}
    for folder, pkg in PACKAGES.items():
        for f in sorted((root / folder).rglob("*.py")):
            rel = f.relative_to(root / folder).with_suffix("").parts
            name = ".".join((pkg, *rel))
            found[name.removesuffix(".__init__")] = f
    return found


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in LAYERS and (prefix != "ditq" or module == "ditq"):  # "ditq": the API module, not a prefix
            return LAYERS[prefix]
    return None


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """``(imported ditq module, line, inside a function)`` for every import statement of ``path``."""
    out = []
    is_pkg = path.name == "__init__.py"

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = module.split(".")
                    keep = len(parts) - child.level + (1 if is_pkg else 0)
                    base = ".".join(parts[:keep] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in child.names]
            for t in targets:
                r = _resolve(t, modules) if t.split(".")[0] == "ditq" else None
                if r and r != module and not module.startswith(r + "."):  # a package's own __init__ runs first anyway
                    out.append((r, child.lineno, in_function))
            visit(child, nested)

    visit(ast.parse(path.read_text()), False)
    return out


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out = {}, {}, [], set(), []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def violations(root: Path) -> list[str]:
    """Every breach of the layering under ``root``, one line each."""
    modules = module_files(root)
    problems, edges = [], {}
    for m, f in modules.items():
        mine = layer_of(m)
        if mine is None:
            problems.append(f"{m}: no layer assigned (add it to LAYERS in tests/test_layers.py)")
            continue
        edges[m] = set()
        for target, line, lazy in imports_of(m, f, modules):
            edges[m].add(target)
            theirs = layer_of(target)
            where = f"{f.relative_to(root)}:{line}"
            if theirs is not None and theirs > mine:
                problems.append(f"{where}: {m} ({NAMES[mine]}) imports {target} ({NAMES[theirs]}), a higher layer")
            if lazy and m not in LAZY_OK:
                problems.append(f"{where}: {m} imports {target} inside a function (only {sorted(LAZY_OK)} may)")
            if m.startswith(TORCH_FREE) and not lazy and not target.startswith(TORCH_FREE):
                problems.append(f"{where}: torch-free {m} imports {target}")
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if m.startswith(TORCH_FREE) and any(n.split(".")[0] in TORCH_MODULES for n in names) and node.col_offset == 0:
                problems.append(f"{f.relative_to(root)}:{node.lineno}: torch-free {m} imports {names[0]} at module level")
    problems += [f"import cycle: {' -> '.join(c)}" for c in _cycles(edges)]
    return problems


def test_every_import_goes_down_the_layers():
    assert violations(ROOT) == []


def test_the_onnx_runtime_side_loads_without_torch():
    """The torch-free modules import with torch and diffusers made unimportable."""
    names = [m for m in module_files(ROOT) if m.startswith(TORCH_FREE) and m != "ditq.runtime.bench_worker"]
    code = (
        "import sys\n"
        + "".join(f"sys.modules[{t!r}] = None\n" for t in TORCH_MODULES)
        + "".join(f"import {m}\n" for m in names)
        + "assert not [m for m, v in sys.modules.items() if v is not None and m.split('.')[0] in "
        + f"{TORCH_MODULES!r}]\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.fixture()
def tree_copy(tmp_path):
    for folder in PACKAGES:
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    return tmp_path


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_the_checker_reports_an_upward_import(tree_copy):
    _append(tree_copy / "runtime" / "samplers.py", "\nfrom ditq.exporter.trace import bind_modules\n")
    found = violations(tree_copy)
    assert any("runtime/samplers.py" in p and "ditq.exporter.trace (exporter), a higher layer" in p for p in found), found
    assert any("torch-free ditq.runtime.samplers imports ditq.exporter.trace" in p for p in found), found


def test_the_checker_reports_a_function_level_import_and_a_cycle(tree_copy):
    _append(tree_copy / "calib" / "numerics.py", "\ndef _late():\n    from ditq.calib import gptq\n    return gptq\n")
    found = violations(tree_copy)
    assert any("calib/numerics.py" in p and "inside a function" in p for p in found), found
    assert any(p.startswith("import cycle:") and "ditq.calib.gptq" in p and "ditq.calib.numerics" in p for p in found), found


def test_the_checker_reports_torch_in_a_torch_free_module(tree_copy):
    _append(tree_copy / "ditq" / "schedule.py", "\nimport torch\n")
    assert any("torch-free ditq.schedule imports torch at module level" in p for p in violations(tree_copy))


def test_the_checker_reports_a_module_without_a_layer(tree_copy):
    (tree_copy / "ditq" / "newthing.py").write_text("X = 1\n")
    assert any(p.startswith("ditq.newthing: no layer assigned") for p in violations(tree_copy))
