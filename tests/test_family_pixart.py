"""The PixArt family (``PixArtTransformer2DModel``): its config schema, coverage, signature, the export wrapper
against diffusers' own forward, the float graph in ONNX Runtime at other batch and text lengths, and W4A8 /
W8A8 exports of both targets validated; the pipeline's text path (``encode_prompt``) and micro-conditions
against diffusers' own code."""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ditq.adapters import adapter_for
from ditq.calib.numerics import sqnr_db
from ditq.calib.robuq import block_units
from ditq.calib.search import genes_of
from ditq.errors import DitqError
from ditq.exporter.trace import export_float
from ditq.families import spec_for
from ditq.models import load_model
from ditq.recipe import TERNARY, Recipe
from ditq.workflows.export import RecipeOptions, export_model
from ditq.workflows.validate import validate
from tests.conftest import assert_no_output, assert_one_line_refusal, run

PIXART = "PixArtTransformer2DModel"
# the tiny PixArt of the issue's contract (hidden 64, 2 blocks, T5 width 32, learned sigma)
TINY = dict(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=16, num_attention_heads=4, caption_channels=32,
            in_channels=4, cross_attention_dim=64, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)  # fmt: skip
# with the resolution/aspect-ratio micro-conditions: hidden 48 (their embeddings take a third of it each)
CONDITIONED = {**TINY, "attention_head_dim": 12, "cross_attention_dim": 48, "use_additional_conditions": True}
ADAPTER = adapter_for(PIXART)
SPEC = spec_for(PIXART)


