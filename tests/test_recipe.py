"""The recipe: JSON round trip, rule order, coverage on a DiT, and the errors that name the problem."""

import json

import pytest

from ditq.adapters import adapter_for
from ditq.errors import DitqError
from ditq.recipe import LayerQuant, Recipe, Rule
from tests.conftest import tiny_config
from ditq.models import build_dit

DIT = adapter_for("DiTTransformer2DModel").coverage  # the family of the models here


def test_json_round_trip_is_identity():
    r = Recipe.qdit(DIT, 6, 8, 32, symmetric=True)
    assert Recipe.from_json(r.to_json()) == r
    d = json.loads(r.to_json())
    assert d["format"] == "ditq-recipe" and d["version"] == 1


def test_later_rules_override_earlier_ones():
    r = Recipe(LayerQuant(4, None, 64), (Rule("blocks.*", {"abits": 8}), Rule("blocks.1.*", {"group_size": 32, "abits": None})))
    assert r.config_for("blocks.0.fc") == LayerQuant(4, 8, 64)
    assert r.config_for("blocks.1.fc") == LayerQuant(4, None, 32)
    assert r.config_for("head") == LayerQuant(4, None, 64)
    assert Recipe(LayerQuant(), (Rule("re:blocks\\.[01]\\.fc", {"wbits": 8}),)).config_for("blocks.1.fc").wbits == 8


def test_qdit_coverage_on_a_dit(tiny_dit):
    plans = Recipe.qdit(DIT, 4, 8, 16).resolve(tiny_dit)
    acts = sorted(n for n, p in plans.items() if p.abits == 8)
    per_block = ["attn1.to_k", "attn1.to_out.0", "attn1.to_q", "attn1.to_v", "ff.net.0.proj", "ff.net.2"]
    assert acts == sorted(f"transformer_blocks.{i}.{s}" for i in range(2) for s in per_block)
    weight_only = {n for n, p in plans.items() if p.abits is None}
    assert "transformer_blocks.0.norm1.linear" in weight_only  # adaLN: weight-only
    assert "transformer_blocks.1.norm1.emb.class_embedder.embedding_table" in weight_only
    assert plans["transformer_blocks.1.norm1.emb.class_embedder.embedding_table"].kind == "embedding"
    assert "proj_out_2" not in plans and "proj_out_1" in plans  # final projection stays float


def test_group_size_that_does_not_divide_names_the_layer():
    model = build_dit(tiny_config(hidden=96, heads=2), seed=0)  # widths 96 and 384; 256 for the t-embedder
    with pytest.raises(DitqError, match=r"group size 64 does not divide the input width 96 of layer 'transformer_blocks\.0\."):
        Recipe.qdit(DIT, 4, 8, 64).resolve(model)


@pytest.mark.parametrize(
    "doc,msg",
    [
        ({"format": "x"}, "not a ditq recipe"),
        ({"format": "ditq-recipe", "version": 7}, "version 7"),
        ({"format": "ditq-recipe", "default": {"wbits": 9}}, "wbits must be an integer in 2..8"),
        ({"format": "ditq-recipe", "default": {"abits": 0}}, "abits must be"),
        ({"format": "ditq-recipe", "default": {"wbits": 1.58}}, "ternary weights .wbits 1.58. are symmetric"),
        ({"format": "ditq-recipe", "default": {"group_size": 0}}, "group_size must be"),
        ({"format": "ditq-recipe", "default": {"bits": 4}}, "default"),
        ({"format": "ditq-recipe", "rules": [{"match": "a", "wbit": 4}]}, "unknown field"),
        ({"format": "ditq-recipe", "rules": [{"match": "re:("}]}, "bad regular expression"),
        ({"format": "ditq-recipe", "method": "magic"}, "method 'magic'"),
    ],
)
def test_bad_recipes_are_refused_with_the_reason(doc, msg):
    with pytest.raises(DitqError, match=msg):
        Recipe.from_dict(doc)


def test_rule_matching_nothing_is_an_error(tiny_dit):
    r = Recipe(LayerQuant(group_size=16), (Rule("transformer_blocks.*.atn1.to_q", {"abits": 8}),))
    with pytest.raises(DitqError, match="selects no linear"):
        r.resolve(tiny_dit)


def test_not_json(tmp_path):
    p = tmp_path / "r.json"
    p.write_text("{not json")
    with pytest.raises(DitqError, match="not valid JSON"):
        Recipe.load(p)
    with pytest.raises(DitqError, match="not found"):
        Recipe.load(tmp_path / "missing.json")
