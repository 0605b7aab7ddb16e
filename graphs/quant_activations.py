"""InsertActivationQDQPass: dynamic per-token, per-group activation quantization in front of a MatMul.

For the input ``X [..., K]`` of a target MatMul, with ``b`` bits and groups of ``g`` channels, the
inserted subgraph computes Q-DiT's sample-wise dynamic quantization at run time (nothing calibrated)::

    X2 = Reshape(X, [-1, K]);  Xg = Reshape(X2, [-1, K/g, g])
    asymmetric:  lo = Min(ReduceMin(Xg, axis 2), 0);  hi = Max(ReduceMax(Xg, axis 2), 0)
                 s  = Max((hi - lo) / (2^b - 1), EPS);  z = Cast(Round(-lo / s), uint8)
    symmetric:   s  = Max(Max(|ReduceMin(Xg)|, |ReduceMax(Xg)|) / (2^(b-1) - 1), EPS);  z = 0 (int8)
    Q  = QuantizeLinear(X2, s, z, axis=1, block_size=g)     [Clip to the b-bit range when b < 8 or signed]
    Y  = Reshape(DequantizeLinear(Q, s, z, axis=1, block_size=g), Shape(X))

the same operations, in the same order, as :func:`ditq.calib.numerics.fake_quantize`. Targets that read
the same tensor with the same configuration (diffusers' ``to_q``/``to_k``/``to_v``) share one subgraph.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

from ditq.calib.numerics import EPS, qrange
from ditq.graphs.passes import GraphPass, PassResult, producers
from ditq.graphs.tensors import META_ROLE, ROLE_ACT_QUANT, attrs, node_meta, rebuild_nodes, scalar, tag

_SHARED = "ditq/const"  # prefix of the scalar constants the subgraphs share


@dataclass(frozen=True)
class ActivationTarget:
    """Quantize the activation input (input 0) of MatMul ``node``, which belongs to torch ``module``."""

    node: str
    module: str
    bits: int
    group_size: int
    in_features: int
    symmetric: bool = False


class InsertActivationQDQPass(GraphPass):
    """Insert the dynamic activation quantization subgraph before every target MatMul; counts the
    subgraphs (shared ones once). Ensures: every target MatMul reads its input through the subgraph, whose
    QuantizeLinear quantizes in blocks of the target's group size."""

    def __init__(self, targets: list[ActivationTarget]):
        self.targets = {t.node: t for t in targets}

    def call(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        nodes = {n.name: n for n in graph.node}
        order = {n.name: i for i, n in enumerate(graph.node)}
        have = {t.name for t in graph.initializer}
        consts: dict[str, TensorProto] = {}
        before: dict[str, list] = {}
        shared: dict[tuple, str] = {}  # (input, bits, g, sym) -> dequantized output
        for name in sorted(self.targets, key=lambda n: order.get(n, -1)):
            t = self.targets[name]
            node = nodes.get(name)
            if node is None or node.op_type != "MatMul":
                raise ValueError(f"cannot quantize the input of {t.module}: node {name!r} is not a MatMul of this graph")
            if t.in_features % t.group_size:
                raise ValueError(f"{t.module}: group size {t.group_size} does not divide the input width {t.in_features}")
            key = (node.input[0], t.bits, t.group_size, t.in_features, t.symmetric)
            if key not in shared:
                out, sub = self._subgraph(node.input[0], t, consts)
                before[name] = sub
                shared[key] = out
            node.input[0] = shared[key]
        rebuild_nodes(graph, before, {})
        graph.initializer.extend(c for n, c in consts.items() if n not in have)
        return PassResult(model, bool(self.targets), len(shared))

    def ensures(self, model: onnx.ModelProto) -> str | None:
        graph = model.graph
        nodes = {n.name: n for n in graph.node}
        made = producers(graph)
        for name, t in self.targets.items():
            node = nodes.get(name)
            ql, seen, todo = None, set(), [node.input[0]] if node is not None else []
            while todo and ql is None:  # back from the MatMul's input through the subgraph's own nodes
                n = made.get(todo.pop())
                if n is None or n.name in seen or node_meta(n).get(META_ROLE) != ROLE_ACT_QUANT:
                    continue
                seen.add(n.name)
                ql = n if n.op_type == "QuantizeLinear" else None
                todo.extend(n.input)
            if ql is None:
                return f"{t.module}: its MatMul does not read its input through an activation QuantizeLinear"
            if attrs(ql).get("block_size") != t.group_size:
                return f"{t.module}: activation block_size {attrs(ql).get('block_size')}, expected {t.group_size}"
        return None

    @staticmethod
    def _subgraph(x: str, t: ActivationTarget, consts: dict[str, TensorProto]) -> tuple[str, list]:
        k, g, b = t.in_features, t.group_size, t.bits
        lo, hi = qrange(b, t.symmetric)
        p = f"{t.module}/act_quant"

        def const(name: str, value, dtype=TensorProto.FLOAT, shape=None) -> str:
            full = f"{_SHARED}/{name}"
            if full not in consts:
                consts[full] = (
                    helper.make_tensor(full, dtype, shape, value) if shape is not None else scalar(full, value, dtype)
                )
            return full

        nodes = []

        def op(op_type: str, inputs: list[str], out: str, **attrs) -> str:
            nodes.append(tag(helper.make_node(op_type, inputs, [f"{p}/{out}"], name=f"{p}/{out}", **attrs), t.module, ROLE_ACT_QUANT))
            return f"{p}/{out}"

        shape = op("Shape", [x], "shape")
        x2 = op("Reshape", [x, const(f"shape_m_{k}", [-1, k], TensorProto.INT64, [2])], "tokens")
        xg = op("Reshape", [x2, const(f"shape_g_{k}_{g}", [-1, k // g, g], TensorProto.INT64, [3])], "groups")
        axis = const("axis_last", [2], TensorProto.INT64, [1])
        mn = op("ReduceMin", [xg, axis], "group_min", keepdims=0)
        mx = op("ReduceMax", [xg, axis], "group_max", keepdims=0)
        qattrs = {"axis": 1, "block_size": g}
        if t.symmetric:
            amax = op("Max", [op("Abs", [mn], "abs_min"), op("Abs", [mx], "abs_max")], "absmax")
            s = op("Max", [op("Div", [amax, const(f"qmax_{hi}", float(hi))], "scale_raw"), const("eps", EPS)], "scale")
            q = op("QuantizeLinear", [x2, s], "codes", output_dtype=TensorProto.INT8, **qattrs)
            q = op("Clip", [q, const(f"i8_{lo}", lo, TensorProto.INT8), const(f"i8_{hi}", hi, TensorProto.INT8)], "codes_clip")
            dq = op("DequantizeLinear", [q, s], "dequant", **qattrs)
        else:
            zero = const("zero", 0.0)
            mn = op("Min", [mn, zero], "lo")
            mx = op("Max", [mx, zero], "hi")
            s_raw = op("Div", [op("Sub", [mx, mn], "range"), const(f"qmax_{hi}", float(hi))], "scale_raw")
            s = op("Max", [s_raw, const("eps", EPS)], "scale")
            z = op("Cast", [op("Round", [op("Div", [op("Neg", [mn], "neg_lo"), s], "zero_raw")], "zero_round")], "zero_point", to=TensorProto.UINT8)
            q = op("QuantizeLinear", [x2, s, z], "codes", **qattrs)
            if b < 8:
                q = op("Clip", [q, const(f"u8_{lo}", lo, TensorProto.UINT8), const(f"u8_{hi}", hi, TensorProto.UINT8)], "codes_clip")
            dq = op("DequantizeLinear", [q, s, z], "dequant", **qattrs)
        out = op("Reshape", [dq, shape], "out")
        return out, nodes
