"""Model-family adapters: the registry, the DiT adapter (coverage, signature, sampler callable), and a
second family that reaches the recipe, the search's genes, RobuQ's units and the tracer through its
adapter alone."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

import ditq.adapters as adapters
from ditq.adapters import Coverage, FamilyAdapter, InputGroup, adapter_for, register
from ditq.calib.robuq import block_units
from ditq.calib.search import genes_of
from ditq.calib.numerics import sqnr_db
from ditq.errors import DitqError
from ditq.families import FamilySpec
from ditq.exporter.trace import bind_modules, export_float
from ditq.models import digits_config
from ditq.pipeline import ClassConditioning
from ditq.recipe import TERNARY, Recipe
from tests.conftest import assert_one_line_refusal, run

DIT = "DiTTransformer2DModel"


# ------------------------------------------------------------------------------------------- registry
def test_the_dit_adapter_is_found_by_model_and_by_class_name(tiny_dit):
    assert adapter_for(tiny_dit) is adapter_for(DIT)
    assert adapter_for(DIT).class_name == DIT == type(tiny_dit).__name__
    assert DIT in adapters.supported()


def _tiny_sana():
    """A family ditq does not support (Sana's feed-forward is convolutional)."""
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=1,
                                  num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                                  caption_channels=16, sample_size=8, patch_size=1)  # fmt: skip


def test_an_unknown_family_is_refused_in_one_line_naming_the_supported_ones(tmp_path, capsys):
    sana, families = _tiny_sana(), ", ".join(adapters.supported())
    assert DIT in families and "SanaTransformer2DModel" not in families
    with pytest.raises(DitqError) as e:
        adapter_for(sana)
    assert str(e.value) == f"unsupported architecture 'SanaTransformer2DModel'; ditq supports: {families}"
    with pytest.raises(DitqError, match="unsupported architecture 'X"):
        adapter_for("X" * 10_000)
    # the loader's class check is the registry's: a Sana folder is refused before any weight is read
    sana.save_pretrained(tmp_path / "sana")
    code, _, err = run(["export", "--model", str(tmp_path / "sana"), "--out", str(tmp_path / "out")], capsys)
    assert_one_line_refusal(code, err, "unsupported architecture 'SanaTransformer2DModel'", f"ditq supports: {families}")
    # a config.json that names no class says so
    (tmp_path / "sana" / "config.json").write_text(json.dumps({"_class_name": 5}))
    code, _, err = run(["export", "--model", str(tmp_path / "sana"), "--out", str(tmp_path / "out")], capsys)
    assert_one_line_refusal(code, err, "names no architecture", f"ditq supports: {families}")


# ------------------------------------------------------------------------------------------ DiT coverage
PER_BLOCK_WA = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")
PER_BLOCK_W = ("norm1.emb.timestep_embedder.linear_1", "norm1.emb.timestep_embedder.linear_2",
               "norm1.emb.class_embedder.embedding_table", "norm1.linear")  # fmt: skip


def _blocks(names, depth=2):
    return {f"transformer_blocks.{i}.{n}" for i in range(depth) for n in names}


def test_dit_coverage_resolves_to_the_layer_sets_of_q_dit_and_robuq(tiny_dit):
    """The tiny DiT (2 blocks), by diffusers' module names: Q-DiT quantizes weights and input activations
    of q, k, v, the attention output, fc1 and fc2, weights alone of everything else but the final
    projection; RobuQ adds adaLN at A4 and 4-bit weight-only class tables and final modulation."""
    cov = adapter_for(tiny_dit).coverage
    plans = Recipe.qdit(cov, 4, 8, 16).resolve(tiny_dit)
    assert {n for n, p in plans.items() if p.abits == 8} == _blocks(PER_BLOCK_WA)
    assert {n for n, p in plans.items() if p.abits is None} == _blocks(PER_BLOCK_W) | {"proj_out_1"}
    assert "proj_out_2" not in plans and len(plans) == 2 * 10 + 1

    robuq = Recipe.robuq(cov, 3, rotate=True).resolve(tiny_dit)
    by = {n: (p.quant.wbits, p.abits, p.quant.rotate) for n, p in robuq.items()}
    want = {n: (TERNARY, 3, True) for n in _blocks(PER_BLOCK_WA)}
    want |= {n: (TERNARY, 4, True) for n in _blocks(["norm1.linear"])}
    want |= {n: (TERNARY, None, False) for n in _blocks(["norm1.emb.timestep_embedder.linear_1", "norm1.emb.timestep_embedder.linear_2"])}
    want |= {n: (4, None, False) for n in _blocks(["norm1.emb.class_embedder.embedding_table"]) | {"proj_out_1"}}
    assert by == want

    # q/k/v read one input: one RobuQ unit, one search gene; the other block linears one each
    units = {}
    for i in range(2):
        b = f"transformer_blocks.{i}."
        units[b + "attn1.qkv"] = (b + "attn1.to_q", b + "attn1.to_k", b + "attn1.to_v")
        units |= {b + n: (b + n,) for n in ("attn1.to_out.0", "ff.net.0.proj", "ff.net.2")}
    assert block_units(tiny_dit) == units
    genes = genes_of(plans, cov)
    assert {g.name: g.layers for g in genes} == units
    assert [g.in_features for g in genes] == [64, 64, 64, 256] * 2 and genes[0].out_features == 3 * 64


