"""``ditq eval`` builds its recipes through ``build_recipe``: every configuration form gives the recipe
it gave when eval built recipes itself (the JSON below was written by that code on the digits DiT)."""

from __future__ import annotations

import pytest

from ditq.models import load_model
from ditq.recipe import Recipe
from ditq.workflows.evaluate import parse_configs

BLOCK = ["transformer_blocks.*.attn1.to_q", "transformer_blocks.*.attn1.to_k", "transformer_blocks.*.attn1.to_v",
         "transformer_blocks.*.attn1.to_out.0", "transformer_blocks.*.ff.net.0.proj", "transformer_blocks.*.ff.net.2"]  # fmt: skip


def qdit_json(wbits, abits, group, symmetric=False, method="rtn", block_group=None):
    rules = [{"abits": abits, "match": m} for m in BLOCK] + [{"match": "proj_out_2", "wbits": None}]
    rules += [{"group_size": block_group, "match": m} for m in BLOCK] if block_group else []
    return {"default": {"abits": None, "group_size": group, "rotate": False, "symmetric": symmetric, "wbits": wbits},
            "format": "ditq-recipe", "method": method, "rules": rules, "version": 1}  # fmt: skip


def robuq_json(abits, rotate):
    rules = [{"abits": abits, "match": m, "rotate": rotate} for m in BLOCK]
    rules += [{"abits": 4, "match": "transformer_blocks.*.norm1.linear", "rotate": rotate},
              {"match": "*class_embedder.embedding_table", "symmetric": False, "wbits": 4},
              {"match": "proj_out_1", "symmetric": False, "wbits": 4}, {"match": "proj_out_2", "wbits": None}]  # fmt: skip
    return {"default": {"abits": None, "group_size": None, "rotate": False, "symmetric": True, "wbits": 1.58},
            "format": "ditq-recipe", "method": "rtn", "rules": rules, "version": 1}  # fmt: skip


FP = {"default": {"abits": None, "group_size": None, "rotate": False, "symmetric": False, "wbits": None},
      "format": "ditq-recipe", "method": "rtn", "rules": [], "version": 1}  # fmt: skip

# (--configs entry, --group-size, symmetric, method) -> the recipe eval quantizes with
CASES = [
    ("fp", 64, False, None, FP),
    ("w4a8", 64, False, None, qdit_json(4, 8, 64)),
    ("w4a8", "auto", True, "gptq", qdit_json(4, 8, 64, True, "gptq")),  # auto: 64 on the digits DiT (width 192)
    ("w4a8g32@ort", 64, False, None, qdit_json(4, 8, 64, block_group=32)),
    ("w4a8g32@ort", "auto", True, "gptq", qdit_json(4, 8, 64, True, "gptq", block_group=32)),
    ("w4a8g64", 64, False, None, qdit_json(4, 8, 64)),  # gN equal to --group-size adds no rules
    ("w4a4gch", None, False, None, qdit_json(4, 4, None)),
    ("w4a4gch", 64, False, None, {**qdit_json(4, 4, 64), "rules": qdit_json(4, 4, 64)["rules"]
                                   + [{"group_size": None, "match": m} for m in BLOCK]}),  # fmt: skip
    ("w6a16", 64, True, "gptq", {**qdit_json(6, None, 64, True, "gptq")}),
    ("w1.58a3h", 64, True, "gptq", robuq_json(3, True)),  # RobuQ ignores symmetric and method
    ("w1.58a2", 64, False, None, robuq_json(2, False)),
]


@pytest.fixture(scope="module")
def digits():
    return load_model("digits")


@pytest.mark.parametrize("raw,group,symmetric,method,expected", CASES, ids=[f"{c[0]}-g{c[1]}-{c[3]}" for c in CASES])
def test_eval_config_recipe_is_unchanged(digits, raw, group, symmetric, method, expected):
    (conf,) = parse_configs(raw, group)
    assert conf.build(digits, symmetric, method).recipe.to_dict() == expected


def test_recipe_file_config_takes_the_method(digits, tmp_path):
    path = tmp_path / "searched.json"
    path.write_text(Recipe.from_dict(qdit_json(4, 8, 32)).to_json())
    (conf,) = parse_configs(str(path), 64)
    assert conf.name == "searched"
    assert conf.build(digits, True, "gptq").recipe.to_dict() == qdit_json(4, 8, 32, method="gptq")
    assert conf.build(digits).recipe.to_dict() == qdit_json(4, 8, 32)


# ---------------------------------------------------------------- the eval/bench API reaches what the CLI does
@pytest.mark.slow  # samples the digits model with ONNX Runtime: about 15 s
def test_api_eval_takes_a_feature_space():
    """FID in a caller's feature space is reachable from ``ditq.evaluate`` (non-digit models need it)."""
    import ditq
    from ditq.calib.digits import load_split, to_unit_range

    real = to_unit_range(load_split().x_test[:60])
    seen = []

    def pixels(images):
        seen.append(len(images))
        return images.reshape(len(images), -1)

    rep = ditq.evaluate("digits", "fp", num_samples=10, steps=2, features=pixels, real_images=real)
    assert seen == [60, 10, 30, 30] and rep.settings["real_images"] == 60  # real set, samples, the floor's halves


@pytest.mark.parametrize("given", ["features", "real_images"])
def test_api_eval_refuses_half_a_feature_space(given):
    import ditq
    from ditq.errors import DitqError

    with pytest.raises(DitqError, match="--inception and --real-images go together"):
        ditq.evaluate("digits", "fp", num_samples=10, steps=2, **{given: "somewhere"})


def test_api_check_goals():
    import ditq
    from ditq.workflows.bench import BenchReport, BenchRow

    def row(name, speedup, err):
        return BenchRow(name, 1 / speedup, 1.0, 1.0, err, 1.0, 0.0, 1, 1, speedup)

    slow = BenchReport([row("float", 1, 0), row("w8a8@ort", 1.5, 0.01)])
    assert ditq.check_goals(slow) == ["w8a8@ort is 1.50x faster than float, goal 2.0x"]


def test_a_configuration_that_does_not_fit_the_model_is_refused_before_any_sampling(monkeypatch, capsys):
    """g128 does not divide the digits DiT's width 192: refused before the fp and w8a8 rows are sampled
    (it used to stop after them, minutes later)."""
    import ditq.workflows.evaluate as ev

    from .conftest import assert_one_line_refusal, run

    def sampled(*a, **k):
        raise AssertionError("sampling started before every configuration was checked")

    monkeypatch.setattr(ev, "ClassDraws", sampled)
    code, _, err = run(["eval", "--model", "digits", "--configs", "fp,w8a8,w4a4g128", "--num-samples", "4"], capsys)
    assert_one_line_refusal(code, err, "group size 128 does not divide the input width 192")
