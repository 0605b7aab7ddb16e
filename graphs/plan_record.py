"""The layer plans an exported model was built with, recorded in its ``ditq.plans`` metadata.

A target turns each layer plan of the recipe into the *effective* plan its kernel computes
(:meth:`ditq.graphs.targets.Target.effective_plan`); the exporter records those plans, and ``ditq
validate`` reads them back instead of recomputing them with its own code, so a model is checked against
what it was built to compute. The record is one JSON object, layer name -> fields, in the recipe's order::

    {"blocks.0.attn.to_q": {"kind": "linear", "in_features": 64, "out_features": 64, "wbits": 4,
                            "abits": 8, "group_size": 16, "symmetric": false, "rotate": false,
                            "kernel": "nbits", "act_group": 16, "act_symmetric": true}, ...}

``wbits`` ... ``rotate`` are the layer's :class:`~ditq.recipe.LayerQuant`; ``kernel``, ``act_group`` and
``act_symmetric`` the :class:`~ditq.recipe.LayerPlan` fields a kernel sets (null: as the weight). Read
back as untrusted input: bounded JSON, every field present and typed; any problem is one
:class:`DitqError` naming the layer and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ditq.errors import DitqError, shown
from ditq.graphs.lower_ort import KERNELS
from ditq.recipe import TERNARY, LayerPlan, LayerQuant
from ditq.untrusted import Bool, Int, OneOf, check_fields, parse_json_object

MAX_WIDTH = 1 << 24  # in/out features, group sizes: far beyond any DiT (DiT-XL/2: 4608), and bounded
MAX_NAME = 1000  # characters of a layer name


@dataclass(frozen=True)
class _WBits:
    """Weight bits of a covered layer: an integer in 2..8, or 1.58 (ternary)."""

    default: Any = None

    def check(self, value: Any, field: str, where: str) -> Any:
        ok = value == TERNARY if isinstance(value, float) else type(value) is int and 2 <= value <= 8
        if not ok:
            raise DitqError(f"{where}: {field} must be an integer in 2..8 or 1.58, got {shown(value, kinds=True)}")
        return value


@dataclass(frozen=True)
class _OptionalBool:
    default: Any = None
    nullable: bool = True

    def check(self, value: Any, field: str, where: str) -> Any:
        return Bool(False).check(value, field, where)


PLAN_FIELDS: dict[str, Any] = {
    "kind": OneOf(("linear", "embedding")),
    "in_features": Int(1, MAX_WIDTH),
    "out_features": Int(1, MAX_WIDTH),
    "wbits": _WBits(),
    "abits": Int(1, 8, nullable=True),
    "group_size": Int(1, MAX_WIDTH, nullable=True),
    "symmetric": Bool(False),
    "rotate": Bool(False),
    "kernel": OneOf(KERNELS),
    "act_group": Int(1, MAX_WIDTH, nullable=True),
    "act_symmetric": _OptionalBool(),
}


def plan_record(plan: LayerPlan) -> dict[str, Any]:
    q = plan.quant
    return {
        "kind": plan.kind, "in_features": plan.in_features, "out_features": plan.out_features,
        "wbits": q.wbits, "abits": q.abits, "group_size": q.group_size, "symmetric": q.symmetric, "rotate": q.rotate,
        "kernel": plan.kernel, "act_group": plan.act_group, "act_symmetric": plan.act_symmetric,
    }  # fmt: skip


def plans_to_json(plans: dict[str, LayerPlan]) -> str:
    """The ``ditq.plans`` record of ``plans`` (compact JSON, the plans' order)."""
    return json.dumps({name: plan_record(p) for name, p in plans.items()}, separators=(",", ":"))


def plans_from_json(text: str, where: str) -> dict[str, LayerPlan]:
    """The plans a ``ditq.plans`` record states; :class:`DitqError` naming ``where``, the layer and the
    field for anything else (not JSON, too large or deep, a field missing, of another type, out of range,
    or unknown)."""
    obj = parse_json_object(text, where)
    plans = {}
    for name, fields in obj.items():
        at = f"{where}: layer {shown(name)}"
        if not 0 < len(name) <= MAX_NAME:
            raise DitqError(f"{at}: a layer name must have 1..{MAX_NAME} characters")
        rec = check_fields(fields, PLAN_FIELDS, at, required=tuple(PLAN_FIELDS))
        extra = sorted(set(rec) - set(PLAN_FIELDS))
        if extra:
            raise DitqError(f"{at}: unknown field {shown(extra[0])}")
        try:
            quant = LayerQuant(rec["wbits"], rec["abits"], rec["group_size"], rec["symmetric"], rec["rotate"])
        except DitqError as e:
            raise DitqError(f"{at}: {e}") from None
        plans[name] = LayerPlan(
            name, rec["kind"], rec["in_features"], rec["out_features"], quant,
            kernel=rec["kernel"], act_group=rec["act_group"], act_symmetric=rec["act_symmetric"],
        )  # fmt: skip
    return plans