def _build(config):
    return ADAPTER.build(SPEC.check_config(config, "test"), seed=0)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The tiny PixArt and the micro-conditioned one saved with ``save_pretrained``; read-only."""
    root = tmp_path_factory.mktemp("pixart")
    for name, config in (("plain", TINY), ("conditioned", CONDITIONED)):
        _build(config).save_pretrained(root / name)
    return {"plain": root / "plain", "conditioned": root / "conditioned"}


# ------------------------------------------------------------------------------------------ coverage
PER_BLOCK_WA = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")  # fmt: skip
SHARED_W = ("adaln_single.emb.timestep_embedder.linear_1", "adaln_single.emb.timestep_embedder.linear_2", "adaln_single.linear",
            "caption_projection.linear_1", "caption_projection.linear_2")  # fmt: skip
MICRO_W = ("adaln_single.emb.resolution_embedder.linear_1", "adaln_single.emb.resolution_embedder.linear_2",
           "adaln_single.emb.aspect_ratio_embedder.linear_1", "adaln_single.emb.aspect_ratio_embedder.linear_2")  # fmt: skip


def _blocks(names, depth=2):
    return {f"transformer_blocks.{i}.{n}" for i in range(depth) for n in names}


def test_pixart_coverage_is_exactly_the_issues_layer_list(folders):
    """Q-DiT: weights and activations of self-attention, cross-attention and feed-forward in every block;
    adaln_single and caption_projection weight-only; proj_out float. RobuQ: the same layers at its bits,
    adaln_single's modulation linear at A4. Groups: q/k/v one, the cross-attention's image-token query one,
    its caption-token key/value one."""
    model = load_model(str(folders["plain"])).model
    cov = ADAPTER.coverage_of(model)
    plans = Recipe.qdit(cov, 4, 8, 16).resolve(model)
    assert {n for n, p in plans.items() if p.abits == 8} == _blocks(PER_BLOCK_WA)
    assert {n for n, p in plans.items() if p.abits is None} == set(SHARED_W)
    assert "proj_out" not in plans and len(plans) == 2 * 10 + 5

    robuq = {n: (p.quant.wbits, p.abits) for n, p in Recipe.robuq(cov, 3, rotate=True).resolve(model).items()}
    want = {n: (TERNARY, 3) for n in _blocks(PER_BLOCK_WA)} | {n: (TERNARY, None) for n in SHARED_W}
    assert robuq == want | {"adaln_single.linear": (TERNARY, 4)}

    units = {}
    for i in range(2):
        b = f"transformer_blocks.{i}."
        units[b + "attn1.qkv"] = (b + "attn1.to_q", b + "attn1.to_k", b + "attn1.to_v")
        units[b + "attn1.to_out.0"] = (b + "attn1.to_out.0",)
        units[b + "attn2.to_q"] = (b + "attn2.to_q",)
        units[b + "attn2.kv"] = (b + "attn2.to_k", b + "attn2.to_v")
        units |= {b + n: (b + n,) for n in ("attn2.to_out.0", "ff.net.0.proj", "ff.net.2")}
    assert block_units(model) == units
    assert {g.name: g.layers for g in genes_of(plans, cov)} == units

    conditioned = load_model(str(folders["conditioned"])).model  # the micro-condition embedders: weight-only
    plans = Recipe.qdit(ADAPTER.coverage_of(conditioned), 4, 8, 16).resolve(conditioned)
    assert {n for n, p in plans.items() if p.abits is None} == set(SHARED_W) | set(MICRO_W)


# ----------------------------------------------------------------------------------------- signature
def test_signature_follows_the_config(folders):
    plain, cond = (dict(load_model(str(folders[k])).model.config) for k in ("plain", "conditioned"))
    x, text, mask, t = ADAPTER.example_inputs(plain, batch=3, seed=1)
    assert (x.shape, text.shape, mask.shape, t.shape) == ((3, 4, 8, 8), (3, 7, 32), (3, 7), (3,))
    assert (mask.dtype, t.dtype) == (torch.int64, torch.int64) and (mask == 0).any(dim=1).all() and (mask[:, 0] == 1).all()
    assert SPEC.graph_inputs(plain) == ("hidden_states", "encoder_hidden_states", "encoder_attention_mask", "timestep")
    assert SPEC.graph_inputs(cond) == (*SPEC.graph_inputs(plain), "resolution", "aspect_ratio")
    assert [a.shape for a in ADAPTER.example_inputs(cond, batch=2)[4:]] == [(2, 2), (2, 1)]
    assert ADAPTER.input_names[ADAPTER.timestep_index] == "timestep" and ADAPTER.timestep_input([0, 999]).dtype == torch.int64
    assert SPEC.output_split(plain) == (4, 4) and SPEC.sample_shape(plain) == (4, 8, 8)
    assert SPEC.output_split({**plain, "out_channels": None}) == (4, 0) and SPEC.prediction_type == "epsilon"


@pytest.mark.parametrize("use, size", [(None, 128), (None, 8), (True, 8), (False, 128)])
def test_micro_conditions_are_decided_as_diffusers_decides(use, size):
    """``use_additional_conditions`` null means ``sample_size == 128``: the constructor's own rule."""
    from diffusers import PixArtTransformer2DModel

    config = {**CONDITIONED, "sample_size": size, "use_additional_conditions": use, "num_layers": 1}
    with torch.device("meta"):
        model = PixArtTransformer2DModel(**config)
    assert SPEC.check_config(config, "c")["use_additional_conditions"] is model.use_additional_conditions
    assert SPEC.graph_inputs(config)[4:] == (("resolution", "aspect_ratio") if model.use_additional_conditions else ())


# ------------------------------------------------------------------------------------------- wrapper
@pytest.mark.parametrize("which", ["plain", "conditioned"])
def test_the_wrapper_is_diffusers_forward_bit_for_bit(folders, which):
    """With a mask that pads every row, the wrapper (export-time cross-attention processor and proj_out hook)
    gives diffusers' own forward exactly, and leaves the model's processors and hooks as they were."""
    model = load_model(str(folders[which])).model
    inputs = ADAPTER.example_inputs(dict(model.config), batch=3, seed=4)
    x, text, mask, t, *micro = inputs
    added = dict(zip(("resolution", "aspect_ratio"), micro)) or None
    processors = [b.attn2.processor for b in model.transformer_blocks]
    wrapper = ADAPTER.wrap(model)
    assert getattr(wrapper, ADAPTER.root) is model
    with torch.no_grad():
        want = model(x, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=t, added_cond_kwargs=added, return_dict=False)[0]
        got = wrapper(*inputs)
        unmasked = model(x, encoder_hidden_states=text, timestep=t, added_cond_kwargs=added, return_dict=False)[0]
    assert torch.equal(got, want) and not torch.equal(got, unmasked)  # the padding is masked, identically
    assert [b.attn2.processor for b in model.transformer_blocks] == processors and not model.proj_out._forward_hooks


