"""Trace a DiT to a float ONNX graph (torch.onnx dynamo exporter) and bind torch modules to its nodes.

The model is traced through its family's adapter (:mod:`ditq.adapters`): its wrapper module, input names,
example inputs and dynamic axes.

The dynamo exporter records each node's module path in ``metadata_props['namespace']``, e.g.
``": W/dit: DiTTransformer2DModel/dit.transformer_blocks.0.attn1.to_q: torch.nn.modules.linear.Linear/
linear_3: aten.linear.default"``. :func:`bind_modules` reads it to find the one MatMul/Gemm (linear) or
Gather (embedding) of every covered module, then proves the binding by comparing the node's weight
initializer with the module's own weight, so a pass never guesses from tensor names.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

from ditq.adapters import FamilyAdapter
from ditq.errors import DitqError, one_line
from ditq.recipe import LayerPlan


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress prints and warnings (ditq shows its own progress); afterwards, let
    go of the exported graph that onnxscript's rewrite rules keep (:func:`drop_rewriter_state`)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._export", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)
        drop_rewriter_state()


def drop_rewriter_state() -> None:
    """Clear what onnxscript's pattern matchers remember of their last match. The rewrite rules that the
    exporter's ``optimize`` runs are module-level objects whose matchers keep the graph they last matched
    in (onnxscript 0.7: ``SimplePatternMatcher._graph``, ``_match``, ...), and through its initializers
    every parameter of the traced model: DiT-B/2's 0.56 GB stayed in memory after its model was released.
    The graph, a reference cycle, is then collected at once rather than at the next full collection."""
    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:  # an onnxscript without it keeps nothing there
        return
    for obj in gc.get_objects():
        # type(), not isinstance(): isinstance reads obj.__class__, and some module-level objects warn on
        # any attribute read (torch.distributed.reduce_op: a FutureWarning on stderr of every export)
        if issubclass(type(obj), SimplePatternMatcher):
            for attr in ("_graph", "_match", "_current_node", "_tracer"):
                if attr in vars(obj):
                    setattr(obj, attr, None)
    gc.collect()


def export_float(adapter: FamilyAdapter, model: nn.Module, path: Path, *, opset: int = 21) -> None:
    """Write the float graph of ``model`` to ``path`` (+ external data), traced through its family's
    wrapper and signature (``adapter``), dynamic batch size."""
    wrapper = adapter.wrap(model).eval()
    if getattr(wrapper, adapter.root, None) is not model:
        raise DitqError(f"the {adapter.class_name} export wrapper must hold the model as attribute {adapter.root!r}")
    inputs = adapter.example_inputs(dict(model.config), batch=2)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with _quiet(), torch.no_grad():
        try:
            torch.onnx.export(
                wrapper,
                inputs,
                str(path),
                dynamo=True,
                opset_version=opset,
                input_names=list(adapter.input_names),
                output_names=list(adapter.output_names),
                dynamic_shapes=adapter.dynamic_shapes(batch)[: len(inputs)],  # a model lacking a trailing optional input
                external_data=True,
                optimize=True,
            )
        except Exception as e:  # the exporter raises many types; report which model failed and why
            raise DitqError(f"torch.onnx.export failed for this model: {one_line(e, 300)}") from None


def quiet_export(module: nn.Module, inputs: tuple, path: Path, *, what: str, opset: int, input_names: list[str],
                 output_names: list[str], dynamic_shapes: tuple) -> None:  # fmt: skip
    """``torch.onnx.export`` (dynamo, optimized, weights as external data ``path.data``) of ``module`` on
    ``inputs``, quietly; a failure is one line naming ``what``."""
    with _quiet(), torch.no_grad():
        try:
            torch.onnx.export(
                module, inputs, str(path), dynamo=True, opset_version=opset, input_names=input_names,
                output_names=output_names, dynamic_shapes=dynamic_shapes, external_data=True, optimize=True,
            )  # fmt: skip
        except Exception as e:  # the exporter raises many types; report which model failed and why
            raise DitqError(f"torch.onnx.export failed for {what}: {one_line(e, 300)}") from None


def strip_trace_metadata(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node metadata (stack traces with local paths, FX names, module scopes: 0.7
    MB on the digits DiT) once the modules are bound; the passes' own ``ditq.*`` tags stay."""
    for node in proto.graph.node:
        keep = [p for p in node.metadata_props if p.key.startswith("ditq.")]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)


