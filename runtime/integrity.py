"""The folder checks of ``ditq validate``: the export folder is the one ditq wrote.

Two checks, each a validation check (a failure is exit 1 with its name, like the numeric checks; a
missing, unreadable or malformed manifest is such a failure too, not a bad-input error, because the
model itself is still read and checked):

``manifest.json: every listed file's size and SHA-256``
    the folder holds a ditq manifest (:func:`ditq.manifest.read_manifest`); every file it lists is a
    regular file with the listed size and SHA-256; the model file being validated, and its external
    data file if it has one, are among them.
``recipe.json equals the recipe the model carries``
    ``recipe.json`` parses to the same JSON value as the model's ``ditq.recipe`` metadata (the recipe
    ``validate`` checks the graph against, unless ``--recipe`` names another).
"""

from __future__ import annotations

import os
from pathlib import Path

from ditq.errors import DitqError
from ditq.fileformat import META_RECIPE
from ditq.manifest import MANIFEST_FILE, RECIPE_FILE, ManifestError, read_manifest, verify_files
from ditq.recipe import MAX_RECIPE_BYTES
from ditq.untrusted import NOT_JSON, JsonError, inside, parse_json, read_json

MANIFEST_CHECK = "manifest.json: every listed file's size and SHA-256"
RECIPE_CHECK = "recipe.json equals the recipe the model carries"


def folder_checks(model_file: Path, meta: dict[str, str]) -> list[tuple[str, bool, str]]:
    """``(name, passed, detail)`` of the two checks above, for ``model_file`` and its metadata ``meta``."""
    return [_manifest_check(Path(model_file)), _recipe_check(Path(model_file).parent, meta)]


def _manifest_check(model_file: Path) -> tuple[str, bool, str]:
    folder = model_file.parent
    try:
        manifest = read_manifest(folder)
    except ManifestError as e:
        return MANIFEST_CHECK, False, str(e)
    except OSError as e:
        return MANIFEST_CHECK, False, f"cannot read {MANIFEST_FILE} ({e.strerror or e})"
    files = manifest["files"]
    try:
        data = inside(folder, model_file.name + ".data", "the model's external data", plain=True)
    except DitqError as e:
        return MANIFEST_CHECK, False, str(e)
    needed = [model_file.name] + ([data.name] if os.path.lexists(data) else [])
    problems = [f"{n} is not listed" for n in needed if n not in files]
    try:
        problems += verify_files(folder, manifest)
    except OSError as e:
        problems.append(f"cannot read a listed file ({e.strerror or e})")
    if problems:
        return MANIFEST_CHECK, False, f"{len(problems)} problem(s): " + "; ".join(problems[:3])
    return MANIFEST_CHECK, True, f"{len(files)} files"


def _recipe_check(folder: Path, meta: dict[str, str]) -> tuple[str, bool, str]:
    if META_RECIPE not in meta:
        return RECIPE_CHECK, False, "the model carries no ditq.recipe metadata"
    try:  # inside the folder (no link out of it), a regular file (never a FIFO), bounded
        on_disk = read_json(inside(folder, RECIPE_FILE, RECIPE_FILE, plain=True), RECIPE_FILE, max_bytes=MAX_RECIPE_BYTES)
    except JsonError as e:
        if e.kind == "missing":
            return RECIPE_CHECK, False, f"no {RECIPE_FILE}"
        if e.kind in NOT_JSON:
            return RECIPE_CHECK, False, f"{RECIPE_FILE} is not JSON ({e.reason})"
        return RECIPE_CHECK, False, str(e)  # not a regular file, unreadable, too large, not an object
    except DitqError as e:  # a symbolic link out of the folder
        return RECIPE_CHECK, False, str(e)
    try:
        carried = parse_json(meta[META_RECIPE], META_RECIPE, max_bytes=MAX_RECIPE_BYTES)
    except JsonError as e:
        return RECIPE_CHECK, False, f"the model's {META_RECIPE} metadata is not JSON ({e.reason})"
    if on_disk != carried:
        return RECIPE_CHECK, False, f"{RECIPE_FILE} differs from the recipe in the model's metadata"
    return RECIPE_CHECK, True, ""
