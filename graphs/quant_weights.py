"""StoreQuantizedWeightsPass: float weight initializers -> low-bit codes behind blocked DequantizeLinear.

For a linear with float weight ``W [N, K]`` and per-row, per-group codes ``Q [N, K]``, scales
``S [N, K/g]`` and zero points ``Z [N, K/g]`` (``W ~ (Q - Z) * S``, groups of ``g`` along ``K``):

    MatMul(X, W^T)            ->  MatMul(X, DequantizeLinear(Q^T, S^T, Z^T, axis=0, block_size=g))
    Gemm(X, W, b, transB=1)   ->  Add(MatMul(X, DequantizeLinear(Q^T, ...)), b)

The weight is stored transposed, ``[K, N]``, blocked along axis 0: the layout ONNX Runtime fuses with
MatMul into ``MatMulNBits`` (a Gemm with an ``[N, K]`` DequantizeLinear is never fused). Embedding
tables ``T [V, D]`` become ``Gather(DequantizeLinear(Q, S, Z, axis=1, block_size=g), ids)``; with 8-bit
containers (ONNX Runtime's Gather takes no 4-bit types) the rows are gathered first,
``DequantizeLinear(Gather(Q, ids), Gather(S, ids), Gather(Z, ids), axis=-1)``, the same values without
dequantizing the whole table at every forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from ditq.calib.numerics import QuantizedTensor, unpack_2bit_u8, unpack_4bit_u8
from ditq.graphs.passes import GraphPass, PassResult, consumers
from ditq.graphs.tensors import (
    META_ROLE,
    ROLE_WEIGHT_DQ,
    ROLE_WEIGHT_GATHER,
    attrs,
    code_tensor,
    code_type,
    float_tensor,
    node_meta,
    nodes_by_module,
    rebuild_nodes,
    remove_unused_initializers,
    tag,
)


@dataclass(frozen=True)
class WeightTarget:
    """Quantize the weight that node ``node`` reads, belonging to torch module ``module``."""

    node: str
    module: str
    weight: QuantizedTensor


class StoreQuantizedWeightsPass(GraphPass):
    """Replace each target's float weight with integer codes behind a blocked DequantizeLinear; counts
    the weights stored. Ensures: every target module has one weight DequantizeLinear, whose codes are an
    initializer of the module's code type and stored shape and whose output is read (by the MatMul or
    Gather that read the float weight; a gather-first table's rows by the table's readers)."""

    def __init__(self, targets: list[WeightTarget]):
        self.targets = {t.node: t for t in targets}

    def check(self, node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], target: WeightTarget) -> str | None:
        """Why ``node`` can't be rewritten, or None."""
        n, k = target.weight.shape
        if node.op_type == "MatMul":
            w = inits.get(node.input[1])
            if w is None:
                return "weight is not a constant initializer"
            if tuple(w.dims) != (k, n):
                return f"weight shape {tuple(w.dims)} is not [K, N] = {(k, n)}"
        elif node.op_type == "Gemm":
            a = attrs(node)
            if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0:
                return "Gemm with transA, alpha or beta is not a plain linear"
            w = inits.get(node.input[1])
            want = (n, k) if a.get("transB", 0) else (k, n)
            if w is None:
                return "weight is not a constant initializer"
            if tuple(w.dims) != want:
                return f"weight shape {tuple(w.dims)} is not {want}"
        elif node.op_type == "Gather":
            w = inits.get(node.input[0])
            if w is None or attrs(node).get("axis", 0) != 0:
                return "table is not a constant initializer gathered along axis 0"
            if tuple(w.dims) != (n, k):
                return f"table shape {tuple(w.dims)} is not {(n, k)}"
        else:
            return f"op {node.op_type} is not MatMul, Gemm or Gather"
        return None

    def call(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        nodes = {n.name: n for n in graph.node}
        missing = set(self.targets) - set(nodes)
        if missing:
            raise ValueError(f"nodes not in the graph: {sorted(missing)[:5]}")
        before: dict[str, list] = {}
        replace: dict[str, list] = {}
        for name, target in self.targets.items():
            node = nodes[name]
            reason = self.check(node, inits, target)
            if reason:
                raise ValueError(f"cannot quantize the weight of {target.module} (node {name}): {reason}")
            qt, mod = target.weight, target.module
            table = node.op_type == "Gather"
            # linear: stored [K, N] blocked along axis 0; table: stored [V, D] blocked along axis 1
            codes = qt.codes.numpy() if table else qt.codes.numpy().T
            scale = qt.scale.numpy() if table else qt.scale.numpy().T
            zero = qt.zero.numpy() if table else qt.zero.numpy().T
            names = [f"{mod}.qweight", f"{mod}.qscale"]
            # appended as made, so that the graph holds the only copy of the codes (ditq.graphs.tensors)
            graph.initializer.append(code_tensor(names[0], codes, qt.bits, qt.symmetric))
            graph.initializer.append(float_tensor(names[1], scale))
            if not qt.symmetric:
                names.append(f"{mod}.qzero")
                graph.initializer.append(code_tensor(names[2], zero, qt.bits, False))
            dq_out = f"{mod}.weight_dq"
            if table and qt.bits > 4:  # gather the rows' codes and scales first, dequantize only those rows
                ids = node.input[1]
                gathered = []
                for n_ in names:
                    g = helper.make_node("Gather", [n_, ids], [f"{n_}_rows"], name=f"{mod}/gather_{n_.rsplit('.', 1)[-1]}", axis=0)
                    gathered.append(tag(g, mod, ROLE_WEIGHT_GATHER))
                dq = helper.make_node(
                    "DequantizeLinear", [g.output[0] for g in gathered], [node.output[0]], name=f"{mod}/weight_dq",
                    axis=-1, block_size=qt.group_size,
                )  # fmt: skip
                replace[name] = gathered + [tag(dq, mod, ROLE_WEIGHT_DQ)]
                continue
            dq = helper.make_node(
                "DequantizeLinear", names, [dq_out], name=f"{mod}/weight_dq",
                axis=1 if table else 0, block_size=qt.group_size,
            )  # fmt: skip
            before[name] = [tag(dq, mod, ROLE_WEIGHT_DQ)]
            if node.op_type == "Gather":
                node.input[0] = dq_out
            elif node.op_type == "MatMul":
                node.input[1] = dq_out
            else:  # Gemm -> MatMul (+ Add bias)
                has_bias = len(node.input) > 2 and node.input[2]
                mm_out = f"{node.output[0]}/matmul" if has_bias else node.output[0]
                mm = helper.make_node("MatMul", [node.input[0], dq_out], [mm_out], name=node.name)
                mm.metadata_props.extend(node.metadata_props)
                replace[name] = [mm]
                if has_bias:
                    add = helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=f"{node.name}/bias")
                    add.metadata_props.extend(node.metadata_props)
                    replace[name].append(add)
        rebuild_nodes(graph, before, replace)
        remove_unused_initializers(graph)
        return PassResult(model, bool(self.targets), len(self.targets))

    def ensures(self, model: onnx.ModelProto) -> str | None:
        graph = model.graph
        inits = {t.name: t for t in graph.initializer}
        dqs = nodes_by_module(graph, ROLE_WEIGHT_DQ)
        gathered = {n.output[0]: n.input[0] for n in graph.node if node_meta(n).get(META_ROLE) == ROLE_WEIGHT_GATHER}
        readers = consumers(graph)
        outputs = {o.name for o in graph.output}
        for t in self.targets.values():
            found = dqs.get(t.module, [])
            if len(found) != 1:
                return f"{t.module}: {len(found)} weight DequantizeLinear nodes, expected 1"
            dq, qt = found[0], t.weight
            codes = inits.get(gathered.get(dq.input[0], dq.input[0]))
            n, k = qt.shape
            table = dq.input[0] in gathered or attrs(dq).get("axis") == 1
            shape = (n, k) if table else (k, n)
            if codes is None or codes.data_type != code_type(qt.bits, qt.symmetric) or tuple(codes.dims) != shape:
                return f"{t.module}: the weight DequantizeLinear does not read {shape} codes of its code type"
            users = readers.get(dq.output[0], [])
            if dq.input[0] in gathered:  # gather-first: the DequantizeLinear writes the Gather's output
                if not users and dq.output[0] not in outputs:
                    return f"{t.module}: the dequantized table rows are not read"
            elif not any((u.op_type == "MatMul" and u.input[1] == dq.output[0]) or (u.op_type == "Gather" and u.input[0] == dq.output[0]) for u in users):
                return f"{t.module}: no MatMul or Gather reads the dequantized weight"
        return None


