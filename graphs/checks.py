"""Structural checks of an exported model against the layer plan it was built from.

Each check returns a list of failure strings (empty = pass), naming the module and what is wrong:

- ``check_weights``: every covered layer has exactly one weight DequantizeLinear whose codes have the
  recipe's container type (INT4/UINT4 for <= 4 bits, INT8/UINT8 above), its block size and axis, scales
  of shape ``[K/g, N]`` (tables: ``[V, D/g]``), and codes inside the ``b``-bit range;
- ``check_activations``: every activation-quantized layer reads its input through a QuantizeLinear ->
  DequantizeLinear pair with the recipe's block size whose scale and zero point are computed in the graph
  from that activation (their producers reach a ReduceMin/ReduceMax), never a stored constant.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import onnx
from onnx import numpy_helper

from ditq.calib.numerics import QuantizedTensor, qrange
from ditq.graphs.quant_weights import stored_codes
from ditq.graphs.lower_ort import ACT_QDQ_KERNELS, KERNEL_QDQ, ROLE_KERNEL
from ditq.graphs.tensors import META_ROLE, ROLE_ACT_QUANT, ROLE_WEIGHT_DQ, ROLE_WEIGHT_GATHER, attrs, code_type, node_meta, nodes_by_module
from ditq.recipe import LayerPlan


def weight_sources(graph: onnx.GraphProto) -> dict[str, str]:
    """Output of each row Gather of a gather-first embedding table -> the initializer it gathers from."""
    return {n.output[0]: n.input[0] for n in graph.node if node_meta(n).get(META_ROLE) == ROLE_WEIGHT_GATHER}


def weight_inputs(dq: onnx.NodeProto, sources: dict[str, str]) -> list[str]:
    """The initializer names behind a weight DequantizeLinear's inputs (``sources``: :func:`weight_sources`)."""
    return [sources.get(i, i) for i in dq.input]


