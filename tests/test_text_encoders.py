"""The text side of a text-to-image export: the tiny pipelines of tests/t2i_fixtures.py run in diffusers; each
encoder kind's ONNX file equals transformers' own model; the tokenizer JSON an export carries gives exactly the
ids of the pipeline's own tokenizer call; the VAE decoder undoes SD3's scaling and shift as the pipeline does;
a folder missing an encoder or tokenizer, a hostile config or text record: one line.

References are diffusers' and transformers' own objects loaded from the saved folders by their own
``from_pretrained`` (default attention, not ditq's loader), and the pipeline's own call defaults."""

from __future__ import annotations

import inspect
import json
import shutil
import sys

import numpy as np
import pytest
import torch
import transformers

from ditq.encoders import load_text_encoder, load_tokenizer, text_encoders_of, tokenizer_json, transformers_module
from ditq.errors import DitqError
from ditq.exporter.text_encoders import check_text_encoder, export_text_encoder
from ditq.exporter.trace import export_vae_decoder
from ditq.families import spec_for
from ditq.models import pipeline_info
from ditq.pipeline import Pipeline
from ditq.text import TextEncoder
from tests.conftest import assert_one_line_refusal, run

CLASS = {"sd3": "SD3Transformer2DModel", "pixart": "PixArtTransformer2DModel", "flux": "FluxTransformer2DModel"}
PROMPTS = ["", "a photo of a cat", "A RED car, on the river!", "naïve café 東京", " ".join(["a big dog"] * 200)]
FLOOR_DB = 80.0  # float32 ONNX Runtime vs float32 torch: rounding and operation order only (measured 113-134 dB)


def _sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    err = ref.astype(np.float64) - got
    return float("inf") if not err.any() else float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum(err**2)))


def _diffusers(folder):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(folder))


# ------------------------------------------------------------------------------------------ the fixtures
@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd3", "pixart", "flux"])
def test_each_tiny_pipeline_runs_in_diffusers_from_its_saved_folder(t2i_pipeline, name):
    pipe = _diffusers(t2i_pipeline(name))
    assert type(pipe).__name__ == {"sd3": "StableDiffusion3Pipeline", "pixart": "PixArtSigmaPipeline", "flux": "FluxPipeline"}[name]
    extra = {"use_resolution_binning": False} if name == "pixart" else {}
    size = 16 if name == "pixart" else 32  # PixArt: its 8x8 latents; SD3 16x16 latents; Flux 8x8 packed tokens
    images = pipe("a photo of a red cat", num_inference_steps=2, height=size, width=size, output_type="np",
                  generator=torch.Generator().manual_seed(0), **extra).images  # fmt: skip
    assert images.shape == (1, size, size, 3) and np.isfinite(images).all() and images.std() > 0


