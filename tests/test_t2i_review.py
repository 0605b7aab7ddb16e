"""Issue 15 review: prompt sampling's untrusted inputs (prompts, the text encoder records and tokenizers an
export holds) and the guidance rules of each family's diffusers pipeline, checked without an export: the
tiny models of tests/t2i_fixtures.py, ditq's sampler driven through the torch transformer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dataclasses import replace

from ditq.adapters import adapter_for
from ditq.errors import DitqError
from ditq.families import spec_for
from ditq.flow import FlowMatchSpec
from ditq.pipeline import Pipeline
from ditq.runtime.text2image import TextToImageModel
from ditq.text import TextEncoder

from . import t2i_fixtures


def _records(class_name: str, max_lengths=None) -> list[TextEncoder]:
    """The text encoder records ``ditq export`` writes for the family (pad id 0), each as its spec says."""
    specs = spec_for(class_name).text_encoders
    lengths = max_lengths or [e.max_length for e in specs]
    return [TextEncoder(folder=e.folder, kind=e.kind, tokenizer=e.tokenizer + ".json", max_length=n, pad_id=0,
                        attention_mask=e.attention_mask, pad_to_max_length=e.pad_to_max_length, truncation=e.truncation)
            for e, n in zip(specs, lengths)]  # fmt: skip


# ---------------------------------------------------------------------------------------------- prompts
def test_a_prompt_that_is_not_utf8_is_refused_in_one_line():
    """A command line's undecodable bytes reach Python as lone surrogates, which the tokenizers library
    rejects with a TypeError (a traceback before this check)."""
    rec = _records("SD3Transformer2DModel")[0]
    tok = rec.configured(t2i_fixtures.word_tokenizer("clip").backend_tokenizer)
    ids, mask = rec.tokenize(tok, ["a cat", "", "a\x00cat"])  # NUL is text: it tokenizes
    assert ids.shape == mask.shape == (3, 77)
    for bad in ("a\udcff cat", "\ud800"):
        with pytest.raises(DitqError, match="must be UTF-8 text") as e:
            rec.tokenize(tok, ["a cat", bad])
        assert "\n" not in str(e.value)


def test_a_tokenizer_that_overruns_max_length_is_refused():
    """A tokenizer file whose template adds more special tokens than ``max_length`` gives rows longer than
    the padding length (before: a [1, 12] row went to an encoder of 5 tokens, or a ragged batch crashed
    numpy)."""
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    tok = Tokenizer(WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "cat": 4}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A " + " ".join(["</s>"] * 10), special_tokens=[("</s>", 1)])
    rec = TextEncoder(folder="text_encoder", kind="t5", tokenizer="tokenizer.json", max_length=5, pad_id=0)
    for prompts in (["a cat"], ["a cat", "a a a a a a"]):
        with pytest.raises(DitqError, match="gives prompts of 12(, 16)? tokens; the text encoder text_encoder takes exactly 5"):
            rec.tokenize(rec.configured(tok), prompts)


# ---------------------------------------------------------------------------------------- text records
@pytest.mark.parametrize("class_name", ["SD3Transformer2DModel", "PixArtTransformer2DModel", "FluxTransformer2DModel"])
def test_the_records_an_export_writes_are_accepted(class_name):
    spec_for(class_name).check_text(_records(class_name), "m")


def test_pixart_accepts_both_pipelines_lengths_only():
    spec = spec_for("PixArtTransformer2DModel")
    for n in (120, 300):  # PixArtAlphaPipeline, PixArtSigmaPipeline
        spec.check_text(_records("PixArtTransformer2DModel", [n]), "m")
    with pytest.raises(DitqError, match="m: text encoder 1 has max_length 200; a PixArtTransformer2DModel pipeline's has 120 or 300"):
        spec.check_text(_records("PixArtTransformer2DModel", [200]), "m")


@pytest.mark.parametrize("change,needle", [
    ({"max_length": 1}, "text encoder 1 has max_length 1; a SD3Transformer2DModel pipeline's has 16 or 77"),
    ({"pad_to_max_length": False}, "has pad_to_max_length False; a SD3Transformer2DModel pipeline's has True"),
    ({"truncation": False}, "has truncation False"),
    ({"kind": "clip"}, "has kind 'clip'; a SD3Transformer2DModel pipeline's has clip-projection"),
])  # fmt: skip
def test_records_that_do_not_fit_the_family_are_refused(change, needle):
    """What sampling would otherwise feed the encoders and compose_prompt (before: a numpy traceback when
    the CLIP rows of SD3 differ in length, or ONNX Runtime's broadcast error)."""
    recs = _records("SD3Transformer2DModel")
    recs[0] = replace(recs[0], **change)
    with pytest.raises(DitqError, match=needle):
        spec_for("SD3Transformer2DModel").check_text(recs, "m")


def test_records_missing_or_extra_encoders_are_refused():
    spec, recs = spec_for("SD3Transformer2DModel"), _records("SD3Transformer2DModel")
    spec.check_text(recs[:2], "m")  # SD3 built without its T5: the pipeline feeds zeros in its place
    with pytest.raises(DitqError, match="the text encoders text_encoder are not those of a SD3Transformer2DModel pipeline "
                                        r"\(text_encoder, text_encoder_2, text_encoder_3 or text_encoder, text_encoder_2 or text_encoder\)"):  # fmt: skip
        spec.check_text(recs[:1], "m")
    flux = _records("FluxTransformer2DModel")
    with pytest.raises(DitqError, match="text encoder 3 has folder 'text_encoder_3'; .* has no such encoder"):
        spec_for("FluxTransformer2DModel").check_text([*flux, recs[2]], "m")


# ------------------------------------------------------------------------------------------- guidance
class _TorchGraph:
    """The torch transformer in the place of the ONNX Runtime session: its graph inputs, its output."""

    def __init__(self, model, names):
        self.call, self.input_names, self.rows = adapter_for(model).torch_callable(model), names, []

    def run_feeds(self, feeds):
        self.rows.append(len(feeds["hidden_states"]))
        return self.call(*(feeds[n] for n in self.input_names))


class _Encoder:
    """A text encoder's outputs for each prompt: ``table[prompt]``, one row each."""

    def __init__(self, folder, table):
        self.record, self.table = type("R", (), {"folder": folder})(), table

    def __call__(self, texts):
        return {k: np.concatenate([self.table[t][k] for t in texts]) for k in self.table[texts[0]]}, np.ones((len(texts), 1), np.int64)


def test_flux_without_guidance_embeds_samples_as_flux_pipeline_does():
    """FluxPipeline applies no classifier-free guidance with its guidance_scale (only true_cfg_scale with a
    negative prompt does); on a model without guidance_embeds (schnell) the scale does nothing. ditq's run
    at guidance 5 against diffusers' own pipeline on the same text embeddings and noise: one row per
    transformer call and the same latents, bit for bit (the same torch model on the same float32 inputs,
    the same float32 sigmas and Euler step on both sides). Before: ditq ran CFG with the empty prompt, two
    rows per call, and other latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    spec = spec_for("FluxTransformer2DModel")
    config = spec.check_config({**t2i_fixtures.FLUX_TRANSFORMER, "axes_dims_rope": [4, 6, 6], "guidance_embeds": False}, "flux")
    model = adapter_for("FluxTransformer2DModel").build(config, seed=0)
    g = torch.Generator().manual_seed(0)
    text, pooled = torch.randn(1, 9, 32, generator=g), torch.randn(1, 48, generator=g)
    noise = torch.randn(1, 4, 8, 8, generator=g).numpy()
    steps, guidance = 3, 5.0

    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=model)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    theirs_rows = []
    hook = model.register_forward_hook(lambda m, args, out: theirs_rows.append(out[0].shape[0]))
    with torch.no_grad():
        latents = FluxPipeline._pack_latents(torch.from_numpy(noise), 1, 4, 8, 8)
        packed = pipe(prompt_embeds=text, pooled_prompt_embeds=pooled, latents=latents, height=64, width=64,
                      num_inference_steps=steps, guidance_scale=guidance, output_type="latent").images  # fmt: skip
    hook.remove()
    theirs = FluxPipeline._unpack_latents(packed, 64, 64, 8).numpy()

    table_t5 = {"a cat": {"last_hidden_state": text.numpy()}, "": {"last_hidden_state": np.zeros((1, 9, 32), np.float32)}}
    table_clip = {"a cat": {"pooled": pooled.numpy()}, "": {"pooled": np.zeros((1, 48), np.float32)}}
    graph = _TorchGraph(model, spec.input_names[:6])
    ours_model = TextToImageModel(graph, None, spec, config, Pipeline(schedule=FlowMatchSpec(shift=1.0, grid="sigmas")),
                                  [_Encoder("text_encoder", table_clip), _Encoder("text_encoder_2", table_t5)])  # fmt: skip
    ours = ours_model.generate("a cat", noise=noise, steps=steps, guidance=guidance)
    assert graph.rows == theirs_rows == [1] * steps
    np.testing.assert_array_equal(ours, theirs)
    with pytest.raises(DitqError, match="FluxTransformer2DModel pipelines do not guide with a negative prompt"):
        ours_model.generate("a cat", negative_prompt="a dog", noise=noise, steps=steps, guidance=guidance)


def test_a_tokenizer_that_is_a_fifo_or_a_folder_is_named_so(tmp_path):
    """A FIFO (whose reading would block) or a folder in the place of a tokenizer file: refused before it is
    read, saying what it is (before: "is missing")."""
    import os

    from ditq.runtime.text2image import PromptEncoder

    rec = _records("SD3Transformer2DModel")[0]
    (tmp_path / rec.onnx).write_bytes(b"not read")
    os.mkfifo(tmp_path / rec.tokenizer)
    with pytest.raises(DitqError, match=f"m: the tokenizer {rec.tokenizer} of text_encoder is not a regular file in {tmp_path}$"):
        PromptEncoder.open(tmp_path, rec, "m", provider="cpu", threads=1)
    os.remove(tmp_path / rec.tokenizer)
    with pytest.raises(DitqError, match=f"the tokenizer {rec.tokenizer} of text_encoder is missing from"):
        PromptEncoder.open(tmp_path, rec, "m", provider="cpu", threads=1)
    (tmp_path / rec.tokenizer).mkdir()
    with pytest.raises(DitqError, match="is not a regular file in"):
        PromptEncoder.open(tmp_path, rec, "m", provider="cpu", threads=1)


@pytest.mark.parametrize("class_name,lists", [
    ("DiTTransformer2DModel", {"transformer_blocks": "num_layers"}),
    ("PixArtTransformer2DModel", {"transformer_blocks": "num_layers"}),
    ("SD3Transformer2DModel", {"transformer_blocks": "num_layers"}),
    ("FluxTransformer2DModel", {"transformer_blocks": "num_layers", "single_transformer_blocks": "num_single_layers"}),
])  # fmt: skip
def test_every_family_counts_its_blocks_before_building(class_name, lists):
    """One shared check (FamilyAdapter.block_counts) for every family: the weights' blocks of each list
    against the config's count."""
    adapter = adapter_for(class_name)
    names = [f"{blocks}.{i}.x.weight" for blocks in lists for i in range(2)] + ["transformer_blocks_extra.0.w"]
    adapter.check_weights(dict.fromkeys(lists.values(), 2), names, "w")
    for blocks, field in lists.items():
        config = {**dict.fromkeys(lists.values(), 2), field: 3}
        with pytest.raises(DitqError, match=f"^w: config.json says {field} 3, the weights hold 2 blocks in {blocks}$"):
            adapter.check_weights(config, names, "w")


def test_each_flow_family_names_its_own_pipelines_step_grid():
    """The grid of a pipeline class comes from the transformer's family (SD3's pipeline spaces the
    scheduler's own timesteps, FluxPipeline passes linspace(1, 1/S, S) sigmas), so a pipeline class of
    another family is refused rather than sampled on that family's grid."""
    cfg = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}
    sd3, flux = spec_for("SD3Transformer2DModel").flow_grids, spec_for("FluxTransformer2DModel").flow_grids
    assert FlowMatchSpec.from_scheduler_config(cfg, pipeline_class="StableDiffusion3Pipeline", grids=sd3).grid == "timesteps"
    assert FlowMatchSpec.from_scheduler_config(cfg, pipeline_class="FluxPipeline", grids=flux).grid == "sigmas"
    with pytest.raises(DitqError, match="pipeline class \"FluxPipeline\" spaces this model's flow-matching steps; it knows DitqDigitsPipeline, StableDiffusion3Pipeline"):
        FlowMatchSpec.from_scheduler_config(cfg, where="s", pipeline_class="FluxPipeline", grids=sd3)
    with pytest.raises(DitqError, match="it knows none"):  # a family without flow pipelines (PixArt)
        FlowMatchSpec.from_scheduler_config(cfg, pipeline_class="FluxPipeline", grids=spec_for("PixArtTransformer2DModel").flow_grids)


def test_opening_an_export_checks_its_text_records_against_its_family(tmp_path):
    """TextToImageModel.open refuses a record the family's pipeline does not have, before any encoder is
    opened or prompt tokenized (a metadata-only model: the check comes first)."""
    import json

    import onnx
    from onnx import TensorProto, helper

    from ditq.fileformat import META_CONFIG, META_FAMILY, META_PIPELINE

    spec = spec_for("SD3Transformer2DModel")
    config = spec.check_config(dict(t2i_fixtures.SD3_TRANSFORMER), "sd3")
    recs = _records("SD3Transformer2DModel")
    recs[1] = replace(recs[1], max_length=1)
    pipeline = Pipeline(schedule=FlowMatchSpec(shift=3.0), text=tuple(recs))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["out"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 21)], ir_version=10)  # fmt: skip
    for k, v in ((META_CONFIG, json.dumps(config)), (META_FAMILY, spec.class_name), (META_PIPELINE, json.dumps(pipeline.to_dict()))):
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(tmp_path / "model.onnx"))
    with pytest.raises(DitqError, match="text encoder 2 has max_length 1; a SD3Transformer2DModel pipeline's has 77$"):
        TextToImageModel.open(tmp_path)
