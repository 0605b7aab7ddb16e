"""The two helpers that cut what a message repeats: ``errors.shown`` (a user's value, in each spelling a
message needs) and ``errors.one_line`` (an exception's text); and that no other module cuts by itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ditq.errors import one_line, shown

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ditq", "runtime", "calib", "graphs", "exporter")


@pytest.mark.parametrize(
    "value,kw,want",
    [
        ("a", {}, "'a'"),
        ("a", {"quote": False}, "a"),
        (Path("/m/dit"), {"quote": False}, "/m/dit"),
        ("a", {"as_json": True}, '"a"'),
        (None, {"as_json": True}, "null"),
        (True, {"as_json": True}, "true"),
        ([0.01, 0.02], {"as_json": True}, "[0.01, 0.02]"),
        ({1}, {"as_json": True}, "{1}"),  # not JSON: repr
        ([1, 2], {"kinds": True}, "a JSON array"),
        ({"a": 1}, {"kinds": True}, "a JSON object"),
        (None, {"kinds": True}, "null"),
        (False, {"kinds": True}, "false"),
        (float("nan"), {"kinds": True}, "NaN"),
        (1.5, {"kinds": True}, "1.5"),
        ("DiT", {"kinds": True}, "'DiT'"),
        (None, {}, "None"),
    ],
)
def test_shown_spells_each_value_as_its_mode_says(value, kw, want):
    assert shown(value, **kw) == want


@pytest.mark.parametrize(
    "kw,head", [({}, repr("x" * 60)), ({"quote": False}, "x" * 60), ({"as_json": True}, '"' + "x" * 60 + '"')]
)
def test_a_long_string_is_cut_to_the_limit_and_counted(kw, head):
    assert shown("x" * 10**6, 60, **kw) == f"{head}... (1000000 characters)"


def test_a_long_path_and_a_long_list_are_cut_and_counted():
    assert shown(Path("/" + "a" * 300), 160, quote=False) == "/" + "a" * 159 + "... (301 characters)"
    text = "[" + ", ".join(["1"] * 1000) + "]"  # 2999 characters as JSON writes it
    assert shown([1] * 1000, 60, as_json=True) == text[:60] + f"... ({len(text)} characters)"


@pytest.mark.parametrize("kw", [{}, {"quote": False}, {"as_json": True}, {"kinds": True}])
def test_an_integer_too_long_to_print_is_named_by_its_digits(kw):
    assert shown(10**5000, **kw) == "<an integer of about 5001 digits>"  # 10**5000 has 5001 digits


def test_a_value_nested_too_deeply_to_print_is_named_by_its_type():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert shown(deep, as_json=True) == "<a list>"


def test_one_line_joins_lines_and_names_an_exception_without_text():
    assert one_line(ValueError("bad\n  value\tthere\r\n")) == "bad value there"
    assert one_line(KeyError()) == "KeyError"
    assert one_line("") == ""


def test_one_line_keeps_the_start_and_the_cause_within_the_limit():
    text = "Failed in " + "/src/onnxruntime/core/x.cc:123 " * 50 + "Failed to allocate memory"
    cut = one_line(RuntimeError(text), 100)
    assert len(cut) <= 100 and cut.startswith("Failed in /src/") and cut.endswith("Failed to allocate memory")
    assert " ... " in cut and one_line(RuntimeError("short"), 100) == "short"


def test_no_module_cuts_an_exception_or_value_by_itself():
    """One definition: ``' '.join(str(e).split())`` and helpers named like it live in ditq/errors.py only."""
    pattern = re.compile(r"split\(\)\)|def (_?show|_shown|_?one_line|echo)\(")
    found = [
        f"{p.relative_to(ROOT)}:{n}"
        for pkg in PACKAGES
        for p in sorted((ROOT / pkg).rglob("*.py"))
        if p != ROOT / "ditq" / "errors.py"
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert found == []
