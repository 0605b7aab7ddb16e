"""Work that samples a model's trajectories refuses, in one line, exit 2, writing nothing, a text-to-image
model it cannot sample: GPTQ calibration and --mixed sensitivity a text model loaded without the text
encoders of a pipeline folder (no prompts source; with them they work: tests/test_t2i_calibration.py);
eval a text model that samples latents (it judges pixel-space models: tests/test_t2i_eval.py), the search
and fitness a text model no digits-t2i judge scores (tests/test_t2i_search.py)."""

from __future__ import annotations

import pytest

from tests.conftest import assert_no_output, assert_one_line_refusal, run
from tests.test_family_sd3 import tiny


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3") / "sd3"
    tiny().save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("argv, needle", [
    (["export", "--wbits", "4", "--abits", "8", "--group-size", "16", "--method", "gptq"], "use --method rtn"),
    (["export", "--wbits", "1.58", "--abits", "4", "--mixed"], "without --mixed"),
])  # fmt: skip
def test_export_work_that_samples_a_text_model_without_its_encoders_is_refused(sd3, tmp_path, capsys, argv, needle):
    """A bare transformer folder has no text encoders to encode calibration prompts with."""
    code, _, err = run([argv[0], "--model", sd3, *argv[1:], "--out", str(tmp_path / "out")], capsys)
    assert_one_line_refusal(code, err, "SD3Transformer2DModel is text-conditioned", "without the text encoders", needle)
    assert_no_output(tmp_path)


def test_eval_and_search_refuse_a_text_model(sd3, tmp_path, capsys):
    code, _, err = run(["eval", "--model", sd3, "--configs", "fp,w8a8", "--num-samples", "8"], capsys)
    assert_one_line_refusal(code, err, sd3, "samples latents", "ditq eval judges pixel-space models")
    code, _, err = run(["search", "--model", sd3, "--journal", str(tmp_path / "j.jsonl"), "--generations", "1",
                        "--out", str(tmp_path / "r.json")], capsys)
    assert_one_line_refusal(code, err, "no digits-t2i judge")
    assert not (tmp_path / "j.jsonl").exists()


@pytest.mark.parametrize("family, pipeline", [
    ("SD3Transformer2DModel", "StableDiffusion3Pipeline"),
    ("PixArtTransformer2DModel", "PixArtAlphaPipeline"),
    ("PixArtTransformer2DModel", "PixArtSigmaPipeline"),
    ("FluxTransformer2DModel", "FluxPipeline"),
])  # fmt: skip
def test_sampling_without_guidance_takes_the_pipelines_default(family, pipeline):
    """`ditq sample --prompt` without --guidance samples at the guidance scale diffusers' pipeline defaults to."""
    import inspect

    import diffusers

    from ditq.families import spec_for

    want = inspect.signature(getattr(diffusers, pipeline).__call__).parameters["guidance_scale"].default
    assert spec_for(family).default_guidance == want


def test_qat_refuses_a_text_model_that_is_not_a_digits_model(tmp_path, capsys):
    """ditq qat trains on the digits: a text model no digits judge scores (here SD3 with random weights) is
    refused before any training, writing nothing."""
    from tests.t2i_fixtures import sd3_pipeline

    folder = sd3_pipeline(tmp_path / "sd3")
    code, _, err = run(["qat", "--model", str(folder), "--steps", "1", "--out", str(tmp_path / "out")], capsys)
    assert_one_line_refusal(code, err, "not a digits model")
    assert not (tmp_path / "out").exists()
