"""RaiseOpsetForInt2Pass: the opset and IR version a quantized graph is written at.

The float graph is traced at one opset (``DEFAULT_OPSET`` unless the user gave one) and written at the
opset ``ditq.exporter.export.resolve_opset`` chose, which is at least ``INT2_OPSET`` when a layer kept as
standard Q/DQ stores 2-bit codes: INT2/UINT2 tensors exist from opset 25 and IR version 13. The ops traced
at 21 read the same at 25 (only types were added), so the default-domain import is raised in place.
"""

from __future__ import annotations

import onnx

from ditq.fileformat import INT2_IR, INT2_OPSET
from ditq.graphs.passes import GraphPass, PassResult

INT2_TYPES = (onnx.TensorProto.INT2, onnx.TensorProto.UINT2)
DEFAULT_DOMAINS = ("", "ai.onnx")


def default_opset(model: onnx.ModelProto) -> int | None:
    """The version of the default ONNX domain ``model`` imports (None: it imports none)."""
    versions = [o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS]
    return max(versions) if versions else None


def has_int2(model: onnx.ModelProto) -> bool:
    return any(t.data_type in INT2_TYPES for t in model.graph.initializer)


class RaiseOpsetForInt2Pass(GraphPass):
    """Raise the default-domain opset import to ``opset`` and, when the graph holds INT2/UINT2
    initializers, the IR version to ``INT2_IR``; counts the fields raised (0, 1 or 2). Ensures: the
    model imports opset >= ``opset``, and a graph with 2-bit initializers imports opset >= ``INT2_OPSET``
    at IR >= ``INT2_IR`` (``opset`` below that there is a bug of ours: the opset was chosen without the
    2-bit codes the passes stored)."""

    def __init__(self, opset: int):
        self.opset = opset

    def call(self, model: onnx.ModelProto) -> PassResult:
        raised = 0
        for o in model.opset_import:
            if o.domain in DEFAULT_DOMAINS and o.version < self.opset:
                o.version = self.opset
                raised = 1
        if has_int2(model) and model.ir_version < INT2_IR:
            model.ir_version = INT2_IR
            raised += 1
        return PassResult(model, bool(raised), raised)

    def ensures(self, model: onnx.ModelProto) -> str | None:
        opset = default_opset(model)
        if opset is None or opset < self.opset:
            return f"the model imports opset {opset}, expected {self.opset} or later"
        if has_int2(model) and (opset < INT2_OPSET or model.ir_version < INT2_IR):
            return (f"2-bit codes (INT2/UINT2) in a graph at opset {opset}, IR {model.ir_version}; "
                    f"they need opset {INT2_OPSET} and IR {INT2_IR}")  # fmt: skip
        return None
