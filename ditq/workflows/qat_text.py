"""``ditq qat`` of a text-conditioned digits model (``digits-t2i``, and models trained from it): RobuQ
quantization-aware training of its transformer on the 16x16 digits with their training paraphrases,
written as a pipeline folder ``ditq export`` reads again.

The data are those the model was trained on: scikit-learn's digits at 16x16 with each digit's training
paraphrases (:func:`ditq.calib.digits_prompts.train_prompts`), encoded once by the folder's frozen float
text encoders; the loop is :func:`ditq.calib.qat_text.train_text_flow`. The output folder is the source's
pipeline (``model_index.json`` and every component folder it names, copied) with the trained EMA
``transformer/``, plus ``recipe.json``, the sampling pipeline (``ditq_pipeline.json``), ``qat.json`` and a
manifest; ``ditq export --model OUT --recipe OUT/recipe.json`` quantizes it exactly as at training time.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from ditq.adapters import adapter_for
from ditq.calib.conditioning import DIGITS_T2I_JUDGE, prompt_conditioning
from ditq.calib.qat import prepare_qat, strip_qat
from ditq.calib.digits_prompts import train_prompts
from ditq.calib.qat_text import train_text_flow
from ditq.calib.train_t2i import training_data
from ditq.calib.train import TrainConfig
from ditq.errors import DitqError
from ditq.files import check_out_dir, staged_dir
from ditq.manifest import RECIPE_FILE, write_manifest
from ditq.models import LoadedModel, source_paths
from ditq.recipe import Recipe
from ditq.untrusted import read_json

TRANSFORMER = "transformer"


def digits_t2i_data():
    """``(images [N, 1, 16, 16] in [-1, 1], labels [N])``: the training split of scikit-learn's digits at
    the size and resampling the ``digits-t2i`` trainer uses."""
    return training_data()


def run_qat_text(model_spec: str, recipe: Recipe, out_dir: str | Path, cfg: TrainConfig, *, checkpoint: str | Path | None = None,
                 progress: bool = True, force: bool = False, loaded: LoadedModel) -> tuple[Path, list[float], float]:  # fmt: skip
    """:func:`ditq.workflows.qat.run_qat` for a text-conditioned model (the module docstring): the output
    folder, the per-100-step losses and the training seconds."""
    adapter, config = adapter_for(loaded.model), dict(loaded.model.config)
    pipe = loaded.pipeline.fitted_to(None, adapter.sample_shape(config), f"{model_spec}: pipeline")
    if pipe.judge != DIGITS_T2I_JUDGE:
        raise DitqError(f"{model_spec}: ditq qat trains on scikit-learn's digits; this model is not a digits model")
    roots = [p for p in source_paths(loaded.source) if p.is_dir() and (p / "model_index.json").is_file()]
    if not pipe.text or not roots:
        raise DitqError(f"{model_spec}: ditq qat of a text-conditioned model needs its pipeline folder (model_index.json) and text encoders")
    root = roots[0]
    protect = source_paths(loaded.source) + ([Path(checkpoint)] if checkpoint else [])
    check_out_dir(out_dir, protect=protect, force=force)  # before the training, not after
    per_digit = [train_prompts(d) for d in range(10)]
    prompts = tuple(p for ps in per_digit for p in ps)
    starts = [sum(map(len, per_digit[:d])) for d in range(10)]
    bank = prompt_conditioning(root, pipe, adapter.spec, prompts)
    x, y = digits_t2i_data()
    model = prepare_qat(loaded.model, recipe)
    t0 = time.perf_counter()
    result = train_text_flow(model, x, y, bank, [range(starts[d], starts[d] + len(per_digit[d])) for d in range(10)], cfg,
                             checkpoint=checkpoint, progress=progress)  # fmt: skip
    trained = strip_qat(result.ema)
    seconds = round(time.perf_counter() - t0, 1)
    info = {"base_model": loaded.source, "recipe": recipe.to_dict(), "config": asdict(cfg), "losses_per_100_steps": result.losses,
            "seconds": seconds}  # fmt: skip
    index = read_json(root / "model_index.json")
    with staged_dir(Path(out_dir), protect=protect, force=force) as stage:
        for name, value in index.items():
            if not name.startswith("_") and name != TRANSFORMER and isinstance(value, list) and (root / name).is_dir():
                shutil.copytree(root / name, stage / name, symlinks=False)
        (stage / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        trained.save_pretrained(stage / TRANSFORMER)
        (stage / RECIPE_FILE).write_text(recipe.to_json() + "\n")
        pipe.write_to(stage)
        (stage / "qat.json").write_text(json.dumps(info, indent=2) + "\n")
        write_manifest(stage, {"kind": "qat"})
    return Path(out_dir), list(result.losses), seconds
