"""``ditq eval``: quantize, export and sample several configurations on the same seeds, and judge them.

For every configuration (``fp``, ``w8a8``, ``w4a16``, ``w4a4g32``, ...) the model is quantized (RTN,
Q-DiT coverage), exported to a ``qdq`` ONNX model, and sampled with ONNX Runtime from the same starting
noise and labels (a text-to-image model: from the same noise and prompts, in ONNX Runtime alone; the
``digits-t2i`` models from held-out paraphrases they never saw in training). Reported per configuration, as the mean (and spread) over the seed sets:

- ``fid``: Frechet distance to the held-out real images in the judge's feature space (FID-digits);
- ``class_accuracy``: how often the judge recognises the class each sample was asked for;
- ``sqnr_db``: the first denoising step's model output against the float PyTorch model on the same inputs;
- ``sample_rmse``: RMSE of the final samples against the float export's samples from the same noise;
- ``file_bytes``: the exported model's size (graph + weights).

``noise_floor_fid`` is the same distance between two disjoint real sets (training images, as many as
samples, against the held-out images): a generator is as good as real data by this metric when its FID
reaches the floor. Run-to-run noise is the spread over the seed sets.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as torch_nn
from tqdm.auto import tqdm

from ditq.adapters import adapter_for
from ditq.calib.calibration import CalibConfig, record_activations
from ditq.calib.digits import load_split, to_unit_range
from ditq.calib.qlinear import quantize_input
from ditq.errors import DitqError, shown
from ditq.exporter.export import export
from ditq.exporter.reference import quantize_model
from ditq.graphs.targets import QDQ, Target, target_named
from ditq.models import LoadedModel, load_model
from ditq.options import MAX_CFG, MAX_SAMPLES, MAX_STEPS, SEED_MAX, check_float, check_int
from ditq.recipe import TERNARY, LayerQuant, Recipe
from ditq.runtime.images import grid_image, save_png
from ditq.runtime.metrics import DigitJudge, FeatureFn, fid, inception_features, load_images
from ditq.workflows.eval_draws import ClassDraws, TextDraws
from ditq.workflows.export import SAME_GROUP, BuiltRecipe, CalibrationOptions, RecipeOptions, build_recipe, calibrate

_CONFIG_RE = re.compile(r"^w([2-8])a([2-8]|16|fp)(?:g(\d+|ch))?$")
_ROBUQ_RE = re.compile(r"^w1\.58a([1-8])(h?)(m?)$")  # RobuQ: ternary, A bits, +Hadamard, +mixed precision
FLOAT_RECIPE = Recipe(LayerQuant(None, None, None), ())  # ``fp``: nothing covered


@dataclass(frozen=True)
class EvalConfig:
    name: str
    wbits: int | None  # None: the float model
    abits: int | None
    group_size: int | None
    recipe_file: str | None = None  # a recipe JSON (e.g. from ``ditq search``) instead of the bits above
    base_group: int | None = None  # group size of the weight-only layers (gN sets the W+A block linears)
    target: Target = QDQ  # export target (ditq.graphs.targets): qdq (Q-DiT's arithmetic) or ort (ONNX Runtime's int8 kernels)
    ternary: bool = False  # RobuQ: ternary weights, per-token activations (Recipe.robuq)
    rotate: bool = False  # RobuQ: + Hadamard rotation
    mixed: bool = False  # RobuQ: + activation bits per layer averaging ``abits`` (needs the model's sensitivity)

    @property
    def is_float(self) -> bool:
        """``fp``: the float model, no quantization."""
        return not self.ternary and self.recipe_file is None and self.wbits is None

    def options(self, symmetric: bool = False, method: str | None = None) -> RecipeOptions | None:
        """The :class:`~ditq.workflows.export.RecipeOptions` of this configuration (None: the float model);
        ``symmetric`` and ``method`` apply to the Q-DiT configurations and recipe files."""
        if self.ternary:
            return RecipeOptions(TERNARY, self.abits, None, rotate=self.rotate, mixed=self.mixed)
        if self.is_float:
            return None
        if self.recipe_file is not None:
            return RecipeOptions(recipe_file=self.recipe_file, method=method)
        block = SAME_GROUP if self.group_size == self.base_group else self.group_size
        return RecipeOptions(self.wbits, self.abits, self.base_group, symmetric, block_group_size=block, method=method)

    def build(self, loaded: LoadedModel | None, symmetric: bool = False, method: str | None = None, *,
              progress: bool = False) -> BuiltRecipe:  # fmt: skip
        """This configuration's recipe for ``loaded`` (:func:`~ditq.workflows.export.build_recipe`: a group
        size of ``auto`` and mixed activation bits are resolved on the model; None: no model)."""
        options = self.options(symmetric, method)
        return BuiltRecipe(FLOAT_RECIPE) if options is None else build_recipe(options, loaded, progress=progress)


def parse_config(raw: str, group_size: int | None, default_target: str = "qdq") -> EvalConfig:
    """One configuration of ``--configs`` (eval) or ``--variants`` (bench): ``fp``; ``wXaY[gN]`` with bits
    of weights and activations (16/fp: float activations) and an optional group size of the
    weight+activation block linears (``gch``: per channel / token; every other layer keeps ``group_size``);
    ``w1.58aY[h][m]`` (RobuQ: ternary, +Hadamard, +mixed activation bits); or a recipe file (named by its
    file stem). ``@ort`` / ``@qdq`` picks the export target (default ``default_target``); the name carries
    ``@ort`` when the target is ``ort``."""
    raw = raw.strip()
    raw, _, target_name = raw.partition("@")
    target = target_named(target_name.lower() or default_target, f"the target of {shown(raw)} (@qdq or @ort)")
    suffix = "" if target is QDQ else f"@{target.name}"
    name = raw.lower()
    if name.endswith(".json"):
        if not Path(raw).is_file():
            raise DitqError(f"recipe file not found: {raw}")
        return EvalConfig(Path(raw).stem + suffix, None, None, None, raw, target=target)
    if name in ("fp", "float", "fp32"):
        return EvalConfig("fp", None, None, None)
    r = _ROBUQ_RE.match(name)
    if r:
        return EvalConfig(name + suffix, None, int(r.group(1)), None, target=target, ternary=True,
                          rotate=bool(r.group(2)), mixed=bool(r.group(3)))  # fmt: skip
    m = _CONFIG_RE.match(name)
    if not m:
        raise DitqError(
            f"cannot read {name!r}; expected fp, wXaY[gN] (e.g. w4a8, w4a16, w4a4g32), "
            "w1.58aY[h][m] (RobuQ: ternary, +h Hadamard, +m mixed activation bits) or a recipe .json, "
            "each optionally @ort or @qdq"
        )
    abits = None if m.group(2) in ("16", "fp") else int(m.group(2))
    g = group_size if m.group(3) is None else (None if m.group(3) == "ch" else int(m.group(3)))
    return EvalConfig(name + suffix, int(m.group(1)), abits, g, base_group=group_size, target=target)


def parse_configs(text: str, group_size: int | None) -> list[EvalConfig]:
    """``"fp,w8a8,w4a16,w4a4g32,w4a4gch,searched.json,w4a8@ort"`` (see :func:`parse_config`); target
    ``qdq`` unless a configuration says ``@ort``."""
    out = []
    for raw in [c for c in text.split(",") if c.strip()]:
        try:
            out.append(parse_config(raw, group_size))
        except DitqError as e:
            raise DitqError(f"--configs: {e}") from None
    if not out:
        raise DitqError("--configs is empty")
    if len({c.name for c in out}) != len(out):
        raise DitqError(f"--configs lists a configuration twice: {text!r}")
    return out


@dataclass
class EvalRow:
    config: str
    fid: float
    class_accuracy: float | None
    sqnr_db: float
    file_bytes: int
    fid_std: float = 0.0
    class_accuracy_std: float = 0.0
    sample_rmse: float | None = None
    layer_error: float | None = None  # mean relative output error of the block linears (--layer-error)
    per_seed: list[dict[str, Any]] = field(default_factory=list)
    # paired against the fp row, seed set by seed set (same noise, same labels or prompts): mean and spread of the differences
    fid_delta: float | None = None
    fid_delta_std: float = 0.0
    class_accuracy_delta: float | None = None
    class_accuracy_delta_std: float = 0.0


@dataclass
class EvalReport:
    rows: list[EvalRow]
    noise_floor_fid: float
    noise_floor_fid_std: float
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": [asdict(r) for r in self.rows],
            "noise_floor_fid": self.noise_floor_fid,
            "noise_floor_fid_std": self.noise_floor_fid_std,
            "settings": self.settings,
        }

    def table(self) -> str:
        s = self.settings
        spread = len(s["seeds"]) > 1
        le = any(r.layer_error is not None for r in self.rows)
        paired = any(r.fid_delta is not None for r in self.rows)
        head = f"{'config':<10} {'FID-digits':>14} {'class acc':>14} {'SQNR step1':>11} {'RMSE vs fp':>11} {'file MB':>8}" + (
            f" {'layer err':>10}" if le else "") + (f" {'dFID vs fp':>14} {'d acc vs fp':>14}" if paired else "")
        lines = [
            f"{s['model']}: {s['num_samples']} samples x {len(s['seeds'])} seed set(s) {s['seeds']}, "
            f"{s['sampler']}-{s['steps']}, cfg {s['cfg']}, group size {s['group_size']}, weights {s['method']}",
            head,
            "-" * len(head),
        ]
        for r in self.rows:
            f = f"{r.fid:.2f}" + (f" ±{r.fid_std:.2f}" if spread else "")
            a = "-" if r.class_accuracy is None else f"{100 * r.class_accuracy:.1f}%" + (f" ±{100 * r.class_accuracy_std:.1f}" if spread else "")
            q = "inf" if not np.isfinite(r.sqnr_db) else f"{r.sqnr_db:.1f} dB"
            e = "-" if r.sample_rmse is None else f"{r.sample_rmse:.4f}"
            lines.append(f"{r.config:<10} {f:>14} {a:>14} {q:>11} {e:>11} {r.file_bytes / 1e6:>8.2f}"
                         + ((f" {r.layer_error:>10.4f}" if r.layer_error is not None else f" {'-':>10}") if le else "")
                         + (_paired_cells(r, spread) if paired else ""))  # fmt: skip
        if paired and spread:
            lines.append("d...vs fp: the difference to the fp row on each seed set (same noise, same conditioning), mean ± spread")
        floor = f"{self.noise_floor_fid:.2f}" + (f" ±{self.noise_floor_fid_std:.2f}" if spread else "")
        lines.append(f"noise floor (real vs real, {s['num_samples']} vs {s['real_images']} images): FID-digits {floor}")
        return "\n".join(lines)


def _paired_cells(r: EvalRow, spread: bool) -> str:
    if r.fid_delta is None or r.config == "fp":
        return f" {'-':>14} {'-':>14}"
    f = f"{r.fid_delta:+.2f}" + (f" ±{r.fid_delta_std:.2f}" if spread else "")
    a = "-" if r.class_accuracy_delta is None else f"{100 * r.class_accuracy_delta:+.1f}" + (f" ±{100 * r.class_accuracy_delta_std:.1f}" if spread else "")
    return f" {f:>14} {a:>14}"


def _layer_error(qdit, inputs) -> float:
    """Mean over the covered block linears of ``|Q_a(x H) Q(W H)^T - x W^T| / |x W^T|`` on held-out
    inputs (``H = I`` for unrotated layers): the layer as it runs, its input side (rotation, then the
    dynamic activation quantizer) being the exported linear's own, against the float layer (no bias)."""
    named = dict(qdit.model.named_modules())
    errs = []
    for name, plan in qdit.plans.items():
        if plan.kind != "linear" or name not in inputs:
            continue
        ref = inputs[name].double() @ named[name].weight.detach().double().T
        out = quantize_input(inputs[name], plan).double() @ qdit.weights[name].dequantize().double().T
        errs.append(float(torch.linalg.norm(out - ref) / torch.linalg.norm(ref)))
    return float(np.mean(errs)) if errs else float("nan")