# ------------------------------------------------------------------------------------------ ONNX
@pytest.mark.slow
def test_the_float_graph_runs_at_another_batch_and_text_length(folders, tmp_path):
    """Traced at batch 2 and 7 text tokens, run at batch 5 and 11 (rows padded differently): ONNX Runtime
    equals torch to >= 80 dB, the fp32 floor of validation (no quantization: only fp32 reassociation in
    MatMul, attention and LayerNorm differs; measured ~120 dB). The micro-conditioned model: all six inputs."""
    model = load_model(str(folders["conditioned"])).model
    export_float(ADAPTER, model, tmp_path / "float.onnx")
    proto = onnx.load(str(tmp_path / "float.onnx"), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert dims == {"hidden_states": ["batch", 4, 8, 8], "encoder_hidden_states": ["batch", "text_tokens", 32],
                    "encoder_attention_mask": ["batch", "text_tokens"], "timestep": ["batch"], "resolution": ["batch", 2],
                    "aspect_ratio": ["batch", 1]}  # fmt: skip
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5, 4, 8, 8, generator=g)
    text = torch.randn(5, 11, 32, generator=g)
    mask = (torch.arange(11)[None] < torch.tensor([[1], [4], [11], [7], [10]])).to(torch.int64)
    t = torch.tensor([0, 1, 250, 500, 999])
    micro = torch.tensor([[64.0, 64.0]]).repeat(5, 1), torch.tensor([[1.0], [0.5], [2.0], [1.0], [0.75]])
    with torch.no_grad():
        want = ADAPTER.wrap(model)(x, text, mask, t, *micro).numpy()
    session = ort.InferenceSession(str(tmp_path / "float.onnx"), providers=["CPUExecutionProvider"])
    feeds = {n: a.numpy() for n, a in zip(SPEC.graph_inputs(model.config), (x, text, mask, t, *micro))}
    got = session.run(None, feeds)[0]
    assert got.shape == (5, 8, 8, 8) and sqnr_db(want, got) >= 80.0


@pytest.mark.slow
@pytest.mark.parametrize("wbits, target", [
    (4, "qdq"),
    pytest.param(8, "qdq", marks=pytest.mark.slow),
    pytest.param(4, "ort", marks=pytest.mark.slow),
    pytest.param(8, "ort", marks=pytest.mark.slow),
])  # fmt: skip
def test_w4a8_and_w8a8_export_and_validate(folders, tmp_path, wbits, target):
    out = export_model(str(folders["plain"]), RecipeOptions(wbits=wbits, abits=8), tmp_path / "out", target=target)
    # 2 blocks x 6 image-token quantizers, and one for the caption tokens: every attn2.to_k/to_v reads them
    assert out.result.layers == 25 and (target == "ort" or out.result.activation_quantizers == 2 * 6 + 1)
    report = validate(tmp_path / "out", progress=False)
    assert report.passed, [c for c in report.checks if not c.passed] + [c for c in report.cases if not c.passed]
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False).metadata_props}
    assert meta["ditq.family"] == PIXART


@pytest.mark.slow
def test_a_micro_conditioned_pixart_exports_and_validates(folders, tmp_path):
    export_model(str(folders["conditioned"]), RecipeOptions(wbits=4, abits=8), tmp_path / "out")
    report = validate(tmp_path / "out", progress=False)
    assert report.passed, [c for c in report.checks if not c.passed] + [c for c in report.cases if not c.passed]


# ------------------------------------------------------------------------------------------ bad input
def test_a_group_size_that_does_not_divide_a_width_names_the_layer(folders, tmp_path, capsys):
    """Group 64 fits the hidden width but not the caption projection's T5 width 32."""
    code, _, err = run(["export", "--model", str(folders["plain"]), "--out", str(tmp_path / "out"), "--group-size", "64"], capsys)
    assert_one_line_refusal(code, err, "group size 64 does not divide the input width 32 of layer 'caption_projection.linear_1'")
    assert_no_output(tmp_path)