# ------------------------------------------------------------------------------- ONNX equals transformers
KINDS = [  # (pipeline, subfolder, kind, transformers class, mask input)
    ("flux", "text_encoder", "clip", "CLIPTextModel", False),
    ("sd3", "text_encoder_2", "clip-projection", "CLIPTextModelWithProjection", False),
    ("pixart", "text_encoder", "t5", "T5EncoderModel", True),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,folder,kind,cls,mask", KINDS, ids=[k[2] for k in KINDS])
def test_each_kind_exports_to_onnx_that_equals_transformers_own_model(t2i_pipeline, tmp_path, name, folder, kind, cls, mask):
    """ONNX Runtime vs transformers' model loaded by its own from_pretrained (its default attention), at a
    batch and text length other than the traced ones, every output at least 80 dB: both compute in float32."""
    root = t2i_pipeline(name)
    tokenizer = folder.replace("text_encoder", "tokenizer")
    enc = TextEncoder(folder=folder, kind=kind, tokenizer=f"{tokenizer}.json", max_length=40, pad_id=0, attention_mask=mask)
    path = tmp_path / enc.onnx
    export_text_encoder(load_text_encoder(root, enc), enc, path, opset=21)

    tok = transformers.AutoTokenizer.from_pretrained(str(root / tokenizer))
    batch = tok(PROMPTS, padding="max_length", max_length=enc.max_length, truncation=True, return_tensors="pt")
    ref_model = getattr(transformers, cls).from_pretrained(str(root / folder)).eval()
    with torch.no_grad():
        if kind == "t5":
            want = [ref_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state]
        else:
            out = ref_model(input_ids=batch.input_ids, output_hidden_states=True)
            want = [out.last_hidden_state, out.hidden_states[-2], out.text_embeds if kind == "clip-projection" else out.pooler_output]

    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == list(enc.input_names) and [o.name for o in sess.get_outputs()] == list(enc.outputs)
    feeds = {"input_ids": batch.input_ids.numpy()} | ({"attention_mask": batch.attention_mask.numpy()} if mask else {})
    got = sess.run(None, feeds)
    assert [g.shape for g in got] == [tuple(w.shape) for w in want]
    assert min(_sqnr_db(w.numpy(), g) for w, g in zip(want, got)) >= FLOOR_DB
    assert len(sess.run(None, {k: v[:1, :7] for k, v in feeds.items()})[0]) == 1  # batch 1, 7 tokens: dynamic both


@pytest.mark.slow
def test_an_export_that_differs_from_transformers_is_caught(t2i_pipeline, tmp_path):
    """The export's own check fails when the ONNX file is another encoder's (here: its last layer altered)."""
    root = t2i_pipeline("flux")
    enc = TextEncoder(folder="text_encoder", kind="clip", tokenizer="tokenizer.json", max_length=77, pad_id=1)
    model = load_text_encoder(root, enc)
    export_text_encoder(model, enc, tmp_path / enc.onnx, opset=21)
    ids = np.array([[0, 10, 11, 1] + [1] * 73], dtype=np.int64)
    assert check_text_encoder(model, enc, tmp_path / enc.onnx, ids, np.ones_like(ids)) >= FLOOR_DB
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("final_layer_norm.weight")).mul_(1.01)
    with pytest.raises(RuntimeError, match="differs from transformers'"):
        check_text_encoder(model, enc, tmp_path / enc.onnx, ids, np.ones_like(ids))


@pytest.mark.slow
def test_a_large_encoder_keeps_its_weights_in_a_data_file_beside_it_and_a_small_one_is_one_file(t2i_pipeline, tmp_path):
    import onnx

    from ditq.exporter.text_encoders import write_text_encoders

    root = t2i_pipeline("flux")
    enc = TextEncoder(folder="text_encoder", kind="clip", tokenizer="tokenizer.json", max_length=77, pad_id=1)
    for limit, files in ((0, ["text_encoder.onnx", "text_encoder.onnx.data", "tokenizer.json"]), (1 << 30, ["text_encoder.onnx", "tokenizer.json"])):
        stage = tmp_path / str(limit)
        (stage / ".work").mkdir(parents=True)
        (entry,) = write_text_encoders(root, (enc,), stage, stage / ".work", opset=21, external_data_bytes=limit)  # checked inside
        assert sorted(p.name for p in stage.iterdir() if p.is_file()) == files and entry["min_sqnr_db"] >= FLOOR_DB
        proto = onnx.load(str(stage / enc.onnx), load_external_data=False)
        locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == ({"text_encoder.onnx.data"} if limit == 0 else set())
        assert not [p for n in proto.graph.node for p in n.metadata_props]  # no stack traces with local paths


def test_a_clip_saved_by_transformers_4_with_its_text_model_prefix_loads_the_same(t2i_pipeline, tmp_path):
    from safetensors.torch import load_file, save_file

    root = tmp_path / "flux"
    shutil.copytree(t2i_pipeline("flux"), root)
    file = root / "text_encoder" / "model.safetensors"
    plain = load_file(file)
    save_file({f"text_model.{k}": v for k, v in plain.items()}, file)  # CLIPTextModel's names in transformers 4
    enc = TextEncoder(folder="text_encoder", kind="clip", tokenizer="tokenizer.json", max_length=77, pad_id=1)
    loaded = load_text_encoder(root, enc).state_dict()
    assert loaded.keys() == plain.keys() and all(torch.equal(loaded[k], plain[k]) for k in plain)


