"""What `export` and `validate` print says what was done: counts of the right things, the right numbers."""

from collections import Counter
from dataclasses import replace

import onnx
import pytest

import ditq
from ditq.adapters import adapter_for
from ditq.cli import main
from ditq.exporter.reference import resolve_plans
from ditq.graphs.checks import check_activations
from ditq.recipe import Recipe

from tests.conftest import TINY

DIT = adapter_for("DiTTransformer2DModel").coverage  # the family of the models here

ACT_CHECK = "activation scales computed in the graph from min/max"
# Q-DiT coverage quantizes the input activations of q, k, v, attention out, fc1 and fc2 of every block;
# q, k and v read one tensor and share one quantizer
ACT_LAYERS = 6 * TINY["depth"]
ACT_QUANTIZERS = 4 * TINY["depth"]


def _export(source, out, abits, target="qdq"):
    loaded = ditq.load_model(str(source))
    qdit = ditq.quantize(loaded.model, Recipe.qdit(DIT, 4, abits, 64), target=target)
    return ditq.export(qdit, out, source=loaded.source), qdit


@pytest.fixture(scope="module")
def a8(tiny_source, tmp_path_factory):
    """A tiny DiT exported W4A8 ``qdq``."""
    return _export(tiny_source, tmp_path_factory.mktemp("a8") / "m", 8)


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_validate_counts_only_activation_quantized_layers(a8):
    res, qdit = a8
    assert len(qdit.plans) > ACT_LAYERS  # weight-only layers exist (adaLN, embedders): the count must skip them
    check = next(c for c in ditq.validate(res.out_dir, progress=False).checks if c.name == ACT_CHECK)
    assert check.passed and check.detail == f"{ACT_LAYERS} layers"


def test_validate_says_a_weight_only_model_has_no_activation_quantizers(tiny_source, tmp_path):
    _export(tiny_source, tmp_path / "a16", None)
    check = next(c for c in ditq.validate(tmp_path / "a16", progress=False).checks if c.name == ACT_CHECK)
    assert check.passed and "layers" not in check.detail.split("(")[0] and check.detail.startswith("none")


def test_export_counts_activation_quantizers_and_kernels_apart(a8, tiny_source, tmp_path, capsys):
    res, _ = a8
    assert res.activation_quantizers == _ops(res.model_path)["QuantizeLinear"] == ACT_QUANTIZERS
    assert res.kernels == 0
    # weight-only on ONNX Runtime kernels: no activation quantizer in the graph, every linear a MatMulNBits
    code = main(["--quiet", "export", "--model", str(tiny_source), "--wbits", "4", "--abits", "16", "--group-size", "64",
                 "--target", "ort", "--out", str(tmp_path / "ort")])  # fmt: skip
    out = capsys.readouterr().out
    kernels = _ops(tmp_path / "ort" / "model.onnx")["MatMulNBits"]
    assert code == 0 and kernels > 0 and _ops(tmp_path / "ort" / "model.onnx")["QuantizeLinear"] == 0
    assert f", 0 activation quantizers, {kernels} layers on ONNX Runtime kernels)" in out, out


def test_activation_block_size_message_names_the_activation_group(a8, tiny_source):
    """A layer whose activation group differs from its weight group: the message gives the activation's."""
    res, qdit = a8
    plans = resolve_plans(ditq.load_model(str(tiny_source)).model, qdit.recipe, "qdq")
    name = "transformer_blocks.0.ff.net.2"
    assert plans[name].group_size == 64
    plans[name] = replace(plans[name], act_group=32)
    fails = check_activations(onnx.load(str(res.model_path)), plans)
    assert fails == [f"{name}: activation block_size 64, recipe needs 32"]
