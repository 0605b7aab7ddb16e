"""RobuQ's activation-only mixed precision. Its other two pieces are parts of the quantized linear
(:mod:`ditq.calib.qlinear`): ternary weights (:func:`ditq.calib.numerics.quantize_ternary`) and the block
Hadamard rotation (:mod:`ditq.calib.hadamard`).

- **Mixed activation bits**: per-layer sensitivities ``cost[layer][bits]`` (output error with only that
  layer's input at ``bits``, measured on the model's own inputs along its float sampling trajectories)
  and an average-bit budget; :func:`allocate_bits` chooses one width per layer by dynamic programming so
  that the bits sum to exactly ``budget x layers`` at the least total cost. :func:`mixed_recipe` is the
  whole path, model to recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ditq.adapters import adapter_for
from ditq.calib.calibration import CalibConfig, record_model_inputs
from ditq.calib.conditioning import PromptConditioning
from ditq.flow import Schedule
from ditq.calib.sensitivity import block_units, unit_errors
from ditq.recipe import LayerPlan, LayerQuant, Recipe


def allocate_bits(
    cost: Mapping[str, Mapping[int, float]], budget: float, weights: Mapping[str, int] | None = None
) -> dict[str, int]:
    """Bits per layer minimising ``sum cost[layer][bits]`` subject to ``sum w_l * bits_l == budget * sum w_l``.

    ``weights`` (default 1 each) count how many layers a unit stands for (q/k/v share one quantizer, so
    that unit weighs 3). Raises ``ValueError`` when no assignment meets the budget exactly.
    """
    names = list(cost)
    w = {n: int((weights or {}).get(n, 1)) for n in names}
    target = budget * sum(w.values())
    if abs(target - round(target)) > 1e-9:
        raise ValueError(f"average {budget} bits over {sum(w.values())} layers is not a whole number of bits")
    target = int(round(target))
    # best[total] = (cost, choices) over the layers seen so far
    best: dict[int, tuple[float, tuple[int, ...]]] = {0: (0.0, ())}
    for n in names:
        nxt: dict[int, tuple[float, tuple[int, ...]]] = {}
        for total, (c, picks) in best.items():
            for b, cb in cost[n].items():
                t = total + w[n] * int(b)
                if t > target:
                    continue
                cand = (c + float(cb), picks + (int(b),))
                if t not in nxt or cand[0] < nxt[t][0]:
                    nxt[t] = cand
        best = nxt
    if target not in best:
        raise ValueError(f"no choice of bits per layer averages exactly {budget}")
    return dict(zip(names, best[target][1]))


# ------------------------------------------------------------------------- sensitivity of a real model
# the trajectories sensitivity inputs are drawn from: 8 samples x 8 timesteps (x 2 rows with guidance)
SENSITIVITY_TRAJECTORIES = CalibConfig(num_samples=8, timesteps_per_sample=8, seed=0)


def sensitivity_inputs(model, *, clip_denoised: bool, schedule: Schedule | None = None, n: int = 64,
                       seed: int = 0, conditioning: PromptConditioning | None = None) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """``n`` of the model's own inputs ``(x_t, t, labels)`` along its float DDIM trajectories
    (:data:`SENSITIVITY_TRAJECTORIES`, :func:`ditq.calib.calibration.record_model_inputs`), drawn without
    replacement with ``seed``: whatever the model's channels, size and classes, the inputs it sees when
    sampling. ``clip_denoised``: the model's sampling clamps ``x_0`` (pixel-space models); ``schedule``: how
    it samples (its ``LoadedModel.schedule``; None: DiT's). A text model's (``conditioning``: its prompts) are
    its graph's inputs, in its family adapter's order."""
    inputs = record_model_inputs(model, SENSITIVITY_TRAJECTORIES, schedule=schedule, clip_denoised=clip_denoised, progress=False,
                                 conditioning=conditioning)  # fmt: skip
    idx = torch.randperm(len(inputs[0]), generator=torch.Generator().manual_seed(seed))[:n]
    return tuple(a[idx] for a in inputs)


def activation_plan(name: str, linear: torch.nn.Linear, bits: int, rotate: bool) -> LayerPlan:
    """The plan of a block linear with only its input quantized: ``bits`` per token, asymmetric min-max
    (as RobuQ's recipe quantizes these inputs), after the Hadamard rotation when ``rotate``; float weights."""
    quant = LayerQuant(wbits=None, abits=bits, group_size=None, symmetric=False, rotate=rotate)
    return LayerPlan(name, "linear", linear.in_features, linear.out_features, quant)


def activation_sensitivity(model, options, *, rotate: bool, inputs, progress: bool = False) -> dict[str, dict[int, float]]:
    """Relative output error ``|f_u,b(x) - f(x)|^2 / |f(x)|^2`` with only unit ``u``'s input activation
    quantized to ``b`` bits (:func:`activation_plan`; weights float: activation-only sensitivity): the
    members swapped for ``Q(x H)(W H)^T + b`` (``H = I`` unrotated) for one forward
    (:func:`ditq.calib.sensitivity.unit_errors`). ``inputs``: the model's graph inputs in its family
    adapter's order (DiT: ``(x, t, labels)``)."""
    members = [m for ms in block_units(model).values() for m in ms]
    plans = {bits: {m: activation_plan(m, model.get_submodule(m), bits, rotate) for m in members} for bits in options}
    return unit_errors(model, inputs, plans, progress=progress, desc="activation sensitivity")


def mixed_activation_bits(
    model, avg_bits: int, *, rotate: bool, inputs, options: Sequence[int] | None = None, progress: bool = False
) -> tuple[dict[str, int], dict[str, dict[int, float]], dict[str, int]]:
    """RobuQ's AMPN: per-unit activation bits averaging exactly ``avg_bits`` over the block linears (q/k/v
    count three times), chosen by :func:`allocate_bits` on the measured sensitivities. Returns the bits
    per module, the sensitivity table and the bits per unit."""
    options = list(options or range(max(1, avg_bits - 1), min(8, avg_bits + 2) + 1))
    table = activation_sensitivity(model, options, rotate=rotate, inputs=inputs, progress=progress)
    units = block_units(model)
    per_unit = allocate_bits(table, float(avg_bits), weights={u: len(m) for u, m in units.items()})
    per_module = {m: per_unit[u] for u, members in units.items() for m in members}
    return per_module, table, per_unit


@dataclass(frozen=True)
class MixedRecipe:
    """RobuQ's recipe with activation bits per module, and how they were chosen."""

    recipe: Recipe
    bits_per_unit: dict[str, int]  # q/k/v as one unit (``...attn1.qkv``), out, fc1, fc2 of every block
    sensitivity: dict[str, dict[int, float]]  # unit -> bits -> relative output error


def mixed_recipe(model, avg_bits: int, *, rotate: bool = True, clip_denoised: bool = False, schedule: Schedule | None = None,
                 progress: bool = False, conditioning: PromptConditioning | None = None) -> MixedRecipe:  # fmt: skip
    """``Recipe.robuq(coverage, avg_bits, rotate)`` (``model``'s family coverage) with mixed activation
    bits for ``model``: sensitivities measured on the model's own sampling inputs
    (:func:`sensitivity_inputs`), bits allocated by :func:`mixed_activation_bits` to average exactly
    ``avg_bits`` over the block linears. A text model samples its inputs from ``conditioning``'s prompts."""
    inputs = sensitivity_inputs(model, clip_denoised=clip_denoised, schedule=schedule, conditioning=conditioning)
    per_module, table, per_unit = mixed_activation_bits(model, avg_bits, rotate=rotate, inputs=inputs, progress=progress)
    recipe = Recipe.robuq(adapter_for(model).coverage_of(model), avg_bits, rotate=rotate, act_bits=per_module)
    return MixedRecipe(recipe, per_unit, table)
