"""Hostile recipes: patterns that would backtrack forever, patterns that cannot compile, megabyte-long
values, and recipe files that are not UTF-8, nest deeply or hold huge integers. Each ends quickly in one
line on stderr and exit 2, with nothing written; valid patterns select what Python's ``re`` and
``fnmatch`` select."""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import re
import subprocess
import sys
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ditq.adapters import adapter_for
from ditq.cli import main
from ditq.errors import DitqError
from ditq.models import build_dit
from ditq.patterns import MAX_MATCH_CHARS, NamePattern
from ditq.recipe import Recipe
from tests.conftest import assert_one_line_refusal, tiny_config

DIT = adapter_for("DiTTransformer2DModel").coverage  # the family of the models here


@lru_cache(maxsize=1)
def dit_names() -> tuple[str, ...]:
    return tuple(n for n, _ in build_dit(tiny_config(), seed=0).named_modules() if n)


def cli(argv: list[str]) -> tuple[int, str]:
    """``ditq argv`` in this process: (exit code, stderr). A traceback propagates and fails the test."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


# ------------------------------------------------------------------------------------- catastrophic patterns
CATASTROPHIC = [
    "re:(.*.*)*X",  # exponential backtracking in Python's re on any name without an X
    "re:(.|.)*Z",
    "re:(\\w+\\w+)*!",
    "re:(a|aa)*(b|bb)*$c",
    "[" * 4000,  # fnmatch's translation rescans the rest of the pattern for each unclosed '['
    "*a" * 2000 + "Z",
    "[a-z]" * 800,
]


def test_catastrophic_patterns_finish_within_a_second():
    """Run in a child process with a time limit: Python's re would never return (the old code hangs).
    The bound is on CPU seconds, which other processes on the machine do not stretch."""
    code = (
        "import json, sys, time\n"
        "from ditq.recipe import Rule\n"
        "names = json.loads(sys.argv[1])\n"
        "out = []\n"
        "for p in json.loads(sys.argv[2]):\n"
        "    t = time.process_time()\n"
        "    r = Rule(p, {'wbits': 8})\n"
        "    hits = sum(r.selects(n) for n in names)\n"
        "    out.append([time.process_time() - t, hits])\n"
        "print(json.dumps(out))\n"
    )
    names = list(dit_names()) + ["transformer_blocks.0.attn1.to_q" * 20, "a" * 200, "x" * 3000]
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(names), json.dumps(CATASTROPHIC)],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("a recipe pattern ran for over 60 s")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no RE2 log lines either
    for p, (seconds, hits) in zip(CATASTROPHIC, json.loads(proc.stdout)):
        assert seconds < 1.0, (p[:40], seconds)
        assert hits == 0, p[:40]


# ---------------------------------------------------------------------------------------- compile failures
@pytest.mark.parametrize(
    "match,why",
    [
        ("re:a{4294967296}", "repeat '{4294967296}'"),  # re: OverflowError; RE2 would read it as text
        ("re:x{1001}", "at most 1000"),
        ("re:x{,3}", "repeat '{,3}'"),  # re: x{0,3}; RE2: the text "x{,3}"
        ("re:[[:digit:]]", "inside a class"),
        ("re:(", "missing )"),
        ("re:" + "(" * 1500, "missing )"),  # re: RecursionError
        ("re:(?=to_q)", "invalid perl operator"),  # look-around: not RE2
        ("re:(a)\\1", "invalid escape"),  # backreference
        ("re:a\\Z", "invalid escape"),
        ("re:\ud800", "not valid Unicode"),
        ("re:" + "x" * (MAX_MATCH_CHARS + 1), f"at most {MAX_MATCH_CHARS} characters"),
    ],
)
def test_a_pattern_that_does_not_compile_is_one_line_naming_the_rule(match, why):
    with pytest.raises(DitqError, match=re.escape(why)) as e:
        Recipe.from_dict({"format": "ditq-recipe", "rules": [{"match": match, "wbits": 8}]})
    msg = str(e.value)
    assert msg.startswith("recipe rule 're:") and "\n" not in msg and len(msg) < 300, msg


def test_deeply_nested_groups_compile_and_match():
    rule = NamePattern("re:" + "(" * 1500 + "to_q" + ")" * 1500)  # re: RecursionError
    assert rule.selects("to_q") and not rule.selects("to_k")


def test_compile_failure_through_the_cli_is_exactly_one_line_on_stderr(tmp_path, capfd):
    """RE2 logs parse errors to the process's stderr itself unless told not to: the fd sees one line."""
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"format": "ditq-recipe", "rules": [{"match": "re:(?=x)", "wbits": 8}]}))
    code = main(["recipe", "--recipe", str(p), "--out", str(tmp_path / "o.json")])
    err = capfd.readouterr().err
    assert_one_line_refusal(code, err)
    assert "invalid perl operator" in err and not (tmp_path / "o.json").exists()