# ------------------------------------------------------------------------------------------- tokenizers
@pytest.mark.parametrize("name", ["sd3", "pixart", "flux"])
def test_the_exported_tokenizer_gives_exactly_the_pipelines_ids(t2i_pipeline, tmp_path, name):
    """Per encoder of the family: the record's max_length is the pipeline's own (its tokenizer's
    model_max_length for CLIP, its max_sequence_length default for T5), and the tokenizer JSON, read by the
    tokenizers library alone, gives the ids and mask of the pipeline's tokenizer call
    (padding="max_length", truncation=True), a prompt longer than max_length included."""
    root = t2i_pipeline(name)
    pipe = _diffusers(root)
    text = text_encoders_of(root, spec_for(CLASS[name]))
    assert [t.folder for t in text] == {"sd3": ["text_encoder", "text_encoder_2", "text_encoder_3"], "pixart": ["text_encoder"],
                                        "flux": ["text_encoder", "text_encoder_2"]}[name]  # fmt: skip
    t5_length = inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default
    for enc in text:
        tok = getattr(pipe, enc.tokenizer.removesuffix(".json"))
        assert enc.max_length == (t5_length if enc.kind == "t5" else pipe.tokenizer_max_length)
        assert enc.pad_id == tok.pad_token_id and enc.attention_mask == (name == "pixart")
        (tmp_path / enc.tokenizer).write_text(tokenizer_json(root, enc, load_tokenizer(root / enc.tokenizer.removesuffix(".json"))))
        ids, mask = enc.tokenize(enc.read_tokenizer(tmp_path, "record"), PROMPTS)
        want = tok(PROMPTS, padding="max_length", max_length=enc.max_length, truncation=True, return_tensors="np")
        assert ids.dtype == mask.dtype == np.int64
        np.testing.assert_array_equal(ids, want.input_ids)
        np.testing.assert_array_equal(mask, want.attention_mask)
        assert ids.shape == (len(PROMPTS), enc.max_length) and mask[-1].all() and not mask[0].all()  # cut, padded


def test_a_folder_tokenizer_json_that_gives_other_ids_is_replaced_by_the_tokenizers_own_or_refused(t2i_pipeline):
    root = t2i_pipeline("pixart")
    (enc,) = text_encoders_of(root, spec_for(CLASS["pixart"]))
    tok = load_tokenizer(root / "tokenizer")
    assert tokenizer_json(root, enc, tok) == (root / "tokenizer" / "tokenizer.json").read_text()  # the folder's: it agrees
    tok.backend_tokenizer.post_processor = None  # transformers' tokenizer now adds no end token; the folder's file does
    assert json.loads(tokenizer_json(root, enc, tok))["post_processor"] is None  # the tokenizer's own serialisation
    tok = load_tokenizer(root / "tokenizer")
    tok.padding_side = "left"  # a setting tokenizers' JSON does not carry: no file reproduces the ids
    with pytest.raises(DitqError, match="does not reproduce this tokenizer's ids") as e:
        tokenizer_json(root, enc, tok)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------- the VAE decoder
