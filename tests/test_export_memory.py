"""Export memory: the export's peak RSS is about one float copy of the weights, and the files it writes
are byte for byte those of the export before the memory work (golden SHA-256 digests taken then)."""

from __future__ import annotations

import gc
import hashlib
import warnings
import weakref
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import tiny_config
from ditq.adapters import adapter_for
from ditq.calib.numerics import pack_2bit_u8, pack_4bit_u8
from ditq.exporter.export import export
from ditq.exporter.reference import quantize_model
from ditq.exporter.trace import drop_rewriter_state, export_float
from ditq.graphs.external import load_initializers, offload_initializers
from ditq.models import build_dit, load_model
from ditq.workflows.export import RecipeOptions, build_recipe, export_model
from ditq.workflows.export_memory import measure_export


def graph_digest(out: Path) -> str:
    """SHA-256 of the exported graph (nodes, initializers, external data references) and its data file."""
    h = hashlib.sha256(onnx.load(str(out / "model.onnx"), load_external_data=False).graph.SerializeToString())
    if (out / "model.onnx.data").exists():
        h.update((out / "model.onnx.data").read_bytes())
    return h.hexdigest()


# Taken with the exporter as it was before the memory work (HEAD 0d073be): the tiny DiT of conftest
# (hidden 64, 2 blocks, seed 0) at group size 32, and the shipped digits DiT at group size 64.
GOLDEN = {
    "w4a8-qdq": "7a0cb8f86509a0508bf333b31a96057f36e787c6e7d0200700739fa086e5653f",
    "w8a8-ort": "cdca830e875e507b92c9e91f0729f3aae2e3d7c2b92efb75e564fb23dd992c29",
    "w4a8-ort-external": "b710451bac815627184695f56d575c604ab60e27537f0e167b865fa478088589",
}
DIGITS_W4A8 = "8289347df288daef21ffcdd22379fa403ebf4ff72f2b2a00fe5408a15090f58e"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["w4a8-qdq", "w8a8-ort"])
def test_ditq_export_writes_the_same_graph_as_before(tmp_path, tiny_source, name):
    """``export_model`` on a spec: the model is consumed (quantized after the trace, weights released)."""
    bits, target = name.split("-")
    opts = RecipeOptions(wbits=int(bits[1]), abits=int(bits[3]), group_size=32)
    export_model(str(tiny_source), opts, tmp_path / "out", target=target)
    assert graph_digest(tmp_path / "out") == GOLDEN[name]


@pytest.mark.slow
def test_api_export_with_external_data_writes_the_same_files_as_before(tmp_path, tiny_source):
    """The eager path (the caller keeps its model and codes) and the external-data writer."""
    loaded = load_model(str(tiny_source))
    qdit = quantize_model(loaded.model, build_recipe(RecipeOptions(4, 8, 32), loaded).recipe, progress=False, target="ort")
    export(qdit, tmp_path / "out", source=loaded.source, pipeline=loaded.pipeline, external_data_bytes=0, progress=False)
    assert (tmp_path / "out" / "model.onnx.data").exists()
    assert graph_digest(tmp_path / "out") == GOLDEN["w4a8-ort-external"]
    assert all(p.device.type == "cpu" for p in loaded.model.parameters())  # not consumed


@pytest.mark.slow  # the digits DiT's export: about 15 s
def test_digits_w4a8_export_writes_the_same_graph_as_before(tmp_path):
    export_model("digits", RecipeOptions(wbits=4, abits=8, group_size=64), tmp_path / "out")
    assert graph_digest(tmp_path / "out") == DIGITS_W4A8


@pytest.mark.slow
def test_a_consumed_export_releases_the_model_and_writes_what_a_kept_one_does(tmp_path):
    kept, used = build_dit(tiny_config(), seed=0), build_dit(tiny_config(), seed=0)
    recipe = build_recipe(RecipeOptions(4, 8, 32)).recipe
    source = {"kind": "api"}
    export(quantize_model(kept, recipe, progress=False), tmp_path / "kept", source=source, progress=False)
    qdit = quantize_model(used, recipe, progress=False, consume=True)
    assert qdit.weights == {}  # nothing quantized before the export has traced the model
    export(qdit, tmp_path / "used", source=source, progress=False)
    assert (tmp_path / "kept" / "model.onnx").read_bytes() == (tmp_path / "used" / "model.onnx").read_bytes()
    assert {t.device.type for t in [*used.parameters(), *used.buffers()]} == {"meta"}
    assert qdit.weights == {}  # the codes went to the graph
    with pytest.raises(RuntimeError, match="consume"):
        qdit.reference()


@pytest.mark.slow
def test_the_float_trace_keeps_no_reference_to_the_model(tmp_path):
    """onnxscript's rewrite rules remember the last graph they matched, which holds the model's parameters;
    the trace clears them, so a released model's weights are freed."""
    model = build_dit(tiny_config(), seed=0)
    export_float(adapter_for(model), model, tmp_path / "float.onnx")
    weight = weakref.ref(model.transformer_blocks[0].attn1.to_q.weight)
    model.to("meta")
    gc.collect()
    assert weight() is None


class _WarnsOnEveryRead:
    """Like ``torch.distributed.reduce_op``: any attribute read, ``__class__`` included, warns."""

    def __getattribute__(self, name):
        warnings.warn("deprecated", FutureWarning, stacklevel=2)
        return object.__getattribute__(self, name)


