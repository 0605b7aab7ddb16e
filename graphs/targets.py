"""Export targets: what a model is built to run on, as objects that carry the behaviour.

| target | layers run as                                   | effective plan          | weights read back from |
|--------|-------------------------------------------------|-------------------------|------------------------|
| ``qdq``| standard QuantizeLinear/DequantizeLinear         | the recipe's, unchanged | weight DequantizeLinear|
| ``ort``| ONNX Runtime kernels where one fits, else Q/DQ   | the kernel's            | + MatMulNBits /        |
|        | (:mod:`ditq.graphs.lower_ort`)                   | (``plan_for_ort``)      | MatMulIntegerToFloat   |

A :class:`Target` says which passes build its graph from the effective plans, how a recipe's layer
plan becomes the effective plan (:meth:`~Target.kernel_options`: every kernel able to run it;
:meth:`~Target.effective_plan`: the one this ditq picks), how stored weights are read back from a
file, and which activation quantizers ``ditq validate`` probes. :func:`target_named` is the registry of
the names the command line and the ``ditq.target`` metadata use (:data:`ditq.fileformat.TARGETS`).

A file records the effective plans it was built with (``ditq.plans``, :mod:`ditq.graphs.plan_record`);
:meth:`Target.recorded` is the same target with those plans in place of its own choice, so a model is
validated against what it was built to compute, and :meth:`Target.plan_problems` says where a record is
not one the target derives from the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import onnx

from ditq.calib.numerics import QuantizedTensor
from ditq.errors import DitqError, shown
from ditq.fileformat import TARGETS
from ditq.graphs.checks import check_codes_equal, check_same_weights, check_weights, weights_from_graph
from ditq.graphs.lower_ort import (
    ACT_QDQ_KERNELS, KERNEL_INT8, KERNEL_QDQ, LowerToOrtKernelsPass, kernel_nodes, kernel_options, plan_for_ort,
    read_kernel_weights,
)  # fmt: skip
from ditq.graphs.passes import GraphPass
from ditq.graphs.quant_activations import ActivationTarget, InsertActivationQDQPass
from ditq.graphs.quant_weights import StoreQuantizedWeightsPass, WeightTarget
from ditq.graphs.rotate import InsertRotationPass, RotationTarget
from ditq.graphs.tensors import ROLE_ACT_QUANT, nodes_by_module
from ditq.recipe import LayerPlan


LAYER_CHUNK_ELEMENTS = 1 << 26  # weights per chunk of layers read back at a time (int16 codes: 128 MiB)


def layer_chunks(plans: dict[str, LayerPlan], max_elements: int | None = None) -> Iterator[dict[str, LayerPlan]]:
    """``plans`` in order, cut into consecutive groups of at most ``max_elements`` weights each (default
    :data:`LAYER_CHUNK_ELEMENTS`; a larger layer alone): what is read back or compared at a time, so that
    at most one group's codes are in memory."""
    max_elements = LAYER_CHUNK_ELEMENTS if max_elements is None else max_elements
    chunk: dict[str, LayerPlan] = {}
    size = 0
    for name, plan in plans.items():
        n = plan.in_features * plan.out_features
        if chunk and size + n > max_elements:
            yield chunk
            chunk, size = {}, 0
        chunk[name] = plan
        size += n
    if chunk:
        yield chunk


@dataclass(frozen=True)
class ActivationProbe:
    """An activation quantizer whose codes ``ditq validate`` recomputes: the float tensor ``input`` it
    quantizes and the tensor of ``codes`` it produces (minus ``offset``: the int8 kernel's uint8 codes
    carry +128), quantized with ``bits`` in groups of ``group_size``."""

    module: str
    input: str
    codes: str
    bits: int
    group_size: int
    symmetric: bool
    offset: int = 0


def describe(plan: LayerPlan) -> str:
    q = plan.quant
    return (f"{plan.kind} {plan.in_features}->{plan.out_features} {q.tag()} sym={q.symmetric} rotate={q.rotate} "
            f"kernel={plan.kernel} act_group={plan.act_group} act_symmetric={plan.act_symmetric}")  # fmt: skip


