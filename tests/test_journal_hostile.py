"""Hostile and damaged search journals: malformed lines are one error naming the journal and the line,
with the file untouched; a last line cut short (a kill, a full disk) is repaired on resume, however
often; NaN fitness never enters the journal nor wins; a search SIGKILLed at random points resumes to the
uninterrupted result with every evaluation journaled once."""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ditq.workflows import fitness
from ditq.calib.journal import Journal, evaluation_record, genome_key
from ditq.calib.search import SearchConfig, evolve, genome_cost, parse_budget
from ditq.cli import main
from ditq.errors import DitqError
from tests.conftest import assert_one_line_refusal, digits_search_argv
from tests.test_search import GENES, A, W, _fitness

SETTINGS = {"search": {"population": 4, "seed": 0}, "budget": 1.5}


def strict_lines(path: Path) -> list[dict]:
    """Every line of a journal as strict JSON (no NaN/Infinity), each ended by a line end."""
    data = path.read_bytes()
    assert data.endswith(b"\n")

    def refuse(name):
        raise AssertionError(f"{name} in the journal")

    return [json.loads(x, parse_constant=refuse) for x in data.decode().split("\n")[:-1]]


def header(tmp_path: Path) -> bytes:
    """The header line a journal of SETTINGS starts with, written by Journal itself."""
    p = tmp_path / "header.jsonl"
    Journal(p, SETTINGS)
    data = p.read_bytes()
    p.unlink()
    return data


def line(genome, fitness=1.0, **extra) -> bytes:
    rec = {"key": genome_key(tuple(genome)), "genome": list(genome), "fitness": fitness, **extra}
    return (json.dumps(rec, sort_keys=True) + "\n").encode()


# --------------------------------------------------------------------------------------- malformed journals
DEEP = b"[" * 100_000 + b"]" * 100_000
MALFORMED = {  # name -> (content after the header, or the whole file when the header is the problem; line; reason)
    "record is a list": (line([32]) + b"[1, 2]\n", 3, "is not a JSON object"),
    "record is a string": (b'"x"\n' + line([32]), 2, "is not a JSON object"),
    "record is null": (b"null\n", 2, "is not a JSON object"),
    "binary bytes": (b"\xff\xfe\x00\x01\x80\n" + line([32]), 2, "is not UTF-8"),
    "NUL bytes": (line([32]) + b"\x00" * 64 + b"\n" + line([64]), 3, "corrupt"),
    "deep nesting": (DEEP + b"\n", 2, "nested too deeply"),
    "deep nesting in a record": (b'{"fitness": 1, "genome": [32], "key": "32", "x": ' + DEEP + b"}\n", 2, "nested too deeply"),
    "missing fitness": (b'{"genome": [32], "key": "32"}\n' + line([64]), 2, "has no 'fitness'"),
    "NaN fitness": (line([32], float("nan")), 2, "holds NaN"),
    "Infinity fitness": (line([32], float("-inf")) + line([64]), 2, "holds -Infinity"),
    "1e999 fitness": (b'{"fitness": 1e999, "genome": [32], "key": "32"}\n', 2, "no finite number 'fitness'"),
    "5000-digit fitness": (b'{"fitness": ' + b"9" * 5000 + b', "genome": [32], "key": "32"}\n', 2, "integer too long"),
    "string fitness": (line([32], "1.0"), 2, "no finite number 'fitness'"),
    "boolean fitness": (line([32], True), 2, "no finite number 'fitness'"),
    "null fitness, not failed": (line([32], None), 2, "no finite number 'fitness'"),
    "failed without a reason": (line([32], None, failed=True), 2, "failed without a reason"),
    "key of another genome": (b'{"fitness": 1, "genome": [32], "key": "64"}\n', 2, "not its genome's"),
    "genome of strings": (b'{"fitness": 1, "genome": ["32"], "key": "32"}\n', 2, "no 'genome' list"),
    "no key": (b'{"fitness": 1, "genome": [32]}\n', 2, "no string 'key'"),
    "corrupt middle line": (b'{"key": "32,3\n' + line([64]), 2, "corrupt"),
    "blank middle line": (b"\n" + line([64]), 2, "corrupt"),
}
BAD_HEADERS = {  # whole files
    "header is a list": b"[1]\n" + line([32]),
    "header is null": b"null\n" + line([32]),
    "header is a number": b"42\n" + line([32]),
    "header is a string": b'"ditq-search"\n' + line([32]),
    "header of another tool": b'{"journal": "other"}\n' + line([32]),
    "header in binary": b"\x89PNG\r\n\x1a\n\x00\x00" + line([32]),
    "header nested deeply": b'{"journal": ' + DEEP + b"}\n",
    "a user's notes without a line end": b"my notes on the search",
    "a user's JSON without a line end": b'{"journal": "mine"}',
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_record_is_one_error_naming_the_journal_and_line(tmp_path, name):
    body, n, reason = MALFORMED[name]
    p = tmp_path / "j.jsonl"
    p.write_bytes(header(tmp_path) + body)
    before = p.read_bytes()
    with pytest.raises(DitqError) as e:
        Journal(p, SETTINGS)
    msg = str(e.value)
    assert msg.startswith(f"{p}: journal line {n} ") and reason in msg and "\n" not in msg and len(msg) < 300, msg
    assert p.read_bytes() == before


@pytest.mark.parametrize("name", list(BAD_HEADERS))
def test_a_file_without_a_journal_header_is_refused_untouched(tmp_path, name):
    p = tmp_path / "j.jsonl"
    p.write_bytes(BAD_HEADERS[name])
    before = p.read_bytes()
    with pytest.raises(DitqError, match="journal") as e:
        Journal(p, SETTINGS)
    assert str(e.value).startswith(f"{p}: ") and "\n" not in str(e.value)
    assert p.read_bytes() == before


def test_records_lacking_a_metric_the_search_reports_are_refused(tmp_path):
    p = tmp_path / "j.jsonl"
    p.write_bytes(header(tmp_path) + line([32], 1.0, fid=3.0) + line([64], 1.0, fid=None))
    with pytest.raises(DitqError, match=r"journal line 3 has no finite number 'fid'"):
        Journal(p, SETTINGS, metrics=("fid",))


def test_search_with_a_non_object_header_journal_is_one_line_and_exit_2(tmp_path, capfd):
    p = tmp_path / "j.jsonl"
    p.write_bytes(b'["not", "a", "header"]\n' + line([32]))
    before = p.read_bytes()
    code = main(["--quiet", "search", "--model", "digits", "--abits", "4", "--population", "2", "--generations", "1",
                 "--journal", str(p), "--out", str(tmp_path / "best.json")])  # fmt: skip
    err = capfd.readouterr().err
    assert_one_line_refusal(code, err)
    assert p.read_bytes() == before and not (tmp_path / "best.json").exists()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120), st.integers(0, 400))
