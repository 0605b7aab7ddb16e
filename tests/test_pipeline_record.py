"""The typed pipeline record (ditq.pipeline.Pipeline): exact round trips, records written by the previous
format still read with the values they meant, hostile records refused in one line naming the field, an
export's record read back as written, and no dict-style reading of a pipeline left in the source tree."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import onnx
import pytest

from ditq.cli import main
from ditq.errors import DitqError
from ditq.models import BUILTIN_PIPELINE, build_dit, digits_config, dit_config
from ditq.pipeline import PIPELINE_FILE, VAE_DECODER_FILE, ClassConditioning, Pipeline
from ditq.schedule import SchedulerSpec
from ditq.untrusted import parse_json

ROOT = Path(__file__).resolve().parents[1]
DIGITS = digits_config()  # 1x8x8 images, 10 classes
LATENT = dit_config(64, 2, 2, sample_size=8, num_classes=1000)  # 4 latent channels, 1000 classes


def _fit(config):
    """What a DiT of ``config`` is fitted to: its class conditioning and sample shape, from its config's
    own numbers (not through ditq's adapter)."""
    n, c, s = config["num_embeds_ada_norm"], config["in_channels"], config["sample_size"]
    return ClassConditioning(n, n), (c, s, s)
V_SPEC = SchedulerSpec(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
                       timestep_spacing="trailing", clip_sample=True, use_clipped_model_output=False,
                       scheduler_class="DDIMScheduler")  # fmt: skip

RECORDS = [
    BUILTIN_PIPELINE["digits"],
    Pipeline(),
    Pipeline(conditioning=ClassConditioning(1000, 1000)),
    Pipeline(space="latent", schedule=V_SPEC, vae=VAE_DECODER_FILE, scaling_factor=0.18215, conditioning=ClassConditioning(7, 9)),
    Pipeline(space="pixel", clip_denoised=True, value_range=(0.0, 255.0), schedule=SchedulerSpec(trained_betas=(0.01, 0.02), num_train_timesteps=2)),
]


# ------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("pipe", RECORDS, ids=range(len(RECORDS)))
def test_to_dict_from_dict_round_trips_exactly_through_json(pipe):
    text = pipe.to_json()
    back = Pipeline.from_dict(json.loads(text), "record")
    assert back == pipe and back.to_json() == text
    assert type(back.value_range) is tuple and back.schedule.to_dict() == pipe.schedule.to_dict()


def test_the_digits_record_keeps_the_previous_keys_and_values_and_adds_the_conditioning():
    assert BUILTIN_PIPELINE["digits"].to_dict() == {
        "space": "pixel", "value_range": [-1.0, 1.0], "clip_denoised": True, "judge": "digits",
        "conditioning": {"num_classes": 10, "null_label": 10},
    }  # fmt: skip


# ---------------------------------------------------------------------------- the previous format reads
def test_a_previous_digits_record_reads_with_the_conditioning_of_its_model():
    old = {"space": "pixel", "value_range": [-1.0, 1.0], "clip_denoised": True, "judge": "digits"}  # ditq before the typed record
    pipe = Pipeline.from_dict(old, "old", fit=_fit(DIGITS))
    assert (pipe.space, pipe.clip_denoised, pipe.value_range, pipe.judge) == ("pixel", True, (-1.0, 1.0), "digits")
    assert pipe.schedule == SchedulerSpec() and pipe.vae is None and pipe.scaling_factor is None
    assert pipe.conditioning == ClassConditioning(10, 10)
    assert pipe.samples_pixels and pipe.judged_by_digits and pipe.makes_images and not pipe.has_decoder
    assert pipe == BUILTIN_PIPELINE["digits"]
    assert Pipeline.from_dict(old, "old").conditioning is None  # a reader without the model config


def test_a_previous_preset_record_takes_todays_defaults():
    pipe = Pipeline.from_dict({"space": "latent", "clip_denoised": False}, "old", fit=_fit(LATENT))
    assert pipe == Pipeline(space="latent", clip_denoised=False, value_range=(-1.0, 1.0), schedule=SchedulerSpec(),
                            vae=None, scaling_factor=None, judge=None, conditioning=ClassConditioning(1000, 1000))  # fmt: skip
    assert not pipe.samples_pixels and not pipe.makes_images and not pipe.judged_by_digits
    assert Pipeline.from_dict({}, "a model without ditq.pipeline", fit=_fit(LATENT)) == pipe


def test_a_previous_pipeline_folder_record_reads_its_schedule_and_decoder():
    old = {  # what `ditq export` of a diffusers pipeline folder with a VAE wrote before the typed record
        "space": "latent", "clip_denoised": False,
        "schedule": {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                     "trained_betas": None, "rescale_betas_zero_snr": False, "prediction_type": "v_prediction",
                     "timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False,
                     "clip_sample_range": 1.0, "use_clipped_model_output": False, "variance_type": None,
                     "scheduler_class": "DDIMScheduler"},
        "vae": "vae_decoder.onnx", "scaling_factor": 0.18215, "value_range": [-1.0, 1.0],
    }  # fmt: skip
    pipe = Pipeline.from_dict(old, "old", fit=_fit(LATENT))
    s = pipe.schedule
    assert (s.beta_schedule, s.beta_start, s.beta_end, s.prediction_type, s.timestep_spacing, s.steps_offset) == (
        "scaled_linear", 0.00085, 0.012, "v_prediction", "leading", 1)  # fmt: skip
    assert (s.set_alpha_to_one, s.clip_sample, s.use_clipped_model_output, s.scheduler_class) == (False, False, False, "DDIMScheduler")
    assert (pipe.vae, pipe.scaling_factor, pipe.value_range) == ("vae_decoder.onnx", 0.18215, (-1.0, 1.0))
    assert pipe.has_decoder and pipe.makes_images and not pipe.samples_pixels
    assert pipe.conditioning == ClassConditioning(1000, 1000)


def test_a_schedule_of_ditq_0_1_and_fields_of_a_newer_ditq():
    pipe = Pipeline.from_dict({"schedule": {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.0001,
                                            "beta_end": 0.02}, "written_by_a_newer_ditq": [1, 2]}, "old")  # fmt: skip
    assert pipe == Pipeline()


# ------------------------------------------------------------------------------------- hostile records
HOSTILE = [
    ([], None, "expected a JSON object"),
    ({"space": "voxel"}, None, "space must be one of"),
    ({"space": 3}, None, "space must be one of"),
    ({"space": ["pixel"]}, None, "space must be one of"),
    ({"clip_denoised": "yes"}, None, "clip_denoised must be true or false"),
    ({"clip_denoised": 1}, None, "clip_denoised must be true or false"),
    ({"value_range": [1, 0]}, None, "value_range must be"),
    ({"value_range": [0, math.nan]}, None, "value_range must be"),
    ({"value_range": [0, math.inf]}, None, "value_range must be"),
    ({"value_range": [0, 10**400]}, None, "value_range must be"),
    ({"value_range": [0, 1, 2]}, None, "value_range must be"),
    ({"value_range": "01"}, None, "value_range must be"),
    ({"vae": "other.onnx", "scaling_factor": 0.5}, None, "vae must be null or 'vae_decoder.onnx'"),
    ({"vae": "../vae_decoder.onnx", "scaling_factor": 0.5}, None, "vae must be null or 'vae_decoder.onnx'"),
    ({"vae": "/etc/passwd", "scaling_factor": 0.5}, None, "vae must be null or 'vae_decoder.onnx'"),
    ({"vae": 7, "scaling_factor": 0.5}, None, "vae must be a string"),
    ({"vae": "x" * 1_000_000, "scaling_factor": 0.5}, None, "vae must be a string"),
    ({"vae": "vae_decoder.onnx"}, None, "vae and scaling_factor come together"),
    ({"scaling_factor": 0.5}, None, "vae and scaling_factor come together"),
    ({"space": "pixel", "vae": "vae_decoder.onnx", "scaling_factor": 0.5}, None, "decodes latents"),
    ({"vae": "vae_decoder.onnx", "scaling_factor": 0}, None, "scaling_factor must be"),
    ({"vae": "vae_decoder.onnx", "scaling_factor": 10**400}, None, "scaling_factor must be"),
    ({"vae": "vae_decoder.onnx", "scaling_factor": "0.5"}, None, "scaling_factor must be"),
    ({"judge": "inception"}, None, "judge must be one of"),
    ({"judge": ["digits"], "space": "pixel"}, None, "judge must be one of"),
    ({"judge": "digits", "space": "latent"}, None, "scores images, but space is 'latent'"),
    ({"judge": "digits", "space": "pixel"}, LATENT, "judge 'digits' scores 1x8x8 images of 10 classes"),
    ({"schedule": [1]}, None, "schedule must be a JSON object"),
    ({"schedule": {"prediction_type": "x0"}}, None, "prediction_type"),
    ({"schedule": {"num_train_timesteps": 10**400}}, None, "num_train_timesteps"),
    ({"schedule": {"not_a_setting": 1}}, None, "unknown schedule field"),
    ({"conditioning": "10"}, None, "conditioning must be a JSON object"),
    ({"conditioning": {"num_classes": 10}}, None, "null_label is missing"),
    ({"conditioning": {"num_classes": 10**30, "null_label": 10**30}}, None, "num_classes must be an integer in"),
    ({"conditioning": {"num_classes": 10, "null_label": -1}}, None, "null_label must be an integer in"),
    ({"conditioning": {"num_classes": 10.0, "null_label": 10}}, None, "num_classes must be an integer in"),
    ({"conditioning": {"num_classes": 10, "null_label": 3}}, None, "null_label 3 is one of the labels 0..9"),
    ({"conditioning": {"num_classes": 10, "null_label": 10}}, LATENT, "does not fit the model"),
    ({"conditioning": {"num_classes": 1000, "null_label": 1001}}, LATENT, "does not fit the model"),
]


@pytest.mark.parametrize("record,config,needle", HOSTILE, ids=[h[2][:30] + f"-{i}" for i, h in enumerate(HOSTILE)])
def test_a_hostile_record_is_one_line_naming_where_and_the_field(record, config, needle):
    with pytest.raises(DitqError) as e:
        Pipeline.from_dict(record, "m/model.onnx: ditq.pipeline", fit=None if config is None else _fit(config))
    msg = str(e.value)
    assert msg.startswith("m/model.onnx: ditq.pipeline") and needle in msg, msg[:500]
    assert "\n" not in msg and len(msg) < 400, msg[:500]


def test_nan_from_the_json_text_is_refused():
    record = parse_json('{"value_range": [0, NaN]}', "meta")  # JSON text ditq reads may hold NaN
    with pytest.raises(DitqError, match="value_range must be"):
        Pipeline.from_dict(record, "meta")


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"value_range": [-1.0, 1.0]}, "value_range must be"),  # typed: a tuple, as from_dict makes it
        ({"space": "pixel", "clip_denoised": None}, "clip_denoised must be"),
        ({"schedule": {}}, "schedule must be a SchedulerSpec"),
        ({"conditioning": (10, 10)}, "conditioning must be"),
        ({"judge": "digits"}, "space is 'latent'"),
    ],
)
def test_the_record_checks_itself_when_built(kwargs, needle):
    with pytest.raises(DitqError, match=needle):
        Pipeline(**kwargs)


