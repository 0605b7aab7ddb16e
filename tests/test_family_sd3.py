"""The SD3 (MMDiT) family: diffusers' ``SD3Transformer2DModel`` through ditq.

Checked against independent references: diffusers' own forward (the wrapper), diffusers'
``StableDiffusion3Pipeline.encode_prompt`` (the prompt composition), the coverage lists written out below
(not derived from the adapter), and ONNX Runtime against PyTorch (exports)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ditq.adapters import adapter_for
from ditq.calib.numerics import sqnr_db
from ditq.errors import DitqError
from ditq.exporter.reference import quantize_model
from ditq.families import spec_for
from ditq.models import load_model
from ditq.recipe import LayerQuant, Recipe
from ditq.workflows.export import RecipeOptions, export_model
from ditq.workflows.validate import within_bound, validate
from tests.conftest import assert_one_line_refusal, run

SD3 = "SD3Transformer2DModel"
ADAPTER, SPEC = adapter_for(SD3), spec_for(SD3)
# the contract's tiny SD3: 2 blocks of 64 (4 heads of 16); block 1 is the last (context_pre_only)
TINY = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=4,
            joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=48, out_channels=4, pos_embed_max_size=32)  # fmt: skip


def tiny(**over):
    return ADAPTER.build(SPEC.check_config({**TINY, **over}, "tiny SD3"), seed=0)


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    """The tiny SD3 saved once per module by diffusers' save_pretrained; read-only."""
    folder = tmp_path_factory.mktemp("sd3") / "sd3"
    tiny().save_pretrained(folder)
    return str(folder)


def inputs(batch, text, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 16, 16, generator=g), torch.randn(batch, text, 32, generator=g),
            torch.randn(batch, 48, generator=g), torch.rand(batch, generator=g) * 1000)  # fmt: skip


# ----------------------------------------------------------------------------------------------- coverage
BLOCK_WA = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_out.0",
            "ff.net.0.proj", "ff.net.2")  # fmt: skip
CONTEXT_OUT_WA = ("attn.to_add_out", "ff_context.net.0.proj", "ff_context.net.2")  # not in the last block
WEIGHT_ONLY = {"context_embedder", "time_text_embed.timestep_embedder.linear_1", "time_text_embed.timestep_embedder.linear_2",
               "time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2", "norm_out.linear",
               *(f"transformer_blocks.{i}.{n}" for i in (0, 1) for n in ("norm1.linear", "norm1_context.linear"))}  # fmt: skip
ACTIVATIONS = {f"transformer_blocks.{i}.{n}" for i in (0, 1) for n in BLOCK_WA} | {f"transformer_blocks.0.{n}" for n in CONTEXT_OUT_WA}
FLOAT = {"proj_out"}


def test_qdit_coverage_is_both_streams_weights_and_activations_the_embedders_weight_only_proj_out_float():
    model = tiny()
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears == ACTIVATIONS | WEIGHT_ONLY | FLOAT  # every linear is in exactly one list
    assert isinstance(model.pos_embed.proj, torch.nn.Conv2d)  # the patch embedding is not a linear: float
    plans = Recipe.qdit(ADAPTER.coverage_of(model), 4, 8, 16).resolve(model)
    assert {n for n, p in plans.items() if p.abits == 8} == ACTIVATIONS
    assert {n for n, p in plans.items() if p.abits is None} == WEIGHT_ONLY
    assert set(plans) == ACTIVATIONS | WEIGHT_ONLY and all(p.quant.wbits == 4 for p in plans.values())
    # one activation quantizer per input: each stream's q/k/v share one
    groups = ADAPTER.coverage.groups(ACTIVATIONS)
    assert groups["transformer_blocks.0.attn.qkv"] == tuple(f"transformer_blocks.0.attn.to_{c}" for c in "qkv")
    assert groups["transformer_blocks.1.attn.add_qkv"] == tuple(f"transformer_blocks.1.attn.add_{c}_proj" for c in "qkv")
    assert len(groups) == 8 + 5  # block 0: qkv, add_qkv, to_out, to_add_out, ff x2, ff_context x2; block 1: no text output