def test_any_bytes_spliced_into_a_journal_open_or_fail_in_one_line(tmp_path_factory, noise, at):
    d = tmp_path_factory.mktemp("j")
    p = d / "j.jsonl"
    good = header(d) + line([32], 1.0) + line([64], 2.0)
    p.write_bytes(good[:at] + noise + good[at:])
    before = p.read_bytes()
    try:
        j = Journal(p, SETTINGS)
    except DitqError as e:
        assert str(e).startswith(f"{p}: ") and "\n" not in str(e)
        assert p.read_bytes() == before  # refused: nothing written
        return
    for rec in j.records.values():  # whatever was taken is a valid record, and the file reads strictly
        assert rec["key"] == genome_key(tuple(rec["genome"])) and math.isfinite(rec["fitness"])
    assert len(strict_lines(p)) == 1 + len(j.records)


RECORD_KEYS = ["key", "genome", "fitness", "failed", "x"]


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(RECORD_KEYS), c, max_size=4),
                    max_leaves=10))  # fmt: skip
def test_any_json_line_is_a_record_or_one_error(tmp_path_factory, value):
    d = tmp_path_factory.mktemp("j")
    p = d / "j.jsonl"
    p.write_bytes(header(d) + json.dumps(value).encode() + b"\n")
    before = p.read_bytes()
    try:
        j = Journal(p, SETTINGS)
    except DitqError as e:
        assert str(e).startswith(f"{p}: journal line 2 ") and "\n" not in str(e)
        assert p.read_bytes() == before
        return
    (rec,) = j.records.values()
    assert rec is not None and (rec.get("failed") or math.isfinite(rec["fitness"]))


# ------------------------------------------------------------------------------------------ torn last lines
def test_a_record_without_its_line_end_is_kept_and_resumes_twice(tmp_path):
    """The record was complete: it is kept, its line ended; the next appends start on new lines, so the
    resume after that (and the one after) reads every record."""
    p = tmp_path / "j.jsonl"
    p.write_bytes(header(tmp_path) + line([32], 1.0) + line([64], 2.0)[:-1])
    j1 = Journal(p, SETTINGS)
    assert set(j1.records) == {"32", "64"} and len(j1.notes) == 1 and "line 3" in j1.notes[0]
    j1.add(json.loads(line([128], 3.0)))
    j2 = Journal(p, SETTINGS)
    assert set(j2.records) == {"32", "64", "128"} and not j2.notes
    j2.add(json.loads(line([192], 4.0)))
    j3 = Journal(p, SETTINGS)
    assert set(j3.records) == {"32", "64", "128", "192"}
    assert [r.get("key") for r in strict_lines(p)[1:]] == ["32", "64", "128", "192"]


