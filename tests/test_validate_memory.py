"""``ditq validate`` in bounded memory (issue 15, item 6: full-size text-to-image shapes on a 24 GB machine).

What validate holds at once is what the tests pin down, on a tiny DiT: the reference is built one layer
group at a time (no group's codes outlive it), the torch model is gone before ONNX Runtime runs, and the
activation-code probes run in groups, each session exposing only its own quantizers and reading the
weights from the model's folder. The reports stay what one all-at-once pass gives, message for message.
"""

from __future__ import annotations

import gc
import weakref
from dataclasses import replace

import onnx
import pytest
from onnx import numpy_helper

import ditq
import ditq.graphs.targets as targets
import ditq.workflows.validate as validate_mod
import ditq.workflows.validate_codes as codes_mod
from ditq.adapters import adapter_for
from ditq.fileformat import META_RECIPE
from ditq.graphs.targets import ActivationProbe, layer_chunks
from ditq.recipe import LayerPlan, LayerQuant, Recipe
from ditq.workflows.validate_codes import probe_runs

DIT = adapter_for("DiTTransformer2DModel").coverage
ACT_CHECK = "activation codes equal the reference numerics (bit exact)"


@pytest.fixture(scope="module")
def exports(tiny_source, tmp_path_factory):
    """The tiny DiT exported W8A8 ``ort`` (int8 kernels) and W4A8 ``qdq``, every weight in external data."""
    root = tmp_path_factory.mktemp("validate-memory")
    loaded = ditq.load_model(str(tiny_source))
    out = {}
    for name, wbits, target in (("w8a8-ort", 8, "ort"), ("w4a8-qdq", 4, "qdq")):
        qdit = ditq.quantize(loaded.model, Recipe.qdit(DIT, wbits, 8, 16), target=target)
        ditq.export(qdit, root / name, source=loaded.source, external_data_bytes=0)
        out[name] = root / name
    return out


def _report(path, **kw) -> dict:
    d = ditq.validate(path, progress=False, **kw).to_dict()
    d.pop("seconds")
    return d


@pytest.fixture(scope="module")
def baseline(exports):
    """Each export's report with the default group sizes (every tiny layer and quantizer in one group)."""
    return {name: _report(path) for name, path in exports.items()}


def _plan(k: int, n: int) -> LayerPlan:
    return LayerPlan("fc", "linear", k, n, LayerQuant(wbits=8, abits=8, group_size=16))


def test_layer_chunks_cut_in_order_within_the_bound():
    plans = {"a": _plan(16, 16), "b": _plan(16, 16), "c": _plan(64, 64), "d": _plan(16, 32), "e": _plan(16, 16)}
    groups = [list(g) for g in layer_chunks(plans, max_elements=600)]
    assert groups == [["a", "b"], ["c"], ["d"], ["e"]]  # 256+256; c (4096) alone; d (512) + e (256) > 600
    assert [list(g) for g in layer_chunks(plans, max_elements=10**9)] == [list(plans)]


def test_probe_runs_count_each_exposed_tensor_once():
    def probe(module, x, codes):
        return ActivationProbe(module, x, codes, 8, 16, True)

    q, k, v, o = probe("q", "x", "cq"), probe("k", "x", "ck"), probe("v", "x", "cv"), probe("o", "y", "co")
    sizes = {"q": 100, "k": 100, "v": 100, "o": 100}
    # q: x (400 bytes) + its codes (100); k and v share x: 100 each -> 700; o: 500 more
    assert probe_runs([q, k, v, o], sizes, budget=700) == [[q, k, v], [o]]
    assert probe_runs([q, k, v, o], sizes, budget=1200) == [[q, k, v, o]]
    assert probe_runs([q, k, v, o], sizes, budget=450) == [[q], [k], [v], [o]]  # one probe over the budget: alone
    assert probe_runs([q, k, v, o], {"q": 100, "o": 100}, budget=10**6) == [[q], [k], [v], [o]]  # unknown size: alone


@pytest.mark.parametrize("name", ["w8a8-ort", "w4a8-qdq"])
def test_probing_sessions_expose_one_group_and_read_weights_from_disk(exports, baseline, name, monkeypatch):
    """With a budget of one probe per run, every probing session's graph holds the model's own output plus
    one quantizer's input and codes, and no weight inline that the file keeps outside the graph; the
    report is the all-at-once one."""
    path = exports[name]
    on_disk = onnx.load(str(path / "model.onnx"), load_external_data=False)
    inline = {t.name for t in on_disk.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL}
    assert len(inline) < len(on_disk.graph.initializer)
    seen, create = [], codes_mod.create_session

    def spy(model, **kw):
        if isinstance(model, bytes):
            seen.append(onnx.load_from_string(model))
        return create(model, **kw)

    monkeypatch.setattr(codes_mod, "create_session", spy)
    monkeypatch.setattr(codes_mod, "PROBE_BYTES", 1)
    assert _report(path) == baseline[name]
    probes = int(next(c for c in baseline[name]["checks"] if c["name"] == ACT_CHECK)["detail"].split(" in ")[1].split()[0])
    assert len(seen) == probes > 1
    for m in seen:
        assert 2 <= len(m.graph.output) - len(on_disk.graph.output) <= 2  # one quantizer: input and codes
        assert {t.name for t in m.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL} == inline


