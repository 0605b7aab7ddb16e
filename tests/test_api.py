"""The Python API reaches what the CLI does, with typed arguments: GPTQ on recorded calibration inputs,
the search, eval and bench; bad typed arguments are one-line DitqErrors; ``import ditq`` imports no torch."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import ditq
from ditq.errors import DitqError
from tests.conftest import run


def _codes_from_scratch(weight: torch.Tensor, x: torch.Tensor, plan):
    """GPTQ codes of one linear written out here: the layer's input as it runs (the recipe's dynamic
    activation quantizer, per token and group, when the layer has one), its Hessian, GPTQ."""
    from ditq.calib.gptq import HessianState, accumulate_hessian, gptq_quantize
    from ditq.calib.numerics import fake_quantize

    if plan.abits is not None:
        x = fake_quantize(x, plan.abits, plan.activation_group, plan.activation_symmetric)
    h = accumulate_hessian(HessianState.zeros(x.shape[-1]), x).h
    return gptq_quantize(weight, h, plan.quant.wbits, plan.group_size, plan.quant.symmetric).weight


def _initializers(model_dir) -> dict[str, np.ndarray]:
    proto = onnx.load(str(model_dir / "model.onnx"))
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


@pytest.mark.slow
def test_gptq_through_the_api_equals_gptq_from_scratch_and_the_cli_export(tiny_source, tmp_path, capsys):
    loaded = ditq.load_model(str(tiny_source))
    recipe = ditq.build_recipe(ditq.RecipeOptions(wbits=4, abits=8, group_size=16, method="gptq"), loaded).recipe
    assert recipe.method == "gptq"
    options = ditq.CalibrationOptions(num_samples=2, timesteps=2, cache_dir=tmp_path / "cache")
    inputs = ditq.calibrate(loaded, recipe, options)
    qdit = ditq.quantize(loaded.model, recipe, calibration=inputs)

    linears = {n: p for n, p in qdit.plans.items() if p.kind == "linear"}
    assert set(inputs) == set(linears) and len(linears) > 10
    assert {p.abits for p in linears.values()} == {None, 8}  # weight-only and W+A layers both checked
    named = dict(loaded.model.named_modules())
    for name, plan in linears.items():
        want = _codes_from_scratch(named[name].weight, inputs[name], plan)
        got = qdit.weights[name]
        assert torch.equal(got.codes, want.codes) and torch.equal(got.scale, want.scale) and torch.equal(got.zero, want.zero), name
    rtn = ditq.quantize(loaded.model, ditq.build_recipe(ditq.RecipeOptions(wbits=4, abits=8, group_size=16), loaded).recipe)
    assert any(not torch.equal(rtn.weights[n].codes, qdit.weights[n].codes) for n in linears)  # GPTQ is not RTN here
    (cache,) = (tmp_path / "cache").iterdir()  # one file, named by model digest and settings key
    assert cache.name.startswith("calib-") and cache.suffix == ".safetensors"

    # `ditq export` with the same recipe and calibration settings (it reads the cache) stores the same codes
    ditq.export(qdit, tmp_path / "api", source=loaded.source)
    code, out, _ = run(["export", "--model", str(tiny_source), "--wbits", "4", "--abits", "8", "--group-size", "16",
                        "--method", "gptq", "--calib-samples", "2", "--calib-timesteps", "2",
                        "--calib-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "cli")], capsys)  # fmt: skip
    assert code == 0 and out.startswith("wrote ")
    api, cli = _initializers(tmp_path / "api"), _initializers(tmp_path / "cli")
    assert api.keys() == cli.keys()
    assert all(np.array_equal(api[k], cli[k]) for k in api)


def test_export_model_runs_the_whole_export_in_one_call(tiny_source, tmp_path):
    done = ditq.export_model(str(tiny_source), ditq.RecipeOptions(wbits=8, abits=8), tmp_path / "m")
    assert done.recipe.default.group_size == 64  # "auto": 128 does not divide the tiny DiT's width 64
    assert done.result.model_path.is_file() and json.loads((tmp_path / "m" / "recipe.json").read_text())["method"] == "rtn"
    with pytest.raises(DitqError, match="needs calibration inputs"):
        ditq.quantize(ditq.load_model(str(tiny_source)).model, ditq.build_recipe(ditq.RecipeOptions(method="gptq", group_size=16)).recipe)


def test_a_one_generation_search_through_the_api_journals_and_ranks(tmp_path):
    from ditq.workflows import fitness

    options = ditq.SearchOptions(
        abits=4, search=ditq.SearchConfig(population=3, generations=1, top_k=2, crossovers=0, mutations=0),
        fitness=ditq.FitnessConfig(num_samples=8, steps=2), workers=1,
    )  # fmt: skip
    journal = tmp_path / "search.jsonl"
    try:
        found = ditq.search("digits", options, journal)
        again = ditq.search("digits", options, journal)  # resumed: every evaluation from the journal
    finally:
        fitness._W.clear()
    lines = [json.loads(x) for x in journal.read_text().splitlines()]
    assert len(lines) == 1 + 3  # the settings header, then one record per genome
    records = {r["key"]: r for r in lines[1:]}
    fits = [r["fitness"] for r in found.ranking]
    assert [r["key"] for r in found.ranking] == sorted(records, key=lambda k: (records[k]["fitness"], k))
    assert fits == sorted(fits) and found.ranking[0] == found.result.best_record
    assert found.result.evaluated == 3 and again.result.evaluated == 0 and again.result.reused == 3
    assert again.recipe == found.recipe and found.recipe.method == "gptq"
    searched = {r.match: r.values["group_size"] for r in found.recipe.rules if "group_size" in r.values}
    assert len(searched) == 6 * 6  # 6 blocks x (q, k, v, out, fc1, fc2)
    assert found.cost <= found.budget and "group sizes: 0.attn1.qkv=" in found.summary()


@pytest.mark.slow  # samples the digits model with ONNX Runtime: about 15 s
def test_eval_takes_typed_configurations():
    fp = ditq.EvalConfig("fp", None, None, None)
    report = ditq.evaluate("digits", [fp], num_samples=20, steps=3, seeds=[0])
    assert [r.config for r in report.rows] == ["fp"] and math.isfinite(report.rows[0].fid)
    assert 0.0 <= report.rows[0].class_accuracy <= 1.0 and report.settings["steps"] == 3


@pytest.mark.slow  # builds and times two variants in subprocesses: about 7 s
def test_bench_takes_typed_variants(tiny_source, tmp_path):
    from ditq.workflows.bench import Variant

    bench = ditq.bench(str(tiny_source), [Variant("float", "float")], runs=1, work_dir=tmp_path / "b")
    assert [r.variant for r in bench.rows] == ["float"] and bench.rows[0].latency_ms > 0


@pytest.mark.parametrize("call,needle", [
    (lambda: ditq.RecipeOptions(wbits="4"), "wbits"),
    (lambda: ditq.RecipeOptions(group_size=16.0), "group_size"),
    (lambda: ditq.RecipeOptions(method="awq"), "method"),
    (lambda: ditq.CalibrationOptions(num_samples=0), "num_samples: expected an integer in 1..100000, got 0"),
    (lambda: ditq.CalibrationOptions(timesteps=2.5), "timesteps"),
    (lambda: ditq.SearchOptions(workers=0), "workers"),
    (lambda: ditq.SearchOptions(space=()), "space"),
    (lambda: ditq.SearchOptions(search=ditq.SearchConfig(population=0)), "population"),
    (lambda: ditq.SearchOptions(fitness=ditq.FitnessConfig(steps=0)), "fitness steps"),
    (lambda: ditq.SearchOptions(fitness=ditq.FitnessConfig(rmse_weight=math.nan)), "rmse_weight"),
    (lambda: ditq.QATOptions(abits=9), "abits"),
    (lambda: ditq.QATOptions(lr=math.inf), "lr"),
    (lambda: ditq.QATOptions(steps=True), "steps"),
    (lambda: ditq.evaluate(num_samples="20"), "num_samples"),
    (lambda: ditq.evaluate(seeds=[-1]), "seeds"),
    (lambda: ditq.evaluate(configs="w9a8"), "w9a8"),
    (lambda: ditq.bench(runs=0), "runs"),
    (lambda: ditq.bench(variants="w4a8m"), "mixed activation bits"),
    (lambda: ditq.search("digits", {"population": 3}, "j.jsonl"), "SearchOptions"),
    (lambda: ditq.qat("digits", {"abits": 4}, "out"), "QATOptions"),
    # integers too large for a float are not finite numbers (math.isfinite would overflow on them)
    (lambda: ditq.QATOptions(lr=10**400), "lr: expected a finite number in (0, 1]"),
    (lambda: ditq.evaluate(cfg=10**400), "cfg: expected a finite number"),
    (lambda: ditq.SearchOptions(fitness=ditq.FitnessConfig(rmse_weight=10**400)), "fitness rmse_weight"),
    (lambda: ditq.FitnessConfig(cfg=-1.0), "fitness cfg"),
    (lambda: __import__("ditq.pipeline").pipeline.Pipeline(space="pixel", value_range=(0, 10**400)), "value_range"),
    # the configs check their own fields, whoever builds them
    (lambda: ditq.train_digits(config=ditq.TrainConfig(steps=0)), "steps: expected an integer in 1..10000000, got 0"),
    (lambda: ditq.TrainConfig(class_dropout=1.5), "class_dropout"),
    (lambda: ditq.SearchConfig(mutation_prob=2), "search mutation_prob: expected a finite number in [0, 1], got 2"),
    (lambda: ditq.SearchConfig(crossover_prob=math.nan), "search crossover_prob"),
    # eval and bench: the workflow's checks, the same bounds as the CLI's
    (lambda: ditq.evaluate(num_samples=1), "num_samples: expected an integer in 2..100000, got 1"),
    (lambda: ditq.bench(threads=0), "threads"),
    # a model spec or path: str or os.PathLike, else named
    (lambda: ditq.load_model(5), "spec: expected a model name or a path"),
    (lambda: ditq.evaluate(model=b"digits"), "model: expected a model name or a path"),
    (lambda: ditq.export_model(None, ditq.RecipeOptions(), "out"), "model: expected a model name or a path"),
    (lambda: ditq.qat("digits", ditq.QATOptions(), 7), "out: expected a model name or a path"),
])  # fmt: skip
def test_bad_typed_arguments_are_one_line_errors(call, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DitqError) as e:
        call()
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_importing_the_api_imports_no_torch():
    code = ("import sys\nsys.modules['torch'] = sys.modules['diffusers'] = None\n"
            "import ditq, ditq.cli\nassert callable(ditq.quantize) and callable(ditq.sample)\n")  # fmt: skip
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.slow  # loads and exports the digits model twice: about 13 s
def test_a_path_names_a_model_as_a_string_does(tiny_source, tmp_path):
    from pathlib import Path

    by_path, by_text = ditq.load_model(Path(tiny_source)), ditq.load_model(str(tiny_source))
    assert by_path.source == by_text.source
    done = ditq.export_model(Path(tiny_source), ditq.RecipeOptions(wbits=8, abits=8, group_size=16), tmp_path / "m")
    assert done.result.model_path.is_file()
    assert ditq.build_recipe(ditq.RecipeOptions(group_size=16), Path(tiny_source)).recipe.default.group_size == 16


@pytest.mark.parametrize("opset,shown", [("21", "'21'"), (21.5, "21.5"), (True, "True")])
def test_an_opset_that_is_not_an_integer_is_one_line_before_anything_is_written(tiny_source, tmp_path, opset, shown):
    with pytest.raises(DitqError) as e:
        ditq.export_model(str(tiny_source), ditq.RecipeOptions(wbits=8, abits=8, group_size=16), tmp_path / "m", opset=opset)
    assert str(e.value) == f"opset: expected an integer in 0..10000, got {shown}"
    assert not (tmp_path / "m").exists()


@pytest.fixture(scope="module")
def tiny_export(tiny_source, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "m"
    ditq.export_model(str(tiny_source), ditq.RecipeOptions(wbits=8, abits=8, group_size=16), out)
    return out


@pytest.mark.parametrize("classes,needle", [(["a"], "classes: expected an integer"), ([2.7], "got 2.7"), (3, "classes: expected class ids")])
def test_sample_refuses_class_ids_that_are_not_integers(tiny_export, tmp_path, classes, needle):
    with pytest.raises(DitqError) as e:
        ditq.sample(tiny_export, tmp_path / "g.npy", classes=classes, per_class=1, steps=1)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_sample_takes_integer_class_ids_and_a_path(tiny_export, tmp_path):
    done = ditq.sample(tiny_export, tmp_path / "g.npy", classes=[np.int64(1), 0], per_class=1, steps=1)
    assert done.classes == [1, 0] and np.load(tmp_path / "g.npy").shape[0] == 2