HOSTILE = [
    ({"num_layers": 10**9}, "num_layers must be an integer in 1..512"),
    ({"num_attention_heads": True}, "num_attention_heads must be an integer"),
    ({"sample_size": "64"}, "sample_size must be an integer"),
    ({"interpolation_scale": float("nan")}, "interpolation_scale must be a finite number"),
    ({"interpolation_scale": 1e-300}, "interpolation_scale must be a finite number in [0.015625, 64]"),
    ({"caption_channels": -1}, "caption_channels must be an integer in 1..65536 or null"),
    ({"activation_fn": "x" * 100_000}, "activation_fn must be one of"),
    ({"use_additional_conditions": "yes"}, "use_additional_conditions must be true or false or null"),
    ({"norm_type": "ada_norm_zero"}, 'norm_type must be one of "ada_norm_single"'),
    ({"attention_type": "gated"}, "attention_type must be one of"),
    ({"num_attention_heads": 256, "attention_head_dim": 1024}, "num_attention_heads x attention_head_dim = 262144, more than"),
    ({"out_channels": 5}, "out_channels must be in_channels (4) or twice it"),
    ({"sample_size": 9}, "sample_size 9 is not a multiple of patch_size 2"),
    ({"cross_attention_dim": 32}, "cross_attention_dim 32 must equal num_attention_heads x attention_head_dim = 64"),
    ({"cross_attention_dim": None}, "cross_attention_dim is null"),
    ({"use_additional_conditions": True}, "use_additional_conditions needs num_attention_heads x attention_head_dim divisible by 3"),
]


@pytest.mark.parametrize("override, message", HOSTILE)
def test_a_config_field_that_cannot_be_exported_is_refused_in_one_line(override, message):
    with pytest.raises(DitqError) as e:
        SPEC.check_config({**TINY, **override}, "config.json")
    text = str(e.value)
    assert text.startswith("config.json: ") and message in text and "\n" not in text and len(text) < 300


def test_a_hostile_config_json_is_refused_before_any_weight_is_read(folders, tmp_path, capsys):
    folder = tmp_path / "model"
    shutil.copytree(folders["plain"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 10**6}))
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"not read")
    code, _, err = run(["export", "--model", str(folder), "--out", str(tmp_path / "out")], capsys)
    assert_one_line_refusal(code, err, "num_attention_heads must be an integer in 1..256")
    assert_no_output(tmp_path)


# ------------------------------------------------------------------------------------- sampling side
def _default_max_sequence_length(module: str, cls: str) -> int:
    """The default of ``max_sequence_length`` in ``cls.__call__``, read from diffusers' source (no import)."""
    tree = ast.parse(open(importlib.util.find_spec(module).origin).read())
    call = next(f for c in tree.body if isinstance(c, ast.ClassDef) and c.name == cls for f in c.body
                if isinstance(f, ast.FunctionDef) and f.name == "__call__")  # fmt: skip
    names = [a.arg for a in call.args.args]
    return call.args.defaults[names.index("max_sequence_length") - (len(names) - len(call.args.defaults))].value


@pytest.mark.parametrize("module, cls", [
    ("diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha", "PixArtAlphaPipeline"),
    ("diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma", "PixArtSigmaPipeline"),
    ("diffusers.pipelines.pag.pipeline_pag_pixart_sigma", "PixArtSigmaPAGPipeline"),
])  # fmt: skip
def test_the_text_length_is_the_pipelines(module, cls):
    (t5,) = SPEC.text_encoders_for(cls)
    assert t5.max_length == _default_max_sequence_length(module, cls)
    want = ("text_encoder", "tokenizer", "t5", ("last_hidden_state",), True)
    assert (t5.folder, t5.tokenizer, t5.kind, t5.outputs, t5.attention_mask) == want


def test_an_unknown_pipeline_class_is_refused_in_one_line():
    assert SPEC.text_encoders_for(None) == SPEC.text_encoders  # no pipeline folder: PixArtAlphaPipeline's
    with pytest.raises(DitqError, match=r"^pipeline 'StableDiffusionPipeline' is not a PixArt pipeline ditq knows; it knows: "):
        SPEC.text_encoders_for("StableDiffusionPipeline")


