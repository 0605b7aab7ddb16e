"""``ditq validate`` checks the folder as well as the graph: every file the manifest lists has its size
and SHA-256, and recipe.json is the recipe the model carries. A tampered manifest, file or recipe.json
is a failed check (exit 1, named), never a pass and never a traceback."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

import ditq
from ditq.adapters import adapter_for
from ditq.cli import main
from ditq.models import build_dit
from ditq.recipe import Recipe
from ditq.runtime.integrity import MANIFEST_CHECK, RECIPE_CHECK, folder_checks
from tests.conftest import returns_within, tiny_config

DIT = adapter_for("DiTTransformer2DModel").coverage  # the family of the models here


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "dit"
    build_dit(tiny_config(), seed=0).save_pretrained(folder)
    loaded = ditq.load_model(str(folder))
    out = tmp_path_factory.mktemp("export") / "m"
    ditq.export(ditq.quantize(loaded.model, Recipe.qdit(DIT, 4, 8, 32)), out, source=loaded.source)
    return out


@pytest.fixture
def m(tmp_path, export_dir) -> Path:
    shutil.copytree(export_dir, tmp_path / "m")
    return tmp_path / "m"


@pytest.fixture(scope="module")
def meta(export_dir) -> dict[str, str]:
    """The export's metadata, read once (a tampered model.onnx need not parse)."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(export_dir / "model.onnx"), load_external_data=False).metadata_props}


def manifest(m: Path) -> dict:
    return json.loads((m / "manifest.json").read_text())


def set_manifest(m: Path, obj) -> None:
    (m / "manifest.json").write_text(json.dumps(obj))


