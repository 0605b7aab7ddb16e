"""The Flux family (diffusers' FluxTransformer2DModel): coverage, the traced signature against diffusers'
own forward, packing and ids against FluxPipeline's own functions, the float graph at other shapes than
traced, quantized exports that validate, and bad input refused in one line.

The model is the contract's tiny Flux (hidden 64: 4 heads of 16, one double and one single block), saved
with ``save_pretrained`` and loaded through ``ditq.models.load_model`` as a user's folder would be."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from diffusers import FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

from ditq.adapters import adapter_for
from ditq.calib.search import genes_of
from ditq.errors import DitqError
from ditq.exporter.trace import export_float
from ditq.families import spec_for
from ditq.models import load_model
from ditq.recipe import Recipe
from ditq.workflows.export import RecipeOptions, export_model
from ditq.workflows.validate import validate
from tests.conftest import assert_one_line_refusal, run

FLUX = "FluxTransformer2DModel"
TINY = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=4,
            joint_attention_dim=32, pooled_projection_dim=48, axes_dims_rope=(4, 6, 6), guidance_embeds=True)  # fmt: skip
ADAPTER = adapter_for(FLUX)
SPEC = spec_for(FLUX)


def _save(folder, **over) -> str:
    config = SPEC.check_config({**TINY, **over}, "tiny flux")
    ADAPTER.build(config, seed=0).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def dev_folder(tmp_path_factory):
    """The tiny guidance-distilled Flux (as Flux.1 dev) saved once per module; read-only."""
    return _save(tmp_path_factory.mktemp("flux") / "dev")


@pytest.fixture(scope="module")
def schnell_folder(tmp_path_factory):
    """The tiny Flux without guidance embedding (as Flux.1 schnell) saved once per module; read-only."""
    return _save(tmp_path_factory.mktemp("flux") / "schnell", guidance_embeds=False)


def sqnr(ref: np.ndarray, x: np.ndarray) -> float:
    ref, x = np.asarray(ref, np.float64), np.asarray(x, np.float64)
    return float(10 * np.log10(np.sum(ref**2) / np.sum((ref - x) ** 2)))


# ------------------------------------------------------------------------------------------- coverage
# Every linear of the tiny Flux and what Q-DiT's recipe gives it: "wa" weights and input activations,
# "w" weight-only, "float" not quantized.
EXPECTED_COVERAGE = {
    "time_text_embed.timestep_embedder.linear_1": "w",
    "time_text_embed.timestep_embedder.linear_2": "w",
    "time_text_embed.guidance_embedder.linear_1": "w",
    "time_text_embed.guidance_embedder.linear_2": "w",
    "time_text_embed.text_embedder.linear_1": "w",
    "time_text_embed.text_embedder.linear_2": "w",
    "context_embedder": "w",
    "x_embedder": "w",
    "transformer_blocks.0.norm1.linear": "w",
    "transformer_blocks.0.norm1_context.linear": "w",
    "transformer_blocks.0.attn.to_q": "wa",
    "transformer_blocks.0.attn.to_k": "wa",
    "transformer_blocks.0.attn.to_v": "wa",
    "transformer_blocks.0.attn.to_out.0": "wa",
    "transformer_blocks.0.attn.add_q_proj": "wa",
    "transformer_blocks.0.attn.add_k_proj": "wa",
    "transformer_blocks.0.attn.add_v_proj": "wa",
    "transformer_blocks.0.attn.to_add_out": "wa",
    "transformer_blocks.0.ff.net.0.proj": "wa",
    "transformer_blocks.0.ff.net.2": "wa",
    "transformer_blocks.0.ff_context.net.0.proj": "wa",
    "transformer_blocks.0.ff_context.net.2": "wa",
    "single_transformer_blocks.0.norm.linear": "w",
    "single_transformer_blocks.0.proj_mlp": "wa",
    "single_transformer_blocks.0.proj_out": "wa",
    "single_transformer_blocks.0.attn.to_q": "wa",
    "single_transformer_blocks.0.attn.to_k": "wa",
    "single_transformer_blocks.0.attn.to_v": "wa",
    "norm_out.linear": "w",
    "proj_out": "float",
}
# The linears that read one input and so share one activation quantizer
EXPECTED_GROUPS = {
    "transformer_blocks.0.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "transformer_blocks.0.attn.add_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "transformer_blocks.0.attn.to_out.0": ("attn.to_out.0",),
    "transformer_blocks.0.attn.to_add_out": ("attn.to_add_out",),
    "transformer_blocks.0.ff.net.0.proj": ("ff.net.0.proj",),
    "transformer_blocks.0.ff.net.2": ("ff.net.2",),
    "transformer_blocks.0.ff_context.net.0.proj": ("ff_context.net.0.proj",),
    "transformer_blocks.0.ff_context.net.2": ("ff_context.net.2",),
    "single_transformer_blocks.0.qkv_mlp": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "single_transformer_blocks.0.proj_out": ("proj_out",),
}


def test_qdit_covers_exactly_the_listed_flux_linears(dev_folder):
    model = load_model(dev_folder).model
    assert type(model) is FluxTransformer2DModel and adapter_for(model) is ADAPTER
    linears = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    assert linears == set(EXPECTED_COVERAGE)  # the list names every linear of the model
    plans = Recipe.qdit(ADAPTER.coverage, 4, 8, 16).resolve(model)
    got = {n: "float" if n not in plans else "wa" if plans[n].abits == 8 else "w" for n in linears}
    assert got == EXPECTED_COVERAGE
    assert all(p.quant.wbits == 4 for p in plans.values())
    blocks = {g: ".".join(g.split(".")[:2]) for g in EXPECTED_GROUPS}  # "transformer_blocks.0"
    assert ADAPTER.coverage.groups(plans) == {g: tuple(f"{blocks[g]}.{m}" for m in ms) for g, ms in EXPECTED_GROUPS.items()}
    assert [g.name for g in genes_of(plans, ADAPTER.coverage)] == list(EXPECTED_GROUPS)  # the search's genes


# ------------------------------------------------------------------------------------------- signature
@pytest.mark.parametrize("guidance", [True, False])
def test_the_traced_wrapper_equals_diffusers_own_forward(guidance):
    config = SPEC.check_config({**TINY, "guidance_embeds": guidance}, "tiny flux")
    model = ADAPTER.build(config, seed=0)
    inputs = ADAPTER.example_inputs(config, batch=2, seed=3)
    assert len(inputs) == (7 if guidance else 6)
    names = SPEC.input_names[: len(inputs)]
    with torch.no_grad():
        ours = ADAPTER.wrap(model)(*inputs)
        theirs = model(**dict(zip(names, inputs)), return_dict=False)[0]
        also = ADAPTER.torch_callable(model)(*(x.numpy() for x in inputs))
    assert torch.equal(ours, theirs) and ours.shape == inputs[0].shape
    np.testing.assert_array_equal(also, theirs.numpy())
    # the text length differs from every other traced size, so no two dynamic axes are fused by their value
    t, s = inputs[1].shape[1], inputs[0].shape[1]
    assert t not in (2, s, inputs[0].shape[2], 3) and s not in (2, inputs[0].shape[2], 3)


def test_feeds_pack_ids_and_unpack_as_flux_pipeline_does():
    """FluxPipeline's own static methods are the reference: packing, the image ids, the text ids, the
    timestep it passes (``t / 1000`` of its float32 timesteps), the guidance vector, and unpacking."""
    config = SPEC.check_config(TINY, "tiny flux")
    b, c, h, w, t = 2, 4, 6, 10, 9
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(b, c, h, w, generator=g)
    text, pooled = torch.randn(b, t, 32, generator=g), torch.randn(b, 48, generator=g)
    cond = {"encoder_hidden_states": text.numpy(), "pooled_projections": pooled.numpy()}
    steps = torch.tensor([1000.0, 937.5])  # a flow-matching scheduler's timesteps (sigma x 1000)
    feeds = SPEC.feeds(config, latents.numpy(), steps.numpy(), cond, guidance=3.5)
    assert list(feeds) == list(SPEC.input_names)
    np.testing.assert_array_equal(feeds["hidden_states"], FluxPipeline._pack_latents(latents, b, c, h, w).numpy())
    np.testing.assert_array_equal(feeds["img_ids"], FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32).numpy())
    np.testing.assert_array_equal(feeds["txt_ids"], torch.zeros(t, 3).numpy())  # encode_prompt's text_ids
    np.testing.assert_array_equal(feeds["timestep"], (steps.expand(b).to(torch.float32) / 1000).numpy())
    np.testing.assert_array_equal(feeds["guidance"], torch.full([1], 3.5, dtype=torch.float32).expand(b).numpy())
    assert all(v.dtype == np.float32 for v in feeds.values())
    # the prediction: the packed output unpacked as FluxPipeline does (pixel size = latent size x 8)
    out = torch.randn(b, (h // 2) * (w // 2), 4 * c, generator=g)
    np.testing.assert_array_equal(SPEC.prediction(config, out.numpy(), latents.numpy()),
                                  FluxPipeline._unpack_latents(out, h * 8, w * 8, 8).numpy())  # fmt: skip
    # a model without guidance embedding takes no guidance input (FluxPipeline ignores the scale for it)
    schnell = {**config, "guidance_embeds": False}
    assert "guidance" not in SPEC.feeds(schnell, latents.numpy(), steps.numpy(), cond, guidance=3.5)
    with pytest.raises(DitqError, match="guidance-distilled"):
        SPEC.feeds(config, latents.numpy(), steps.numpy(), cond)
    with pytest.raises(DitqError, match="even H and W"):
        SPEC.feeds(config, latents[:, :, :5].numpy(), steps.numpy(), {}, guidance=3.5)
    # validation's timesteps are what the pipeline passes at those scheduler timesteps
    assert torch.equal(ADAPTER.timestep_input([0, 500, 999]), torch.tensor([0.0, 500.0, 999.0]) / 1000)


def test_prompt_encoders_and_composition_follow_flux_pipeline():
    clip, t5 = SPEC.text_encoders
    assert (clip.folder, clip.tokenizer, clip.kind, clip.max_length) == ("text_encoder", "tokenizer", "clip", 77)
    assert (t5.folder, t5.tokenizer, t5.kind) == ("text_encoder_2", "tokenizer_2", "t5")
    assert t5.max_length == inspect.signature(FluxPipeline.__call__).parameters["max_sequence_length"].default
    hidden, pooled = np.ones((2, 5, 32), np.float32), np.full((2, 48), 2.0, np.float32)
    encoded = {"text_encoder": {"last_hidden_state": np.zeros((2, 77, 32)), "penultimate": np.zeros((2, 77, 32)), "pooled": pooled},
               "text_encoder_2": {"last_hidden_state": hidden}}  # fmt: skip
    text = SPEC.compose_prompt(encoded, {"text_encoder": np.ones((2, 77), np.int64), "text_encoder_2": np.ones((2, 5), np.int64)})
    assert set(text) == {"encoder_hidden_states", "pooled_projections"}
    np.testing.assert_array_equal(text["encoder_hidden_states"], hidden)  # T5's hidden states
    np.testing.assert_array_equal(text["pooled_projections"], pooled)  # CLIP-L's pooler_output
    assert SPEC.prediction_type == "flow" and SPEC.sample_shape(TINY) == (4, 128, 128) and SPEC.image_tokens(TINY) == 4096


# ------------------------------------------------------------------------------------------- float graph
@pytest.mark.slow
def test_the_float_graph_runs_at_another_batch_text_length_and_image_size(schnell_folder, tmp_path):
    """Traced at batch 2, 7 text tokens and 6x10 latents (15 image tokens); run at batch 3, 11 tokens and
    8x12 latents (24 tokens, other ids). Only fp32 reassociation (MatMul, attention, norms) separates ONNX
    Runtime from PyTorch, about 1e-6 relative (120 dB); 80 dB (1e-4) is validate's float floor and fails
    on any real difference (a wrong id, a specialised shape). A model without guidance also proves the
    tracer drops the optional last input's axes."""
    model = load_model(schnell_folder).model
    export_float(ADAPTER, model, tmp_path / "float.onnx")
    session = ort.InferenceSession(str(tmp_path / "float.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == list(SPEC.input_names[:6])
    g = torch.Generator().manual_seed(7)
    b, h, w, t = 3, 8, 12, 11
    latents = torch.randn(b, 4, h, w, generator=g).numpy()
    text, pooled = torch.randn(b, t, 32, generator=g), torch.randn(b, 48, generator=g)
    cond = {"encoder_hidden_states": text.numpy(), "pooled_projections": pooled.numpy()}
    feeds = SPEC.feeds(dict(model.config), latents, np.array([1000.0, 500.0, 20.0]), cond)
    got = session.run(None, feeds)[0]
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}, return_dict=False)[0].numpy()
    assert got.shape == want.shape == (b, (h // 2) * (w // 2), 16)
    assert sqnr(want, got) >= 80.0


# ------------------------------------------------------------------------------------------- exports
@pytest.mark.slow
@pytest.mark.parametrize(
    "wbits,target",
    [(4, "qdq"), pytest.param(8, "qdq", marks=pytest.mark.slow), pytest.param(4, "ort", marks=pytest.mark.slow),
     pytest.param(8, "ort", marks=pytest.mark.slow)],
)  # fmt: skip
def test_a_quantized_flux_export_validates(dev_folder, tmp_path, wbits, target):
    export_model(dev_folder, RecipeOptions(wbits=wbits, abits=8), tmp_path / "out", target=target)
    report = validate(tmp_path / "out", progress=False)
    assert report.passed, report.table()
    assert len(report.cases) == 3
    proto = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["ditq.family"] == FLUX
    assert SPEC.check_config(json.loads(meta["ditq.model_config"]), "recorded") == SPEC.check_config(TINY, "tiny")
    assert [i.name for i in proto.graph.input] == list(SPEC.input_names)
    if target == "qdq":  # one in-graph activation quantizer per input group (to_q/k/v + proj_mlp share one)
        quantizers = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"
                      and any(p.key == "ditq.role" and p.value == "act_quant" for p in n.metadata_props)]  # fmt: skip
        assert len(quantizers) == len(EXPECTED_GROUPS)


# ------------------------------------------------------------------------------------------- bad input
def test_a_group_size_that_does_not_divide_a_flux_width_names_the_layer(dev_folder, tmp_path, capsys):
    code, _, err = run(["recipe", "--model", dev_folder, "--group-size", "32", "--out", str(tmp_path / "r.json")], capsys)
    assert_one_line_refusal(code, err, "group size 32", "width 48", "time_text_embed.text_embedder.linear_1")
    # the single blocks' proj_out reads [attention, MLP] concatenated: 64 + 256 = 320 channels
    recipe = Recipe.qdit(ADAPTER.coverage, 4, 8, 16).to_dict()
    recipe["rules"].append({"match": "single_transformer_blocks.*.proj_out", "group_size": 128})
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    code, _, err = run(["export", "--model", dev_folder, "--recipe", str(tmp_path / "recipe.json"), "--out", str(tmp_path / "out")], capsys)
    assert_one_line_refusal(code, err, "group size 128", "width 320", "single_transformer_blocks.0.proj_out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "over,needle",
    [
        ({"num_layers": 10**9}, "num_layers must be an integer in 1..256, got 1000000000"),
        ({"guidance_embeds": "yes"}, "guidance_embeds must be true or false"),
        ({"axes_dims_rope": [4, 6, 8]}, "axes_dims_rope [4, 6, 8] must sum to attention_head_dim 16"),
        ({"axes_dims_rope": [8, 8]}, "axes_dims_rope must have 3 entries"),
        ({"axes_dims_rope": [2, 8, 6, 0]}, "axes_dims_rope must be an array of 1..3 items"),
        ({"axes_dims_rope": [3, 7, 6]}, "axes_dims_rope entries must be even"),
        ({"axes_dims_rope": "x" * 5000}, "axes_dims_rope must be an array"),
        ({"patch_size": 2}, "patch_size must be 1"),
        ({"in_channels": 18}, "in_channels 18 is not a multiple of 4"),
        ({"out_channels": 32}, "out_channels 32 differs from in_channels 16"),
        ({"num_attention_heads": 256, "attention_head_dim": 1024}, "num_attention_heads x attention_head_dim = 262144"),
        ({"joint_attention_dim": 1.5}, "joint_attention_dim must be an integer"),
    ],
)  # fmt: skip
def test_a_hostile_flux_config_field_is_refused_in_one_line(dev_folder, tmp_path, capsys, over, needle):
    folder = tmp_path / "flux"
    folder.mkdir()
    config = json.loads((Path(dev_folder) / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **over}))
    code, _, err = run(["recipe", "--model", str(folder), "--out", str(tmp_path / "r.json")], capsys)
    assert_one_line_refusal(code, err, needle)


def test_weights_that_do_not_fit_the_block_counts_are_refused_in_one_line(dev_folder, tmp_path, capsys):
    folder = tmp_path / "flux"
    folder.mkdir()
    src = Path(dev_folder)
    for f in src.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((src / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_single_layers": 2}))
    code, _, err = run(["recipe", "--model", str(folder), "--out", str(tmp_path / "r.json")], capsys)
    assert_one_line_refusal(code, err, "num_single_layers 2", "the weights hold 1 block in single_transformer_blocks")
