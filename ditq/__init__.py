"""ditq: Diffusion Transformers to deployable low-bit ONNX models, run with ONNX Runtime.

Python API (the CLI is a thin layer over these)::

    import ditq
    loaded = ditq.load_model("dit-s-2")                       # preset, diffusers folder or DiT checkpoint
    recipe = ditq.Recipe.qdit(wbits=4, abits=8, group_size=64)
    qdit = ditq.quantize(loaded.model, recipe)                # integer weights + PyTorch reference
    ditq.export(qdit, "out/dit-s-w4a8", source=loaded.source) # model.onnx + recipe.json + manifest.json
    report = ditq.validate("out/dit-s-w4a8")                  # ONNX Runtime vs the reference
    assert report.passed
"""

from __future__ import annotations

from ditq.errors import DitqError
from ditq.recipe import LayerQuant, Recipe, Rule

__all__ = ["DitqError", "LayerQuant", "Recipe", "Rule", "load_model", "quantize", "export", "validate"]


def load_model(spec: str, **kwargs):
    """See :func:`ditq.models.load_model`."""
    from ditq.models import load_model as _load

    return _load(spec, **kwargs)


def quantize(model, recipe: Recipe, progress: bool = False, target: str = "qdq"):
    """See :func:`ditq.exporter.reference.quantize_model`."""
    from ditq.exporter.reference import quantize_model

    return quantize_model(model, recipe, progress=progress, target=target)


def export(qdit, out_dir, *, source: dict | None = None, **kwargs):
    """See :func:`ditq.exporter.export.export`."""
    from ditq.exporter.export import export as _export

    return _export(qdit, out_dir, source=source or {"kind": "api"}, progress=kwargs.pop("progress", False), **kwargs)


def validate(model_path, **kwargs):
    """See :func:`ditq.workflows.validate.validate`."""
    from ditq.workflows.validate import validate as _validate

    return _validate(model_path, progress=kwargs.pop("progress", False), **kwargs)
