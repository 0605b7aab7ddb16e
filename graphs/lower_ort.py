"""Target ``ort``: lower quantized linears to ONNX Runtime kernels that compute in low bit.

The portable ``qdq`` graph spells Q-DiT's arithmetic with standard QuantizeLinear/DequantizeLinear, and
ONNX Runtime runs it in fp32 (slower than float: the per-group activation Q/DQ blocks every fused
kernel). ``ort`` chooses, per layer, a kernel that runs the matrix product in integers:

| layer (effective recipe)                   | kernel                                     | input activation          |
|--------------------------------------------|--------------------------------------------|---------------------------|
| W8 A8                                      | ``MatMulIntegerToFloat`` (u8 x s8, VNNI)   | int8 per token, symmetric |
| W2-W7 (any group), A8 or weight-only       | ``MatMulNBits`` bits 2/4/8, accuracy 4     | int8 per block, symmetric |
| A1-A7                                      | the recipe's activation Q/DQ, then         | as the recipe (exact)     |
|                                            | ``MatMulNBits`` at accuracy 0 (fp32)       |                           |
| a group with no power-of-two block >= 16   | kept as ``qdq``                            | as the recipe             |

The kernels' activation arithmetic differs from Q-DiT's asymmetric per-group min-max, and
:func:`plan_for_ort` states the difference as an *effective* layer plan, which the PyTorch reference
(:mod:`ditq.exporter.reference`) computes, so ``ditq validate`` still proves parity:

- ``MatMulIntegerToFloat``: per-output-channel symmetric int8 weights (re-derived from the float weight
  by the recipe's method: the kernel has one scale per column) and per-token symmetric int8 activations
  ``s = max|x| / 127``, ``q = round(x / s)``, built in the graph as Abs -> ReduceMax -> Div -> Max(eps) ->
  QuantizeLinear to uint8 with zero point 128 (u8 x s8 is the fast VNNI path; s8 x s8 is 10x slower). The
  product is exact in int32, scaled per column by the kernel and per token by one Mul. The codes come
  from one per-axis QuantizeLinear over the ``[tokens, K]`` view (scale per token, zero point 128): the
  same rounding as a Div/Round/Add/Cast chain, bit for bit, at half its time.
- ``MatMulNBits`` at ``accuracy_level=4``: the recipe's weight codes, unchanged; ONNX Runtime
  quantizes the activation to int8 per token in blocks of ``block_size`` channels with ``s = max|x| / 127``
  inside the kernel. A group ``g`` that is not a power of two (Q-DiT's 192, 288, or a whole row) is
  expressed with the largest power-of-two block ``b`` dividing it (at most 128, the fastest here), each
  group's scale and zero point repeated ``g / b`` times, which is exact for the weights. Weight-only
  layers (adaLN, timestep MLP) take this kernel too: at batch 1 they are matrix-vector products, 7-16x
  faster than fp32 this way, and their activation is then int8 per block as well.

Weights of the MatMulNBits layers are stored ``[N, K/b, b*bits/8]`` uint8 (codes offset to unsigned for
symmetric recipes), scales ``[N, K/b]``, zero points packed along ``K/b``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ditq.calib.numerics import EPS, QuantizedTensor, qrange, pack_2bit_u8, pack_4bit_u8, unpack_2bit_u8, unpack_4bit_u8
from ditq.graphs.passes import GraphPass, PassResult, consumers
from ditq.graphs.quant_weights import stored_codes
from ditq.graphs.tensors import ROLE_WEIGHT_DQ, attrs, nodes_by_module, rebuild_nodes, remove_unused_initializers, tag
from ditq.recipe import LayerPlan

KERNEL_QDQ = "qdq"
KERNEL_INT8 = "int8_gemm"  # com.microsoft::MatMulIntegerToFloat with per-token int8 activations
KERNEL_NBITS = "nbits"  # com.microsoft::MatMulNBits, accuracy_level 4
KERNEL_NBITS_QDQ = "nbits_qdq"  # the recipe's activation Q/DQ feeding MatMulNBits at accuracy_level 0 (fp32)
ACT_QDQ_KERNELS = ("qdq", KERNEL_NBITS_QDQ)  # kernels whose activation quantization is an in-graph Q/DQ
KERNELS = (KERNEL_QDQ, KERNEL_INT8, KERNEL_NBITS, KERNEL_NBITS_QDQ)  # what a layer plan's ``kernel`` may say
PREFERENCE = (KERNEL_INT8, KERNEL_NBITS, KERNEL_NBITS_QDQ, KERNEL_QDQ)  # plan_for_ort's choice, fastest first
ROLE_KERNEL = "ort_kernel"
MS_DOMAIN = "com.microsoft"
NBITS_ACCURACY = 4  # int8 activations inside MatMulNBits (levels 0-2 keep fp32 and are no faster)
MAX_BLOCK = 128  # larger MatMulNBits blocks measured slower (FACTS: 512 -> 1.8x of 128's time)
MIN_BLOCK = 16


def nbits_block(group: int) -> int | None:
    """The MatMulNBits block for weight group ``group``: the largest power of two dividing it, at most
    128; None when it is below 16 (the kernel's minimum)."""
    b = group & -group  # lowest set bit = largest power-of-two divisor
    b = min(b, MAX_BLOCK)
    return b if b >= MIN_BLOCK else None


def container_bits(wbits: int) -> int:
    return 2 if wbits <= 2 else 4 if wbits <= 4 else 8


def kernel_options(plan: LayerPlan) -> dict[str, LayerPlan]:
    """Every kernel able to run the layer of ``plan`` under target ``ort``, with the effective plan it
    computes (the module docstring's table): the recipe's Q/DQ always; below 8-bit activations only the
    exact Q/DQ feeding an fp32 MatMulNBits; at A8 or weight-only the int8 kernels."""
    q = plan.quant
    options = {KERNEL_QDQ: plan}
    if plan.kind != "linear":
        return options
    block = nbits_block(plan.group_size)
    if plan.abits is not None and plan.abits < 8:  # no integer kernel for < 8-bit activations: keep them exact
        if block:
            options[KERNEL_NBITS_QDQ] = replace(plan, kernel=KERNEL_NBITS_QDQ)
        return options
    if q.wbits == 8 and plan.abits == 8 and not plan.rotation:
        options[KERNEL_INT8] = replace(
            plan, quant=replace(q, group_size=None, symmetric=True), kernel=KERNEL_INT8,
            act_group=plan.in_features, act_symmetric=True,
        )  # fmt: skip
    if block:
        options[KERNEL_NBITS] = replace(plan, quant=replace(q, abits=8), kernel=KERNEL_NBITS, act_group=block, act_symmetric=True)
    return options


def plan_for_ort(plan: LayerPlan) -> LayerPlan:
    """The effective plan of a layer under target ``ort``: the fastest of its :func:`kernel_options`."""
    options = kernel_options(plan)
    return next(options[k] for k in PREFERENCE if k in options)


def kernel_counts(plans: dict[str, LayerPlan]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in plans.values():
        out[p.kernel] = out.get(p.kernel, 0) + 1
    return out


# ------------------------------------------------------------------------------------------ packing
def pack_along_last(codes: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``bits``-bit codes ``[..., L]`` packed along the last axis (low bits first), uint8."""
    lead, n = codes.shape[:-1], codes.shape[-1]
    rows = codes.reshape(-1, n)
    if bits == 8:
        return rows.astype(np.uint8).reshape(*lead, n)
    per = 8 // bits
    width = -(-n // per)
    pad = np.zeros((rows.shape[0], width * per), np.uint8)
    pad[:, :n] = rows
    pack = pack_4bit_u8 if bits == 4 else pack_2bit_u8
    return pack(pad).reshape(*lead, width)


def unpack_along_last(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    lead = packed.shape[:-1]
    rows = packed.reshape(-1, packed.shape[-1])
    if bits == 8:
        return rows[:, :n].astype(np.uint8).reshape(*lead, n)
    unpack = unpack_4bit_u8 if bits == 4 else unpack_2bit_u8
    flat = unpack(rows, rows.size * (8 // bits), signed=False).reshape(rows.shape[0], -1)
    return flat[:, :n].reshape(*lead, n)


@dataclass(frozen=True)
class NBitsWeight:
    """A ``[N, K]`` quantized weight in MatMulNBits form."""

    b: np.ndarray  # uint8 [N, K/block, block*bits/8]
    scales: np.ndarray  # float32 [N, K/block]
    zero_points: np.ndarray | None  # uint8 [N, ceil(K/block * bits / 8)], None = the default 2^(bits-1)
    bits: int
    block: int


def to_nbits(qt: QuantizedTensor, block: int) -> NBitsWeight:
    """Recipe codes (groups of ``qt.group_size``) -> MatMulNBits blocks of ``block`` (dividing the group)."""
    n, k = qt.shape
    bits = container_bits(qt.bits)
    rep = qt.group_size // block
    codes = qt.codes.numpy().astype(np.int16)
    zero = qt.zero.numpy().astype(np.int16)
    if qt.symmetric:  # signed codes -> unsigned with the kernel's default zero point 2^(bits-1)
        codes = codes + 2 ** (bits - 1)
        zero_points = None
    else:
        zero_points = pack_along_last(np.repeat(zero, rep, axis=1).astype(np.uint8), bits)
    blocks = codes.astype(np.uint8).reshape(n, k // block, block)
    scales = np.repeat(qt.scale.numpy().astype(np.float32), rep, axis=1)
    return NBitsWeight(pack_along_last(blocks, bits), np.ascontiguousarray(scales), zero_points, bits, block)


# ------------------------------------------------------------------------------------------ the pass
class LowerToOrtKernelsPass(GraphPass):
    """Rewrite ``DequantizeLinear(weight) -> MatMul`` of every lowered layer into its ORT kernel; counts
    the layers lowered. Ensures: each has exactly one kernel node of its op in ``com.microsoft`` (which the
    model imports) and no weight DequantizeLinear left.

    Runs on the ``qdq`` graph built from the effective plans, where lowered layers have their weight
    stored behind a DequantizeLinear and no activation Q/DQ (the kernel quantizes the activation)."""

    def __init__(self, plans: dict[str, LayerPlan], weights: dict[str, QuantizedTensor]):
        self.plans = {n: p for n, p in plans.items() if p.kernel != KERNEL_QDQ}
        self.weights = weights

    def call(self, model: onnx.ModelProto) -> PassResult:
        graph = model.graph
        dq_of = {m: nodes[0] for m, nodes in nodes_by_module(graph, ROLE_WEIGHT_DQ).items()}
        readers = consumers(graph)
        replace_: dict[str, list] = {}
        shared: dict[str, TensorProto] = {}
        for name, plan in self.plans.items():
            dq = dq_of.get(name)
            users = readers.get(dq.output[0], []) if dq is not None else []
            if dq is None or len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[1] != dq.output[0]:
                raise ValueError(f"{name}: cannot lower to {plan.kernel}: its weight does not feed exactly one MatMul")
            mm = users[0]
            replace_[dq.name] = []
            if plan.kernel in (KERNEL_NBITS, KERNEL_NBITS_QDQ):
                nodes, new = self._nbits(name, plan, mm)
            else:
                nodes, new = self._int8(name, plan, mm, shared)
            replace_[mm.name] = nodes
            graph.initializer.extend(new)  # as made: the graph holds the only copy (ditq.graphs.tensors)
        rebuild_nodes(graph, {}, replace_)
        graph.initializer.extend(shared.values())
        remove_unused_initializers(graph)
        if not any(o.domain == MS_DOMAIN for o in model.opset_import) and self.plans:
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        return PassResult(model, bool(self.plans), len(self.plans))

    def ensures(self, model: onnx.ModelProto) -> str | None:
        kernels, dqs = kernel_nodes(model.graph), nodes_by_module(model.graph, ROLE_WEIGHT_DQ)
        if self.plans and not any(o.domain == MS_DOMAIN for o in model.opset_import):
            return f"the model does not import the {MS_DOMAIN} opset"
        for name, plan in self.plans.items():
            op = kernel_op(plan)
            found = [n for n in kernels.get(name, []) if n.op_type == op and n.domain == MS_DOMAIN]
            if len(found) != 1 or dqs.get(name):
                return f"{name}: {len(found)} {MS_DOMAIN}::{op} and {len(dqs.get(name, []))} weight DequantizeLinear, expected 1 and 0"
        return None

    def _nbits(self, name: str, plan: LayerPlan, mm: onnx.NodeProto):
        w = to_nbits(self.weights[name], nbits_block(plan.group_size))
        inputs = [mm.input[0], f"{name}.nbits_weight", f"{name}.nbits_scale"]
        inits = [numpy_helper.from_array(w.b, inputs[1]), numpy_helper.from_array(w.scales, inputs[2])]
        if w.zero_points is not None:
            inputs.append(f"{name}.nbits_zero")
            inits.append(numpy_helper.from_array(w.zero_points, inputs[3]))
        node = helper.make_node(
            "MatMulNBits", inputs, [mm.output[0]], name=f"{name}/matmul_nbits", domain=MS_DOMAIN,
            K=plan.in_features, N=plan.out_features, bits=w.bits, block_size=w.block, accuracy_level=_accuracy(plan),
        )  # fmt: skip
        return [tag(node, name, ROLE_KERNEL)], inits

    def _int8(self, name: str, plan: LayerPlan, mm: onnx.NodeProto, shared: dict[str, TensorProto]):
        qt = self.weights[name]
        if qt.bits != 8 or not qt.symmetric or qt.group_size != plan.in_features:
            raise ValueError(f"{name}: the int8 kernel needs per-channel symmetric 8-bit weights")

        def const(cname: str, value, dtype) -> str:
            full = f"ditq/const/{cname}"
            if full not in shared:
                shared[full] = helper.make_tensor(full, dtype, [], [value])
            return full

        codes = np.ascontiguousarray(qt.codes.numpy().T, dtype=np.int8)  # [K, N], one copy
        inits = [
            numpy_helper.from_array(codes, f"{name}.int8_weight"),
            numpy_helper.from_array(qt.scale.numpy()[:, 0].astype(np.float32), f"{name}.int8_scale"),
        ]
        p = f"{name}/act_quant"
        nodes = []

        def op(op_type: str, inputs: list[str], out: str, domain: str = "", **kw) -> str:
            node = helper.make_node(op_type, inputs, [f"{p}/{out}"], name=f"{p}/{out}", domain=domain, **kw)
            nodes.append(tag(node, name, ROLE_KERNEL))
            return f"{p}/{out}"

        x = mm.input[0]
        for cname, vals in (("axis_last", [-1]), (f"shape_m_{plan.in_features}", [-1, plan.in_features]), ("shape_flat", [-1]),
                            ("shape_col", [-1, 1]), ("slice_0", [0]), ("slice_m1", [-1]), (f"dim_{plan.out_features}", [plan.out_features])):  # fmt: skip
            full = f"ditq/const/{cname}"
            if full not in shared:
                shared[full] = helper.make_tensor(full, TensorProto.INT64, [len(vals)], vals)
        c = "ditq/const/"
        amax = op("ReduceMax", [op("Abs", [x], "abs"), c + "axis_last"], "absmax", keepdims=1)
        s = op("Max", [op("Div", [amax, const("qmax_127", 127.0, TensorProto.FLOAT)], "scale_raw"), const("eps", EPS, TensorProto.FLOAT)], "scale")
        # per-token codes: one per-axis QuantizeLinear over [M, K] (round half to even, +128, saturate to uint8)
        x2 = op("Reshape", [x, c + f"shape_m_{plan.in_features}"], "tokens")
        s1 = op("Reshape", [s, c + "shape_flat"], "scale_tokens")
        zp = op("ConstantOfShape", [op("Shape", [s1], "tokens_shape")], "zero_point",
                value=helper.make_tensor("v", TensorProto.UINT8, [1], [128]))  # fmt: skip
        codes_u8 = op("QuantizeLinear", [x2, s1, zp], "codes", axis=0)
        y0 = op(
            "MatMulIntegerToFloat",
            [codes_u8, inits[0].name, const("one", 1.0, TensorProto.FLOAT), inits[1].name, const("u8_128", 128, TensorProto.UINT8)],
            "matmul_int8", domain=MS_DOMAIN,
        )  # fmt: skip
        y1 = op("Mul", [y0, op("Reshape", [s, c + "shape_col"], "scale_col")], "token_scale")
        out_shape = op("Concat", [op("Slice", [op("Shape", [x], "in_shape"), c + "slice_0", c + "slice_m1"], "lead_dims"),
                                  c + f"dim_{plan.out_features}"], "out_shape", axis=0)  # fmt: skip
        node = helper.make_node("Reshape", [y1, out_shape], [mm.output[0]], name=f"{name}/out")
        nodes.append(tag(node, name, ROLE_KERNEL))
        return nodes, inits


def kernel_op(plan: LayerPlan) -> str:
    """The ``com.microsoft`` op a lowered layer's kernel runs on."""
    return "MatMulIntegerToFloat" if plan.kernel == KERNEL_INT8 else "MatMulNBits"


def _accuracy(plan: LayerPlan) -> int:
    """MatMulNBits accuracy level: 4 (int8 activations) for the fast kernel, 0 (fp32) behind a Q/DQ."""
    return NBITS_ACCURACY if plan.kernel == KERNEL_NBITS else 0


# ------------------------------------------------------------------------------------- read back, check
def kernel_nodes(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """The nodes of every lowered layer's kernel, by module."""
    return nodes_by_module(graph, ROLE_KERNEL)


def read_kernel_weights(model: onnx.ModelProto, plans: dict[str, LayerPlan]) -> tuple[dict[str, QuantizedTensor], list[str]]:
    """The weights of every lowered layer, read back from its kernel in the recipe's ``[N, K]`` form,
    with the structural problems found on the way (wrong kernel, attributes, shapes, repeated scales
    that are not repeats, codes out of range)."""
    import torch

    inits = {t.name: t for t in model.graph.initializer}
    by_module = kernel_nodes(model.graph)
    out, fails = {}, []
    for name, plan in plans.items():
        if plan.kernel == KERNEL_QDQ:
            continue
        q = plan.quant
        nodes = by_module.get(name, [])
        want_op = kernel_op(plan)
        kern = [n for n in nodes if n.op_type == want_op]
        if len(kern) != 1 or kern[0].domain != MS_DOMAIN:
            fails.append(f"{name}: expected one {MS_DOMAIN}::{want_op}, found {len(kern)}")
            continue
        node = kern[0]
        n_out, k_in, g = plan.out_features, plan.in_features, plan.group_size
        if plan.kernel != KERNEL_INT8:
            a = attrs(node)
            bits, block = container_bits(q.code_bits), nbits_block(g)
            want = {"K": k_in, "N": n_out, "bits": bits, "block_size": block, "accuracy_level": _accuracy(plan)}
            got = {key: a.get(key) for key in want}
            if got != want:
                fails.append(f"{name}: MatMulNBits attributes {got}, expected {want}")
                continue
            b = numpy_helper.to_array(inits[node.input[1]]) if node.input[1] in inits else None
            sc = numpy_helper.to_array(inits[node.input[2]]) if node.input[2] in inits else None
            kb = k_in // block
            if b is None or sc is None or b.shape != (n_out, kb, block * bits // 8) or sc.shape != (n_out, kb):
                fails.append(f"{name}: MatMulNBits weight/scales are not initializers of shape {(n_out, kb, block * bits // 8)} / {(n_out, kb)}")
                continue
            codes = unpack_along_last(b, bits, block).reshape(n_out, k_in).astype(np.int16)
            rep = g // block
            scale = sc[:, ::rep]
            if not np.array_equal(np.repeat(scale, rep, axis=1), sc):
                fails.append(f"{name}: block scales are not the group's scale repeated {rep} times")
            if q.symmetric:
                if len(node.input) > 3 and node.input[3]:
                    fails.append(f"{name}: symmetric weight with a stored zero point")
                codes = codes - 2 ** (bits - 1)
                zero = np.zeros_like(scale, np.int16)
            else:
                zp = numpy_helper.to_array(inits[node.input[3]]) if len(node.input) > 3 and node.input[3] in inits else None
                if zp is None:
                    fails.append(f"{name}: asymmetric weight without stored zero points")
                    continue
                zfull = unpack_along_last(zp, bits, kb).astype(np.int16)
                zero = zfull[:, ::rep]
                if not np.array_equal(np.repeat(zero, rep, axis=1), zfull):
                    fails.append(f"{name}: block zero points are not the group's repeated {rep} times")
        else:
            w = inits.get(node.input[1])
            sc = inits.get(node.input[3])
            if w is None or sc is None or w.data_type != TensorProto.INT8 or tuple(w.dims) != (k_in, n_out) or tuple(sc.dims) != (n_out,):
                fails.append(f"{name}: MatMulIntegerToFloat weight is not an INT8 [{k_in}, {n_out}] initializer with [{n_out}] scales")
                continue
            codes = stored_codes(w).T.astype(np.int16)
            scale = numpy_helper.to_array(sc).reshape(n_out, 1)
            zero = np.zeros_like(scale, np.int16)
        lo, hi = qrange(q.code_bits, q.symmetric)
        if codes.size and (int(codes.min()) < lo or int(codes.max()) > hi):
            fails.append(f"{name}: codes outside the {q.code_bits}-bit range [{lo}, {hi}]")
        out[name] = QuantizedTensor(
            torch.from_numpy(np.ascontiguousarray(codes)), torch.from_numpy(np.ascontiguousarray(scale.astype(np.float32))),
            torch.from_numpy(np.ascontiguousarray(zero)), q.code_bits, g, q.symmetric,
        )  # fmt: skip
    return out, fails