# ----------------------------------------------------------------------------------------- long echoes
@pytest.mark.parametrize(
    "doc",
    [
        {"format": "ditq-recipe", "rules": [{"match": "re:" + "x" * 10_000_000}]},
        {"format": "ditq-recipe", "rules": [{"match": "re:(" + "x" * 4000}]},
        {"format": "ditq-recipe", "rules": [{"match": "a", "wbits": "w" * 1_000_000}]},
        {"format": "ditq-recipe", "rules": [{"match": "a", "w" * 1_000_000: 4}]},
        {"format": "ditq-recipe", "default": {"group_size": list(range(100_000))}},
        {"format": "ditq-recipe", "method": "m" * 1_000_000},
        {"format": "f" * 1_000_000},
        {"format": "ditq-recipe", "k" * 1_000_000: 1},
        {"format": "ditq-recipe", "version": 10**4000},
        {"format": "ditq-recipe", "default": {"wbits": -(10**4000)}},
    ],
)
def test_messages_echo_user_values_cut_to_a_readable_length(doc):
    with pytest.raises(DitqError) as e:
        Recipe.from_dict(doc)
    msg = str(e.value)
    assert len(msg) < 400 and "\n" not in msg, msg[:1000]


# ------------------------------------------------------------------------------------- hostile recipe files
def _digits(n: int) -> bytes:
    return b"9" * n


HOSTILE_FILES = {
    "latin-1": '{"format": "ditq-recipe", "rules": [{"match": "blöcks.*"}]}'.encode("latin-1"),
    "utf-16": '{"format": "ditq-recipe"}'.encode("utf-16"),
    "binary": bytes(range(256)) * 4,
    "nested lists": b"[" * 200_000 + b"]" * 200_000,
    "nested objects": b'{"a": ' * 100_000 + b"1" + b"}" * 100_000,
    "nested rule value": b'{"format": "ditq-recipe", "rules": [{"match": "a", "wbits": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}",
    "huge version": b'{"format": "ditq-recipe", "version": ' + _digits(5000) + b"}",
    "huge wbits": b'{"format": "ditq-recipe", "default": {"wbits": ' + _digits(5000) + b"}}",
    "4000-digit group size": b'{"format": "ditq-recipe", "default": {"group_size": -' + _digits(4000) + b"}}",
    "huge float": b'{"format": "ditq-recipe", "default": {"wbits": 1e999}}',
    "NaN": b'{"format": "ditq-recipe", "default": {"abits": NaN}}',
    "lone surrogate": b'{"format": "ditq-recipe", "rules": [{"match": "re:\\ud800", "wbits": 8}]}',
    "empty": b"",
    "json list": b"[]",
    "json null": b"null",
}


@pytest.mark.parametrize("name", list(HOSTILE_FILES))
def test_hostile_recipe_file_is_one_line_and_exit_2_with_nothing_written(tmp_path, name):
    p = tmp_path / "recipe.json"
    p.write_bytes(HOSTILE_FILES[name])
    out = tmp_path / "out.json"
    assert_one_line_refusal(*cli(["recipe", "--recipe", str(p), "--out", str(out)]))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["recipe.json"]


@pytest.mark.parametrize("name", ["latin-1", "nested lists", "huge version"])
def test_export_with_a_hostile_recipe_file_is_one_line_and_exit_2(tmp_path, name):
    p = tmp_path / "recipe.json"
    p.write_bytes(HOSTILE_FILES[name])
    assert_one_line_refusal(*cli(["export", "--model", "digits", "--recipe", str(p), "--out", str(tmp_path / "m")]))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["recipe.json"]


# ------------------------------------------------------------------------------------ properties (hypothesis)
MATCHES = ["*", "transformer_blocks.*", "re:.*", "re:(.*.*)*X", "re:(", "re:a{,2}", "[", "re:\ud800", "x" * 5000]
scalars = (st.none() | st.booleans() | st.integers() | st.integers(-3, 300) | st.floats() | st.just(1.58)
           | st.text(max_size=12) | st.sampled_from(MATCHES))  # fmt: skip
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=12)
layer_keys = st.sampled_from(["wbits", "abits", "group_size", "symmetric", "rotate", "bits"])
layer = st.dictionaries(layer_keys, json_values, max_size=4)
rule = st.one_of(json_values, st.dictionaries(layer_keys | st.just("match"), json_values, max_size=4),
                 st.builds(lambda m, d: {"match": m, **d}, st.sampled_from(MATCHES) | st.text(max_size=8), layer))  # fmt: skip
recipe_docs = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"format": st.just("ditq-recipe") | json_values},
        optional={"version": st.just(1) | json_values, "method": st.sampled_from(["rtn", "gptq"]) | json_values,
                  "default": layer | json_values, "rules": st.lists(rule, max_size=4) | json_values,
                  "extra": json_values},
    ),  # fmt: skip
)