def check_weights(model: onnx.ModelProto, plans: dict[str, LayerPlan]) -> list[str]:
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    dqs = nodes_by_module(graph, ROLE_WEIGHT_DQ)
    sources = weight_sources(graph)
    fails = []
    for name, plan in plans.items():
        if plan.kernel != KERNEL_QDQ:  # lowered to an ORT kernel: lower_ort.read_kernel_weights checks it
            continue
        nodes = dqs.get(name, [])
        if len(nodes) != 1:
            fails.append(f"{name}: expected 1 weight DequantizeLinear, found {len(nodes)}")
            continue
        dq = nodes[0]
        q = plan.quant
        dq_in = weight_inputs(dq, sources)
        codes = inits.get(dq_in[0])
        scale = inits.get(dq_in[1])
        if codes is None or scale is None:
            fails.append(f"{name}: weight codes or scales are not initializers")
            continue
        a = attrs(dq)
        table = plan.kind == "embedding"
        want_shape = (plan.out_features, plan.in_features) if table else (plan.in_features, plan.out_features)
        want_scale = (plan.out_features, plan.in_features // plan.group_size) if table else (plan.in_features // plan.group_size, plan.out_features)
        want_type = code_type(q.code_bits, q.symmetric)
        if codes.data_type != want_type:
            fails.append(f"{name}: codes are {onnx.TensorProto.DataType.Name(codes.data_type)}, recipe needs {onnx.TensorProto.DataType.Name(want_type)}")
        if a.get("block_size") != plan.group_size or a.get("axis", 1) not in ((1, -1) if table else (0,)):
            fails.append(f"{name}: block_size={a.get('block_size')} axis={a.get('axis', 1)}, recipe needs block_size={plan.group_size} axis={1 if table else 0}")
        if tuple(codes.dims) != want_shape or tuple(scale.dims) != want_scale:
            fails.append(f"{name}: codes {tuple(codes.dims)} / scales {tuple(scale.dims)}, expected {want_shape} / {want_scale}")
        if not q.symmetric and (len(dq_in) < 3 or dq_in[2] not in inits):
            fails.append(f"{name}: asymmetric weight without a stored zero point")
        if codes.data_type == want_type and codes.raw_data:
            c = stored_codes(codes)
            lo, hi = qrange(q.code_bits, q.symmetric)
            if c.size and (int(c.min()) < lo or int(c.max()) > hi):
                fails.append(f"{name}: codes outside the {q.code_bits}-bit range [{lo}, {hi}]")
    return fails


def activation_qdq_layers(plans: dict[str, LayerPlan]) -> list[str]:
    """The layers whose input activation is quantized by an in-graph Q/DQ: what :func:`check_activations`
    checks (the int8 kernels' per-token quantizers are proven by ``ditq validate``'s code probe)."""
    return [n for n, p in plans.items() if p.abits is not None and p.kernel in ACT_QDQ_KERNELS]


def check_activations(model: onnx.ModelProto, plans: dict[str, LayerPlan]) -> list[str]:
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    dqs = nodes_by_module(graph, ROLE_WEIGHT_DQ)
    fails = []
    kernels = nodes_by_module(graph, ROLE_KERNEL)
    for name in activation_qdq_layers(plans):
        plan = plans[name]
        if plan.kernel == KERNEL_QDQ:
            dq_w = dqs.get(name, [])
            mm = [c for d in dq_w for c in consumers.get(d.output[0], []) if c.op_type == "MatMul"]
        else:  # the recipe's Q/DQ feeding a MatMulNBits
            mm = [n for n in kernels.get(name, []) if n.op_type == "MatMulNBits"]
        if len(mm) != 1:
            fails.append(f"{name}: cannot find the MatMul reading its quantized weight")
            continue
        # walk back from the MatMul's activation input through the act_quant subgraph
        ql, seen, todo = None, set(), deque([mm[0].input[0]])
        while todo:
            t = todo.popleft()
            n = producer.get(t)
            if n is None or n.name in seen or node_meta(n).get(META_ROLE) != ROLE_ACT_QUANT:
                continue
            seen.add(n.name)
            if n.op_type == "QuantizeLinear":
                ql = n
                break
            todo.extend(n.input)
        if ql is None:
            fails.append(f"{name}: its input is not quantized (no QuantizeLinear in front of its MatMul)")
            continue
        if attrs(ql).get("block_size") != plan.activation_group:
            fails.append(f"{name}: activation block_size {attrs(ql).get('block_size')}, recipe needs {plan.activation_group}")
        for role, t in zip(("scale", "zero point"), ql.input[1:3]):
            if t in inits or (producer.get(t) is not None and producer[t].op_type == "Constant"):
                fails.append(f"{name}: activation {role} is a stored constant, not computed at run time")
            elif not _reaches_reduce(t, producer):
                fails.append(f"{name}: activation {role} is not computed from the activation's min/max")
    return fails


def _reaches_reduce(tensor: str, producer: dict[str, onnx.NodeProto]) -> bool:
    seen, todo = set(), deque([tensor])
    while todo:
        n = producer.get(todo.popleft())
        if n is None or n.name in seen:
            continue
        seen.add(n.name)
        if n.op_type in ("ReduceMin", "ReduceMax"):
            return True
        todo.extend(n.input)
    return False


def check_codes_equal(model: onnx.ModelProto, plans: dict[str, LayerPlan], expected: dict[str, QuantizedTensor]) -> list[str]:
    """Stored weight codes and scales equal ``expected[name]`` exactly, element for element."""
    inits = {t.name: t for t in model.graph.initializer}
    dqs = nodes_by_module(model.graph, ROLE_WEIGHT_DQ)
    sources = weight_sources(model.graph)
    fails = []
    for name, qt in expected.items():
        if plans[name].kernel != KERNEL_QDQ:
            continue
        nodes = dqs.get(name)
        dq_in = weight_inputs(nodes[0], sources) if nodes else []
        if not nodes or dq_in[0] not in inits:
            continue  # reported by check_weights
        codes = stored_codes(inits[dq_in[0]]).astype(np.int16)
        scale = numpy_helper.to_array(inits[dq_in[1]])
        want = qt.codes.numpy()
        want_scale = qt.scale.numpy()
        if plans[name].kind == "linear":  # linears are stored transposed, [K, N]
            want, want_scale = want.T, want_scale.T
        if codes.shape != want.shape or not np.array_equal(codes, want):
            bad = int((codes != want).sum()) if codes.shape == want.shape else -1
            fails.append(f"{name}: stored weight codes differ from the reference's ({bad} of {want.size})")
        elif not np.array_equal(scale, want_scale):
            fails.append(f"{name}: stored weight scales differ from the reference's")
    return fails


def weights_from_graph(model: onnx.ModelProto, plans: dict[str, LayerPlan]) -> dict[str, QuantizedTensor]:
    """The integer weights a model stores, read back per covered module (``[N, K]`` layout, like RTN's).

    Used to build the reference of weights that cannot be recomputed from the float model alone (GPTQ
    depends on calibration data); :func:`check_weights` must pass first."""
    import torch

    inits = {t.name: t for t in model.graph.initializer}
    dqs = nodes_by_module(model.graph, ROLE_WEIGHT_DQ)
    out = {}
    sources = weight_sources(model.graph)
    for name, plan in plans.items():
        if plan.kernel != KERNEL_QDQ:
            continue
        dq_in = weight_inputs(dqs[name][0], sources)
        codes = stored_codes(inits[dq_in[0]]).astype(np.int16)
        scale = numpy_helper.to_array(inits[dq_in[1]]).astype(np.float32)
        zero = (
            stored_codes(inits[dq_in[2]]).astype(np.int16)
            if len(dq_in) > 2 and dq_in[2]
            else np.zeros_like(scale, np.int16)
        )
        if plan.kind == "linear":
            codes, scale, zero = codes.T, scale.T, zero.T
        q = plan.quant
        out[name] = QuantizedTensor(
            torch.from_numpy(np.ascontiguousarray(codes)), torch.from_numpy(np.ascontiguousarray(scale)),
            torch.from_numpy(np.ascontiguousarray(zero)), q.code_bits, plan.group_size, q.symmetric,
        )  # fmt: skip
    return out


def check_same_weights(got: dict[str, QuantizedTensor], expected: dict[str, QuantizedTensor]) -> list[str]:
    """Read-back weights equal ``expected``: codes, scales and zero points, element for element."""
    fails = []
    for name, g in got.items():
        w = expected[name]
        if g.codes.shape != w.codes.shape or not torch_equal(g.codes, w.codes):
            fails.append(f"{name}: stored weight codes differ from the reference's")
        elif not torch_equal(g.scale, w.scale) or not torch_equal(g.zero, w.zero):
            fails.append(f"{name}: stored weight scales or zero points differ from the reference's")
    return fails


def torch_equal(a, b) -> bool:
    return tuple(a.shape) == tuple(b.shape) and np.array_equal(np.asarray(a), np.asarray(b))
