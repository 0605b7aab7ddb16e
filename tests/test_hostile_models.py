"""Hostile and broken model files: each is refused with one line and exit 2, nothing is written, no pickle
runs, and no file outside a model folder is opened.

The hostile inputs are made here: a tiny DiT saved with ``save_pretrained`` and then tampered with
(tensors removed, added, reshaped, NaN; config fields of the wrong type; a VAE with a tensor missing),
pickles whose ``__reduce__`` runs a shell command, safetensors headers that lie, and exported models
whose metadata is not JSON, not an object, of the wrong types, or names files outside their folder.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import struct

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import load_file, save_file

from ditq.adapters import adapter_for
from ditq.errors import DitqError
from ditq.models import load_model, load_vae
from ditq.recipe import Recipe
from tests.conftest import assert_no_output, assert_one_line_refusal, run, tiny_config
from tests.test_loaders import to_original_layout

DIT = adapter_for("DiTTransformer2DModel").coverage  # the family of the models here

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def dit_copy(tmp_path, tiny_source):
    folder = tmp_path / "dit"
    shutil.copytree(tiny_source, folder)
    return folder


def export_refused(tmp_path, capsys, model, *needles, extra=()):
    code, _, err = run(["export", "--model", str(model), "--out", str(tmp_path / "out"), *extra], capsys)
    assert_one_line_refusal(code, err, *needles)
    assert_no_output(tmp_path)


# ------------------------------------------------------------------------ weights that do not fit (2)
def _drop(sd):
    del sd["proj_out_1.weight"]


def _extra(sd):
    sd["transformer_blocks.0.attn1.to_z.weight"] = torch.zeros(64, 64)


def _reshape(sd):
    sd["proj_out_2.weight"] = torch.zeros(16, 64)


def _nan(sd):
    sd["transformer_blocks.1.ff.net.2.weight"][3, 5] = math.nan


def _inf(sd):
    sd["pos_embed.proj.bias"][0] = -math.inf


def _integer(sd):
    sd["proj_out_2.bias"] = torch.arange(32)


@pytest.mark.parametrize(
    "tamper,needles",
    [
        (_drop, ["missing 1 tensor", "proj_out_1.weight"]),
        (_extra, ["unexpected 1 tensor", "to_z.weight"]),
        (_reshape, ["another shape", "proj_out_2.weight", "[16, 64]", "[32, 64]"]),
        (_nan, ["NaN or Inf", "transformer_blocks.1.ff.net.2.weight", "1 NaN"]),
        (_inf, ["NaN or Inf", "pos_embed.proj.bias", "1 Inf"]),
        (_integer, ["not floating point", "proj_out_2.bias"]),
    ],
)
def test_diffusers_weights_that_do_not_fit_are_named(tmp_path, capsys, dit_copy, tamper, needles):
    sd = load_file(str(dit_copy / WEIGHTS))
    tamper(sd)
    save_file(sd, str(dit_copy / WEIGHTS))
    export_refused(tmp_path, capsys, dit_copy, str(dit_copy), *needles)


def test_an_empty_bin_and_an_unrelated_file_are_refused(tmp_path, capsys, dit_copy):
    (dit_copy / WEIGHTS).unlink()
    torch.save({}, dit_copy / "diffusion_pytorch_model.bin")
    export_refused(tmp_path, capsys, dit_copy, "diffusion_pytorch_model.bin", "holds no tensors")
    (dit_copy / "diffusion_pytorch_model.bin").unlink()
    save_file({"conv.weight": torch.zeros(3, 3)}, str(dit_copy / WEIGHTS))
    export_refused(tmp_path, capsys, dit_copy, "num_layers 2", "hold 0 blocks")


def test_fewer_layers_in_the_config_than_in_the_checkpoint(tmp_path, capsys, dit_copy):
    cfg = json.loads((dit_copy / "config.json").read_text())
    (dit_copy / "config.json").write_text(json.dumps({**cfg, "num_layers": 1}))
    export_refused(tmp_path, capsys, dit_copy, "num_layers 1", "hold 2 blocks")


def test_loaded_weights_are_the_saved_ones_exactly(tiny_source):
    saved = load_file(str(tiny_source / WEIGHTS))
    model = load_model(str(tiny_source)).model
    state = model.state_dict()
    assert set(state) == set(saved) and all(torch.equal(state[k], saved[k]) for k in saved)


def test_the_shipped_model_loads_as_diffusers_configures_it():
    """The shipped digits DiT: every tensor of its file (fp16) exactly, in float32, and the config
    diffusers' own ``from_config`` makes of its config.json."""
    from diffusers import DiTTransformer2DModel

    from ditq.models import BUILTIN

    ours = load_model("digits").model
    saved = load_file(str(BUILTIN["digits"] / WEIGHTS))
    state = ours.state_dict()
    assert set(state) == set(saved) and all(torch.equal(state[k], saved[k].float()) for k in saved)
    ref = DiTTransformer2DModel.load_config(BUILTIN["digits"])
    ref = DiTTransformer2DModel.from_config(ref).config
    public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731
    assert public(ours.config) == public(ref)