# ------------------------------------------------------------------------------- an export reads back
def test_an_exported_models_pipeline_reads_back_as_written(tmp_path):
    from ditq.runtime.generate import ExportedDiT

    folder = tmp_path / "dit"
    config = dit_config(32, 1, 2, sample_size=8, num_classes=10)  # the smallest DiT: seconds to export
    build_dit(config, seed=0).save_pretrained(folder)
    written = Pipeline(space="pixel", clip_denoised=True, value_range=(0.0, 1.0), schedule=V_SPEC)  # no conditioning
    written.write_to(folder)
    assert json.loads((folder / PIPELINE_FILE).read_text()) == written.to_dict()
    assert main(["--quiet", "export", "--model", str(folder), "--wbits", "8", "--abits", "8", "--group-size", "16",
                 "--out", str(tmp_path / "m")]) == 0  # fmt: skip
    want = Pipeline(space="pixel", clip_denoised=True, value_range=(0.0, 1.0), schedule=V_SPEC,
                    conditioning=ClassConditioning(config["num_embeds_ada_norm"], config["num_embeds_ada_norm"]))  # fmt: skip
    meta = {p.key: p.value for p in onnx.load(tmp_path / "m" / "model.onnx").metadata_props}
    assert meta["ditq.pipeline"] == want.to_json()
    model = ExportedDiT.open(tmp_path / "m")
    assert model.pipeline == want and model.schedule == V_SPEC and model.num_classes == 10


