"""Low-bit ONNX tensors and small graph helpers shared by the passes.

Container types for ``b``-bit codes (``qdq`` target): ``b <= 2`` -> INT2/UINT2 (four codes per byte; the
model is then written at opset 25, IR 13), ``b <= 4`` -> INT4/UINT4 (two codes per byte),
``5 <= b <= 8`` -> INT8/UINT8 (one code per byte); signed for symmetric, unsigned for asymmetric.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from ditq.calib.numerics import pack_2bit_u8, pack_4bit_u8, qrange

# metadata_props keys the passes put on the nodes they insert: which torch module, which role.
META_MODULE = "ditq.module"
META_ROLE = "ditq.role"
ROLE_WEIGHT_DQ = "weight_dq"
ROLE_WEIGHT_GATHER = "weight_gather"  # Gather of table codes/scales/zero points ahead of their DequantizeLinear
ROLE_ACT_QUANT = "act_quant"


def code_type(bits: int, symmetric: bool) -> int:
    """ONNX element type that stores ``bits``-bit codes (2-bit: INT2/UINT2, opset 25 and IR 13)."""
    if bits <= 2:
        return TensorProto.INT2 if symmetric else TensorProto.UINT2
    if bits <= 4:
        return TensorProto.INT4 if symmetric else TensorProto.UINT4
    return TensorProto.INT8 if symmetric else TensorProto.UINT8


def code_tensor(name: str, codes: np.ndarray, bits: int, symmetric: bool) -> TensorProto:
    """An integer-code initializer (packed for 4-bit containers) with the given shape."""
    codes = np.asarray(codes)
    lo, hi = qrange(bits, symmetric)
    if codes.size and (codes.min() < lo or codes.max() > hi):
        raise ValueError(f"{name}: codes outside the {bits}-bit range [{lo}, {hi}]")
    dtype = code_type(bits, symmetric)
    t = TensorProto()
    t.name = name
    t.data_type = dtype
    t.dims.extend(codes.shape)
    if dtype in (TensorProto.INT2, TensorProto.UINT2):
        t.raw_data = pack_2bit_u8(codes).tobytes()
    elif dtype in (TensorProto.INT4, TensorProto.UINT4):
        t.raw_data = pack_4bit_u8(codes).tobytes()
    else:
        t.raw_data = codes.astype(np.int8 if symmetric else np.uint8).tobytes()
    return t


def float_tensor(name: str, values: np.ndarray) -> TensorProto:
    return onnx.numpy_helper.from_array(np.ascontiguousarray(values, dtype=np.float32), name)


def scalar(name: str, value, dtype: int) -> TensorProto:
    return helper.make_tensor(name, dtype, [], [value])


def tag(node: onnx.NodeProto, module: str, role: str) -> onnx.NodeProto:
    """Record on ``node`` which module it quantizes and its role (read by the structural checks)."""
    for key, value in ((META_MODULE, module), (META_ROLE, role)):
        p = node.metadata_props.add()
        p.key, p.value = key, value
    return node


def attrs(node: onnx.NodeProto) -> dict:
    """A node's attributes as plain Python values."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def node_meta(node: onnx.NodeProto) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def nodes_by_module(graph: onnx.GraphProto, role: str) -> dict[str, list[onnx.NodeProto]]:
    """The nodes a pass inserted with ``role``, grouped by the torch module they belong to."""
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        m = node_meta(n)
        if m.get(META_ROLE) == role:
            out.setdefault(m[META_MODULE], []).append(n)
    return out


def rebuild_nodes(graph: onnx.GraphProto, before: dict[str, list], replace: dict[str, list]) -> None:
    """Rewrite ``graph.node`` in order: ``before[name]`` is emitted just ahead of node ``name`` and
    ``replace[name]`` (if present) in its place. Keeps the graph topologically sorted when the
    inserted nodes read only tensors defined before that node."""
    new = []
    for node in graph.node:
        new.extend(before.get(node.name, ()))
        new.extend(replace.get(node.name, [node]))
    del graph.node[:]
    graph.node.extend(new)


def remove_unused_initializers(graph: onnx.GraphProto) -> int:
    """Drop initializers no node or graph output reads, in place (the others are not copied: see
    :mod:`ditq.graphs.external`); returns how many were removed."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for n in graph.node:  # subgraphs (If/Loop) may read outer initializers
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                used |= {i for sn in a.g.node for i in sn.input}
    unused = [i for i, t in enumerate(graph.initializer) if t.name not in used]
    for i in reversed(unused):
        del graph.initializer[i]
    return len(unused)