def test_dit_signature_conditioning_and_output_split(tiny_dit):
    a, cfg = adapter_for(tiny_dit), dict(tiny_dit.config)
    x, t, y = a.example_inputs(cfg, batch=3, seed=1)
    assert (x.shape, x.dtype, t.shape, t.dtype, y.dtype) == ((3, 4, 8, 8), torch.float32, (3,), torch.int64, torch.int64)
    assert a.input_names == ("sample", "timestep", "class_labels") and a.sample_shape(cfg) == (4, 8, 8)
    assert a.conditioning(cfg) == ClassConditioning(10, null_label=10)
    assert a.output_split(cfg) == (4, 4)  # out_channels 8 = 2 x 4: learned sigma
    assert a.output_split(digits_config()) == (1, 0)
    wrapper = a.wrap(tiny_dit)
    assert getattr(wrapper, a.root) is tiny_dit
    with torch.no_grad():
        want = tiny_dit(x, timestep=t, class_labels=y, return_dict=False)[0]
        assert torch.equal(wrapper(x, t, y), want)


def test_the_torch_callable_is_the_diffusers_model_over_numpy(tiny_dit):
    g = np.random.default_rng(0)
    x = g.standard_normal((5, 4, 8, 8)).astype(np.float32)
    t, y = np.array([0, 10, 500, 999, 3]), np.array([0, 3, 9, 10, 10])  # label 10: the null class
    got = adapter_for(tiny_dit).torch_callable(tiny_dit)(x, t, y)
    with torch.no_grad():
        want = tiny_dit(torch.from_numpy(x), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(y)).sample.numpy()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------ a second, test-local family
class ToyBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.ada, self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(5))
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, T, D)
        h = h * (1 + self.ada(h.mean(1, keepdim=True)))
        att = torch.softmax(self.q(h) @ self.k(h).transpose(1, 2) / h.shape[-1] ** 0.5, -1)  # (N, T, T)
        h = h + self.o(att @ self.v(h))
        return h + self.fc2(torch.relu(self.fc1(h)))