@pytest.mark.parametrize(
    "tamper,needle",
    [
        (lambda sd: sd.pop("blocks.1.mlp.fc2.bias"), "blocks.1.mlp.fc2.bias"),
        (lambda sd: sd.update(evil=torch.zeros(2)), "unexpected 1 tensor ('evil')"),
        (lambda sd: sd["blocks.0.attn.proj.weight"].fill_(math.nan), "NaN or Inf"),
        (lambda sd: sd.update({"x_embedder.proj.weight": torch.zeros(64)}), "not an original DiT state dict"),
    ],
)
def test_original_checkpoints_that_do_not_fit_are_named(tmp_path, tiny_dit, tamper, needle):
    sd = to_original_layout(tiny_dit)
    tamper(sd)
    path = tmp_path / "ckpt.safetensors"
    save_file(sd, str(path))
    with pytest.raises(DitqError) as e:
        load_model(str(path), num_heads=2)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.fixture
def pipeline_copy(tmp_path):
    """A pipeline folder: the tiny DiT, a tiny VAE and a scheduler config."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

    from ditq.models import build_dit

    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), norm_num_groups=4)  # fmt: skip
    folder = tmp_path / "pipe"
    DiTPipeline(transformer=build_dit(tiny_config(), seed=0), vae=vae, scheduler=DDIMScheduler()).save_pretrained(folder)
    return folder


def test_a_vae_with_a_missing_tensor_is_named(pipeline_copy):
    source = load_model(str(pipeline_copy)).source
    load_vae(source)  # as saved: loads
    sd = load_file(str(pipeline_copy / "vae" / WEIGHTS))
    del sd["decoder.conv_out.weight"]
    save_file(sd, str(pipeline_copy / "vae" / WEIGHTS))
    with pytest.raises(DitqError, match=r"missing 1 tensor \('decoder.conv_out.weight'\)"):
        load_vae(source)


@pytest.mark.parametrize("field,value", [("scaling_factor", "big"), ("block_out_channels", [10**9]), ("layers_per_block", 1e6)])
def test_a_vae_config_of_the_wrong_types_is_refused_at_load(pipeline_copy, field, value):
    cfg_file = pipeline_copy / "vae" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), field: value}))
    with pytest.raises(DitqError, match=rf"vae/config.json: {field}.* must be"):
        load_model(str(pipeline_copy))


@pytest.mark.parametrize("vae", ["../victim.onnx", "ABSOLUTE", 3])
def test_a_ditq_pipeline_json_naming_another_decoder_file_is_refused(tmp_path, capsys, pipeline_copy, vae):
    """ditq_pipeline.json becomes the export's ditq.pipeline, and export writes the decoder to its vae:
    anything but the name ditq writes would put (or remove) a file outside the export."""
    victim = tmp_path / "victim.onnx"
    victim.write_text("precious")
    vae = str(victim) if vae == "ABSOLUTE" else vae
    (pipeline_copy / "ditq_pipeline.json").write_text(json.dumps({"space": "latent", "vae": vae, "scaling_factor": 0.5}))
    export_refused(tmp_path, capsys, pipeline_copy, "ditq_pipeline.json", "vae must be")
    assert victim.read_text() == "precious"


# ----------------------------------------------------------------------------------- config.json (6, 7)
BIG = "1" * 5000


@pytest.mark.parametrize(
    "text,needles",
    [
        ("[1, 2]", ["expected a JSON object, got a JSON array"]),
        ("null", ["expected a JSON object, got null"]),
        ('"DiT"', ["expected a JSON object, got 'DiT'"]),
        ('{"a": ' + "[" * 50000 + "]" * 50000 + "}", ["nested"]),
        ("{BASE, " + f'"num_layers": {BIG}' + "}", ["integer with too many digits"]),
        ("{BASE, " + '"num_layers": "2"}', ["num_layers must be an integer", "got '2'"]),
        ("{BASE, " + '"num_layers": 2.0}', ["num_layers must be an integer", "got 2.0"]),
        ("{BASE, " + '"num_layers": true}', ["num_layers must be an integer", "got true"]),
        ("{BASE, " + '"patch_size": 0}', ["patch_size must be an integer in 1..64", "got 0"]),
        ("{BASE, " + '"patch_size": -2}', ["patch_size must be"]),
        ("{BASE, " + '"patch_size": 3}', ["sample_size 8 is not a multiple of patch_size 3"]),
        ("{BASE, " + '"norm_eps": NaN}', ["norm_eps must be a finite number", "got NaN"]),
        ("{BASE, " + '"norm_eps": -Infinity}', ["norm_eps must be a finite number"]),
        ("{BASE, " + '"norm_eps": 1e999}', ["norm_eps must be a finite number"]),
        ("{BASE, " + '"num_attention_heads": 0}', ["num_attention_heads must be"]),
        ("{BASE, " + '"attention_head_dim": 1}', ["= 2 is not a multiple of 4"]),
        ("{BASE, " + '"attention_head_dim": [32]}', ["attention_head_dim must be", "got a JSON array"]),
        ("{BASE, " + '"norm_type": "layer_norm"}', ["norm_type must be one of"]),
        ("{BASE, " + '"num_embeds_ada_norm": null}', ["num_embeds_ada_norm must be"]),
        ("{BASE, " + '"attention_head_dim": 4096, "num_attention_heads": 200}', ["attention_head_dim must be"]),
        ('{"_class_name": ' + f'"{"X" * 10000}"' + "}", ["unsupported architecture", "(10000 characters)"]),
    ],
)
def test_malformed_config_json_is_one_line(tmp_path, capsys, dit_copy, text, needles):
    base = json.loads((dit_copy / "config.json").read_text())
    body = json.dumps(base)[1:-1]
    (dit_copy / "config.json").write_text(text.replace("{BASE", "{" + body))
    export_refused(tmp_path, capsys, dit_copy, str(dit_copy), *needles)


def test_config_json_that_is_not_utf8_or_not_a_file(tmp_path, capsys, dit_copy):
    (dit_copy / "config.json").write_bytes(b'{"_class_name": "\xff\xfe"}')
    export_refused(tmp_path, capsys, dit_copy, "not UTF-8")
    (dit_copy / "config.json").unlink()
    os.mkfifo(dit_copy / "config.json")  # reading a FIFO would block: it is not opened as a config
    export_refused(tmp_path, capsys, dit_copy, "config.json")


def test_hidden_size_not_divisible_by_heads(tmp_path, capsys, tiny_dit):
    save_file(to_original_layout(tiny_dit), str(tmp_path / "ckpt.safetensors"))
    export_refused(tmp_path, capsys, tmp_path / "ckpt.safetensors", "not divisible by 3 heads", extra=["--num-heads", "3"])


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-3, 3) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
# Fields whose every other value changes a tensor's shape (or the set of tensors) of the saved DiT:
# any value but the saved one must be refused, by type, by range or by the weights.
SHAPE_FIELDS = ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers",
                "patch_size", "num_embeds_ada_norm", "attention_bias", "norm_type", "norm_elementwise_affine")  # fmt: skip
# Fields whose value is free within a range; these values are outside it (or not numbers at all).
BAD_NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).filter(lambda v: not (0 < v <= 1)),
    st.text(max_size=4), st.none(), st.booleans(), st.lists(st.floats(0.1, 0.5), max_size=2),
)  # fmt: skip


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_config_value_that_does_not_fit_is_one_line(tmp_path, capsys, tiny_source, data):
    folder = tmp_path / "dit"
    if not folder.exists():
        shutil.copytree(tiny_source, folder)
    base = json.loads((tiny_source / "config.json").read_text())
    if data.draw(st.booleans()):
        field = data.draw(st.sampled_from(SHAPE_FIELDS))
        value = data.draw(JSON_VALUES.filter(lambda v: not (type(v) is type(base[field]) and v == base[field])))
    else:
        field = data.draw(st.sampled_from(("norm_eps", "dropout")))
        value = data.draw(BAD_NUMBERS.filter(lambda v: not (field == "dropout" and v == 0.0)))
    (folder / "config.json").write_text(json.dumps({**base, field: value}))
    export_refused(tmp_path, capsys, folder, str(folder))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=JSON_VALUES.filter(lambda v: not isinstance(v, dict)))
def test_any_config_that_is_not_an_object_is_one_line(tmp_path, capsys, tiny_source, value):
    folder = tmp_path / "dit"
    if not folder.exists():
        shutil.copytree(tiny_source, folder)
    (folder / "config.json").write_text(json.dumps(value))
    export_refused(tmp_path, capsys, folder, "expected a JSON object")


# ---------------------------------------------------------------------------- pickles and headers (10)
class Payload:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("layout", ["pt", "pt-nested", "bin", "legacy-protocol-2"])
def test_pickle_payloads_are_refused_naming_the_global(tmp_path, capsys, tiny_dit, dit_copy, monkeypatch, layout):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    evil = Payload(f"touch {marker}")
    sd = to_original_layout(tiny_dit)
    if layout == "bin":
        (dit_copy / WEIGHTS).unlink()
        target, model = dit_copy / "diffusion_pytorch_model.bin", dit_copy
        torch.save({**tiny_dit.state_dict(), "x": evil}, target)
    elif layout == "legacy-protocol-2":
        target = model = tmp_path / "evil.pth"
        with open(target, "wb") as f:  # plain pickle: tensors in it would be refused first, by their own globals
            pickle.dump({"x": evil}, f, protocol=2)
    else:
        target = model = tmp_path / "evil.pt"
        torch.save({"model": {**sd, "x": evil}} if layout == "pt-nested" else {**sd, "x": evil}, target)
    code, _, err = run(["export", "--model", str(model), "--num-heads", "2", "--out", str(tmp_path / "out")], capsys)
    assert_one_line_refusal(code, err, str(target), "refused to load", "system", "nothing in the file was run")
    assert "weights_only" not in err and "trusted source" not in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_inception_weights_with_a_payload_are_refused_before_anything_else(tmp_path):
    from ditq.runtime.metrics import inception_features

    marker = tmp_path / "MARKER"
    torch.save({"x": Payload(f"touch {marker}")}, tmp_path / "pt_inception.pth")
    with pytest.raises(DitqError, match=r"refused to load: the pickle asks for the global 'posix.system'") as e:
        inception_features(tmp_path / "pt_inception.pth")
    assert "weights_only" not in str(e.value) and not marker.exists()


def test_an_opcode_the_unpickler_refuses_is_one_line(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": Payload("true")}, f, protocol=4)  # STACK_GLOBAL
    code, _, err = run(["export", "--model", str(path), "--out", str(tmp_path / "out")], capsys)
    assert_one_line_refusal(code, err, "refused to load", "opcode")
    assert "weights_only" not in err


def _safetensors(header, body: bytes = b"\0" * 64, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


F32 = lambda shape, a, b: {"dtype": "F32", "shape": shape, "data_offsets": [a, b]}  # noqa: E731
HEADERS = {
    "length beyond the file": _safetensors({"a": F32([4, 4], 0, 64)}, length=1 << 20),
    "length of 2^63": _safetensors({"a": F32([4, 4], 0, 64)}, length=1 << 63),
    "header not JSON": _safetensors(b"this is not json"),
    "offsets out of range": _safetensors({"a": F32([4, 4], 0, 1 << 40)}),
    "offsets overlapping": _safetensors({"a": F32([4, 4], 0, 64), "b": F32([4, 4], 0, 64)}),
    "huge shape": _safetensors({"a": F32([1 << 40, 1 << 40], 0, 64)}),
    "shape that overflows": _safetensors({"a": F32([1 << 62] * 3, 0, 64)}),
    "deep header": _safetensors(b'{"__metadata__": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
    "empty file": b"",
    "8 bytes": b"\x01" * 8,
}


@pytest.mark.parametrize("case", HEADERS)
def test_safetensors_header_abuse(tmp_path, capsys, dit_copy, case):
    path = tmp_path / "ckpt.safetensors"
    path.write_bytes(HEADERS[case])
    export_refused(tmp_path, capsys, path, str(path))
    (dit_copy / WEIGHTS).write_bytes(HEADERS[case])
    export_refused(tmp_path, capsys, dit_copy, WEIGHTS)


# --------------------------------------------------------------- exported models: files and metadata (3)
C, S = 4, 8
CONFIG = {"in_channels": C, "out_channels": C, "sample_size": S, "num_embeds_ada_norm": 10, "num_layers": 1,
          "num_attention_heads": 2, "attention_head_dim": 32}  # fmt: skip


def _onnx(nodes, inputs, outputs, inits=(), meta=None):
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)), opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    for k, v in (meta or {}).items():
        m.metadata_props.add(key=k, value=v)
    return m


def fake_export(folder, **meta):
    """A folder shaped like a latent ditq export: ``model.onnx`` (output = 0.5 x sample) with ditq
    metadata, and ``vae_decoder.onnx`` (tanh of the first 3 latent channels)."""
    folder.mkdir(parents=True, exist_ok=True)
    f32 = lambda n, shape: helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)  # noqa: E731
    i64 = lambda n: helper.make_tensor_value_info(n, TensorProto.INT64, ["N"])  # noqa: E731
    meta = {"ditq.model_config": json.dumps(CONFIG), "ditq.recipe": Recipe.qdit(DIT, 4, 8, 16).to_json(),
            "ditq.source": json.dumps({"kind": "preset", "name": "dit-s-2", "seed": 0, "image_size": None}),
            "ditq.pipeline": json.dumps({"space": "latent", "clip_denoised": False, "vae": "vae_decoder.onnx", "scaling_factor": 0.5}),
            **meta}  # fmt: skip
    half = numpy_helper.from_array(np.array(0.5, np.float32), "half")
    dit = _onnx([helper.make_node("Mul", ["sample", "half"], ["out"])], [f32("sample", ["N", C, S, S]), i64("timestep"), i64("class_labels")],
                [f32("out", ["N", C, S, S])], [half], meta)  # fmt: skip
    onnx.save(dit, str(folder / "model.onnx"))
    cut = [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("b", 0), ("e", 3), ("a", 1))]
    dec = _onnx([helper.make_node("Slice", ["z", "b", "e", "a"], ["s"]), helper.make_node("Tanh", ["s"], ["img"])],
                [f32("z", ["N", C, S, S])], [f32("img", ["N", 3, S, S])], cut)  # fmt: skip
    onnx.save(dec, str(folder / "vae_decoder.onnx"))
    return folder


@pytest.fixture
def opened(monkeypatch):
    """Every path ONNX Runtime or Python's ``open`` is asked to open, as resolved absolute paths."""
    seen = []
    real_session, real_open = onnxruntime.InferenceSession.__init__, open

    def session(self, path_or_bytes, *a, **k):
        if isinstance(path_or_bytes, (str, os.PathLike)):
            seen.append(os.path.realpath(path_or_bytes))
        return real_session(self, path_or_bytes, *a, **k)

    def recording_open(file, *a, **k):
        if isinstance(file, (str, os.PathLike)):
            seen.append(os.path.realpath(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr(onnxruntime.InferenceSession, "__init__", session)
    monkeypatch.setattr("builtins.open", recording_open)
    return seen


def _sample(folder, out, capsys):
    return run(["sample", str(folder), "--classes", "0,1", "--per-class", "2", "--steps", "2", "--out", str(out)], capsys)


def test_sample_opens_the_decoder_inside_the_folder(tmp_path, capsys, opened):
    folder = fake_export(tmp_path / "m")
    opened.clear()
    code, out, err = _sample(folder, tmp_path / "grid.png", capsys)
    assert code == 0, err
    assert str((folder / "vae_decoder.onnx").resolve()) in opened  # the recorder sees what sample opens


@pytest.mark.parametrize("escape", ["../outside.onnx", "ABSOLUTE", "link.onnx", "sub/../../outside.onnx", "loop.onnx", "", 7])
def test_sample_never_opens_a_file_outside_the_model_folder(tmp_path, capsys, opened, escape):
    outside = tmp_path / "outside.onnx"
    fake_export(tmp_path / "donor")
    shutil.copy(tmp_path / "donor" / "vae_decoder.onnx", outside)  # a working decoder: only the path is wrong
    if escape == "ABSOLUTE":
        escape = str(outside)
    folder = fake_export(tmp_path / "m", **{"ditq.pipeline": json.dumps({"space": "latent", "vae": escape, "scaling_factor": 0.5})})
    (folder / "link.onnx").symlink_to(outside)
    (folder / "loop.onnx").symlink_to("loop.onnx")
    opened.clear()  # what making the files opened
    code, _, err = _sample(folder, tmp_path / "grid.png", capsys)
    assert_one_line_refusal(code, err, "ditq.pipeline", "vae")
    assert str(outside.resolve()) not in opened and not (tmp_path / "grid.png").exists()


def test_a_model_file_that_links_out_of_its_folder_is_refused(tmp_path, capsys, opened):
    fake_export(tmp_path / "donor")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.onnx").symlink_to(tmp_path / "donor" / "model.onnx")
    opened.clear()
    code, _, err = _sample(tmp_path / "m", tmp_path / "grid.npy", capsys)
    assert_one_line_refusal(code, err, "symbolic link")
    assert str((tmp_path / "donor" / "model.onnx").resolve()) not in opened


DEEP = "[" * 20000 + "]" * 20000


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("ditq.model_config", "not json", "not valid JSON"),
        ("ditq.model_config", "[1]", "expected a JSON object"),
        ("ditq.model_config", DEEP, "nested"),
        ("ditq.model_config", json.dumps({**CONFIG, "in_channels": "4"}), "in_channels must be"),
        ("ditq.model_config", json.dumps({**CONFIG, "num_embeds_ada_norm": -1}), "num_embeds_ada_norm must be"),
        ("ditq.model_config", '{"sample_size": ' + BIG + "}", "too many digits"),
        ("ditq.pipeline", "nope", "not valid JSON"),
        ("ditq.pipeline", "null", "expected a JSON object"),
        ("ditq.pipeline", DEEP, "nested"),
        ("ditq.pipeline", '{"space": 3}', "space must be one of"),
        ("ditq.pipeline", '{"clip_denoised": "yes"}', "clip_denoised must be true or false"),
        ("ditq.pipeline", '{"value_range": [1, 0]}', "value_range must be"),
        ("ditq.pipeline", '{"value_range": [0, NaN]}', "value_range must be"),
        ("ditq.pipeline", '{"schedule": [1]}', "schedule must be a JSON object"),
        ("ditq.pipeline", '{"scaling_factor": "0.5"}', "scaling_factor must be"),
    ],
)
def test_sample_with_tampered_metadata_is_one_line(tmp_path, capsys, key, value, needle):
    folder = fake_export(tmp_path / "m", **{key: value})
    code, _, err = _sample(folder, tmp_path / "grid.npy", capsys)
    assert_one_line_refusal(code, err, key, needle)
    assert not (tmp_path / "grid.npy").exists()