@dataclass(frozen=True)
class Target:
    """The portable ``qdq`` target; :class:`OrtTarget` lowers layers to ONNX Runtime kernels."""

    name: str = "qdq"

    # ------------------------------------------------------------------ plans
    def kernel_options(self, plan: LayerPlan) -> dict[str, LayerPlan]:
        """Kernel name -> the effective plan of every way this target can run ``plan``'s layer."""
        return {KERNEL_QDQ: plan}

    def effective_plan(self, plan: LayerPlan) -> LayerPlan:
        """The plan this target's kernel for ``plan``'s layer computes."""
        return plan

    def effective_plans(self, plans: dict[str, LayerPlan]) -> dict[str, LayerPlan]:
        return {n: self.effective_plan(p) for n, p in plans.items()}

    def plan_problems(self, plans: dict[str, LayerPlan], recorded: dict[str, LayerPlan]) -> list[str]:
        """Where ``recorded`` (a file's effective plans) is not one this target derives from the recipe's
        ``plans``: layers missing or extra, or a plan none of the layer's :meth:`kernel_options` computes."""
        fails = [f"{shown(n)}: recorded, but the recipe does not cover it" for n in recorded if n not in plans]
        fails += [f"{shown(n)}: covered by the recipe, not recorded" for n in plans if n not in recorded]
        for name, plan in plans.items():
            if name in recorded and recorded[name] not in self.kernel_options(plan).values():
                fails.append(f"{shown(name)}: recorded {describe(recorded[name])}; target {self.name} "
                             f"computes {describe(plan)} as one of {sorted(self.kernel_options(plan))}")  # fmt: skip
        return fails

    def recorded(self, plans: dict[str, LayerPlan]) -> "RecordedTarget":
        """This target, with the effective plans a file records in place of its own choice."""
        return RecordedTarget(self, dict(plans))

    @property
    def base(self) -> "Target":
        """The registered target (itself; a :class:`RecordedTarget`'s own target)."""
        return self

    # ------------------------------------------------------------------ building the graph
    def passes(self, plans: dict[str, LayerPlan], weights: dict[str, QuantizedTensor], bound: dict[str, str]) -> list[GraphPass]:
        """The passes that build this target's graph from the traced float graph, in order, for the
        effective ``plans``, their ``weights`` and ``bound`` (module -> the node that reads its weight)."""
        return [
            StoreQuantizedWeightsPass([WeightTarget(bound[n], n, weights[n]) for n in plans]),
            InsertRotationPass([RotationTarget(bound[n], n, p.rotation, p.in_features) for n, p in plans.items() if p.rotation]),
            InsertActivationQDQPass([
                ActivationTarget(bound[n], n, p.abits, p.activation_group, p.in_features, p.activation_symmetric)
                for n, p in plans.items() if p.abits is not None and p.kernel in ACT_QDQ_KERNELS
            ]),
        ]  # fmt: skip

    # ------------------------------------------------------------------ reading a file back
    def read_weights(self, model: onnx.ModelProto, plans: dict[str, LayerPlan]) -> tuple[dict[str, QuantizedTensor], list[str]]:
        """The weights ``model`` stores for ``plans``, in the recipe's ``[N, K]`` form, and the structural
        problems found (type, block size, shapes, code range); no weights when there is a problem."""
        fails = check_weights(model, plans)
        return ({} if fails else weights_from_graph(model, plans)), fails

    def weight_problems(self, model: onnx.ModelProto, plans: dict[str, LayerPlan]) -> list[str]:
        """The problems :meth:`read_weights` finds, holding no more than one :func:`layer_chunks` group of
        weights at a time."""
        return check_weights(model, plans)

    def compare_weights(self, model: onnx.ModelProto, plans: dict[str, LayerPlan], expected: dict[str, QuantizedTensor]) -> list[str]:
        """Where the stored codes, scales and zero points differ from ``expected``, element for element."""
        return [f for part in self.weight_comparisons(model, plans, expected) for f in part]

    def weight_comparisons(self, model: onnx.ModelProto, plans: dict[str, LayerPlan], expected: dict[str, QuantizedTensor]) -> list[list[str]]:
        """:meth:`compare_weights`' failures, one list per kind of comparison, each in the order of
        ``plans``: comparing group by group and joining each kind's lists gives :meth:`compare_weights`
        of all the groups at once, message for message."""
        return [check_codes_equal(model, plans, expected)]

    def probes(self, model: onnx.ModelProto, plans: dict[str, LayerPlan]) -> list[ActivationProbe]:
        """Every in-graph activation quantizer of a covered layer: its QuantizeLinear's float input and
        its final codes (after the Clip to the ``b``-bit range, when there is one)."""
        out = []
        for module, nodes in nodes_by_module(model.graph, ROLE_ACT_QUANT).items():
            plan = plans.get(module)
            ql = next((n for n in nodes if n.op_type == "QuantizeLinear"), None)
            if plan is None or ql is None:
                continue
            clip = next((n for n in nodes if n.op_type == "Clip"), None)
            out.append(ActivationProbe(module, ql.input[0], (clip or ql).output[0], plan.abits, plan.activation_group,
                                       plan.activation_symmetric))  # fmt: skip
        return out


