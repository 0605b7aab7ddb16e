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

import json
from pathlib import Path

from ditq.exporter.export import META_RECIPE, RECIPE_FILE
from ditq.manifest import MANIFEST_FILE, ManifestError, read_manifest, verify_files

MANIFEST_CHECK = "manifest.json: every listed file's size and SHA-256"
RECIPE_CHECK = "recipe.json equals the recipe the model carries"
MAX_RECIPE_BYTES = 16 << 20


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
    needed = [model_file.name] + [p.name for p in (folder / (model_file.name + ".data"),) if p.exists()]
    problems = [f"{n} is not listed" for n in needed if n not in files]
    try:
        problems += verify_files(folder, manifest)
    except OSError as e:
        problems.append(f"cannot read a listed file ({e.strerror or e})")
    if problems:
        return MANIFEST_CHECK, False, f"{len(problems)} problem(s): " + "; ".join(problems[:3])
    return MANIFEST_CHECK, True, f"{len(files)} files"


def _recipe_check(folder: Path, meta: dict[str, str]) -> tuple[str, bool, str]:
    path = folder / RECIPE_FILE
    if META_RECIPE not in meta:
        return RECIPE_CHECK, False, "the model carries no ditq.recipe metadata"
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            return RECIPE_CHECK, False, f"{RECIPE_FILE} is larger than {MAX_RECIPE_BYTES} bytes"
        on_disk = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return RECIPE_CHECK, False, f"no {RECIPE_FILE}"
    except OSError as e:
        return RECIPE_CHECK, False, f"cannot read {RECIPE_FILE} ({e.strerror or e})"
    except (ValueError, RecursionError):
        return RECIPE_CHECK, False, f"{RECIPE_FILE} is not JSON"
    try:
        carried = json.loads(meta[META_RECIPE])
    except (ValueError, RecursionError):
        return RECIPE_CHECK, False, "the model's ditq.recipe metadata is not JSON"
    if on_disk != carried:
        return RECIPE_CHECK, False, f"{RECIPE_FILE} differs from the recipe in the model's metadata"
    return RECIPE_CHECK, True, ""