def relist(m: Path, name: str) -> None:
    """Update ``name``'s manifest entry to the file's current size and hash: a careful forger."""
    data = (m / name).read_bytes()
    man = manifest(m)
    man["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    set_manifest(m, man)


def results(m: Path, meta: dict[str, str]) -> dict[str, tuple[bool, str]]:
    return {name: (passed, detail) for name, passed, detail in folder_checks(m / "model.onnx", meta)}


def test_an_export_passes_and_its_manifest_matches_hashlib(m, meta):
    for name, info in manifest(m)["files"].items():  # an independent reading of the manifest's claim
        data = (m / name).read_bytes()
        assert info == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert sorted(manifest(m)["files"]) == ["model.onnx", "recipe.json"]
    got = results(m, meta)
    assert got[MANIFEST_CHECK][0] and got[RECIPE_CHECK] == (True, "")


def _edit_hash(m):
    man = manifest(m)
    h = man["files"]["model.onnx"]["sha256"]
    man["files"]["model.onnx"]["sha256"] = ("0" if h[0] != "0" else "1") + h[1:]
    set_manifest(m, man)


def _edit_size(m):
    man = manifest(m)
    man["files"]["recipe.json"]["bytes"] += 1
    set_manifest(m, man)


def _unlist_model(m):
    man = manifest(m)
    del man["files"]["model.onnx"]
    set_manifest(m, man)


def _outside(m):
    secret = m.parent / "secret"
    secret.write_bytes(b"not the model's")
    data = secret.read_bytes()
    man = manifest(m)
    man["files"]["../secret"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    set_manifest(m, man)


def _flip_model_byte(m):
    data = bytearray((m / "model.onnx").read_bytes())
    data[-1] ^= 1
    (m / "model.onnx").write_bytes(bytes(data))


MANIFEST_TAMPERING = {
    "a listed hash edited": (_edit_hash, "SHA-256 differs"),
    "a listed size edited": (_edit_size, "the manifest says"),
    "a model byte flipped": (_flip_model_byte, "SHA-256 differs"),
    "a listed file deleted": (lambda m: (m / "recipe.json").unlink(), "recipe.json is missing"),
    "the model not listed": (_unlist_model, "model.onnx is not listed"),
    "a path outside listed": (_outside, "not a file name"),
    "no manifest": (lambda m: (m / "manifest.json").unlink(), "no manifest.json"),
    "not JSON": (lambda m: (m / "manifest.json").write_bytes(b"\xff{"), "not JSON"),
    "nested 100000 deep": (lambda m: (m / "manifest.json").write_text("[" * 100_000), "not JSON"),
    "a list": (lambda m: set_manifest(m, [1, 2]), "does not name ditq"),
    "another tool": (lambda m: set_manifest(m, {**manifest(m), "tool": "other"}), "does not name ditq"),
    "files not a table": (lambda m: set_manifest(m, {**manifest(m), "files": ["model.onnx"]}), "no files table"),
    "a size that is a string": (
        lambda m: set_manifest(m, {**manifest(m), "files": {"model.onnx": {"bytes": "1", "sha256": "x"}}}), "no size"),
    "a folder for a manifest": (lambda m: [(m / "manifest.json").unlink(), (m / "manifest.json").mkdir()], "not a regular file"),
}  # fmt: skip


@pytest.mark.parametrize("tamper", list(MANIFEST_TAMPERING))
def test_a_tampered_manifest_fails_its_check(m, meta, tamper):
    edit, needle = MANIFEST_TAMPERING[tamper]
    edit(m)
    got = results(m, meta)
    assert got[MANIFEST_CHECK][0] is False and needle in got[MANIFEST_CHECK][1], got[MANIFEST_CHECK]


RECIPE_TAMPERING = {
    "another recipe": (lambda m: (m / "recipe.json").write_text(Recipe.qdit(DIT, 8, 8, 32).to_json()), "differs"),
    "the same recipe reformatted": None,  # equal JSON: passes
    "not JSON": (lambda m: (m / "recipe.json").write_text("{"), "not JSON"),
    "missing": (lambda m: (m / "recipe.json").unlink(), "no recipe.json"),
}


@pytest.mark.parametrize("tamper", list(RECIPE_TAMPERING))
def test_a_wrong_recipe_json_fails_its_check_even_when_relisted(m, meta, tamper):
    if RECIPE_TAMPERING[tamper] is None:
        (m / "recipe.json").write_text(json.dumps(json.loads((m / "recipe.json").read_text())))
        relist(m, "recipe.json")
        assert results(m, meta)[RECIPE_CHECK] == (True, "")
        return
    edit, needle = RECIPE_TAMPERING[tamper]
    edit(m)
    if (m / "recipe.json").exists():
        relist(m, "recipe.json")  # the manifest agrees: only the recipe check can tell
        assert results(m, meta)[MANIFEST_CHECK][0]
    got = results(m, meta)
    assert got[RECIPE_CHECK][0] is False and needle in got[RECIPE_CHECK][1], got[RECIPE_CHECK]


@pytest.mark.parametrize("tamper", ["hash", "recipe"])
def test_validate_fails_with_the_named_check(m, capsys, tamper):
    """End to end: ``ditq validate`` exits 1 and the table names the failed check, and only it."""
    if tamper == "hash":
        _edit_hash(m)
        failing = MANIFEST_CHECK
    else:
        (m / "recipe.json").write_text(Recipe.qdit(DIT, 8, 8, 32).to_json() + "\n")
        relist(m, "recipe.json")
        failing = RECIPE_CHECK
    code = main(["--quiet", "validate", str(m), "--json", str(m.parent / "v.json")])
    out, err = capsys.readouterr()
    assert code == 1 and f"[FAIL] {failing}" in out, out + err
    report = json.loads((m.parent / "v.json").read_text())
    assert [c["name"] for c in report["checks"] if not c["passed"]] == [failing]
    assert all(c["passed"] for c in report["cases"])


# ------------------------------------------------------------------- files that are not what they claim
def test_a_named_pipe_for_recipe_json_fails_its_check_without_blocking(m, meta):
    (m / "recipe.json").unlink()
    os.mkfifo(m / "recipe.json")
    got = {name: (passed, detail) for name, passed, detail in returns_within(10, m / "recipe.json", folder_checks, m / "model.onnx", meta)}
    assert got[RECIPE_CHECK][0] is False and "not a regular file" in got[RECIPE_CHECK][1], got[RECIPE_CHECK]


def test_a_recipe_json_linking_out_of_the_folder_is_not_read(m, meta):
    """The file outside holds exactly the model's recipe: a check that followed the link would pass."""
    outside = m.parent / "elsewhere.json"
    shutil.move(m / "recipe.json", outside)
    (m / "recipe.json").symlink_to(outside)
    got = results(m, meta)
    assert got[RECIPE_CHECK][0] is False and "symbolic link out of" in got[RECIPE_CHECK][1], got[RECIPE_CHECK]


def test_external_data_linking_out_of_the_folder_fails_the_manifest_check_naming_the_link(m, meta):
    (m.parent / "elsewhere.data").write_bytes(b"x")
    (m / "model.onnx.data").symlink_to(m.parent / "elsewhere.data")
    got = results(m, meta)
    assert got[MANIFEST_CHECK][0] is False and "symbolic link out of" in got[MANIFEST_CHECK][1], got[MANIFEST_CHECK]


def test_a_lone_model_file_has_no_folder_checks_and_the_report_names_the_recipe(export_dir, tmp_path, capsys):
    """``ditq validate X.onnx --recipe r.json`` on a model file with no manifest next to it: there is no
    export folder to check (before: the manifest and recipe.json checks failed, so it could never pass),
    and the report says which recipe was validated. A folder stays checked when its manifest is gone."""
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(export_dir / "model.onnx", lone / "x.onnx")
    recipe = tmp_path / "r.json"
    shutil.copy(export_dir / "recipe.json", recipe)
    code = main(["--quiet", "validate", str(lone / "x.onnx"), "--recipe", str(recipe), "--json", str(tmp_path / "v.json")])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert f"recipe validated: {recipe} (--recipe)" in out
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["recipe_file"] == str(recipe)
    assert not {MANIFEST_CHECK, RECIPE_CHECK} & {c["name"] for c in report["checks"]}

    folder = tmp_path / "m"
    shutil.copytree(export_dir, folder)
    (folder / "manifest.json").unlink()
    code = main(["--quiet", "validate", str(folder), "--json", str(tmp_path / "v.json")])
    out, err = capsys.readouterr()
    assert code == 1 and "recipe validated: the one the model carries" in out, out + err
    report = json.loads((tmp_path / "v.json").read_text())
    assert [c["name"] for c in report["checks"] if not c["passed"]] == [MANIFEST_CHECK] and report["recipe_file"] is None