def test_the_torch_model_is_gone_before_onnx_runtime_runs(exports, monkeypatch):
    """No ONNX Runtime session is created while the float model (which became the reference) lives."""
    model_ref, load = [], validate_mod.load_from_source

    def loading(source):
        loaded = load(source)
        model_ref.append(weakref.ref(loaded.model))
        return loaded

    alive_at_session = []

    def spying(create):
        def spy(model, **kw):
            gc.collect()
            alive_at_session.append(model_ref[0]() is not None)
            return create(model, **kw)

        return spy

    monkeypatch.setattr(validate_mod, "load_from_source", loading)
    monkeypatch.setattr(validate_mod, "create_session", spying(validate_mod.create_session))
    monkeypatch.setattr(codes_mod, "create_session", spying(codes_mod.create_session))
    assert ditq.validate(exports["w8a8-ort"], progress=False).passed
    assert len(alive_at_session) >= 3 and not any(alive_at_session)  # validated, default and probing sessions


@pytest.mark.parametrize("name", ["w8a8-ort", "w4a8-qdq"])
def test_the_reference_holds_one_layer_group_of_codes(exports, baseline, name, monkeypatch):
    """With one layer per group, no layer's codes are alive when the next layer is quantized; the
    report is the all-at-once one."""
    made, quantize_weight = [], codes_mod.quantize_weight

    def spy(weight, plan, method="rtn", inputs=None):
        gc.collect()
        assert not [r for r in made if r() is not None], "an earlier layer's codes are still in memory"
        qt = quantize_weight(weight, plan, method, inputs)
        made.append(weakref.ref(qt.codes))
        return qt

    monkeypatch.setattr(codes_mod, "quantize_weight", spy)
    monkeypatch.setattr(targets, "LAYER_CHUNK_ELEMENTS", 1)
    assert _report(exports[name]) == baseline[name]
    assert len(made) == int(next(c for c in baseline[name]["checks"] if c["name"].startswith("stored codes"))["detail"].split()[0])


def test_stored_codes_reference_in_groups(exports, baseline, tmp_path, monkeypatch):
    """A ``gptq`` recipe takes the codes the file stores (read back one layer at a time here): the same
    outputs as the reference that recomputes them, and no stored-codes comparison."""
    meta = {p.key: p.value for p in onnx.load(str(exports["w8a8-ort"] / "model.onnx"), load_external_data=False).metadata_props}
    (tmp_path / "gptq.json").write_text(replace(Recipe.from_json(meta[META_RECIPE]), method="gptq").to_json())
    read, read_weights = [], targets.OrtTarget.read_weights

    def spy(self, model, plans):
        read.append(list(plans))
        return read_weights(self, model, plans)

    monkeypatch.setattr(targets.OrtTarget, "read_weights", spy)
    monkeypatch.setattr(targets, "LAYER_CHUNK_ELEMENTS", 1)
    got = _report(exports["w8a8-ort"], recipe_path=tmp_path / "gptq.json")
    assert got["passed"]
    assert [c["name"] for c in got["checks"]] == [c["name"] for c in baseline["w8a8-ort"]["checks"]
                                                  if c["name"] != "stored codes and scales equal the reference's"]  # fmt: skip
    assert got["cases"] == baseline["w8a8-ort"]["cases"]
    assert len(read) > 10 and all(len(names) == 1 for names in read)  # the stored codes, one layer at a time


def test_grouped_comparison_reports_like_one_comparison(exports, tmp_path, monkeypatch):
    """Scales tampered in an int8 kernel of block 0 and a Q/DQ table of block 1: the failure reads as one
    comparison of all layers gives it (the Q/DQ layers' messages first, then the kernels'), whether the
    layers are compared in one group or one by one."""
    model = onnx.load(str(exports["w8a8-ort"] / "model.onnx"))
    kernel, table = "transformer_blocks.0.attn1.to_q", "transformer_blocks.1.norm1.emb.class_embedder.embedding_table"
    for t in model.graph.initializer:
        if t.name in (f"{kernel}.int8_scale", f"{table}.qscale"):
            arr = numpy_helper.to_array(t).copy()
            arr.reshape(-1)[0] *= 1.5
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
    onnx.save(model, str(tmp_path / "model.onnx"))  # a lone model file: no folder checks
    whole = ditq.validate(tmp_path / "model.onnx", progress=False)
    monkeypatch.setattr(targets, "LAYER_CHUNK_ELEMENTS", 1)
    alone = ditq.validate(tmp_path / "model.onnx", progress=False)
    failed = next(c for c in whole.checks if not c.passed)  # and the outputs, in a session without the config
    assert failed.name == "stored codes and scales equal the reference's"
    assert failed.detail == (f"2 problem(s): {table}: stored weight scales differ from the reference's; "
                                f"{kernel}: stored weight scales or zero points differ from the reference's")  # fmt: skip
    assert [(c.name, c.passed, c.detail) for c in alone.checks] == [(c.name, c.passed, c.detail) for c in whole.checks]