def fusable_weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """Modules whose stored weight ``DequantizeLinear`` feeds a MatMul's weight input: the pattern ONNX
    Runtime fuses into ``MatMulNBits`` (when the activation side has no Q/DQ), whose default accuracy
    level then quantizes the activations to int8 (see :mod:`ditq.runtime.session`)."""
    matmul_weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
    return sorted(m for m, nodes in nodes_by_module(model.graph, ROLE_WEIGHT_DQ).items() if any(d.output[0] in matmul_weights for d in nodes))


def stored_codes(t: onnx.TensorProto) -> np.ndarray:
    """Integer codes of an initializer written by this pass (unpacked, in its stored layout)."""
    count = int(np.prod(t.dims)) if len(t.dims) else 1
    if t.data_type in (TensorProto.INT2, TensorProto.UINT2):
        flat = unpack_2bit_u8(np.frombuffer(t.raw_data, np.uint8), count, signed=t.data_type == TensorProto.INT2)
    elif t.data_type in (TensorProto.INT4, TensorProto.UINT4):
        flat = unpack_4bit_u8(np.frombuffer(t.raw_data, np.uint8), count, signed=t.data_type == TensorProto.INT4)
    elif t.data_type in (TensorProto.INT8, TensorProto.UINT8):
        flat = np.frombuffer(t.raw_data, np.int8 if t.data_type == TensorProto.INT8 else np.uint8)[:count]
    else:
        raise ValueError(f"{t.name}: not an integer-code tensor")
    return flat.reshape(tuple(t.dims))