@pytest.mark.slow
def test_the_vae_decoder_undoes_sd3s_scaling_and_shift_as_the_pipeline_does(t2i_pipeline, tmp_path):
    import onnxruntime as ort

    root = t2i_pipeline("sd3")
    pipe, info = _diffusers(root), pipeline_info({"kind": "diffusers", "path": str(root)})
    assert (info.scaling_factor, info.shift_factor) == (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (1.5305, 0.0609)
    call = dict(prompt="a dog", num_inference_steps=2, height=32, width=32)
    latents = pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    images = pipe(**call, output_type="np", generator=torch.Generator().manual_seed(0)).images
    export_vae_decoder(pipe.vae, tmp_path / "vae.onnx", channels=4, size=16, scaling_factor=info.scaling_factor, shift_factor=info.shift_factor)
    sess = ort.InferenceSession(str(tmp_path / "vae.onnx"), providers=["CPUExecutionProvider"])
    decoded = sess.run(None, {"latents": latents.numpy()})[0]
    ours = np.clip(decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)  # diffusers' postprocess of [-1, 1] images
    np.testing.assert_allclose(ours, images, atol=1e-5)


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("gone", ["text_encoder_3", "tokenizer_2"])
def test_a_pipeline_folder_missing_a_text_encoder_or_tokenizer_is_one_line_naming_it(t2i_pipeline, tmp_path, capsys, gone):
    root = tmp_path / "sd3"
    shutil.copytree(t2i_pipeline("sd3"), root)
    shutil.rmtree(root / gone)
    code, _, err = run(["export", "--model", str(root), "--wbits", "8", "--abits", "8", "--out", str(tmp_path / "out")], capsys)
    assert_one_line_refusal(code, err, f"{gone}/", "StableDiffusion3Pipeline", "lacks")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("hidden_size", 10**9, "hidden_size must be an integer in"),
        ("num_hidden_layers", "2", "num_hidden_layers must be an integer in"),
        ("hidden_act", "exec", "hidden_act must be one of"),
        ("model_type", "llama", "model_type must be one of"),
        ("eos_token_id", 5000, "eos_token_id 5000 is not an id"),
    ],
)
def test_a_hostile_text_encoder_config_is_one_line_naming_the_field(t2i_pipeline, tmp_path, field, value, needle):
    root = tmp_path / "flux"
    shutil.copytree(t2i_pipeline("flux"), root)
    cfg_file = root / "text_encoder" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), field: value}))
    enc = TextEncoder(folder="text_encoder", kind="clip", tokenizer="tokenizer.json", max_length=77, pad_id=1)
    with pytest.raises(DitqError) as e:
        load_text_encoder(root, enc)
    assert str(cfg_file) in str(e.value) and needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_without_transformers_the_text_export_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(DitqError, match=r"needs transformers: pip install 'ditq\[text\]'"):
        transformers_module()


GOOD = {"folder": "text_encoder_2", "kind": "t5", "tokenizer": "tokenizer_2.json", "max_length": 256, "pad_id": 0}
HOSTILE_TEXT = [
    ({"folder": "../text_encoder"}, "folder must be text_encoder or text_encoder_N"),
    ({"folder": "/etc/passwd"}, "folder must be text_encoder"),
    ({"folder": "text_encoder/../../x"}, "folder must be text_encoder"),
    ({"folder": "x" * 100_000}, "folder must be a string of 1..64"),
    ({"folder": 3}, "folder must be a string"),
    ({"kind": "gpt2"}, "kind must be one of"),
    ({"tokenizer": "../../etc/passwd.json"}, "tokenizer must be tokenizer.json or tokenizer_N.json"),
    ({"tokenizer": "manifest.json"}, "tokenizer must be tokenizer.json"),
    ({"tokenizer": "tokenizer_2.onnx"}, "tokenizer must be tokenizer.json"),
    ({"onnx": "../model.onnx"}, "onnx must be 'text_encoder_2.onnx'"),
    ({"onnx": "model.onnx"}, "onnx must be 'text_encoder_2.onnx'"),
    ({"outputs": ["pooled"]}, "outputs must be ['last_hidden_state'] for a t5 encoder"),
    ({"max_length": 0}, "max_length must be an integer in 1..4096"),
    ({"max_length": 10**400}, "max_length must be an integer"),
    ({"max_length": 77.0}, "max_length must be an integer"),
    ({"max_length": True}, "max_length must be an integer"),
    ({"pad_id": -1}, "pad_id must be an integer in 0.."),
    ({"attention_mask": "yes"}, "attention_mask must be true or false"),
    ({"kind": "clip", "attention_mask": True, "outputs": None}, "attention_mask is a T5 input"),
    ({"max_length": None}, "max_length is missing"),
]