class VaeDecode(nn.Module):
    """``latents -> images in [-1, 1]``: undo the latent scaling (``latents / scaling_factor +
    shift_factor``, as diffusers' SD3 and Flux pipelines do; no shift: DiT's and PixArt's), then the VAE decoder."""

    def __init__(self, vae: nn.Module, scaling_factor: float, shift_factor: float | None = None):
        super().__init__()
        self.vae, self.scaling_factor = vae, float(scaling_factor)
        self.shift_factor = None if shift_factor is None else float(shift_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scaling_factor
        if self.shift_factor is not None:
            z = z + self.shift_factor
        return self.vae.decode(z, return_dict=False)[0]


def export_vae_decoder(vae: nn.Module, path: Path, *, channels: int, size: int | tuple[int, int], scaling_factor: float,
                       shift_factor: float | None = None, opset: int = 21) -> None:  # fmt: skip
    """Write the float VAE decoder (``latents [B, C, H, W] -> images``, ``size``: ``H`` and ``W``, or ``H = W``)
    to ``path``, dynamic batch size."""
    h, w = (size, size) if isinstance(size, int) else size
    z = torch.randn(2, channels, h, w, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=4096)
    quiet_export(VaeDecode(vae, scaling_factor, shift_factor).eval(), (z,), path, what="the VAE decoder", opset=opset,
                 input_names=["latents"], output_names=["images"], dynamic_shapes=({0: batch},))  # fmt: skip


def _module_path(node: onnx.NodeProto, root: str) -> str | None:
    """The innermost module scope of ``node`` under the wrapper's attribute ``root`` (without the
    ``root.`` prefix), from dynamo's metadata."""
    meta = {p.key: p.value for p in node.metadata_props}
    ns = meta.get("namespace")
    if not ns:
        return None
    scopes = [s.split(": ")[0] for s in ns.split("/")]
    # the last scope is the aten op; the one before it is the module that called it
    for scope in reversed(scopes[:-1]):
        if scope == root or scope.startswith(root + "."):
            return scope[len(root) + 1 :]
    return None


_CHUNK_BYTES = 16 << 20  # what one comparison reads of an external initializer at a time


def _holds(init: onnx.TensorProto, want: np.ndarray, base_dir: Path) -> bool:
    """Whether the initializer ``init`` holds exactly ``want`` (float32, same shape). External data (the
    float graph's large weights) is read in chunks of :data:`_CHUNK_BYTES` rows, not whole: the largest
    layer (Flux's fused single-block input, 264 MB) would otherwise sit in memory twice beside the model."""
    if tuple(init.dims) != want.shape or init.data_type != onnx.TensorProto.FLOAT:
        return False
    if init.data_location != onnx.TensorProto.EXTERNAL:
        return np.array_equal(onnx.numpy_helper.to_array(init), want)
    info = {e.key: e.value for e in init.external_data}
    offset, length = int(info.get("offset", 0)), int(info.get("length", want.nbytes))
    if length != want.nbytes or want.ndim != 2:
        return np.array_equal(onnx.numpy_helper.to_array(init, base_dir=str(base_dir)), want)
    row_bytes = want.shape[1] * 4
    rows = max(1, _CHUNK_BYTES // max(row_bytes, 1))
    with open(Path(base_dir) / info["location"], "rb") as f:  # the float graph this export just traced
        f.seek(offset)
        for r in range(0, want.shape[0], rows):
            n = min(rows, want.shape[0] - r)
            chunk = np.frombuffer(f.read(n * row_bytes), dtype="<f4")
            if chunk.size != n * want.shape[1] or not np.array_equal(chunk.reshape(n, -1), want[r : r + n]):
                return False
    return True


def bind_modules(
    adapter: FamilyAdapter, proto: onnx.ModelProto, model: nn.Module, plans: dict[str, LayerPlan], base_dir: Path
) -> dict[str, str]:
    """Map each covered module name to the name of the node that reads its weight (``proto`` traced by
    :func:`export_float` with ``adapter``: module paths start with its wrapper's ``root``).

    Proven, not guessed: the node's op must fit the module kind, and its weight initializer must hold
    exactly the module's weight (transposed for MatMul).
    """
    by_module: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        if node.op_type in ("MatMul", "Gemm", "Gather"):
            path = _module_path(node, adapter.root)
            if path in plans:
                by_module.setdefault(path, []).append(node)
    inits = {t.name: t for t in proto.graph.initializer}
    named = dict(model.named_modules())
    bound: dict[str, str] = {}
    for name, plan in plans.items():
        want_ops = ("MatMul", "Gemm") if plan.kind == "linear" else ("Gather",)
        cands = [n for n in by_module.get(name, []) if n.op_type in want_ops]
        weight = named[name].weight.detach().float().numpy()
        hits = []
        for node in cands:
            w_in = node.input[1] if node.op_type != "Gather" else node.input[0]
            if w_in not in inits:
                continue
            want = weight.T if node.op_type == "MatMul" else weight
            if _holds(inits[w_in], want, base_dir):
                hits.append(node)
        if len(hits) != 1:
            raise DitqError(
                f"cannot locate module {name!r} in the traced graph "
                f"({len(cands)} candidate {'/'.join(want_ops)} nodes, {len(hits)} holding its weight)"
            )
        bound[name] = hits[0].name
    return bound