# ------------------------------------------------------------------------------ one reader, one writer
PACKAGES = ("ditq", "calib", "exporter", "graphs", "runtime")


def _source_files():
    for pkg in PACKAGES:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def _terminal_name(node: ast.AST) -> str | None:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None


def test_no_pipeline_is_read_as_a_dict():
    """``pipe.get("...")``, ``loaded.pipeline["..."]`` and the like: a pipeline is read by attribute."""
    found = []
    for f in _source_files():
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
                receiver = node.func.value
            elif isinstance(node, ast.Subscript):
                receiver = node.value
            else:
                continue
            if _terminal_name(receiver) in ("pipe", "pipeline", "pipeline_info"):
                found.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    assert not found, found


def test_the_file_names_are_spelled_in_one_place():
    """``ditq_pipeline.json`` and ``vae_decoder.onnx`` are string constants of ditq/pipeline.py only."""
    found = []
    for f in _source_files():
        if f == ROOT / "ditq" / "pipeline.py":
            continue
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Constant) and node.value in (PIPELINE_FILE, VAE_DECODER_FILE, "ditq.pipeline"):
                found.append(f"{f.relative_to(ROOT)}:{node.lineno}: {node.value}")
    found = [x for x in found if not (x.startswith("ditq/fileformat.py") and x.endswith("ditq.pipeline"))]  # META_PIPELINE
    assert not found, found