@pytest.mark.parametrize("change,needle", HOSTILE_TEXT, ids=[h[1][:24] + f"-{i}" for i, h in enumerate(HOSTILE_TEXT)])
def test_a_hostile_text_record_is_one_line_naming_the_field(change, needle):
    entry = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(DitqError) as e:
        Pipeline.from_dict({"text": [entry]}, "m/model.onnx: ditq.pipeline")
    msg = str(e.value)
    assert msg.startswith("m/model.onnx: ditq.pipeline.text[0]") and needle in msg, msg[:500]
    assert "\n" not in msg and len(msg) < 400, msg[:500]


@pytest.mark.parametrize(
    "record,needle",
    [
        ({"text": [GOOD] * 5}, "text must be an array of 1..4 items"),
        ({"text": [GOOD, GOOD]}, "names a text encoder twice"),
        ({"text": GOOD}, "text must be an array"),
        ({"text": ["text_encoder.onnx"]}, "text[0] must be a JSON object"),
        ({"text": [GOOD], "conditioning": {"num_classes": 10, "null_label": 10}}, "text encoders and class conditioning"),
        ({"shift_factor": 0.1}, "shift_factor comes with vae"),
        ({"vae": "vae_decoder.onnx", "scaling_factor": 1.0, "shift_factor": 10**400}, "shift_factor must be"),
    ],
)
def test_a_hostile_pipeline_text_part_is_one_line(record, needle):
    with pytest.raises(DitqError) as e:
        Pipeline.from_dict(record, "m/model.onnx: ditq.pipeline")
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_text_record_round_trips_and_its_files_may_not_link_out_of_the_folder(tmp_path):
    pipe = Pipeline(vae="vae_decoder.onnx", scaling_factor=1.5305, shift_factor=0.0609,
                    text=(TextEncoder(**{**GOOD, "attention_mask": True}), TextEncoder("text_encoder", "clip", "tokenizer.json", 77, 1)))  # fmt: skip
    assert Pipeline.from_dict(json.loads(pipe.to_json()), "r") == pipe
    (tmp_path / "secret.json").write_text("{}")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "tokenizer_2.json").symlink_to(tmp_path / "secret.json")
    with pytest.raises(DitqError, match="symbolic link out of"):
        pipe.text[0].read_tokenizer(tmp_path / "m", "m/model.onnx: ditq.pipeline")


# ------------------------------------------------------------------------------------- the whole export
@pytest.mark.slow
def test_ditq_export_of_a_pipeline_folder_writes_and_lists_its_text_encoders(t2i_pipeline, tmp_path, capsys):
    import onnx

    from ditq.manifest import read_manifest

    root, out = t2i_pipeline("pixart"), tmp_path / "out"
    code, _, err = run(["export", "--model", str(root), "--wbits", "8", "--abits", "8", "--group-size", "16", "--out", str(out)], capsys)
    assert code == 0, err
    meta = {p.key: p.value for p in onnx.load(out / "model.onnx", load_external_data=False).metadata_props}
    pipe = Pipeline.from_dict(json.loads(meta["ditq.pipeline"]), "meta")
    (enc,) = pipe.text
    assert (enc.folder, enc.kind, enc.onnx, enc.tokenizer, enc.max_length, enc.attention_mask) == (
        "text_encoder", "t5", "text_encoder.onnx", "tokenizer.json", 300, True)  # fmt: skip
    manifest = read_manifest(out)
    assert {"text_encoder.onnx", "tokenizer.json", "vae_decoder.onnx", "model.onnx"} <= set(manifest["files"])
    assert [e["onnx"] for e in manifest["text_encoders"]] == ["text_encoder.onnx"] and manifest["text_encoders"][0]["min_sqnr_db"] >= 80


def test_a_tokenizer_folder_holding_a_fifo_is_refused_without_reading_it(t2i_pipeline, tmp_path):
    import os

    from tests.conftest import returns_within

    root = tmp_path / "pixart"
    shutil.copytree(t2i_pipeline("pixart"), root)
    os.remove(root / "tokenizer" / "tokenizer.json")
    os.mkfifo(root / "tokenizer" / "tokenizer.json")
    with pytest.raises(DitqError, match="tokenizer.json: not a regular file"):
        returns_within(30, root / "tokenizer" / "tokenizer.json", text_encoders_of, root, spec_for(CLASS["pixart"]))