def test_feeds_give_the_pipelines_transformer_call(folders):
    """One step as PixArtAlphaPipeline's loop makes it (its lines, with CFG's doubled batch): feeds ->
    the model's graph signature -> prediction equals ``transformer(...)`` then the learned-sigma chunk."""
    model = load_model(str(folders["plain"])).model
    config = dict(model.config)
    g = torch.Generator().manual_seed(3)
    latents, embeds = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 9, 32, generator=g)
    mask = (torch.arange(9)[None] < torch.tensor([[1], [5], [3], [9]])).to(torch.int64)
    t = torch.tensor(801)  # an element of the scheduler's int64 timesteps
    with torch.no_grad():
        noise_pred = model(latents, encoder_hidden_states=embeds, encoder_attention_mask=mask, timestep=t[None].expand(4),
                           added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]  # fmt: skip
    want = noise_pred.chunk(2, dim=1)[0].numpy()
    cond = SPEC.compose_prompt({"text_encoder": {"last_hidden_state": embeds.numpy()}}, {"text_encoder": mask.numpy()})
    feeds = SPEC.feeds(config, latents.numpy(), t.numpy(), cond)
    assert list(feeds) == list(SPEC.graph_inputs(config)) and feeds["timestep"].dtype == np.int64
    out = ADAPTER.torch_callable(model)(*feeds.values())
    np.testing.assert_array_equal(SPEC.prediction(config, out, latents.numpy()), want)


def test_micro_conditions_are_the_pipelines():
    """PixArtAlphaPipeline's lines: ``[height, width]`` and ``height / width`` of the image, repeated per row."""
    height, width = 16 * 8, 24 * 8  # latents of 16 x 24, the VAE's factor 8
    resolution = torch.tensor([height, width]).repeat(3, 1).to(torch.float32)
    aspect_ratio = torch.tensor([float(height / width)]).repeat(3, 1).to(torch.float32)
    feeds = SPEC.feeds(CONDITIONED, np.zeros((3, 4, 16, 24), np.float32), np.int64(5),
                       {"encoder_hidden_states": np.zeros((3, 2, 32)), "encoder_attention_mask": np.ones((3, 2))})  # fmt: skip
    np.testing.assert_array_equal(feeds["resolution"], resolution.numpy())
    np.testing.assert_array_equal(feeds["aspect_ratio"], aspect_ratio.numpy())
    assert "resolution" not in SPEC.feeds(TINY, np.zeros((1, 4, 8, 8)), 5, {"encoder_hidden_states": np.zeros((1, 2, 32)),
                                                                              "encoder_attention_mask": np.ones((1, 2))})  # fmt: skip


@pytest.mark.slow  # imports transformers (~8 s here)
def test_compose_prompt_is_encode_prompt(folders):
    """A tiny T5 and a word-level tokenizer: the prompt as the spec says (lower-cased, stripped, padded to
    the pipeline's length), through T5 with its mask, composed, equals PixArtAlphaPipeline.encode_prompt."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>", "a", "red", "cat", "on", "the", "mat", "dog"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        t5 = T5EncoderModel(T5Config(vocab_size=1000, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4)).eval()
    pipe = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=t5, vae=None, transformer=load_model(str(folders["plain"])).model,
                               scheduler=DPMSolverMultistepScheduler())  # fmt: skip
    prompts = ["  A red CAT on the Mat ", "dog"]
    (t5_spec,) = SPEC.text_encoders_for("PixArtAlphaPipeline")
    with torch.no_grad():
        embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
        ids = tokenizer([SPEC.prompt_text(p) for p in prompts], padding="max_length", max_length=t5_spec.max_length,
                        truncation=True, return_tensors="pt")  # fmt: skip
        hidden = t5(ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state
    got = SPEC.compose_prompt({"text_encoder": {"last_hidden_state": hidden.numpy()}}, {"text_encoder": ids.attention_mask.numpy()})
    assert embeds.shape[1] == 120 and int(mask.sum()) == 7 + 2
    np.testing.assert_array_equal(got["encoder_hidden_states"], embeds.numpy())
    np.testing.assert_array_equal(got["encoder_attention_mask"], mask.numpy())
