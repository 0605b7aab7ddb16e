"""Shared fixtures: a tiny DiT (seconds to export) and ORT helpers."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from ditq.models import build_dit, dit_config

TINY = dict(hidden=64, depth=2, heads=2, sample_size=8, num_classes=10)


def tiny_config(**over):
    c = {**TINY, **over}
    return dit_config(c["hidden"], c["depth"], c["heads"], sample_size=c["sample_size"], num_classes=c["num_classes"])


@pytest.fixture
def tiny_dit():
    return build_dit(tiny_config(), seed=0)


def make_model(graph: onnx.GraphProto, opset: int = 21) -> onnx.ModelProto:
    """A model at IR 10 (ONNX Runtime 1.31 reads IR <= 13; onnx 1.23 writes 14 by default)."""
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=10)


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs=None) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(outputs, feeds)
