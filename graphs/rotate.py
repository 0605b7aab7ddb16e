"""InsertRotationPass: RobuQ's online Hadamard rotation of a linear's input, ahead of its quantization.

For a target MatMul reading ``X [..., K]`` with rotation block ``b`` (a power of two dividing ``K``)::

    Xr = Reshape(MatMul(Reshape(X, [-1, K/b, b]), H_b), Shape(X))      H_b = hadamard(b) (normalised)

``H_b`` is stored as its int8 signs behind a DequantizeLinear with scale ``1/sqrt(b)``, which gives the
float32 matrix bit for bit at a quarter of the bytes.

so ``Xr = X H`` with ``H`` block diagonal, the same product :func:`ditq.calib.hadamard.rotate` computes. The
layer's stored weight is already ``W H`` (rotated offline), so the float layer is unchanged. Targets that
read the same tensor with the same block (``to_q``/``to_k``/``to_v``) share one rotation. The activation
quantization pass, run afterwards, quantizes the rotated tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ditq.calib.hadamard import hadamard
from ditq.graphs.passes import GraphPass, PassResult, producers
from ditq.graphs.tensors import META_ROLE, node_meta, rebuild_nodes, tag

ROLE_ROTATE = "rotate"


@dataclass(frozen=True)
class RotationTarget:
    node: str
    module: str
    block: int
    in_features: int


class InsertRotationPass(GraphPass):
    """Rotate the input of every target MatMul; counts the rotations (shared ones once). Ensures: every
    target MatMul reads its input through a rotation whose MatMul multiplies by ``H_b`` of its block."""

    def __init__(self, targets: list[RotationTarget]):
        self.targets = {t.node: t for t in targets}

    def call(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        nodes = {n.name: n for n in graph.node}
        have = {t.name for t in graph.initializer}
        consts: dict[str, TensorProto] = {}
        hnodes: dict[str, onnx.NodeProto] = {}  # one DequantizeLinear per Hadamard size
        before: dict[str, list] = {}
        shared: dict[tuple, str] = {}
        order = {n.name: i for i, n in enumerate(graph.node)}
        for name in sorted(self.targets, key=lambda n: order.get(n, -1)):
            t = self.targets[name]
            node = nodes.get(name)
            if node is None or node.op_type != "MatMul":
                raise ValueError(f"cannot rotate the input of {t.module}: node {name!r} is not a MatMul of this graph")
            k, b = t.in_features, t.block
            if k % b or b & (b - 1):
                raise ValueError(f"{t.module}: rotation block {b} is not a power of two dividing {k}")
            key = (node.input[0], b)
            if key not in shared:
                h, shp = f"ditq/const/hadamard_{b}", f"ditq/const/shape_rot_{k}_{b}"
                if h not in hnodes:  # stored as int8 signs times one scale: exactly hadamard(b), a quarter the bytes
                    signs = np.sign(hadamard(b, torch.float64).numpy()).astype(np.int8)
                    consts[h + "_signs"] = numpy_helper.from_array(signs, h + "_signs")
                    consts[h + "_scale"] = numpy_helper.from_array(np.float32(1.0 / math.sqrt(b)), h + "_scale")
                    hnodes[h] = helper.make_node("DequantizeLinear", [h + "_signs", h + "_scale"], [h], name=h)
                if shp not in consts:
                    consts[shp] = helper.make_tensor(shp, TensorProto.INT64, [3], [-1, k // b, b])
                p = f"{t.module}/rotate"
                sub = [
                    helper.make_node("Shape", [node.input[0]], [f"{p}/shape"], name=f"{p}/shape"),
                    helper.make_node("Reshape", [node.input[0], shp], [f"{p}/blocks"], name=f"{p}/blocks"),
                    helper.make_node("MatMul", [f"{p}/blocks", h], [f"{p}/hadamard"], name=f"{p}/hadamard"),
                    helper.make_node("Reshape", [f"{p}/hadamard", f"{p}/shape"], [f"{p}/out"], name=f"{p}/out"),
                ]
                before[name] = [tag(n, t.module, ROLE_ROTATE) for n in sub]
                shared[key] = f"{p}/out"
            node.input[0] = shared[key]
        rebuild_nodes(graph, before, {})
        if hnodes:  # the Hadamard constants go first: every rotation may read them
            rest = list(graph.node)
            del graph.node[:]
            graph.node.extend(list(hnodes.values()) + rest)
        graph.initializer.extend(c for n, c in consts.items() if n not in have)
        return PassResult(model, bool(self.targets), len(shared))

    def ensures(self, model: onnx.ModelProto) -> str | None:
        nodes = {n.name: n for n in model.graph.node}
        made = producers(model.graph)
        for name, t in self.targets.items():
            out = made.get(nodes[name].input[0]) if name in nodes else None
            mm = made.get(out.input[0]) if out is not None and node_meta(out).get(META_ROLE) == ROLE_ROTATE else None
            if mm is None or mm.op_type != "MatMul" or mm.input[1] != f"ditq/const/hadamard_{t.block}":
                return f"{t.module}: its MatMul does not read its input rotated by hadamard({t.block})"
        return None
