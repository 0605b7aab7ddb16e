"""Initializer data out of a model proto and back, so that a built graph is copied and checked without it.

The ``upb`` protobuf runtime that ``onnx`` uses allocates every field of a model in that model's arena
and frees the arena only with the whole model: a tensor deleted from ``graph.initializer`` or a cleared
``raw_data`` keeps its memory, and a rebuilt initializer list is one more copy of every weight. The passes
therefore append what they make and delete in place
(:func:`~ditq.graphs.tensors.remove_unused_initializers`), and the exporter ends with:

1. :func:`offload_initializers`: the inline data (codes, scales) is appended to a file in the work folder
   and referenced from there (external data), in a *new* model proto; the passes' proto, with whatever its
   arena accumulated (the float weights' references, the codes the ``ort`` lowering replaced), is freed;
2. ``onnx.checker.check_model(path)`` on that small model saved next to the file (the in-memory checker
   serializes the whole model twice, and refuses one past protobuf's 2 GB);
3. :func:`load_initializers`: the data read back, each moved tensor exactly as it was (same fields), and
   the float tensors the traced graph still references loaded as before.

The checker does not compare external data with the declared shape, so :func:`offload_initializers` does:
``bytes = ceil(prod(dims) * bits / 8)``, ``bits`` being 2 or 4 for the packed types, 8 x itemsize otherwise.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper
from onnx.external_data_helper import load_external_data_for_model, set_external_data

PACKED_BITS = {TensorProto.INT4: 4, TensorProto.UINT4: 4, TensorProto.FLOAT4E2M1: 4, TensorProto.INT2: 2, TensorProto.UINT2: 2}
MIN_OFFLOAD_BYTES = 1024  # smaller tensors (scalars, shapes) stay in the proto, as in the saved file


def data_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of ``raw_data`` that ``tensor``'s type and shape take."""
    count = math.prod(tensor.dims)
    bits = PACKED_BITS.get(tensor.data_type)
    if bits:
        return -(-count * bits // 8)
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def offload_initializers(
    model: onnx.ModelProto, data_file: Path, min_bytes: int = MIN_OFFLOAD_BYTES
) -> tuple[onnx.ModelProto, frozenset[str]]:
    """A new proto of ``model`` whose inline initializers of at least ``min_bytes`` (without a
    ``data_location``) refer to their data appended to ``data_file`` (external data relative to its folder),
    and the names of those tensors; ``model`` is left without that data. RuntimeError when a tensor's data
    does not match its type and shape (a bug of the pass that made it)."""
    moved = []
    with open(data_file, "ab") as f:
        for t in model.graph.initializer:
            if not t.HasField("raw_data") or t.HasField("data_location"):
                continue
            data = t.raw_data  # one copy of this tensor, dropped at the next
            if len(data) < min_bytes:
                continue
            if len(data) != data_bytes(t):
                raise RuntimeError(f"initializer {t.name!r} holds {len(data)} bytes, its type and shape {list(t.dims)} take {data_bytes(t)}")
            offset = f.tell()
            f.write(data)
            set_external_data(t, data_file.name, offset, len(data))
            t.data_location = TensorProto.EXTERNAL
            t.ClearField("raw_data")
            moved.append(t.name)
    small = onnx.ModelProto()
    small.CopyFrom(model)
    return small, frozenset(moved)


def load_initializers(model: onnx.ModelProto, base_dir: Path, moved: frozenset[str]) -> None:
    """Read every external tensor of ``model`` into it from ``base_dir``; those :func:`offload_initializers`
    ``moved`` become exactly what they were (no ``data_location``, as the passes made them)."""
    load_external_data_for_model(model, str(base_dir))
    for t in model.graph.initializer:
        if t.name in moved:
            t.ClearField("data_location")