def test_every_cut_of_a_journal_opens_to_the_records_before_it(tmp_path):
    """Cut a journal after every byte (a write cut short anywhere): opening keeps exactly the records
    whose text is complete, leaves the file ending with a line end, and the next append reads back."""
    full = header(tmp_path) + b"".join(line([g], float(i)) for i, g in enumerate((32, 64, 128, 192)))
    ends = [i + 1 for i, b in enumerate(full) if b == ord("\n")]  # header end, then each record's
    p = tmp_path / "j.jsonl"
    for k in range(len(full) + 1):
        p.write_bytes(full[:k])
        j = Journal(p, SETTINGS)
        complete = [e for e in ends[1:] if e - 1 <= k]  # a record is complete once its closing brace is in
        assert len(j.records) == len(complete), k
        assert p.read_bytes() == (full[: complete[-1]] if complete else full[: ends[0]]), k
        if k % 7 == 0:
            j.add(json.loads(line([288], 9.0)))
            assert set(Journal(p, SETTINGS).records) == set(j.records)


def test_a_cut_header_is_started_again_but_a_foreign_file_is_not(tmp_path):
    p = tmp_path / "j.jsonl"
    h = header(tmp_path)
    p.write_bytes(h[:25])
    j = Journal(p, SETTINGS)
    assert p.read_bytes() == h and not j.records and "header" in j.notes[0]


# ------------------------------------------------------------------------------------------------ NaN fitness
BUDGET = parse_budget("g128", GENES, W, A)
SMALL = SearchConfig(population=10, generations=4, top_k=3, crossovers=5, mutations=5, seed=2)


def _poisoned(genome) -> float:
    """The synthetic fitness, but NaN or inf for a quarter of the genomes each, the unpoisoned best among them."""
    if genome[1] == 128:
        return float("nan")
    if genome[3] == 128:
        return float("inf")
    return _fitness(genome)


def _run(path, evaluate, cfg=SMALL):
    return evolve(GENES, cfg, BUDGET, lambda g: genome_cost(GENES, g, W, A), evaluate, Journal(path, SETTINGS))


def _evaluate(log, fn=_poisoned, delay=0.0):
    def evaluate(genomes):
        for g in genomes:
            log.append(g)
            if delay:
                time.sleep(delay)
            yield g, {"fitness": fn(g)}

    return evaluate


def test_nan_fitness_is_journaled_as_failed_and_never_best(tmp_path):
    log = []
    res = _run(tmp_path / "j.jsonl", _evaluate(log))
    poisoned = [g for g in log if not math.isfinite(_poisoned(g))]
    assert poisoned, "the search never met a NaN fitness: the test proves nothing"
    recs = {r["key"]: r for r in strict_lines(tmp_path / "j.jsonl")[1:]}  # no NaN or Infinity token in the file
    for g in poisoned:
        assert recs[genome_key(g)]["fitness"] is None and recs[genome_key(g)]["failed"].startswith("fitness is ")
    assert math.isfinite(_poisoned(res.best))
    assert min(_fitness(g) for g in poisoned) < res.best_record["fitness"]  # poisoned genomes were contenders
    assert res.best_record["fitness"] == min(_poisoned(g) for g in log if math.isfinite(_poisoned(g)))
    again = []
    res2 = _run(tmp_path / "j.jsonl", _evaluate(again))
    assert again == [] and res2.best == res.best  # failed evaluations are reused, not redone


def test_a_search_where_every_fitness_is_nan_is_an_error(tmp_path):
    with pytest.raises(DitqError, match="every genome evaluated failed"):
        cfg = SearchConfig(population=4, generations=2, top_k=2, crossovers=1, mutations=1)
        _run(tmp_path / "j.jsonl", _evaluate([], fn=lambda g: float("nan")), cfg)


def test_the_journal_refuses_a_nan_record(tmp_path):
    p = tmp_path / "j.jsonl"
    j = Journal(p, SETTINGS)
    before = p.read_bytes()
    with pytest.raises(DitqError, match="no finite number 'fitness'"):
        j.add({"key": "32", "genome": [32], "fitness": float("nan")})
    assert p.read_bytes() == before and not j.records
    rec = evaluation_record((32,), 1.0, 0, {"fitness": float("nan"), "fid": float("inf"), "rmse": 0.5})
    assert rec["fitness"] is None and rec["fid"] is None and rec["rmse"] == 0.5 and rec["failed"] == "fitness is nan"


