"""A normal (non-editable) install: ditq built as a wheel and installed into a fresh environment that
cannot see the source tree finds its package data (the shipped digits DiT and the digit judge).

The fresh environment is a venv whose site-packages holds the installed wheel and a ``.pth`` line that
appends this environment's site-packages for the dependencies (torch, onnxruntime, ...). Directories named
by a ``.pth`` line are added to ``sys.path`` without their own ``.pth`` files being run, so the editable
install's import hook of the development environment is not active there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "ditq", "calib", "exporter", "graphs", "runtime")


def _run(cmd, cwd, env=None) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    assert res.returncode == 0, f"{cmd[:3]} exited {res.returncode}:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    return res


def _installed_env(tmp_path: Path) -> tuple[Path, Path]:
    """Build a wheel from a copy of the sources and install it into a fresh venv; returns (python, purelib)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:  # a copy: building writes build/ and *.egg-info next to the sources
        p = REPO / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(p, src / name)
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", src, "-w", wheels], tmp_path)
    (wheel,) = wheels.glob("ditq-*.whl")
    env_dir = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", env_dir], tmp_path)
    python = env_dir / "bin" / "python"
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).stdout.strip())
    (purelib / "_ditq_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel], tmp_path)
    return python, purelib


@pytest.mark.slow  # builds and installs a wheel into a fresh venv: about 20-90 s
def test_wheel_install_samples_and_evaluates_digits_with_the_shipped_judge(tmp_path):
    python, purelib = _installed_env(tmp_path)
    run_dir = tmp_path / "run"  # outside the repository: the working directory adds nothing importable
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    ditq = python.parent / "ditq"  # the console script the wheel installed

    where = _run([python, "-c", "import ditq, ditq.runtime.metrics as m; print(ditq.__file__); print(m.__file__)"], run_dir, env)
    for line in where.stdout.split():
        assert Path(line).is_relative_to(purelib), f"imported {line}, not the installed copy under {purelib}"

    ev = _run([ditq, "--quiet", "eval", "--model", "digits", "--configs", "fp", "--num-samples", "20", "--steps", "5",
               "--exports", "exports"], run_dir, env)  # fmt: skip
    assert "class acc" in ev.stdout, ev.stdout
    fp_row = next(line for line in ev.stdout.splitlines() if line.startswith("fp "))
    assert "%" in fp_row, ev.stdout  # the judge's class accuracy of the float model's samples

    sa = _run([ditq, "--quiet", "sample", "exports/fp", "--per-class", "1", "--steps", "5", "--out", "grid.png"], run_dir, env)
    assert "the digit judge recognises" in sa.stdout, sa.stdout
    assert (run_dir / "grid.png").is_file()
