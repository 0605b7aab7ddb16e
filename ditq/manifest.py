"""``manifest.json``: what a folder written by ditq holds, and the rule that says a folder is ditq's.

Every folder ditq writes (``ditq export``, ``ditq qat``, ``ditq train-digits``) ends with a manifest::

    {"tool": "ditq", "version": "...", ..., "files": {"model.onnx": {"bytes": 224226, "sha256": "..."}, ...}}

``files`` lists every file of the folder as written (the manifest itself excepted), by its path in the
folder: a plain name, or plain names joined by ``/`` for a pipeline folder's subfolders (no link is
followed on the way).

**Which existing folder an output may replace** (:func:`folder_status`; enforced by
:func:`ditq.files.check_out_dir` before anything is written):

============  ===========================================================================  ===============
status        the folder                                                                   replaced
============  ===========================================================================  ===============
``empty``     has no entries                                                               yes
``ours``      holds a manifest with ``"tool": "ditq"`` and a ``files`` table; every        yes
              listed file is there as a regular file of the listed size; every other
              entry is a regular file named ``*.json``, ``*.png`` or ``*.npy`` (what
              ``ditq validate --json``, ``ditq sample --out`` and the other ``--json``
              reports write next to a model, e.g. ``make demo``'s ``validation.json``
              and ``grid.png``)
``modified``  holds such a manifest, but a listed file is missing or resized, or another   with ``--force``
              entry is a folder, a link or a file of another kind (``notes.txt``)
``foreign``   anything else: no manifest, an unreadable one, or one not naming ditq        never
============  ===========================================================================  ===============

Sizes, not hashes, decide ``ours``: reading the whole folder is ``ditq validate``'s job
(:func:`verify_files`), and a folder a person edited by hand keeps its manifest's claim of being ditq's.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from ditq.errors import DitqError, shown
from ditq.untrusted import NOT_JSON, JsonError, inside, parse_json, read_regular, regular_size

MANIFEST_FILE = "manifest.json"
RECIPE_FILE = "recipe.json"  # the recipe a folder was made with (an export, a QAT output)
TOOL = "ditq"
REPORT_SUFFIXES = (".json", ".png", ".npy")  # what ditq's reports and samples are written as
MAX_MANIFEST_BYTES = 16 << 20  # a manifest lists a handful of files: a few KB

EMPTY, OURS, MODIFIED, FOREIGN = "empty", "ours", "modified", "foreign"


class ManifestError(ValueError):
    """A manifest that cannot be read as ditq's (the message says why)."""


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def list_files(folder: Path) -> dict[str, dict[str, Any]]:
    """The ``files`` table of ``folder``: every regular file but the manifest, by its path relative to the
    folder (``/``-separated: a pipeline folder's ``transformer/config.json``), with its size and SHA-256.
    Links are not followed."""
    folder = Path(folder)
    out = {}
    for path in sorted(_walk(folder)):
        name = path.relative_to(folder).as_posix()
        if name != MANIFEST_FILE and path.is_file() and not path.is_symlink():
            out[name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return out


def _walk(folder: Path):
    """Every entry under ``folder`` that is not a folder (links and special files included), and every
    empty folder, without following links."""
    for entry in os.scandir(folder):
        if entry.is_dir(follow_symlinks=False):
            inner = Path(entry.path)
            if next(os.scandir(inner), None) is None:
                yield inner
            yield from _walk(inner)
        else:
            yield Path(entry.path)


def tool_version() -> str:
    """The installed ditq's version (``0+unknown`` in a source tree that was never installed)."""
    try:
        return version("ditq")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "0+unknown"


def write_manifest(folder: Path, fields: dict[str, Any]) -> dict[str, Any]:
    """Write ``folder/manifest.json`` with ``"tool": "ditq"``, the :func:`tool_version`, ``fields`` and the
    files table; returns it."""
    manifest = {"tool": TOOL, "version": tool_version(), **fields, "files": list_files(folder)}
    (Path(folder) / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of ``folder``; raises :class:`ManifestError` (missing, unreadable, not JSON, not
    ditq's, or a ``files`` entry that is not a plain file name with a size and a SHA-256)."""
    try:  # a link is not followed: the manifest is the folder's own file
        data = read_regular(Path(folder) / MANIFEST_FILE, MANIFEST_FILE, max_bytes=MAX_MANIFEST_BYTES, follow_links=False)
        obj = parse_json(data, MANIFEST_FILE, max_bytes=MAX_MANIFEST_BYTES)
    except JsonError as e:
        if e.kind == "missing":
            raise ManifestError(f"no {MANIFEST_FILE}") from None
        if e.kind == "not-regular":
            raise ManifestError(f"{MANIFEST_FILE} is not a regular file") from None
        raise ManifestError(f"{MANIFEST_FILE} is not JSON ({e.reason})" if e.kind in NOT_JSON else str(e)) from None
    if not isinstance(obj, dict) or obj.get("tool") != TOOL:
        raise ManifestError(f"{MANIFEST_FILE} does not name {TOOL} as the tool that wrote the folder")
    files = obj.get("files")
    if not isinstance(files, dict):
        raise ManifestError(f"{MANIFEST_FILE} has no files table")
    for name, info in files.items():
        try:  # the name alone, each part a plain name: nothing is opened
            refused = name == MANIFEST_FILE or not isinstance(name, str)
            for part in name.split("/"):
                inside(folder, part, MANIFEST_FILE, plain=True, links_may_leave=True)
        except DitqError:
            refused = True
        if refused:
            raise ManifestError(f"{MANIFEST_FILE} lists {shown(name)}, which is not a file name of the folder")
        if not (
            isinstance(info, dict)
            and type(info.get("bytes")) is int
            and info["bytes"] >= 0
            and isinstance(info.get("sha256"), str)
        ):
            raise ManifestError(f"{MANIFEST_FILE}: the entry of {shown(name)} has no size and SHA-256")
    return obj


def folder_status(folder: Path) -> tuple[str, str]:
    """``(status, reason)`` of an existing folder under the table of the module docstring."""
    folder = Path(folder)
    names = sorted(os.listdir(folder))
    if not names:
        return EMPTY, ""
    try:
        manifest = read_manifest(folder)
    except ManifestError as e:
        return FOREIGN, str(e)
    files = manifest["files"]
    for name, info in files.items():
        size = _listed_size(folder, name)
        if size is None:
            return MODIFIED, f"{name} is missing"
        if size != info["bytes"]:
            return MODIFIED, f"{name} is {size} bytes, its manifest says {info['bytes']}"
    for path in _walk(folder):
        name = path.relative_to(folder).as_posix()
        if name in files or name == MANIFEST_FILE:
            continue
        top_report = "/" not in name and name.lower().endswith(REPORT_SUFFIXES) and regular_size(path) is not None
        if not top_report:
            return MODIFIED, f"it holds {shown(name, quote=False)}, which its manifest does not list"
    return OURS, ""


def _listed_size(folder: Path, name: str) -> int | None:
    """The size of the listed file ``name`` when it is a regular file reached through real folders of
    ``folder`` (no link on the way: a listed path never leads out of the folder); else None."""
    parent = Path(folder)
    for part in name.split("/")[:-1]:
        parent = parent / part
        if parent.is_symlink() or not parent.is_dir():
            return None
    return regular_size(Path(folder) / name)


def verify_files(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """Problems found checking every file ``manifest`` lists against ``folder``: missing, not a regular
    file, another size, another SHA-256. Empty when all match."""
    problems = []
    for name, info in manifest["files"].items():
        path = Path(folder) / name
        size = _listed_size(folder, name)
        if size is None:
            problems.append(f"{name} is missing or not a regular file")
        elif size != info["bytes"]:
            problems.append(f"{name} is {size} bytes, the manifest says {info['bytes']}")
        elif file_sha256(path) != info["sha256"].lower():
            problems.append(f"{name}'s SHA-256 differs from the manifest's")
    return problems