def _paired(row: EvalRow, fp: EvalRow) -> None:
    """``row``'s FID and class accuracy minus the float row's, seed set by seed set: mean and sample spread."""
    def spread(d: np.ndarray) -> float:
        return float(d.std(ddof=1)) if len(d) > 1 else 0.0

    d = np.array([a["fid"] - b["fid"] for a, b in zip(row.per_seed, fp.per_seed)])
    row.fid_delta, row.fid_delta_std = float(d.mean()), spread(d)
    if row.class_accuracy is not None:
        d = np.array([a["class_accuracy"] - b["class_accuracy"] for a, b in zip(row.per_seed, fp.per_seed)])
        row.class_accuracy_delta, row.class_accuracy_delta_std = float(d.mean()), spread(d)


def _sqnr(ref: np.ndarray, x: np.ndarray) -> float:
    err = float(np.sum((x.astype(np.float64) - ref) ** 2))
    return float("inf") if err == 0 else 10 * np.log10(float(np.sum(ref.astype(np.float64) ** 2)) / err)


def feature_space(features: FeatureFn | str | Path | None, real_images: np.ndarray | str | Path | None
                  ) -> tuple[FeatureFn | None, np.ndarray | None]:  # fmt: skip
    """The Frechet distance's feature extractor and real images: both None (the digit judge's space), or
    both given: ``features`` a callable (images ``[N,C,H,W]`` in [0,1] -> ``[N,D]``) or Inception weights
    (:func:`~ditq.runtime.metrics.inception_features`); ``real_images`` an array ``[N,C,H,W]`` in [0,1] or
    a folder/file :func:`~ditq.runtime.metrics.load_images` reads."""
    if (features is None) != (real_images is None):
        raise DitqError("--inception and --real-images go together (a feature space needs real images to compare with)")
    if isinstance(features, (str, Path)):
        features = inception_features(features)
    if isinstance(real_images, (str, Path)):
        real_images = load_images(real_images)
    return features, real_images