@pytest.mark.parametrize(
    "value,needle",
    [
        ("not json", "not valid JSON"),
        ("[]", "expected a JSON object"),
        ("null", "expected a JSON object"),
        (DEEP, "nested"),
        ('{"kind": 7}', "kind must be one of"),
        ('{"kind": "preset", "name": 5}', "name must be a string"),
        ('{"kind": "diffusers"}', "path is missing"),
        ('{"kind": "preset", "name": "dit-s-2", "seed": "x"}', "seed must be an integer"),
        ('{"kind": "preset", "name": "dit-s-2", "seed": -1}', "seed must be an integer"),
        ('{"kind": "dit-checkpoint", "path": "x.pt", "num_heads": 0.5}', "num_heads must be"),
    ],
)
def test_validate_with_a_tampered_source_is_one_line(tmp_path, capsys, value, needle):
    folder = fake_export(tmp_path / "m", **{"ditq.source": value})
    before = sorted(p.name for p in folder.iterdir())
    code, _, err = run(["validate", str(folder)], capsys)
    assert_one_line_refusal(code, err, "ditq.source", needle)
    assert sorted(p.name for p in folder.iterdir()) == before


@pytest.mark.parametrize("value", ["xyz", '"' * 100000])
def test_validate_with_a_tampered_target_is_one_line(tmp_path, capsys, value):
    folder = fake_export(tmp_path / "m", **{"ditq.target": value})
    code, _, err = run(["validate", str(folder)], capsys)
    assert_one_line_refusal(code, err, "ditq.target must be one of qdq, ort")


@pytest.mark.parametrize("data,needle", [(b"", "empty file (0 bytes), not an ONNX model"), (b"\xf8\x07\x01", "not an ONNX model")])
def test_an_empty_or_foreign_onnx_file_says_so(tmp_path, capsys, data, needle):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.onnx").write_bytes(data)  # b"\xf8\x07\x01": one unknown protobuf field, parses
    code, _, err = run(["validate", str(tmp_path / "m")], capsys)
    assert_one_line_refusal(code, err, needle)
    if not data:
        code, _, err = _sample(tmp_path / "m", tmp_path / "grid.npy", capsys)
        assert_one_line_refusal(code, err, needle)


def test_a_recipe_file_over_16_mib_is_refused_unparsed(tmp_path, capsys):
    """Valid JSON (a recipe padded with spaces) but larger than any recipe: refused by its size."""
    p = tmp_path / "r.json"
    p.write_text(Recipe.qdit(DIT, 4, 8, 32).to_json() + " " * (16 << 20))
    code, _, err = run(["recipe", "--recipe", str(p), "--out", str(tmp_path / "o.json")], capsys)
    assert_one_line_refusal(code, err, str(p), f"more than the {16 << 20} bytes allowed")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["r.json"]