@pytest.mark.parametrize("text", ["nan", "inf", "1e999", "gnan", "ginf", "g-64", "0", "-5"])
def test_a_budget_that_is_not_a_positive_finite_number_is_refused(text):
    """A NaN budget would make every genome infeasible and reach the journal's header as NaN."""
    with pytest.raises(DitqError, match="--budget: .* positive and finite"):
        parse_budget(text, GENES, W, A)


def test_fitness_of_diverged_samples_is_nan_without_judging_them(monkeypatch):
    monkeypatch.setitem(fitness._W, "cfg", fitness.FitnessConfig())  # no judge loaded: it must not be called
    x = np.zeros((4, 1, 8, 8), np.float32)
    x[2, 0, 3, 3] = np.nan
    m = fitness.metrics_of(x)
    assert set(m) == {"fid", "rmse", "class_accuracy", "fitness"} and all(math.isnan(v) for v in m.values())


# ------------------------------------------------------------------------------- SIGKILL at random points
def _child_search(path: str, delay: float) -> None:
    _run(Path(path), _evaluate([], delay=delay))


def test_search_killed_at_random_points_resumes_to_the_uninterrupted_result(tmp_path):
    """A forked search (synthetic fitness, NaN for some genomes) is SIGKILLed at random instants, its
    journal sometimes cut inside the last line too (a write cut short), several times over; then it runs to
    the end. It ends at the uninterrupted best, with the uninterrupted run's evaluations, each journaled
    once."""
    log, delay = [], 0.004
    t0 = time.perf_counter()
    straight = _run(tmp_path / "straight.jsonl", _evaluate(log, delay=delay))
    seconds = time.perf_counter() - t0
    expected = {genome_key(g) for g in log}
    rng = random.Random(1234)
    ctx = mp.get_context("fork")
    cut_midway = 0
    for trial in range(6):
        path = tmp_path / f"cut{trial}.jsonl"
        for _ in range(rng.randint(1, 3)):  # kills before it may finish
            proc = ctx.Process(target=_child_search, args=(str(path), delay))
            proc.start()
            time.sleep(rng.uniform(0.0, 1.2 * seconds))
            os.kill(proc.pid, signal.SIGKILL)
            proc.join()
            cut_midway += path.is_file() and 2 < len(path.read_bytes().splitlines()) < 1 + len(log)
            if path.is_file() and rng.random() < 0.5:
                data = path.read_bytes()
                start = data.rstrip(b"\n").rfind(b"\n") + 1  # the last line
                path.write_bytes(data[: rng.randint(start, len(data))])
        resumed_log = []
        res = _run(path, _evaluate(resumed_log))
        assert res.best == straight.best and res.best_record["fitness"] == straight.best_record["fitness"]
        keys = [r["key"] for r in strict_lines(path)[1:]]
        assert len(keys) == len(set(keys)) and set(keys) == expected, trial
    assert cut_midway, "no kill landed mid-search: the test proves nothing"


@pytest.mark.slow
def test_cli_search_killed_at_random_points_resumes_to_the_same_recipe(tmp_path):
    """`ditq search` on digits (tiny settings) SIGKILLed with its workers at a random point, its journal
    then cut inside the last line, and killed again, then rerun: the recipe equals an uninterrupted run's
    and the journal holds each evaluation once."""

    def argv(journal, out):
        return digits_search_argv(journal, out, generations=2, mutations=1)

    straight = subprocess.run(argv(tmp_path / "a.jsonl", tmp_path / "a.json"), capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    total = len(strict_lines(tmp_path / "a.jsonl")) - 1
    rng = random.Random(7)
    journal = tmp_path / "b.jsonl"
    for _ in range(2):
        proc = subprocess.Popen(argv(journal, tmp_path / "b.json"), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        kill_after = rng.randint(0, total - 1)  # records journaled before the kill (0: during start-up)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            n = len(journal.read_bytes().splitlines()) if journal.is_file() else 0
            if n >= 1 + kill_after:
                break
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not (tmp_path / "b.json").exists()
        if journal.is_file():
            data = journal.read_bytes()
            start = data.rstrip(b"\n").rfind(b"\n") + 1
            journal.write_bytes(data[: rng.randint(start, len(data))])
    resumed = subprocess.run(argv(journal, tmp_path / "b.json"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    keys = [r["key"] for r in strict_lines(journal)[1:]]
    assert len(keys) == len(set(keys)) == total
    assert (tmp_path / "b.json").read_text() == (tmp_path / "a.json").read_text()