def test_robuq_coverage_takes_the_adaln_linears_at_a4_and_the_final_modulation_at_w4():
    model = tiny()
    plans = Recipe.robuq(ADAPTER.coverage_of(model), 4).resolve(model)
    adaln = {f"transformer_blocks.{i}.{n}" for i in (0, 1) for n in ("norm1.linear", "norm1_context.linear")}
    assert {n for n, p in plans.items() if p.abits == 4} == ACTIVATIONS | adaln
    assert {n for n, p in plans.items() if p.quant.wbits == 4} == {"norm_out.linear"}
    assert "proj_out" not in plans and all(p.quant.ternary for n, p in plans.items() if n != "norm_out.linear")


def test_sd35_dual_attention_blocks_add_their_attn2_groups_and_an_sd3_recipe_names_none():
    """SD3.5-medium's attn2 (self-attention of the image stream, in the dual blocks only) is covered where it
    exists; a model without one gets a recipe whose every rule selects a module (else resolve refuses)."""
    model = tiny(num_layers=3, dual_attention_layers=[0], qk_norm="rms_norm")
    plans = Recipe.qdit(ADAPTER.coverage_of(model), 4, 8, 16).resolve(model)
    attn2 = {f"transformer_blocks.0.attn2.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0")}
    assert attn2 <= {n for n, p in plans.items() if p.abits == 8}
    assert not any(".attn2." in n for n in plans if not n.startswith("transformer_blocks.0."))
    assert ADAPTER.coverage.groups(plans)["transformer_blocks.0.attn2.qkv"] == tuple(f"transformer_blocks.0.attn2.to_{c}" for c in "qkv")
    recipe = Recipe.qdit(ADAPTER.coverage_of(tiny()), 4, 8, 16)
    assert not any("attn2" in r.match for r in recipe.rules)
    recipe.resolve(tiny())  # no rule that selects nothing


# ----------------------------------------------------------------------------------------------- signature
def test_the_wrapper_and_the_torch_callable_compute_diffusers_own_forward():
    model, x = tiny(), inputs(2, 7)
    with torch.no_grad():
        want = model(hidden_states=x[0], encoder_hidden_states=x[1], pooled_projections=x[2], timestep=x[3]).sample
        got = ADAPTER.wrap(model)(*x)
    assert torch.equal(got, want)
    assert np.array_equal(ADAPTER.torch_callable(model)(*(v.numpy() for v in x)), want.numpy())


def test_example_inputs_take_a_text_length_unlike_any_other_size_and_float_timesteps():
    x = ADAPTER.example_inputs(TINY, batch=2)
    assert [tuple(v.shape) for v in x] == [(2, 4, 16, 16), (2, 333, 32), (2, 48), (2,)]  # the pipeline's 77 + 256 tokens
    assert all(v.dtype == torch.float32 for v in x)
    assert ADAPTER.example_inputs({**TINY, "joint_attention_dim": 333}, batch=2)[1].shape[1] == 334
    assert ADAPTER.example_inputs({**TINY, "pooled_projection_dim": 333}, batch=334)[1].shape[1] == 335


def test_the_timestep_is_the_flow_schedulers_sigma_times_1000_as_float():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(5)
    assert torch.allclose(sched.timesteps, sched.sigmas[:-1] * 1000)  # what the pipeline passes the transformer
    t = ADAPTER.timestep_input([0, 500, 999])
    assert t.dtype == sched.timesteps.dtype == torch.float32 and t.tolist() == [0.0, 500.0, 999.0]
    feeds = SPEC.feeds(TINY, np.zeros((2, 4, 16, 16)), sched.timesteps[:2].numpy().astype(np.float64),
                       {"encoder_hidden_states": np.zeros((2, 5, 32)), "pooled_projections": np.zeros((2, 48))})  # fmt: skip
    assert tuple(feeds) == ADAPTER.input_names and all(v.dtype == np.float32 for v in feeds.values())
    assert np.array_equal(feeds["timestep"], sched.timesteps[:2].numpy())
    assert SPEC.prediction_type == "flow" and SPEC.sample_shape(TINY) == (4, 16, 16) and SPEC.output_split(TINY) == (4, 0)