def test_clearing_the_rewriter_state_reads_no_attribute_of_unrelated_objects():
    """The rewriter-state sweep looks at every live object; one that warns when read must stay silent
    (else every export printed a library FutureWarning before ditq's one-line errors)."""
    held = _WarnsOnEveryRead()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        drop_rewriter_state()
    assert type(held) is _WarnsOnEveryRead


def _model(initializers: list[onnx.TensorProto]) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    nodes = [helper.make_node("Identity", [t.name], [f"{t.name}_out"]) for t in initializers]
    outs = [helper.make_tensor_value_info(f"{t.name}_out", t.data_type, list(t.dims)) for t in initializers]
    return helper.make_model(helper.make_graph(nodes, "g", [x], outs, initializers))


def _packed(name: str, dtype: int, codes: np.ndarray, pack) -> onnx.TensorProto:
    t = onnx.TensorProto(name=name, data_type=dtype, dims=codes.shape)
    t.raw_data = pack(codes.reshape(-1)).tobytes()
    return t


def test_offloaded_initializers_come_back_exactly(tmp_path):
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((33, 17)).astype(np.float32), "w"),
        _packed("u4", TensorProto.UINT4, rng.integers(0, 16, (45, 51)).astype(np.uint8), pack_4bit_u8),  # odd count
        _packed("i2", TensorProto.INT2, rng.integers(-2, 2, (3, 1367)).astype(np.int8), pack_2bit_u8),  # 4101 codes
        numpy_helper.from_array(rng.integers(-128, 128, (40, 40)).astype(np.int8), "i8"),
        numpy_helper.from_array(np.float32(0.5), "small"),
    ]
    model = _model(inits)
    before = model.SerializeToString()
    small, moved = offload_initializers(model, tmp_path / "d.data")
    assert moved == {"w", "u4", "i2", "i8"}  # "small" (4 bytes) stays inline
    assert (tmp_path / "d.data").stat().st_size == 33 * 17 * 4 + 1148 + 1026 + 1600  # ceil(2295 / 2), ceil(4101 / 4)
    assert [t.name for t in small.graph.initializer if t.HasField("raw_data")] == ["small"]
    load_initializers(small, tmp_path, moved)
    assert small.SerializeToString() == before


def test_an_initializer_shorter_than_its_shape_is_refused(tmp_path):
    t = numpy_helper.from_array(np.zeros((32, 32), np.float32), "w")
    t.raw_data = t.raw_data[:-4]
    with pytest.raises(RuntimeError, match="4092 bytes.*4096"):
        offload_initializers(_model([t]), tmp_path / "d.data")


@pytest.mark.slow
def test_the_memory_benchmark_measures_the_export_process(tiny_source):
    """The child's own peak, over the model's float32 parameter bytes: with a 700 MB array held here, a
    peak read in (or inherited from) this process could not be below this process's RSS."""
    ballast = np.ones(700_000_000 // 8)
    with open("/proc/self/status") as f:
        here = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    m = measure_export(str(tiny_source), "w4a8@ort")
    del ballast
    assert m.weight_bytes == 4 * sum(p.numel() for p in build_dit(tiny_config(), seed=0).parameters())
    assert 100e6 < m.baseline_bytes < m.peak_rss_bytes < here  # torch in the child; the child's peak only
    assert m.ratio == m.peak_rss_bytes / m.weight_bytes and m.ratio > 1
    assert m.ratio_above_baseline == (m.peak_rss_bytes - m.baseline_bytes) / m.weight_bytes
    assert m.file_bytes > 0 and m.variant == "w4a8@ort"


@pytest.mark.slow  # DiT-B/2 (0.59 GB of weights) exported in a child process: about 1 min
def test_dit_b_export_holds_one_float_copy_of_the_weights():
    """Above the imports, the peak is the loaded model (1.0x), the exporter's own memory (~0.1 GB) and
    at most the codes; before the memory work it was 3.7x (the traced graph, int16 codes, proto copies)."""
    m = measure_export("dit-b-2", "w8a8@ort")
    assert m.ratio_above_baseline < 1.7, m


@pytest.mark.parametrize("external", [False, True])
def test_binding_compares_a_weight_chunk_by_chunk_exactly(tmp_path, monkeypatch, external):
    """The traced graph's weight is matched to the module's exactly, reading external data a few rows at a
    time: equal -> True; one element changed anywhere (first, middle, last chunk), another shape or another
    type -> False."""
    import ditq.exporter.trace as trace

    monkeypatch.setattr(trace, "_CHUNK_BYTES", 3 * 8 * 4)  # 3 rows of 8 floats per read
    rng = np.random.default_rng(0)
    w = rng.standard_normal((10, 8)).astype(np.float32)
    t = numpy_helper.from_array(w, "w")
    if external:
        with open(tmp_path / "d.bin", "wb") as f:
            f.write(b"\0" * 12)  # the tensor starts past other data
            f.write(w.tobytes())
        t = onnx.TensorProto(name="w", data_type=TensorProto.FLOAT, dims=w.shape, data_location=TensorProto.EXTERNAL)
        for k, v in (("location", "d.bin"), ("offset", "12"), ("length", str(w.nbytes))):
            t.external_data.add(key=k, value=v)
    assert trace._holds(t, w, tmp_path)
    for r, c in ((0, 0), (4, 3), (9, 7)):
        other = w.copy()
        other[r, c] = np.nextafter(other[r, c], np.float32(np.inf))
        assert not trace._holds(t, other, tmp_path), (r, c)
    assert not trace._holds(t, w.T.copy(), tmp_path)
    assert not trace._holds(t, w[:9], tmp_path)
