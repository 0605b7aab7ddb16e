"""``ditq export``: float DiT + recipe -> a self-describing low-bit ONNX model folder.

Output folder::

    model.onnx          the graph (+ model.onnx.data when the weights pass `external_data_bytes`)
    recipe.json         the recipe it was made with
    manifest.json       tool version, source, target, the ONNX Runtime session config entries the model
                        needs (also in its ``ditq.session_config`` metadata), files with their SHA-256 and sizes
    vae_decoder.onnx    a pipeline folder's float VAE decoder (latents / scaling_factor + shift_factor -> images)
    text_encoder*.onnx  a text-to-image pipeline's float text encoders and their tokenizers, tokenizer*.json
                        (:mod:`ditq.text`)

The folder is assembled under a temporary sibling name and renamed into place only when complete, so a
crash never leaves a half-written model under the final name, and re-exporting over an old folder starts
from empty files (ONNX's external-data writer appends, so reusing a folder would grow the data file).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from tqdm.auto import tqdm

from ditq.adapters import adapter_for
from ditq.errors import DitqError
from ditq.fileformat import (
    DEFAULT_OPSET, EXACT_QDQ_CONFIG, INT2_OPSET, MAX_OPSET, META_CONFIG, META_FAMILY, META_PIPELINE, META_PLANS, META_RECIPE,
    META_SESSION_CONFIG, META_SOURCE, META_TARGET, META_VERSION, MODEL_FILE,
)  # fmt: skip
from ditq.exporter.reference import QuantizedDiT
from ditq.exporter.text_encoders import write_text_encoders
from ditq.exporter.trace import bind_modules, export_float, export_vae_decoder, strip_trace_metadata
from ditq.files import staged_dir
from ditq.graphs.external import load_initializers, offload_initializers
from ditq.graphs.lower_ort import KERNEL_QDQ, LowerToOrtKernelsPass, kernel_counts
from ditq.graphs.opset import INT2_TYPES, RaiseOpsetForInt2Pass
from ditq.graphs.passes import PassSequence
from ditq.graphs.plan_record import plans_to_json
from ditq.graphs.quant_activations import InsertActivationQDQPass
from ditq.graphs.quant_weights import StoreQuantizedWeightsPass, fusable_weight_matmuls
from ditq.graphs.targets import as_target
from ditq.graphs.tensors import code_type
from ditq.manifest import RECIPE_FILE, tool_version, write_manifest
from ditq.models import load_vae, pipeline_info, source_folder, source_paths
from ditq.options import check_int
from ditq.pipeline import Pipeline

DATA_FILE = "model.onnx.data"


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    model_path: Path
    file_bytes: int
    seconds: float
    layers: int
    activation_quantizers: int  # in-graph activation Q/DQ subgraphs (to_q/k/v share one)
    kernels: int = 0  # layers lowered to ONNX Runtime kernels (target ``ort``)


def _jsonable_config(config: Any) -> dict[str, Any]:
    return {k: v for k, v in dict(config).items() if not k.startswith("_") and isinstance(v, (int, float, str, bool, list, type(None)))}


def required_opset(qdit: QuantizedDiT) -> int:
    """The lowest opset whose types hold every tensor of ``qdit``'s graph: ``INT2_OPSET`` (25) when a layer
    kept as standard QDQ stores 2-bit codes (INT2/UINT2, see :func:`ditq.graphs.tensors.code_type`; the
    ``ort`` kernels pack theirs into uint8), else ``DEFAULT_OPSET`` (21: blocked Q/DQ, INT4/UINT4). Read
    from the plans (ternary's 1.58 bits are 2-bit codes), so known before any weight is quantized."""
    int2 = any(code_type(p.quant.wbits, p.quant.symmetric) in INT2_TYPES for p in qdit.plans.values() if p.kernel == KERNEL_QDQ)
    return INT2_OPSET if int2 else DEFAULT_OPSET


def resolve_opset(qdit: QuantizedDiT, opset: int | None) -> int:
    """The opset to write: ``opset`` when given and able to hold the recipe, else :func:`required_opset`."""
    if opset is None:
        return required_opset(qdit)
    opset = check_int(opset, "opset", 0, 10**4)  # an integer: the bounds that matter follow, each with its reason
    if opset < DEFAULT_OPSET:
        raise DitqError(f"opset {opset} has no blocked QuantizeLinear/DequantizeLinear; use {DEFAULT_OPSET} or later")
    highest = min(MAX_OPSET, onnx.defs.onnx_opset_version())
    if opset > highest:
        raise DitqError(f"opset {opset} is above {highest}, the highest ditq writes (tested with onnx and "
                        f"ONNX Runtime); use --opset {DEFAULT_OPSET}..{highest} or leave --opset out")  # fmt: skip
    need = required_opset(qdit)
    if opset < need:
        raise DitqError(
            f"opset {opset} cannot hold this recipe's 2-bit weight codes (INT2/UINT2 need opset {need}); "
            f"use --opset {need} or leave --opset out"
        )
    return opset


def build_quantized_graph(
    qdit: QuantizedDiT, work_dir: Path, *, opset: int | None = None, progress: bool = True
) -> tuple[onnx.ModelProto, int, int, int]:
    """Trace the float model into ``work_dir`` and run the passes of ``qdit.target`` (each checked by its
    postcondition, :mod:`ditq.graphs.passes`); returns the proto (its remaining float initializers loaded)
    and how many weights, activation Q/DQ subgraphs and ORT kernels were inserted. Layers not quantized
    yet (``quantize_model(..., consume=True)``) are quantized once the float graph is traced, releasing
    the model's weights; the built graph is checked from disk without its data (:mod:`ditq.graphs.external`).

    The graph is written at ``resolve_opset(qdit, opset)``. An explicit ``opset`` is also the one traced at;
    without one the float graph is traced at ``DEFAULT_OPSET`` and, when 2-bit codes need ``INT2_OPSET``,
    its opset import is raised to it (:class:`~ditq.graphs.opset.RaiseOpsetForInt2Pass`)."""
    written = resolve_opset(qdit, opset)
    steps = tqdm(total=4, desc="export", unit="step", disable=not progress)
    steps.set_postfix_str("trace (torch.onnx dynamo)")
    float_path = work_dir / "float.onnx"
    adapter = adapter_for(qdit.model)
    export_float(adapter, qdit.model, float_path, opset=DEFAULT_OPSET if opset is None else opset)
    steps.update()

    steps.set_postfix_str("bind modules to nodes")
    proto = onnx.load(str(float_path), load_external_data=False)
    bound = bind_modules(adapter, proto, qdit.model, qdit.plans, work_dir)
    qdit.quantize_pending(progress)  # consume: the float graph now holds the weights the export reads
    steps.update()

    steps.set_postfix_str("store low-bit weights, insert activation quantization")
    passes = PassSequence([*as_target(qdit.target).passes(qdit.plans, qdit.weights, bound), RaiseOpsetForInt2Pass(written)])
    done = passes(proto)
    counts = (done.count(StoreQuantizedWeightsPass), done.count(InsertActivationQDQPass), done.count(LowerToOrtKernelsPass))
    proto, moved = offload_initializers(done.model, work_dir / "quantized.onnx.data")
    del done, passes  # the passes' proto and all its arena holds
    if qdit.consume:  # used up: the graph holds the codes now
        qdit.weights.clear()
    steps.update()
    steps.set_postfix_str("check")
    onnx.save_model(proto, str(work_dir / "quantized.onnx"))
    try:
        onnx.checker.check_model(str(work_dir / "quantized.onnx"))
    except onnx.checker.ValidationError as e:  # a bug of ours, not bad input: let it be reported loudly
        raise RuntimeError(f"the quantized graph fails the ONNX checker: {e}") from e
    load_initializers(proto, work_dir, moved)  # + the float tensors that stay (biases, norms, conv)
    steps.update()
    steps.close()
    return (proto, *counts)


def export(
    qdit: QuantizedDiT,
    out_dir: str | Path,
    *,
    source: dict[str, Any],
    pipeline: Pipeline | None = None,
    opset: int | None = None,
    external_data_bytes: int = 256 << 20,
    progress: bool = True,
    force: bool = False,
) -> ExportResult:
    """Export ``qdit`` to ``out_dir`` (replacing, atomically, only an empty folder or an earlier ditq output:
    see :mod:`ditq.files`; ``force``: also one that changed since), for the target it was quantized for,
    at ``opset`` (None: the lowest that holds the recipe, see :func:`resolve_opset`). ``pipeline``: how the
    model samples, recorded as ``ditq.pipeline`` (the loader's ``LoadedModel.pipeline``; None: read from
    ``source`` by :func:`~ditq.models.pipeline_info`), its class conditioning fitted to the model's (its family adapter's)."""
    target = as_target(qdit.target).name
    resolve_opset(qdit, opset)  # refuse an opset that cannot hold the recipe before anything is written
    config = _jsonable_config(qdit.model.config)
    adapter = adapter_for(qdit.model)
    pipe = pipeline_info(source, config=config, adapter=adapter) if pipeline is None else pipeline  # likewise a scheduler setting not implemented
    pipe = pipe.fitted_to(adapter.conditioning(config), adapter.sample_shape(config), "the model's pipeline")
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    with staged_dir(out_dir, protect=source_paths(source), force=force) as stage:  # see ditq.files
        work = stage / ".work"
        work.mkdir()
        proto, n_weights, n_acts, n_kernels = build_quantized_graph(qdit, work, opset=opset, progress=progress)
        session_config = dict(EXACT_QDQ_CONFIG) if fusable_weight_matmuls(proto) else {}
        written = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        meta = {
            META_RECIPE: qdit.recipe.to_json(),
            META_SOURCE: json.dumps(source),
            META_VERSION: tool_version(),
            META_TARGET: target,
            META_CONFIG: json.dumps(config),
            META_FAMILY: adapter.class_name,
            META_PIPELINE: pipe.to_json(),
            META_SESSION_CONFIG: json.dumps(session_config),
            META_PLANS: plans_to_json(qdit.plans),
        }
        strip_trace_metadata(proto)
        del proto.graph.value_info[:]  # intermediate shapes: ONNX Runtime and the checker infer them
        del proto.metadata_props[:]
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=v)
        proto.producer_name, proto.producer_version = "ditq", tool_version()
        weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
        model_path = stage / MODEL_FILE
        if weight_bytes > external_data_bytes:
            onnx.save_model(
                proto, str(model_path), save_as_external_data=True, all_tensors_to_one_file=True,
                location=DATA_FILE, size_threshold=1024,
            )  # fmt: skip
        else:
            onnx.save_model(proto, str(model_path))
        del proto
        if pipe.has_decoder:  # a pipeline folder: the float VAE decoder goes next to the transformer
            vae_path, vae = stage / pipe.vae, load_vae(source)
            export_vae_decoder(vae, vae_path, channels=vae.config.latent_channels, size=adapter.sample_shape(config)[1:],
                               scaling_factor=pipe.scaling_factor, shift_factor=pipe.shift_factor, opset=opset or DEFAULT_OPSET)  # fmt: skip
            vae_proto = onnx.load(str(vae_path))  # one self-contained file (the decoder is small)
            for f in stage.glob(pipe.vae + ".data"):
                f.unlink()
            onnx.save_model(vae_proto, str(vae_path))
        text = write_text_encoders(source_folder(source), pipe.text, stage, work, opset=opset or DEFAULT_OPSET,
                                   external_data_bytes=external_data_bytes) if pipe.text else []  # fmt: skip
        shutil.rmtree(work)
        (stage / RECIPE_FILE).write_text(qdit.recipe.to_json() + "\n")
        manifest = write_manifest(stage, {
            "target": target,
            "opset": written,  # the opset model.onnx imports
            "source": source,
            "layers": n_weights,
            "activation_subgraphs": n_acts,
            "lowered_kernels": n_kernels,
            "session_config": session_config,  # ONNX Runtime session config entries the model needs
            "kernels": kernel_counts(qdit.plans),
            **({"text_encoders": text} if text else {}),  # the text-to-image export's encoders and tokenizers
        })  # fmt: skip
    model_bytes = sum(f["bytes"] for n, f in manifest["files"].items() if n in (MODEL_FILE, DATA_FILE))  # the transformer
    return ExportResult(out_dir, out_dir / MODEL_FILE, model_bytes, time.perf_counter() - t0, n_weights, n_acts, n_kernels)
