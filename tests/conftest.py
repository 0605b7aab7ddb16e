"""Shared fixtures and helpers: a tiny DiT (seconds to export) and its saved folders, the command line run
in-process, the one-line refusal every bad input must give, and ORT helpers."""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from ditq.cli import main
from ditq.models import build_dit, dit_config

TINY = dict(hidden=64, depth=2, heads=2, sample_size=8, num_classes=10)


def tiny_config(**over):
    c = {**TINY, **over}
    return dit_config(c["hidden"], c["depth"], c["heads"], sample_size=c["sample_size"], num_classes=c["num_classes"])


@pytest.fixture
def tiny_dit():
    return build_dit(tiny_config(), seed=0)


@pytest.fixture
def tiny_folder(tmp_path, tiny_dit):
    """The tiny DiT saved as a diffusers folder in the test's own ``tmp_path`` (``dit/``), as a string."""
    tiny_dit.save_pretrained(tmp_path / "dit")
    return str(tmp_path / "dit")


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    """The tiny DiT (hidden 64, 2 blocks) saved once per test module as a diffusers folder; read-only."""
    folder = tmp_path_factory.mktemp("tiny") / "dit"
    build_dit(tiny_config(), seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def t2i_pipeline(tmp_path_factory):
    """``t2i_pipeline(name)``: the folder of a tiny text-to-image pipeline of tests/t2i_fixtures.py ("sd3",
    "pixart" or "flux"), built and saved on first use, once per session; read-only."""
    from tests.t2i_fixtures import BUILDERS

    built = {}

    def folder(name: str):
        if name not in built:
            built[name] = BUILDERS[name](tmp_path_factory.mktemp(f"t2i-{name}") / name)
        return built[name]

    return folder


def run(argv, capsys):
    """``ditq --quiet argv`` in this process: (exit code, stdout, stderr) of that command alone (what the test
    printed before, e.g. a fixture built on first use, is dropped)."""
    capsys.readouterr()
    code = main(["--quiet", *argv])
    out, err = capsys.readouterr()
    return code, out, err


MAX_REFUSAL = 600  # characters of a refusal: a path or two (tmp paths are ~100) and values cut to ~100


def assert_one_line_refusal(code: int, err: str, *needles: str) -> None:
    """Bad input: exit 2 and exactly one line on stderr, ``ditq: error: ...`` (no traceback, at most
    :data:`MAX_REFUSAL` characters), holding every needle."""
    assert code == 2, (code, err[:2000])
    assert err.startswith("ditq: error: ") and err.endswith("\n") and err.count("\n") == 1, err[:2000]
    assert "Traceback" not in err and len(err) <= MAX_REFUSAL, err[:2000]
    for n in needles:
        assert n in err, err


def assert_no_output(tmp_path) -> None:
    """Nothing written under ``tmp_path``: no ``out`` folder and no staging folder (``.NAME.partial-...``)."""
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def make_model(graph: onnx.GraphProto, opset: int = 21) -> onnx.ModelProto:
    """A model at IR 10 (ONNX Runtime 1.31 reads IR <= 13; onnx 1.23 writes 14 by default)."""
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=10)


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs=None) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(outputs, feeds)


def returns_within(seconds: float, fifo, fn, *args):
    """``fn(*args)``, which must return within ``seconds`` although ``fifo`` (a named pipe) has no writer.
    A call still blocked on the pipe then is released (a writer opens and closes it) and the test fails."""
    box = {}

    def call():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # re-raised in the test's thread
            box["error"] = e

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the blocked reader opens, then reads EOF
        except OSError:
            pass
        t.join(seconds)
        pytest.fail(f"{getattr(fn, '__name__', fn)} blocked on the named pipe {fifo}")
    if "error" in box:
        raise box["error"]
    return box["value"]


def digits_search_argv(journal, out, *, generations: int, mutations: int) -> list[str]:
    """A `ditq search` on digits in a subprocess, small enough to run (and be killed) in a test."""
    return [sys.executable, "-m", "ditq.cli", "--quiet", "search", "--model", "digits", "--abits", "4",
            "--population", "4", "--generations", str(generations), "--top-k", "2", "--crossovers", "2",
            "--mutations", str(mutations), "--num-samples", "20", "--fitness-steps", "3", "--workers", "2",
            "--journal", str(journal), "--out", str(out)]  # fmt: skip


def grid_cells(png, rows: int, cols: int, size: int, label_chars: int = 1) -> np.ndarray:
    """The ``rows x cols`` images of a ``ditq sample`` grid, each ``size`` pixels: [N, size, size, 3] uint8.
    The layout is the grid's own (64-pixel cells, 2-pixel gaps, a label margin of 8 + 7 per character),
    and each cell must be its image scaled up by whole pixels (nearest neighbour)."""
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB"))
    cell, pad, left, k = 64, 2, 8 + 7 * label_chars, 64 // size
    assert img.shape == (pad + rows * (cell + pad), left + pad + cols * (cell + pad), 3)
    out = []
    for r in range(rows):
        for c in range(cols):
            y0, x0 = pad + r * (cell + pad), left + pad + c * (cell + pad)
            tile = img[y0 : y0 + cell, x0 : x0 + cell]
            small = tile[::k, ::k]
            assert np.array_equal(tile, small.repeat(k, 0).repeat(k, 1))
            out.append(small)
    return np.stack(out)