def _cli_on_file(data: bytes) -> None:
    """The property: exit 0 with a recipe that reads back the same, or one line, exit 2, nothing written."""
    with tempfile.TemporaryDirectory() as d:
        p, out = Path(d) / "r.json", Path(d) / "o.json"
        p.write_bytes(data)
        code, err = cli(["recipe", "--recipe", str(p), "--out", str(out)])
        if code == 0:
            assert Recipe.load(out) == Recipe.load(p)
        else:
            assert_one_line_refusal(code, err)
            assert not out.exists()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipe_docs)
def test_any_json_recipe_is_accepted_or_one_line_exit_2(doc):
    _cli_on_file(json.dumps(doc).encode())


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 200))
def test_any_bytes_spliced_into_a_recipe_are_accepted_or_one_line_exit_2(noise, at):
    text = Recipe.qdit(DIT, 4, 8, 64).to_json().encode()
    _cli_on_file(text[:at] + noise + text[at:])


# ------------------------------------------------------------------- semantics: as Python's re and fnmatch
OWN_PATTERNS = [  # the shapes ditq's own recipes, README and tests use, and ones a user would write
    "blocks\\.[01]\\.fc", "transformer_blocks\\.[0-9]+\\.attn1\\.to_[qkv]", "(?i)TRANSFORMER_blocks\\..*",
    ".*\\.ff\\.net\\.(0\\.proj|2)", "transformer_blocks\\.\\d+\\..*", "proj_out_[12]", ".*emb.*", "^proj_out_2$",
    "transformer_blocks\\.1\\..*norm1.*", "(transformer_blocks\\.(0|1)\\.)?attn1?\\..*", "pos_embed", ".*_[a-z]{1,2}",
    "transformer_blocks\\.[^0]\\..*", "[a-z_]+(\\.[a-z_0-9]+){2,3}", ".*(to_out|proj_out).*", "transformer_blocks\\..{1,3}attn1.*",
]  # fmt: skip


@pytest.mark.parametrize("pattern", OWN_PATTERNS)
def test_re2_selects_the_modules_python_re_selects(pattern):
    names = dit_names() + ("blocks.1.fc", "blocks.2.fc")
    got = {n for n in names if NamePattern("re:" + pattern).selects(n)}
    assert got == {n for n in names if re.fullmatch(pattern, n)}


atoms = st.sampled_from(["a", "t", "o", "_", "\\.", ".", "[0-9]", "[a-z]", "[^.]", "\\d", "\\w", "[qkv]", "(?:to_)", "0", "1"])
quantifiers = st.sampled_from(["", "", "*", "+", "?", "{1,2}", "{2}", "*?", "+?"])
pieces = st.builds(lambda a, q: a + q, atoms, quantifiers)
branches = st.lists(pieces, min_size=1, max_size=6).map("".join)
groups = st.builds(lambda bs, q: "(" + "|".join(bs) + ")" + q, st.lists(branches, min_size=1, max_size=3), st.sampled_from(["", "?"]))
regexes = st.lists(pieces | groups, min_size=1, max_size=6).map("".join)  # no nested repeats: re stays fast


@settings(max_examples=300, deadline=None)
@given(regexes, st.lists(st.sampled_from(["transformer_blocks", "0", "1", "attn1", "to_q", "to_out", "ff", "t_o"]), min_size=1, max_size=4))
def test_re2_and_python_re_agree_on_generated_patterns(pattern, parts):
    name = ".".join(parts)
    assert NamePattern("re:" + pattern).selects(name) == (re.fullmatch(pattern, name) is not None), (pattern, name)


glob_alphabet = "ab[]!-^*?\\"


@settings(max_examples=1000, deadline=None)
@given(st.text(glob_alphabet, max_size=16), st.text("ab[]!-^\\", max_size=10))
def test_globs_select_what_fnmatch_selects(glob, name):
    assert NamePattern(glob).selects(name) == fnmatch.fnmatchcase(name, glob), (glob, name)


re_tokens = st.sampled_from(
    list("aAb()[]{}|*+?.,019^$-:=!<>_")
    + ["\\d", "\\w", "\\s", "\\b", "\\.", "(?i)", "(?:", "(?P<n>", "\\A", "\\z", "\\Z", "[^", "{1,2}", "{2}", "{,2}",
       "{1,}", "\\", "\\x41", "(?s)", "(?m)", "\\0", "\\1", "\\W", "\\D"]
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.lists(re_tokens, max_size=10).map("".join), st.text("aAb_.019-", min_size=1, max_size=8))
def test_any_pattern_python_re_compiles_is_refused_or_read_the_same_by_re2(pattern, name):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # re's FutureWarning on "[[" ("possible nested set")
            python = re.compile(pattern)
    except (re.error, OverflowError, RecursionError):
        return
    try:
        ours = NamePattern("re:" + pattern)
    except DitqError:
        return
    assert ours.selects(name) == (python.fullmatch(name) is not None), (pattern, name)