# --------------------------------------------------------------------------------------- the prompt's inputs
def _tokenizer(max_length: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "a", "photo", "of", "cat", "red", "dog", "the", "blurry"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", model_max_length=max_length)


def _clip(hidden: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(hidden)
    cfg = CLIPTextConfig(hidden_size=hidden, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         projection_dim=hidden, vocab_size=1000, max_position_embeddings=77)  # fmt: skip
    return CLIPTextModelWithProjection(cfg).eval()


def _t5(width: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(width)
    return T5EncoderModel(T5Config(d_model=width, d_ff=37, d_kv=8, num_layers=2, num_heads=4, vocab_size=1000)).eval()


def _encoded(pipe, prompts: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """Each encoder's outputs as ditq's text-encoder files name them (penultimate hidden states, projected
    pooled output; T5's last hidden state), on the pipeline's own token ids."""
    out = {}
    with torch.no_grad():
        for folder, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3")):
            enc, tokenizer = getattr(pipe, folder), getattr(pipe, tok)
            if enc is None:
                continue
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
            if folder == "text_encoder_3":
                out[folder] = {"last_hidden_state": enc(ids)[0].numpy()}
            else:
                o = enc(ids, output_hidden_states=True)
                out[folder] = {"last_hidden_state": o.last_hidden_state.numpy(), "penultimate": o.hidden_states[-2].numpy(),
                               "pooled": o.text_embeds.numpy()}  # fmt: skip
    return out


@pytest.mark.parametrize("widths", [(8, 16, 32), (32, 32, 32), (8, 16, None)], ids=["padded", "cut", "no-t5"])
def test_compose_prompt_is_stable_diffusion_3_pipelines_encode_prompt(widths):
    """Exactly (concatenation and zero padding): prompt and negative prompt, CLIP-L + CLIP-G padded to the T5
    width (cut where wider, as torch's negative pad does: diffusers' own tiny pipeline is built so), and
    zeros in place of a missing T5."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    dl, dg, dt = widths
    pipe = StableDiffusion3Pipeline(
        transformer=tiny(), scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
        text_encoder=_clip(dl), tokenizer=_tokenizer(77), text_encoder_2=_clip(dg), tokenizer_2=_tokenizer(77),
        text_encoder_3=None if dt is None else _t5(dt), tokenizer_3=None if dt is None else _tokenizer(256),
    )  # fmt: skip
    prompts, negative = ["a photo of a cat", "red dog"], ["blurry", "the"]
    with torch.no_grad():
        pe, npe, pooled, npooled = pipe.encode_prompt(prompts, None, None, negative_prompt=negative, do_classifier_free_guidance=True)
    for words, embeds, pool in ((prompts, pe, pooled), (negative, npe, npooled)):
        got = SPEC.compose_prompt(_encoded(pipe, words), {}, config=TINY)
        assert got["encoder_hidden_states"].shape == (2, 77 + 256, 32) and got["encoder_hidden_states"].dtype == np.float32
        assert np.array_equal(got["encoder_hidden_states"], embeds.numpy())
        assert np.array_equal(got["pooled_projections"], pool.numpy())
    with pytest.raises(DitqError, match="T5"):
        SPEC.compose_prompt({k: v for k, v in _encoded(pipe, prompts).items() if k != "text_encoder_3"}, {})
    assert [(e.folder, e.tokenizer, e.kind, e.max_length) for e in SPEC.text_encoders] == [
        ("text_encoder", "tokenizer", "clip-projection", 77), ("text_encoder_2", "tokenizer_2", "clip-projection", 77),
        ("text_encoder_3", "tokenizer_3", "t5", 256)]  # fmt: skip


# ------------------------------------------------------------------------------------------------ bad input
HOSTILE = [
    ({"num_attention_heads": 10**400}, "num_attention_heads must be an integer in 1..256"),
    ({"joint_attention_dim": True}, "joint_attention_dim must be an integer"),
    ({"qk_norm": "l2"}, "qk_norm must be one of null"),  # diffusers builds no SD3 with it
    ({"qk_norm": "rms_norm_across_heads"}, "qk_norm must be one of null"),  # fails in the joint attention
    ({"dual_attention_layers": [0, 2]}, "dual_attention_layers[1] must be an integer in 0..1"),
    ({"dual_attention_layers": [1, 1]}, "dual_attention_layers names a block twice"),
    ({"dual_attention_layers": "x" * 1_000_000}, "dual_attention_layers must be an array of block indices"),
    ({"num_layers": 0}, "num_layers must be an integer in 1..512"),
    ({"caption_projection_dim": 32}, "caption_projection_dim 32 must equal"),
    ({"out_channels": 8}, "out_channels 8 must equal in_channels 4"),
    ({"sample_size": 128}, "64 patches a side, more than pos_embed_max_size 32"),
    ({"patch_size": 3}, "sample_size 16 is not a multiple of patch_size 3"),
    ({"num_attention_heads": 256, "attention_head_dim": 1024}, "more than 16384"),
]


@pytest.mark.parametrize("field,needle", HOSTILE, ids=[n[:40] for _, n in HOSTILE])
def test_the_config_checker_refuses_a_hostile_field_in_one_line_naming_it(field, needle):
    with pytest.raises(DitqError) as e:
        SPEC.check_config({**TINY, **field}, "config.json")
    msg = str(e.value)
    assert needle in msg and msg.startswith("config.json: ") and "\n" not in msg and len(msg) < 400, msg


def test_a_hostile_config_is_refused_by_the_command_line_before_any_weight_is_read(tmp_path, capsys):
    (tmp_path / "m").mkdir()  # no weights at all: the config is refused first
    (tmp_path / "m" / "config.json").write_text(json.dumps({**TINY, "_class_name": SD3, "dual_attention_layers": [9] * 10**5}))
    code, _, err = run(["export", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "out")], capsys)
    assert_one_line_refusal(code, err, "config.json: dual_attention_layers must be an array of block indices")


def test_a_group_size_that_does_not_divide_a_width_names_the_layer(sd3_folder, tmp_path, capsys):
    code, _, err = run(["export", "--model", sd3_folder, "--group-size", "32", "--out", str(tmp_path / "out")], capsys)
    assert_one_line_refusal(code, err, "group size 32 does not divide the input width 48 of layer 'time_text_embed.text_embedder.linear_1'")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- export
def _session(path):
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.mark.slow
def test_the_float_export_runs_at_another_batch_and_text_length_as_the_float_model(sd3_folder, tmp_path):
    """Traced at batch 2 with 333 text tokens; run at batch 3 with 20 and batch 1 with 400. Bound 80 dB
    (relative error 1e-4): nothing is quantized, only fp32 reassociation in MatMul, attention and the
    norms differs (measured 124-129 dB)."""
    export_model(sd3_folder, Recipe(LayerQuant(wbits=None)), tmp_path / "out")
    session = _session(tmp_path / "out" / "model.onnx")
    assert [(i.name, i.shape) for i in session.get_inputs()] == [
        ("hidden_states", ["batch", 4, 16, 16]), ("encoder_hidden_states", ["batch", "text", 32]),
        ("pooled_projections", ["batch", 48]), ("timestep", ["batch"])]  # fmt: skip
    model = load_model(sd3_folder).model
    for batch, text in ((3, 20), (1, 400)):
        x = inputs(batch, text, seed=batch)
        with torch.no_grad():
            want = model(*x, return_dict=False)[0].numpy()
        got = session.run(None, dict(zip(ADAPTER.input_names, (v.numpy() for v in x))))[0]
        assert got.shape == want.shape and sqnr_db(want, got) >= 80.0, (batch, text, sqnr_db(want, got))


EXPORTS = [
    pytest.param("qdq", 8, id="qdq-W8A8"),
    pytest.param("qdq", 4, id="qdq-W4A8", marks=pytest.mark.slow),
    pytest.param("ort", 8, id="ort-W8A8", marks=pytest.mark.slow),
    pytest.param("ort", 4, id="ort-W4A8", marks=pytest.mark.slow),
]


@pytest.mark.slow
@pytest.mark.parametrize("target,wbits", EXPORTS)
def test_w_a8_exports_validate_and_run_at_another_text_length(sd3_folder, tmp_path, target, wbits):
    """``validate`` passes (batches 1-3); and at batch 4 with 21 text tokens ONNX Runtime meets validate's
    own bound against the PyTorch reference: SQNR(ort, ref) >= min(80 dB, SQNR(ref, float)), as accurate
    against the float model as the reference within 1 dB."""
    outcome = export_model(sd3_folder, RecipeOptions(wbits=wbits, abits=8, group_size=16), tmp_path / "out", target=target)
    report = validate(tmp_path / "out", progress=False)
    assert report.passed, report.table()
    model_file = tmp_path / "out" / "model.onnx"
    if target == "qdq":  # one activation quantizer per input group: 8 in block 0, 5 in the last block
        assert sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(model_file), load_external_data=False).graph.node) == 13
    model = load_model(sd3_folder).model
    x = inputs(4, 21, seed=7)
    with torch.no_grad():
        flt = model(*x, return_dict=False)[0].numpy()
        ref = quantize_model(model, outcome.recipe, progress=False, target=target).reference()(*x, return_dict=False)[0].numpy()
    got = _session(model_file).run(None, dict(zip(ADAPTER.input_names, (v.numpy() for v in x))))[0]
    bound = min(80.0, sqnr_db(flt, ref))
    assert within_bound(got, ref, flt, bound), (sqnr_db(ref, got), bound)


def test_coverage_of_a_model_keeps_every_group_it_holds():
    """The general rule behind the SD3 case: a DiT holds all of its groups, so its coverage is unchanged."""
    from ditq.models import build_dit
    from tests.conftest import tiny_config

    dit = build_dit(tiny_config(), seed=0)
    assert adapter_for(dit).coverage_of(dit) == adapter_for(dit).coverage
    sd3 = tiny()
    kept = ADAPTER.coverage_of(sd3)
    assert [g.name for g in kept.activation_groups] == [g.name for g in ADAPTER.coverage.activation_groups if not g.name.startswith("attn2.")]
    one = tiny(num_layers=1)  # its only block is the last: no text output layers
    plans = Recipe.qdit(ADAPTER.coverage_of(one), 4, 8, 16).resolve(one)
    assert {n for n, p in plans.items() if p.abits} == {f"transformer_blocks.0.{n}" for n in BLOCK_WA}


@pytest.mark.slow
@pytest.mark.parametrize("qk_norm", ["rms_norm", "layer_norm"])
def test_an_sd35_shaped_model_dual_attention_and_qk_norm_exports_and_validates(tmp_path, qk_norm):
    """SD3.5-medium's structure at tiny size: a dual-attention first block, per-head q/k norms."""
    tiny(num_layers=3, dual_attention_layers=[0], qk_norm=qk_norm).save_pretrained(tmp_path / "sd35")
    export_model(str(tmp_path / "sd35"), RecipeOptions(wbits=4, abits=8, group_size=16), tmp_path / "out")
    report = validate(tmp_path / "out", progress=False)
    assert report.passed, report.table()