class ToyNet(nn.Module):
    """Tokens ``(N, T, D)`` and a label: a label table, two blocks, a float head."""

    def __init__(self, d: int = 32, classes: int = 3):
        super().__init__()
        self.config = {"width": d, "tokens": 4, "classes": classes}
        self.table = nn.Embedding(classes + 1, d)
        self.blocks = nn.ModuleList(ToyBlock(d) for _ in range(2))
        self.head = nn.Linear(d, d)

    def forward(self, tokens: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        h = tokens + self.table(label)[:, None]
        for b in self.blocks:
            h = b(h)
        return self.head(h)


class ToyForward(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, tokens: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.net(tokens, label)


class ToySpec(FamilySpec):
    class_name = "ToyNet"
    input_names = ("tokens", "label")

    def conditioning(self, config):
        return ClassConditioning(config["classes"], null_label=config["classes"])

    def output_split(self, config):
        return config["width"], 0

    def sample_shape(self, config):
        return config["tokens"], config["width"]


class ToyAdapter(FamilyAdapter):
    class_name = "ToyNet"
    spec = ToySpec()
    coverage = Coverage(
        blocks="blocks",
        activation_groups=(InputGroup("qkv", ("q", "k", "v")), InputGroup("o", ("o",)), InputGroup("fc1", ("fc1",)),
                           InputGroup("fc2", ("fc2",))),  # fmt: skip
        float_linears=("head",),
        robuq_activation_4bit=("blocks.*.ada",),
        robuq_weight_4bit=("table",),
    )
    root = "net"

    def wrap(self, model):
        return ToyForward(model)

    def example_inputs(self, config, batch=2, seed=0):
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(batch, config["tokens"], config["width"], generator=g),
                torch.randint(0, config["classes"] + 1, (batch,), generator=g))  # fmt: skip

    def torch_callable(self, model):
        return lambda tokens, label: model(torch.from_numpy(tokens), torch.from_numpy(label)).detach().numpy()


@pytest.fixture
def toy_family(monkeypatch):
    monkeypatch.setattr(adapters, "_REGISTRY", dict(adapters._REGISTRY))  # the registration ends with the test
    register(ToyAdapter)
    torch.manual_seed(0)  # the toy's weights, so its measured errors are the same every run
    return ToyNet()


def test_a_second_family_flows_through_the_recipe_the_genes_and_robuq_units(toy_family):
    net = toy_family
    assert {"DiTTransformer2DModel", "ToyNet"} <= set(adapters.supported())  # beside the other families
    cov = adapter_for(net).coverage
    wa = {f"blocks.{i}.{n}" for i in range(2) for n in ("q", "k", "v", "o", "fc1", "fc2")}
    plans = Recipe.qdit(cov, 4, 8, 16).resolve(net)
    assert {n for n, p in plans.items() if p.abits == 8} == wa
    assert {n for n, p in plans.items() if p.abits is None} == {"blocks.0.ada", "blocks.1.ada", "table"}
    robuq = Recipe.robuq(cov, 2).resolve(net)
    assert {n: (p.quant.wbits, p.abits) for n, p in robuq.items() if n not in wa} == {
        "blocks.0.ada": (TERNARY, 4), "blocks.1.ada": (TERNARY, 4), "table": (4, None)}  # fmt: skip
    units = []
    for i in range(2):
        units.append((f"blocks.{i}.qkv", (f"blocks.{i}.q", f"blocks.{i}.k", f"blocks.{i}.v")))
        units += [(f"blocks.{i}.{n}", (f"blocks.{i}.{n}",)) for n in ("o", "fc1", "fc2")]
    assert list(block_units(net).items()) == units  # block by block, in the coverage's group order
    assert [g.name for g in genes_of(plans, cov)] == ["blocks.0.qkv", "blocks.0.o", "blocks.0.fc1", "blocks.0.fc2",
                                                      "blocks.1.qkv", "blocks.1.o", "blocks.1.fc1", "blocks.1.fc2"]  # fmt: skip


def test_a_second_family_is_traced_and_bound_through_its_adapter(toy_family, tmp_path):
    """The tracer takes the family's wrapper, names and dynamic batch; binding finds every covered module
    under the wrapper's own root attribute (``net``), proven by weight content."""
    net, adapter = toy_family.eval(), adapter_for(toy_family)
    plans = Recipe.qdit(adapter.coverage, 4, 8, 16).resolve(net)
    export_float(adapter, net, tmp_path / "toy.onnx")
    proto = onnx.load(str(tmp_path / "toy.onnx"), load_external_data=False)
    assert [i.name for i in proto.graph.input] == ["tokens", "label"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # the batch is symbolic
    bound = bind_modules(adapter, proto, net, plans, tmp_path)
    assert set(bound) == set(plans) and len(set(bound.values())) == len(plans)


def test_a_subclass_of_a_registered_class_resolves_to_its_adapter(toy_family):
    class MyToyNet(ToyNet):
        pass

    assert isinstance(adapter_for(MyToyNet()), ToyAdapter)  # by the MRO: ToyNet's adapter
    with pytest.raises(DitqError, match="unsupported architecture 'Linear'"):
        adapter_for(nn.Linear(2, 2))  # nn.Module is no family


def test_a_second_family_is_quantized_exported_and_runs_in_onnx_runtime(toy_family, tmp_path):
    """``ditq.quantize`` + the full folder export, with the family's own conditioning and sample shape in
    the recorded pipeline, and the exported graph run in ONNX Runtime under the adapter's input names.

    Bound: W8A8 Q/DQ in ONNX Runtime against ditq's quantized torch reference, SQNR > 30 dB: both compute
    the same quantized function up to float rounding order, which moves some activations by one 8-bit
    step (measured about 42 dB); a graph with the wrong inputs or unbound weights is far below that."""
    import onnxruntime as ort

    import ditq
    from ditq.exporter.export import export
    from ditq.fileformat import META_PIPELINE
    from ditq.pipeline import Pipeline

    net, adapter = toy_family.eval(), adapter_for(toy_family)
    qd = ditq.quantize(net, Recipe.qdit(adapter.coverage, 8, 8, None))
    out = tmp_path / "toy"
    export(qd, out, source={"kind": "test"}, pipeline=Pipeline(), progress=False)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert Pipeline.from_metadata(meta, "toy").conditioning == ClassConditioning(3, 3)  # the adapter's, not a DiT's
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["tokens", "label"]
    tokens, label = adapter.example_inputs(net.config, batch=3, seed=7)
    got = session.run(None, {"tokens": tokens.numpy(), "label": label.numpy()})[0]
    with torch.no_grad():
        ref = qd.reference()(tokens, label).numpy()
        flt = net(tokens, label).numpy()
    assert got.shape == (3, 4, 32)
    assert sqnr_db(ref, got) > 30, (sqnr_db(ref, got), sqnr_db(ref, flt))
