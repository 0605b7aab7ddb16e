"""``ditq validate``: prove an exported model equal to its PyTorch reference in ONNX Runtime.

The reference is rebuilt from the layer plans the model records (``ditq.plans``: what each layer's kernel
computes, as the exporting ditq chose it), not from this ditq's own kernel choice; they must be plans the
model's target derives from the recipe (else a failed check, exit 1), and a missing or malformed record
is bad input (one line, exit 2). Three kinds of evidence, all of which must hold (exit 0), else exit 1:

1. **Structure** (exact): the ONNX checker with full shape inference; every covered layer stores its
   weight as codes of the recipe's type and block size (:mod:`ditq.graphs.checks`); the stored codes and
   scales equal the reference's element for element; activation scales are computed in the graph.
2. **Activation codes** (exact): ONNX Runtime exposes, for every activation-quantized layer, the float
   input of its QuantizeLinear and the codes it produced; the reference numerics, applied to that same
   input, must produce the same codes, all of them. This proves the in-graph min/max -> scale -> zero
   point -> QuantizeLinear arithmetic is Q-DiT's, bit for bit, on real activations.
3. **Outputs** (bounded): on fixed inputs (batch 1, 2 and 3; timesteps from 0 to 999; real and null
   classes) ORT and the reference agree:

   - no quantized activation: ``SQNR(ort, ref) >= 80 dB`` (relative error 1e-4). With the codes equal,
     only fp32 reassociation in MatMul/attention/LayerNorm remains (measured 120+ dB on DiT presets).
   - quantized activations: an fp32 difference of one ulp flips an activation code wherever a value sits
     on a rounding boundary; in a deep network the difference then grows and flips more codes
     downstream (measured 49-55 dB ORT-vs-reference on random-weight DiT-S/XL presets at A8, while each
     layer's codes are bit-exact when fed the same input, check 2). A flip moves a value by one rounding
     step, the same size as the rounding quantization does anyway, so the two runs can differ by at most
     about the quantization error itself: ``SQNR(ort, ref) >= SQNR(ref, float)``. And the ONNX model must
     be exactly as accurate as the reference: ``|SQNR(ort, float) - SQNR(ref, float)| <= 1 dB``.

Also reported: ``SQNR(float, ref)``, the error the quantization itself causes. A folder export (a
folder, or a model file with a ``manifest.json`` next to it) is checked too
(:mod:`ditq.runtime.integrity`): the manifest's sizes and SHA-256, and recipe.json against the recipe
the model carries; a missing or malformed manifest is a failed check (exit 1), not bad input. A lone
model file has no folder to check. The report names the recipe validated (``--recipe``'s file, or the
one the model carries).

The session that is validated applies the ONNX Runtime config entries the model records
(``ditq.session_config``, see :mod:`ditq.runtime.session`). The same cases also run in a *default*
session (no config entries: what a deployer gets from a plain ``InferenceSession``) and are reported
next to it; validation fails when that session misses the bound and the model records no configuration.
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from tqdm.auto import tqdm

from ditq.adapters import adapter_for
from ditq.calib.numerics import sqnr_db
from ditq.errors import DitqError, one_line
from ditq.fileformat import EXACT_QDQ_CONFIG, META_PLANS, META_RECIPE, META_SOURCE, META_TARGET
from ditq.graphs.checks import activation_qdq_layers, check_activations
from ditq.graphs.plan_record import plans_from_json
from ditq.graphs.targets import target_named
from ditq.manifest import MANIFEST_FILE
from ditq.models import load_from_source, load_model
from ditq.recipe import LayerPlan, Recipe
from ditq.runtime.generate import resolve_model_file
from ditq.runtime.integrity import folder_checks
from ditq.runtime.session import applied_session_config, create_session, recorded_session_config, run_session
from ditq.untrusted import check_source, parse_json
from ditq.workflows.validate_codes import build_reference, check_activation_codes, input_sizes

FP32_FLOOR_DB = 80.0
ACCURACY_MATCH_DB = 1.0
PLANS_CHECK = "the layer plans the model records are its recipe's under its target"
CASES = (  # (batch, seed, timesteps)
    (1, 0, (999,)),
    (2, 1, (0, 500)),
    (3, 2, (1, 250, 999)),
)


@dataclass
class Check:
    name: str
    passed: bool
    detail: str = ""


@dataclass
class CaseResult:
    batch: int
    timesteps: list[int]
    classes: list[int] | None  # class-conditioned families' labels; None: text-conditioned
    sqnr_ort_vs_ref_db: float
    max_abs_ort_vs_ref: float
    sqnr_ref_vs_float_db: float
    sqnr_ort_vs_float_db: float
    bound_db: float
    passed: bool
    sqnr_default_vs_ref_db: float | None = None  # the same case in a session without config entries
    default_passed: bool | None = None


@dataclass
class ValidationReport:
    model: str
    recipe: dict[str, Any]
    checks: list[Check] = field(default_factory=list)
    cases: list[CaseResult] = field(default_factory=list)
    seconds: float = 0.0
    session_config: dict[str, str] | None = None  # what the model records; None: nothing
    recipe_file: str | None = None  # the recipe validated: this file (--recipe); None: the model's ditq.recipe

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks) and all(c.passed for c in self.cases)

    def to_dict(self) -> dict[str, Any]:
        def clean(v):
            return None if isinstance(v, float) and math.isinf(v) else v

        return {
            "model": self.model,
            "passed": self.passed,
            "seconds": round(self.seconds, 2),
            "checks": [asdict(c) for c in self.checks],
            "cases": [{k: clean(v) for k, v in asdict(c).items()} for c in self.cases],
            "recipe": self.recipe,
            "recipe_file": self.recipe_file,
            "session_config": self.session_config,
        }

    def table(self) -> str:
        lines = [f"ditq validate {self.model}", "recipe validated: " + (f"{self.recipe_file} (--recipe)" if self.recipe_file
                 else "the one the model carries (ditq.recipe metadata)"), "", "checks"]  # fmt: skip
        for c in self.checks:
            lines.append(f"  [{'PASS' if c.passed else 'FAIL'}] {c.name}" + (f": {c.detail}" if c.detail else ""))
        lines += ["", "outputs (SQNR in dB; ort=ONNX Runtime, ref=PyTorch reference, float=unquantized model;",
                  "        pass: ort-vs-ref >= bound and ort-vs-float within 1 dB of ref-vs-float;",
                  "        default: ort-vs-ref of a session without config entries; session config the model records: "
                  + ("none" if self.session_config is None else _config(self.session_config) or "{}") + ")"]
        lines.append(f"  {'batch':>5} {'timesteps':<16} {'ort-vs-ref':>10} {'bound':>6} {'max|ort-ref|':>12} {'ref-vs-float':>12} {'ort-vs-float':>12} {'default':>8}  result")
        for c in self.cases:
            lines.append(
                f"  {c.batch:>5} {','.join(map(str, c.timesteps)):<16} {_db(c.sqnr_ort_vs_ref_db):>10} {c.bound_db:>6.1f} "
                f"{c.max_abs_ort_vs_ref:>12.3e} {_db(c.sqnr_ref_vs_float_db):>12} {_db(c.sqnr_ort_vs_float_db):>12} "
                f"{'-' if c.sqnr_default_vs_ref_db is None else _db(c.sqnr_default_vs_ref_db):>8}  "
                f"{'PASS' if c.passed else 'FAIL'}"
            )
        lines += ["", f"{'PASSED' if self.passed else 'FAILED'} in {self.seconds:.1f} s"]
        return "\n".join(lines)


def _db(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.1f}"


def _config(config: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.items())


def load_proto(path: Path):
    try:
        proto = onnx.load(str(path))
    except (DecodeError, OSError, ValueError, onnx.onnx_cpp2py_export.checker.ValidationError) as e:
        raise DitqError(f"{path}: not a readable ONNX model ({one_line(e, 200)})") from None
    if not proto.HasField("graph") or not proto.graph.node:  # protobuf parses many byte strings as an empty model
        raise DitqError(f"{path}: not an ONNX model (no graph)")
    return proto


def output_bound_db(quantizes_activations: bool, sqnr_ref_vs_float_db: float) -> float:
    """The documented bound on SQNR(ort, ref) (see the module docstring)."""
    if not quantizes_activations:
        return FP32_FLOOR_DB
    return min(FP32_FLOOR_DB, sqnr_ref_vs_float_db)


def within_bound(ort_out: np.ndarray, ref: np.ndarray, flt: np.ndarray, bound_db: float) -> bool:
    """One case's criterion (module docstring): ``SQNR(ort, ref) >= bound``, and ORT as accurate against
    the float model as the reference is (unless it agrees with the reference to the fp32 floor)."""
    ort_vs_ref = sqnr_db(ref, ort_out)
    same_accuracy = abs(sqnr_db(flt, ort_out) - sqnr_db(flt, ref)) <= ACCURACY_MATCH_DB or ort_vs_ref >= FP32_FLOOR_DB
    return bool(ort_vs_ref >= bound_db and same_accuracy and np.isfinite(ort_out).all())


def default_session_check(cases: list[CaseResult], recorded: dict[str, str] | None, applied: dict[str, str]) -> Check:
    """Passes when a session without config entries meets every case's bound, or when the model records
    :data:`~ditq.runtime.session.EXACT_QDQ_CONFIG`, the configuration that runs its weight
    ``DequantizeLinear -> MatMul`` exactly (any other recorded config does not excuse the default session)."""
    worst = min(cases, key=lambda c: c.sqnr_default_vs_ref_db - c.bound_db)
    ok = all(c.default_passed for c in cases)
    needed = recorded is not None and all(recorded.get(k) == v for k, v in EXACT_QDQ_CONFIG.items())
    detail = f"worst case {_db(worst.sqnr_default_vs_ref_db)} dB against a bound of {worst.bound_db:.1f} dB"
    if not ok:
        detail += (f"; the model records the config it needs: {_config(recorded)}" if needed
                   else f"; the model records {_config(recorded) or '{}'}, not {_config(EXACT_QDQ_CONFIG)}" if recorded is not None
                   else "; the model records no config that meets it" + (f" (validated with {_config(applied)})" if applied else ""))  # fmt: skip
    return Check("default ONNX Runtime session within the bound, or the config it needs recorded", ok or needed, detail)


def _feeds(adapter, inputs) -> dict[str, np.ndarray]:
    """The session feeds of one case's torch inputs, by the family's input names."""
    return {name: x.numpy() for name, x in zip(adapter.input_names, inputs)}


def recorded_plans(meta: dict[str, str], path: Path) -> dict[str, LayerPlan]:
    """The effective layer plans a model records (``ditq.plans``: what each layer's kernel computes, as
    the exporting ditq chose it), read as untrusted input; one-line :class:`DitqError` when they are
    missing or not a well-formed record."""
    if META_PLANS not in meta:
        raise DitqError(f"{path} records no layer plans (ditq.plans): re-export with this ditq")
    try:
        return plans_from_json(meta[META_PLANS], f"{path}: ditq.plans")
    except DitqError as e:
        raise DitqError(f"{one_line(e, 400)}: re-export with this ditq") from None


def validate(
    model_path: str | Path,
    *,
    model_spec: str | None = None,
    recipe_path: str | Path | None = None,
    image_size: int | None = None,
    provider: str = "cpu",
    progress: bool = True,
) -> ValidationReport:
    """Validate an exported model (folder or ``.onnx``) against the layer plans it records
    (``ditq.plans``: what its kernels compute, see :func:`recorded_plans`); raises :class:`DitqError` on
    bad input."""
    t0 = time.perf_counter()
    path = resolve_model_file(model_path)
    proto = load_proto(path)
    meta = {p.key: p.value for p in proto.metadata_props}
    if recipe_path is not None:
        recipe = Recipe.load(recipe_path)
    elif META_RECIPE in meta:
        recipe = Recipe.from_json(meta[META_RECIPE])
    else:
        raise DitqError(f"{path} carries no ditq recipe; pass --recipe")
    target = target_named(meta.get(META_TARGET, "qdq"), f"{path}: ditq.target")
    if model_spec is not None:
        source = None
    elif META_SOURCE in meta:
        where = f"{path}: ditq.source"
        source = check_source(parse_json(meta[META_SOURCE], where), where)
    else:
        raise DitqError(f"{path} carries no model source; pass --model")
    plans = recorded_plans(meta, path)
    loaded = load_model(model_spec, image_size=image_size) if source is None else load_from_source(source)

    report = ValidationReport(str(model_path), recipe.to_dict(), recipe_file=None if recipe_path is None else str(recipe_path))
    if Path(model_path).is_dir() or (path.parent / MANIFEST_FILE).exists() or (path.parent / MANIFEST_FILE).is_symlink():
        # a folder export: the folder is ditq's, as written (a lone .onnx file has no manifest to check)
        report.checks += [Check(*c) for c in folder_checks(path, meta)]
    steps = tqdm(total=4 + len(CASES), desc="validate", unit="step", disable=not progress)
    gptq = recipe.method == "gptq"
    problems = target.plan_problems(recipe.resolve(loaded.model), plans)
    if problems:  # the model was not built from this recipe (or its record was edited): nothing to rebuild
        report.checks.append(Check(PLANS_CHECK, False, f"{len(problems)} problem(s): " + "; ".join(problems[:3])))
        steps.close()
        return report
    target = target.recorded(plans)  # the reference computes what the file records, not today's kernel choice
    weight_fails = target.weight_problems(proto, plans)
    if gptq and weight_fails:  # GPTQ codes depend on calibration data: the reference takes the stored ones
        detail = f"{len(weight_fails)} problem(s): " + "; ".join(weight_fails[:3])  # nothing trustworthy to build it from
        report.checks.append(Check("quantized weights: type, block size, shapes, code range", False, detail))
        steps.close()
        return report
    try:
        onnx.checker.check_model(str(path), full_check=True)
        report.checks.append(Check("onnx checker (full shape inference)", True))
    except Exception as e:  # checker raises ValidationError / InferenceError
        report.checks.append(Check("onnx checker (full shape inference)", False, one_line(e, 300)))
    act_fails, probes = check_activations(proto, plans), target.probes(proto, plans)

    adapter = adapter_for(loaded.model)
    config = dict(loaded.model.config)
    cases = []
    for batch, seed, ts in CASES:
        inputs = list(adapter.example_inputs(config, batch=batch, seed=100 + seed))
        inputs[adapter.timestep_index] = adapter.timestep_input(list(ts))
        cases.append(tuple(inputs))
    with torch.no_grad():
        floats = [adapter.wrap(loaded.model)(*inputs).numpy() for inputs in cases]
        steps.update()
        # the float outputs are taken: the model becomes the reference, layer group by layer group
        code_fails = build_reference(loaded.model, plans, proto, target, recipe.method, stored=gptq)
        del proto  # the file's tensors: the checks below read the file itself
        for name, fails, covered in (
            ("quantized weights: type, block size, shapes, code range", weight_fails, len(plans)),
            *([] if gptq else [("stored codes and scales equal the reference's", code_fails, len(plans))]),
            ("activation scales computed in the graph from min/max", act_fails, len(activation_qdq_layers(plans))),
        ):
            ok = f"{covered} layers" if covered else "none to check (no layer quantizes its input in the graph)"
            detail = ok if not fails else f"{len(fails)} problem(s): " + "; ".join(fails[:3])
            report.checks.append(Check(name, not fails, detail))
        steps.update()
        reference = loaded.model
        refs = [adapter.wrap(reference)(*inputs).numpy() for inputs in cases[:-1]]
        with input_sizes(reference, list(dict.fromkeys(p.module for p in probes))) as sizes:  # what each probe exposes
            refs.append(adapter.wrap(reference)(*cases[-1]).numpy())
    del reference, loaded  # ONNX Runtime's sessions below run without the torch model in memory
    gc.collect()
    steps.update()

    report.session_config = recorded_session_config(meta, str(path))
    session_config = applied_session_config(meta, str(path))
    session = create_session(path, provider=provider, config=session_config)
    quantizes_acts = any(p.abits is not None for p in plans.values())
    labels = [adapter.input_names.index("class_labels")] if "class_labels" in adapter.input_names else []
    for inputs, f, r in zip(cases, floats, refs):
        o = run_session(session, _feeds(adapter, inputs), where=str(path))[0]
        ref_vs_float = sqnr_db(f, r)
        bound = output_bound_db(quantizes_acts, ref_vs_float)
        report.cases.append(
            CaseResult(
                batch=int(inputs[0].shape[0]), timesteps=[int(v) for v in CASES[len(report.cases)][2]],
                classes=inputs[labels[0]].tolist() if labels else None,
                sqnr_ort_vs_ref_db=sqnr_db(r, o), max_abs_ort_vs_ref=float(np.abs(o - r).max()),
                sqnr_ref_vs_float_db=ref_vs_float, sqnr_ort_vs_float_db=sqnr_db(f, o), bound_db=bound,
                passed=within_bound(o, r, f, bound),
            )
        )  # fmt: skip
        steps.update()
    del session
    session = create_session(path, provider=provider, config={})  # what a plain InferenceSession computes
    for inputs, f, r, case in zip(cases, floats, refs, report.cases):
        o = run_session(session, _feeds(adapter, inputs), where=str(path))[0]
        case.sqnr_default_vs_ref_db, case.default_passed = sqnr_db(r, o), within_bound(o, r, f, case.bound_db)
    del session
    report.checks.append(default_session_check(report.cases, report.session_config, session_config))

    # activation codes: expose every QuantizeLinear's input and final codes, recompute them in torch
    if probes:
        bad, total = check_activation_codes(path, probes, _feeds(adapter, cases[-1]), sizes, provider=provider, config=session_config)
        detail = f"{total} codes in {len(probes)} activation quantizers" if not bad else "; ".join(bad[:3])
        report.checks.append(Check("activation codes equal the reference numerics (bit exact)", not bad, detail))
    steps.update()
    steps.close()
    report.seconds = time.perf_counter() - t0
    return report