def evaluate(
    model_spec: str = "digits",
    configs: list[EvalConfig] | None = None,
    *,
    num_samples: int = 500,
    steps: int = 50,
    cfg: float = 1.5,
    sampler: str | None = None,
    seeds: list[int] = (0,),
    group_size: int | None = 64,
    symmetric: bool = False,
    method: str | None = None,
    provider: str = "cpu",
    exports_dir: str | Path | None = None,
    grid_path: str | Path | None = None,
    grid_columns: int = 10,
    judge_path: str | Path | None = None,
    features: FeatureFn | str | Path | None = None,
    real_images: np.ndarray | str | Path | None = None,
    calibration: CalibrationOptions = CalibrationOptions(),
    layer_error: bool = False,
    progress: bool = True,
) -> EvalReport:
    """Evaluate ``configs`` of ``model_spec`` (see the module docstring).

    ``features``/``real_images``: another feature space for the Frechet distance and the real images to
    compare with, given together (:func:`feature_space`); by default the digit judge's features and the
    held-out digits. Class accuracy needs the judge, so it is reported for digit models only. ``method``
    overrides the quantized configurations' weight method; ``gptq`` is calibrated as ``calibration`` says
    (:func:`ditq.workflows.export.calibrate`).
    """

    configs = configs or parse_configs("fp,w8a8,w6a8,w4a8,w4a16", group_size)
    features, real_images = feature_space(features, real_images)
    check_int(num_samples, "num_samples", 2, MAX_SAMPLES)  # FID needs a covariance: 2 samples at least
    check_int(steps, "steps", 1, MAX_STEPS)
    check_float(cfg, "cfg", 0.0, MAX_CFG)
    seeds = [check_int(s, "seeds", 0, SEED_MAX) for s in seeds]
    loaded = load_model(model_spec)
    pipe = loaded.pipeline
    if not pipe.samples_pixels:
        raise DitqError(f"{model_spec}: samples latents; ditq eval judges pixel-space models (digits, digits-t2i, or images "
                        "in --real-images' space); sample it with ditq sample")  # fmt: skip
    for conf in configs:  # a recipe that does not fit the model is refused now, not after the configurations before it
        if not conf.mixed:
            with torch.no_grad():
                conf.build(loaded, symmetric, method).recipe.resolve(loaded.model)
    draws = (TextDraws if adapter_for(loaded.model).conditioning(dict(loaded.model.config)) is None else ClassDraws)(
        loaded, model_spec, num_samples=num_samples, steps=steps, cfg=cfg, sampler=sampler, seed=seeds[0], provider=provider)  # fmt: skip
    sampler = draws.sampler
    judge = DigitJudge.load(judge_path) if draws.judged else None
    split = load_split()
    own_space = features is None  # the judge's features and the digits split
    if own_space:
        if judge is None:
            raise DitqError(f"{model_spec}: {draws.not_digits}; give a feature extractor (--inception WEIGHTS) and --real-images")
        features, real_images = judge.features, to_unit_range(split.x_test)
    real_feats = features(real_images)
    labels = draws.labels
    tmp = None
    if exports_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ditq-eval-")
        exports_dir = tmp.name
    exports_dir = Path(exports_dir)
    rows: list[EvalRow] = []
    allocations: dict[str, dict[str, int]] = {}  # mixed-precision configs: activation bits per unit
    samples: dict[str, dict[int, np.ndarray]] = {}
    held_out = None  # block-linear inputs of held-out trajectories, recorded once for --layer-error
    t0 = time.perf_counter()
    bar = tqdm(total=len(configs) * (1 + len(seeds)), desc="eval", unit="job", disable=not progress)
    try:
        for conf in configs:
            bar.set_postfix_str(f"{conf.name}: quantize + export")
            if conf.mixed:
                bar.set_postfix_str(f"{conf.name}: activation sensitivity + bit allocation")
            built = conf.build(loaded, symmetric, method)
            recipe = built.recipe
            if built.bits_per_unit is not None:
                allocations[conf.name] = built.bits_per_unit
            inputs = None
            if recipe.method == "gptq":
                bar.set_postfix_str(f"{conf.name}: calibration + GPTQ")
                inputs = calibrate(loaded, recipe, calibration, progress=progress)
            qdit = quantize_model(loaded.model, recipe, progress=False, calibration=inputs, target=conf.target)
            lerr = None
            if layer_error and qdit.plans:
                if held_out is None:
                    bar.set_postfix_str("record held-out layer inputs")
                    blocks = adapter_for(loaded.model).coverage.blocks + "."
                    names = [n for n, m in loaded.model.named_modules() if n.startswith(blocks) and isinstance(m, torch_nn.Linear)]
                    held_out = record_activations(loaded.model, names, CalibConfig(num_samples=32, seed=4321), schedule=loaded.schedule,
                                                  clip_denoised=pipe.clip_denoised, progress=False, conditioning=draws.held_out_conditioning())  # fmt: skip
                lerr = _layer_error(qdit, held_out)
            res = export(qdit, exports_dir / conf.name.replace("@", "-"), source=loaded.source, pipeline=pipe, progress=False)
            del qdit
            model = draws.open(res.out_dir)
            sqnr = _sqnr(draws.float_probe, draws.probe(model))
            bar.update()
            per_seed, samples[conf.name] = [], {}
            for s in seeds:
                bar.set_postfix_str(f"{conf.name}: sample seed set {s}")
                x = draws.sample(model, s)
                samples[conf.name][s] = x
                imgs = draws.images(x)
                per_seed.append(
                    {"seed": s, "fid": fid(features(imgs), real_feats), "class_accuracy": judge.accuracy(imgs, labels) if judge else None}
                )
                bar.update()
            fids = np.array([p["fid"] for p in per_seed])
            accs = np.array([p["class_accuracy"] for p in per_seed], dtype=float) if judge else None
            rows.append(
                EvalRow(
                    conf.name, float(fids.mean()), float(accs.mean()) if judge else None, sqnr, res.file_bytes,
                    fid_std=float(fids.std(ddof=1)) if len(fids) > 1 else 0.0,
                    class_accuracy_std=float(accs.std(ddof=1)) if judge and len(accs) > 1 else 0.0,
                    per_seed=per_seed, layer_error=lerr,
                )  # fmt: skip
            )
    finally:
        bar.close()
        if tmp is not None:
            tmp.cleanup()
    if "fp" in samples:
        fp_row = next(r for r in rows if r.config == "fp")
        for r in rows:
            diffs = [np.sqrt(np.mean((samples[r.config][s] - samples["fp"][s]) ** 2)) for s in seeds]
            r.sample_rmse = float(np.mean(diffs))
            _paired(r, fp_row)
    # noise floor: a real set as large as the samples, disjoint from the reference set, in the same space
    floor = []
    pool = to_unit_range(split.x_train) if own_space else None
    for s in seeds:
        rng = np.random.default_rng(10_000 + s)
        if pool is not None:
            other = pool[rng.choice(len(pool), min(num_samples, len(pool)), replace=False)]
            floor.append(fid(features(other), real_feats))
        else:  # split the user's real images in two halves
            perm = rng.permutation(len(real_images))
            half = len(perm) // 2
            floor.append(fid(features(real_images[perm[:half]]), features(real_images[perm[half:]])))
    if grid_path is not None:
        k = min(grid_columns, num_samples)
        grid = grid_image(
            [draws.images(samples[cf.name][seeds[0]][:k], judged=False) for cf in configs],
            row_labels=[cf.name for cf in configs], col_labels=[str(int(v)) for v in labels[:k]],
        )  # fmt: skip
        save_png(grid, grid_path)
    settings = {
        "model": model_spec, "num_samples": num_samples, "steps": steps, "cfg": cfg, "sampler": sampler,
        "seeds": seeds, "group_size": group_size, "symmetric": symmetric, "method": method or "rtn", "real_images": len(real_images),
        "first_step_timestep": draws.first_timestep, **draws.settings, "seconds": round(time.perf_counter() - t0, 1),
        "activation_bits": allocations,
    }  # fmt: skip
    return EvalReport(rows, float(np.mean(floor)), float(np.std(floor, ddof=1)) if len(floor) > 1 else 0.0, settings)