@dataclass(frozen=True)
class OrtTarget(Target):
    """Target ``ort``: each layer on the fastest ONNX Runtime kernel that runs it (:mod:`ditq.graphs.lower_ort`)."""

    name: str = "ort"

    def kernel_options(self, plan: LayerPlan) -> dict[str, LayerPlan]:
        return kernel_options(plan)

    def effective_plan(self, plan: LayerPlan) -> LayerPlan:
        return plan_for_ort(plan)

    def passes(self, plans, weights, bound) -> list[GraphPass]:
        return [*super().passes(plans, weights, bound), LowerToOrtKernelsPass(plans, weights)]

    def read_weights(self, model, plans):
        lowered, fails = read_kernel_weights(model, plans)
        fails += check_weights(model, plans)
        return ({} if fails else {**weights_from_graph(model, plans), **lowered}), fails

    def weight_problems(self, model, plans):
        kernels = [f for chunk in layer_chunks(plans) for f in read_kernel_weights(model, chunk)[1]]
        return kernels + check_weights(model, plans)

    def weight_comparisons(self, model, plans, expected):
        return [check_codes_equal(model, plans, expected), check_same_weights(read_kernel_weights(model, plans)[0], expected)]

    def probes(self, model, plans) -> list[ActivationProbe]:
        """Also the int8 kernel's per-token quantizer: Abs's input, QuantizeLinear's uint8 codes (+128)."""
        out = super().probes(model, plans)
        for module, nodes in kernel_nodes(model.graph).items():
            plan = plans.get(module)
            ops = {n.op_type: n for n in nodes}
            if plan is not None and plan.kernel == KERNEL_INT8 and "Abs" in ops and "QuantizeLinear" in ops:
                out.append(ActivationProbe(module, ops["Abs"].input[0], ops["QuantizeLinear"].output[0], 8,
                                           plan.activation_group, True, 128))  # fmt: skip
        return out


@dataclass(frozen=True, eq=False)
class RecordedTarget:
    """``target`` with the effective plans a file records (``plans``) in place of its own choice: a
    model is rebuilt and checked as it was built. Everything else is ``target``'s."""

    target: Target
    plans: dict[str, LayerPlan] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def base(self) -> Target:
        return self.target

    def effective_plans(self, plans: dict[str, LayerPlan]) -> dict[str, LayerPlan]:
        """The recorded plans, when they are ones the target derives from ``plans`` (the recipe's)."""
        problems = self.target.plan_problems(plans, self.plans)
        if problems:
            raise DitqError(f"the recorded layer plans are not the recipe's under target {self.name}: {problems[0]}")
        return dict(self.plans)

    def kernel_options(self, plan: LayerPlan) -> dict[str, LayerPlan]:
        return self.target.kernel_options(plan)

    def plan_problems(self, plans: dict[str, LayerPlan], recorded: dict[str, LayerPlan]) -> list[str]:
        return self.target.plan_problems(plans, recorded)

    def passes(self, plans, weights, bound) -> list[GraphPass]:
        return self.target.passes(plans, weights, bound)

    def read_weights(self, model, plans):
        return self.target.read_weights(model, plans)

    def weight_problems(self, model, plans):
        return self.target.weight_problems(model, plans)

    def compare_weights(self, model, plans, expected):
        return self.target.compare_weights(model, plans, expected)

    def weight_comparisons(self, model, plans, expected):
        return self.target.weight_comparisons(model, plans, expected)

    def probes(self, model, plans) -> list[ActivationProbe]:
        return self.target.probes(model, plans)


QDQ, ORT = Target(), OrtTarget()
_REGISTRY = {t.name: t for t in (QDQ, ORT)}


def target_named(name: object, what: str = "target") -> Target:
    """The registered target called ``name`` (one of :data:`ditq.fileformat.TARGETS`); one-line
    :class:`DitqError` naming ``what`` and the choices for anything else."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise DitqError(f"{what} must be one of {', '.join(TARGETS)}, got {shown(name)}")
    return _REGISTRY[name]


def as_target(target: "Target | RecordedTarget | str") -> "Target | RecordedTarget":
    """``target`` itself, or the registered target of that name (the command line and the Python API
    name targets as strings)."""
    return target_named(target) if isinstance(target, str) else target
