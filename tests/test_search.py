"""The evolutionary group-size search on synthetic fitness: budget, determinism, journal, resume."""

from __future__ import annotations

import json

import pytest

from ditq.calib.search import Gene, Journal, SearchConfig, evolve, gene_cost, genome_cost, genome_key, parse_budget
from ditq.errors import DitqError
from tests.conftest import digits_search_argv

GENES = [Gene(f"transformer_blocks.{i}.{n}", (f"l{i}{n}",), k, k, tuple(s for s in (32, 64, 128, 192, 288) if k % s == 0))
         for i in range(3) for n, k in (("qkv", 192), ("fc2", 768))]  # fmt: skip
W, A = 4, 8


def _fitness(genome):
    # a known optimum: small groups help the fc2 genes a lot, the qkv genes a little
    return sum((1.0 if "fc2" in ge.name else 0.1) * g / 288 for ge, g in zip(GENES, genome))


def _evaluate(log):
    def evaluate(genomes):
        for g in genomes:
            log.append(g)
            yield g, {"fitness": _fitness(g)}

    return evaluate


def _run(tmp_path, name, cfg, evaluate, budget=None):
    budget = budget if budget is not None else parse_budget("g128", GENES, W, A)
    settings = {"cfg": cfg.__dict__, "budget": budget}
    return evolve(GENES, cfg, budget, lambda g: genome_cost(GENES, g, W, A), evaluate, Journal(tmp_path / name, settings))


def test_choices_and_cost_model():
    assert GENES[0].choices == (32, 64, 192) and GENES[1].choices == (32, 64, 128, 192)
    assert gene_cost(GENES[1], 32, W, A) > gene_cost(GENES[1], 128, W, A) > gene_cost(GENES[1], 192, W, A)
    # integer products plus one fp32 rescale per output, token and group
    assert gene_cost(GENES[0], 64, W, A) == 192 * 192 * 32 + 192 * 3 * 1024
    with pytest.raises(DitqError, match="--budget"):
        parse_budget("gx", GENES, W, A)


def test_search_respects_budget_and_finds_a_better_genome_than_uniform(tmp_path):
    cfg = SearchConfig(population=12, generations=6, top_k=4, crossovers=6, mutations=6, seed=0)
    log = []
    res = _run(tmp_path, "j.jsonl", cfg, _evaluate(log))
    budget = parse_budget("g128", GENES, W, A)
    assert genome_cost(GENES, res.best, W, A) <= budget
    assert len(set(log)) == len(log)  # never evaluates a genome twice
    assert all(genome_cost(GENES, g, W, A) <= budget for g in log)
    assert res.history == sorted(res.history, reverse=True)  # elitism: the best never gets worse
    uniform_192 = tuple(192 for _ in GENES)  # the only uniform size within this budget for every width
    assert _fitness(res.best) < _fitness(uniform_192)


def test_same_seed_same_result_and_journal_lines(tmp_path):
    cfg = SearchConfig(population=8, generations=3, top_k=3, crossovers=4, mutations=4, seed=5)
    a, b = _run(tmp_path, "a.jsonl", cfg, _evaluate([])), _run(tmp_path, "b.jsonl", cfg, _evaluate([]))
    assert a.best == b.best
    la = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert la[0]["journal"] == "ditq-search" and len(la) - 1 == a.evaluated
    assert {r["key"] for r in la[1:]} == {genome_key(tuple(r["genome"])) for r in la[1:]}


def test_resume_after_a_crash_reuses_every_finished_evaluation(tmp_path):
    cfg = SearchConfig(population=10, generations=4, top_k=3, crossovers=5, mutations=5, seed=2)
    full_log = []
    full = _run(tmp_path, "full.jsonl", cfg, _evaluate(full_log))

    class Crash(Exception):
        pass

    first_log = []

    def crashing(genomes):
        for g in genomes:
            if len(first_log) == 17:  # mid-generation 1
                raise Crash
            first_log.append(g)
            yield g, {"fitness": _fitness(g)}

    with pytest.raises(Crash):
        _run(tmp_path, "cut.jsonl", cfg, crashing)
    # a torn last line (crash while writing) is dropped and redone
    with open(tmp_path / "cut.jsonl", "a") as f:
        f.write('{"key": "32,3')
    second_log = []
    resumed = _run(tmp_path, "cut.jsonl", cfg, _evaluate(second_log))
    assert resumed.best == full.best and resumed.best_record["fitness"] == full.best_record["fitness"]
    assert resumed.reused == 17 and not set(first_log) & set(second_log)
    assert first_log + second_log == full_log  # the same evaluations in the same order, none twice


def test_journal_of_other_settings_is_refused(tmp_path):
    cfg = SearchConfig(population=4, generations=1, top_k=2, crossovers=1, mutations=1)
    _run(tmp_path, "j.jsonl", cfg, _evaluate([]))
    with pytest.raises(DitqError, match="other settings"):
        _run(tmp_path, "j.jsonl", SearchConfig(population=5, generations=1, top_k=2), _evaluate([]))


def test_infeasible_budget_is_a_clear_error(tmp_path):
    cfg = SearchConfig(population=4, generations=1, max_tries=50)
    with pytest.raises(DitqError, match="fits the budget"):
        _run(tmp_path, "j.jsonl", cfg, _evaluate([]), budget=1.0)


@pytest.mark.slow  # a real digits search killed and resumed: about 45 s; the synthetic kill tests of test_journal_hostile stay in the fast lane
def test_cli_search_killed_mid_generation_resumes_to_the_same_recipe(tmp_path):
    """`ditq search` on digits (tiny settings), SIGKILLed with its workers after the first child of
    generation 1 is journaled, then rerun: no finished evaluation is redone, and the recipe equals an
    uninterrupted run's."""
    import os
    import signal
    import subprocess
    import time

    def argv(journal, out):
        return digits_search_argv(journal, out, generations=3, mutations=2)

    straight = subprocess.run(argv(tmp_path / "a.jsonl", tmp_path / "a.json"), capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr

    journal = tmp_path / "b.jsonl"
    proc = subprocess.Popen(argv(journal, tmp_path / "b.json"), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if journal.is_file() and len(journal.read_text().splitlines()) >= 1 + 5:  # header + 4 + 1 child
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the search ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "b.json").exists()
    done_before = {json.loads(x)["key"] for x in journal.read_text().splitlines()[1:] if x.endswith("}")}
    assert 5 <= len(done_before) < 12

    resumed = subprocess.run(argv(journal, tmp_path / "b.json"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    keys = [json.loads(x)["key"] for x in journal.read_text().splitlines()[1:]]
    assert len(keys) == len(set(keys))  # every genome evaluated once over both runs
    assert f"{len(done_before)} from the journal" in resumed.stdout
    assert (tmp_path / "b.json").read_text() == (tmp_path / "a.json").read_text()
