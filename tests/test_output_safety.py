"""``--out`` never destroys what the user owns: only an empty folder or an earlier ditq output is replaced
(the rule of ``ditq/manifest.py``), never the input model or the current folder, and ``--force`` widens
that only to ditq outputs that changed. Bad output paths and a full disk are one line, exit 2, with the
previous output unchanged and nothing left behind."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ditq
from ditq.adapters import adapter_for
from ditq.errors import DitqError
from ditq.files import check_out_dir
from ditq.manifest import write_manifest
from ditq.recipe import Recipe
from tests.conftest import assert_one_line_refusal, returns_within, run

DIT = adapter_for("DiTTransformer2DModel").coverage  # the family of the models here

ROOT = Path(__file__).resolve().parents[1]
EXPORT_ARGS = ["--wbits", "4", "--abits", "8", "--group-size", "32"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes): equality means nothing was touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden(parent: Path) -> list[str]:
    """Staging folders, locks and temporary files ditq would leave next to its outputs."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def old_export(tmp_path_factory, tiny_source) -> Path:
    """A real W4A8 export of the tiny DiT (copied by the tests that replace or tamper with one)."""
    loaded = ditq.load_model(str(tiny_source))
    out = tmp_path_factory.mktemp("old") / "m"
    ditq.export(ditq.quantize(loaded.model, Recipe.qdit(DIT, 4, 8, 32)), out, source=loaded.source)
    return out


def fake_output(folder: Path, **files: bytes) -> Path:
    """A folder as ditq writes it: the files, then a manifest listing them."""
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    write_manifest(folder, {"kind": "test"})
    return folder


# ------------------------------------------------------------------------------- data loss (item 1)
@pytest.mark.parametrize("force", [False, True])
def test_a_folder_ditq_did_not_write_is_refused_and_kept(tmp_path, capsys, tiny_source, force):
    d = tmp_path / "d"
    d.mkdir()
    (d / "notes.txt").write_text("x\n")
    before = snapshot(tmp_path)
    code, _, err = run(["export", "--model", str(tiny_source), *EXPORT_ARGS, "--out", str(d), *(["--force"] if force else [])], capsys)
    assert_one_line_refusal(code, err, "did not write")
    assert snapshot(tmp_path) == before and hidden(tmp_path) == []


@pytest.mark.parametrize("where", ["the model folder", "inside it", "its parent"])
@pytest.mark.parametrize("force", [False, True])
def test_out_at_the_input_model_is_refused_and_the_checkpoint_kept(tmp_path, capsys, tiny_source, where, force):
    """The input here even carries a ditq manifest (as a ``ditq qat`` output does), so only the
    input-model rule stands between it and the export, with or without --force."""
    model = tmp_path / "models" / "dit"
    shutil.copytree(tiny_source, model)
    write_manifest(model, {"kind": "qat"})
    out = {"the model folder": model, "inside it": model / "onnx", "its parent": model.parent}[where]
    before = snapshot(tmp_path)
    code, _, err = run(["export", "--model", str(model), *EXPORT_ARGS, "--out", str(out), *(["--force"] if force else [])], capsys)
    assert_one_line_refusal(code, err, "input model")
    assert snapshot(tmp_path) == before
    assert hidden(tmp_path) == hidden(tmp_path / "models") == hidden(model) == []


@pytest.mark.parametrize("out", [".", "..", "./"])
@pytest.mark.parametrize("cwd_empty", [True, False])
def test_out_dot_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch, tiny_source, out, cwd_empty):
    """Even an empty current folder, which the ownership rule alone would let ditq replace."""
    work = tmp_path / "parent" / "work"
    work.mkdir(parents=True)
    if not cwd_empty:
        (work / "notes.txt").write_text("x\n")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    code, _, err = run(["export", "--model", str(tiny_source), *EXPORT_ARGS, "--out", out], capsys)
    assert_one_line_refusal(code, err, "current folder")
    assert snapshot(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["parent"]
    assert sorted(os.listdir(tmp_path / "parent")) == ["work"] and hidden(work) == []


def test_a_previous_export_is_replaced_with_its_reports(tmp_path, old_export, tiny_source):
    """An export over an earlier one, which ``ditq validate --json`` and ``ditq sample --out`` wrote
    into (as ``make demo`` does), replaces it; parents that do not exist yet are made."""
    out = tmp_path / "new" / "sub" / "m"
    shutil.copytree(old_export, out)
    (out / "validation.json").write_text('{"passed": true}\n')
    (out / "grid.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    loaded = ditq.load_model(str(tiny_source))
    ditq.export(ditq.quantize(loaded.model, Recipe.qdit(DIT, 8, 8, 32)), out, source=loaded.source)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(os.listdir(out)) == sorted([*manifest["files"], "manifest.json"])
    assert Recipe.load(out / "recipe.json") == Recipe.qdit(DIT, 8, 8, 32)
    assert hidden(out.parent) == []


@pytest.mark.slow
def test_force_replaces_a_changed_ditq_output_only(tmp_path, capsys, old_export, tiny_source):
    out = tmp_path / "m"
    shutil.copytree(old_export, out)
    (out / "notes.txt").write_text("mine\n")
    before = snapshot(tmp_path)
    code, _, err = run(["export", "--model", str(tiny_source), *EXPORT_ARGS, "--out", str(out)], capsys)
    assert_one_line_refusal(code, err, "changed since ditq wrote it", "notes.txt", "--force")
    assert snapshot(tmp_path) == before
    code, _, _ = run(["export", "--model", str(tiny_source), *EXPORT_ARGS, "--out", str(out), "--force"], capsys)
    assert code == 0 and not (out / "notes.txt").exists() and hidden(tmp_path) == []


def test_the_ownership_rule(tmp_path):
    """Each row of the table in ditq/manifest.py, with and without force."""
    ok = {
        "new": None,
        "empty": lambda d: d.mkdir(),
        "ours": lambda d: fake_output(d, **{"model.onnx": b"m" * 10}),
        "ours with reports": lambda d: [fake_output(d, **{"model.onnx": b"m"}), (d / "validation.json").write_text("{}"),
                                        (d / "grid.png").write_bytes(b"png"), (d / "samples.npy").write_bytes(b"npy")],
    }  # fmt: skip
    changed = {
        "an unlisted text file": lambda d: [fake_output(d, **{"model.onnx": b"m"}), (d / "notes.txt").write_text("x")],
        "a listed file resized": lambda d: [fake_output(d, **{"model.onnx": b"m" * 10}), (d / "model.onnx").write_bytes(b"m")],
        "a listed file missing": lambda d: [fake_output(d, **{"model.onnx": b"m"}), (d / "model.onnx").unlink()],
        "a sub-folder": lambda d: [fake_output(d, **{"model.onnx": b"m"}), (d / "runs").mkdir()],
        "a link named like a report": lambda d: [fake_output(d, **{"model.onnx": b"m"}), (d / "v.json").symlink_to("/etc/hostname")],
    }  # fmt: skip
    foreign = {
        "no manifest": lambda d: [d.mkdir(), (d / "notes.txt").write_text("x")],
        "another tool's manifest": lambda d: [d.mkdir(), (d / "manifest.json").write_text('{"tool": "other", "files": {}}')],
        "a manifest that is not JSON": lambda d: [d.mkdir(), (d / "manifest.json").write_text("{")],
        "a manifest listing a path outside": lambda d: [d.mkdir(), (d / "manifest.json").write_text(
            json.dumps({"tool": "ditq", "files": {"../x": {"bytes": 1, "sha256": "0"}}}))],
    }  # fmt: skip
    never = {
        "a file": lambda d: d.write_text("x"),
        "a link to an export": lambda d: [fake_output(tmp_path / "real", **{"model.onnx": b"m"}), d.symlink_to(tmp_path / "real")],
    }  # fmt: skip
    for group, cases in (("ok", ok), ("changed", changed), ("foreign", foreign), ("never", never)):
        for name, make in cases.items():
            d = tmp_path / f"{group}-{len(os.listdir(tmp_path))}"
            if make:
                make(d)
            before = snapshot(tmp_path)
            for force in (False, True):
                allowed = group == "ok" or (group == "changed" and force)
                if allowed:
                    assert check_out_dir(d, force=force) == Path(os.path.realpath(d)), (name, force)
                else:
                    with pytest.raises(DitqError) as e:
                        check_out_dir(d, force=force)
                    assert len(str(e.value).splitlines()) == 1, (name, force)
            assert snapshot(tmp_path) == before, name


def test_qat_and_train_digits_write_manifests_under_the_same_rule(tmp_path):
    from ditq.calib.train import TrainConfig
    from ditq.manifest import OURS, folder_status
    from ditq.models import BUILTIN
    from ditq.workflows.qat import run_qat
    from ditq.workflows.train import train_digits_model

    assert folder_status(BUILTIN["digits"]) == (OURS, "")  # `ditq train-digits` may replace the shipped model
    cfg = TrainConfig(steps=1, batch_size=4, warmup=1, save_every=1)
    for write in (lambda out, **kw: train_digits_model(out, cfg, progress=False, **kw),
                  lambda out, **kw: run_qat("digits", Recipe.robuq(DIT, 4), out, cfg, progress=False, **kw)):  # fmt: skip
        out = tmp_path / "out"
        write(out)
        assert folder_status(out) == (OURS, "")
        (out / "notes.txt").write_text("x")
        before = snapshot(tmp_path)
        with pytest.raises(DitqError, match="--force"):
            write(out)
        assert snapshot(tmp_path) == before
        write(out, force=True)  # over its own earlier output, changed since
        assert not (out / "notes.txt").exists() and folder_status(out) == (OURS, "") and hidden(tmp_path) == []
        shutil.rmtree(out)
    with pytest.raises(DitqError, match="input model"):  # qat never writes over the model it trains
        run_qat("digits", Recipe.robuq(DIT, 4), BUILTIN["digits"], cfg, progress=False, force=True)


def test_a_named_pipe_named_like_a_lock_neither_blocks_the_next_write_nor_is_removed(tmp_path):
    """The recovery of killed writes reads every lock of the target: a named pipe there has no writer."""
    from ditq.files import staged_dir
    from ditq.manifest import OURS, folder_status

    fifo = tmp_path / ".m.ditq-999999-0000abcd"  # the name of a lock of a process that is gone
    os.mkfifo(fifo)

    def write():
        with staged_dir(tmp_path / "m") as stage:
            (stage / "a.json").write_text("{}")
            write_manifest(stage, {"kind": "test"})

    returns_within(10, fifo, write)
    assert folder_status(tmp_path / "m") == (OURS, "") and fifo.is_fifo() and hidden(tmp_path) == [fifo.name]


# --------------------------------------------------------------------------- output paths (item 6)
def test_output_paths_that_cannot_be_written_are_one_line(tmp_path, capsys, tiny_source):
    (tmp_path / "file.txt").write_text("x\n")
    before = snapshot(tmp_path)
    for out, needle in (
        (tmp_path / "file.txt", "not a folder"),
        (tmp_path / "file.txt" / "m", "is a file, not a folder"),
        (tmp_path / "file.txt" / "missing" / "m", "is a file, not a folder"),
    ):
        code, _, err = run(["export", "--model", str(tiny_source), *EXPORT_ARGS, "--out", str(out)], capsys)
        assert_one_line_refusal(code, err, needle)
    # files written atomically (reports, recipes, samples): a folder or a file in the way
    (tmp_path / "dir.json").mkdir()
    for out, needle in ((tmp_path / "dir.json", "is a folder"), (tmp_path / "file.txt" / "r.json", "cannot write")):
        code, _, err = run(["recipe", "--wbits", "4", "--group-size", "32", "--out", str(out)], capsys)
        assert_one_line_refusal(code, err, needle)
    assert snapshot(tmp_path) == before and hidden(tmp_path) == []


def _read_only_runner(tmp_path: Path):
    """How to run a command against a read-only folder ``tmp_path/ro``: ``chmod`` for a normal user; for
    root (whom permissions do not stop) a read-only tmpfs in a private mount namespace; else None."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        return lambda argv: subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=ROOT)
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", f"mount -t tmpfs -o ro,size=64k tmpfs {ro}"],
                           capture_output=True)  # fmt: skip
    if probe.returncode != 0:
        return None
    wrap = ["unshare", "-m", "--propagation", "private", "sh", "-c", f'mount -t tmpfs -o ro,size=64k tmpfs {ro} && exec "$@"', "sh"]
    return lambda argv: subprocess.run(wrap + argv, capture_output=True, text=True, timeout=300, cwd=ROOT)


MAIN_SCRIPT = """
import contextlib, io, json, sys
from ditq.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        results.append((main(argv), err.getvalue()))
print(json.dumps(results))
"""


def test_a_read_only_folder_is_one_line(tmp_path, tiny_source):
    runner = _read_only_runner(tmp_path)
    if runner is None:
        pytest.skip("needs a non-root user, or root allowed to mount a tmpfs in a private mount namespace")
    argvs = []
    for out in (tmp_path / "ro" / "m", tmp_path / "ro" / "missing" / "m"):
        argvs.append(["--quiet", "export", "--model", str(tiny_source), *EXPORT_ARGS, "--out", str(out)])
        argvs.append(["--quiet", "recipe", "--wbits", "4", "--group-size", "32", "--out", str(out.parent / "r.json")])
    r = runner([sys.executable, "-c", MAIN_SCRIPT, json.dumps(argvs)])
    assert r.returncode == 0, r.stderr[-2000:]
    for (code, err), needle in zip(json.loads(r.stdout), ["read-only", "cannot write"] * 2):
        assert_one_line_refusal(code, err, needle)
    (tmp_path / "ro").chmod(0o755)
    assert os.listdir(tmp_path / "ro") == []


# ----------------------------------------------------------------------------------------- full disk
FULL_DISK_SCRIPT = """
import contextlib, io, json, os, resource, shutil, signal, subprocess, sys, traceback
mode, disk, old, argv = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
if mode == "tmpfs":
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", disk], check=True)
shutil.copytree(old, os.path.join(disk, "m"))
import ditq.exporter.export as ex
from ditq.cli import main

save = ex.onnx.save_model

def full_while_saving(*args, **kwargs):
    if mode == "tmpfs":  # another program takes the room left, but for 32 KB
        fd = os.open(os.path.join(disk, "filler"), os.O_CREAT | os.O_WRONLY)
        st = os.statvfs(disk)
        os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize - (32 << 10))
        os.close(fd)
    else:  # files of this process may not grow past 32 KB
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (32 << 10, resource.RLIM_INFINITY))
    return save(*args, **kwargs)

ex.onnx.save_model = full_while_saving
err = io.StringIO()
try:
    with contextlib.redirect_stderr(err):
        rc = main(argv)
except BaseException:
    rc, err = "traceback", io.StringIO(traceback.format_exc())
with contextlib.suppress(FileNotFoundError):
    os.unlink(os.path.join(disk, "filler"))
files = {os.path.relpath(os.path.join(d, f), disk): open(os.path.join(d, f), "rb").read().hex()
         for d, _, fs in os.walk(disk) for f in fs}
print(json.dumps({"rc": rc, "stderr": err.getvalue(), "files": files, "top": sorted(os.listdir(disk))}))
"""


@pytest.mark.slow  # a real export in a subprocess on a full file system: about 10 s
def test_a_disk_that_fills_while_the_model_is_saved(tmp_path, old_export, tiny_source):
    """A real export in a subprocess whose disk fills just as model.onnx is written: a 16 MB tmpfs that
    another file fills up (root, in a private mount namespace), else a file-size limit (RLIMIT_FSIZE).
    One line, exit 2, the old export as it was, nothing left next to it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    argv = ["--quiet", "export", "--model", str(tiny_source), "--wbits", "8", "--abits", "8", "--group-size", "32",
            "--out", str(disk / "m")]  # fmt: skip
    tmpfs = os.geteuid() == 0 and shutil.which("unshare") is not None
    if tmpfs:
        tmpfs = subprocess.run(["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "tmpfs", str(disk)],
                               capture_output=True).returncode == 0  # fmt: skip
    cmd = [sys.executable, "-c", FULL_DISK_SCRIPT, "tmpfs" if tmpfs else "rlimit", str(disk), str(old_export), json.dumps(argv)]
    if tmpfs:
        cmd = ["unshare", "-m", "--propagation", "private", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert_one_line_refusal(res["rc"], res["stderr"], str(disk / "m"))
    assert any(e in res["stderr"] for e in (os.strerror(errno.ENOSPC), os.strerror(errno.EFBIG))), res["stderr"]
    assert {k: bytes.fromhex(v) for k, v in res["files"].items()} == {f"m/{k}": v for k, v in snapshot(old_export).items()}
    assert res["top"] == ["m"]


def test_a_pipeline_folder_with_subfolders_is_ours_and_its_links_are_not_followed(tmp_path):
    """A folder ditq wrote with subfolders (a pipeline folder: transformer/, tokenizer/, ...) lists its files
    by relative path and may be replaced; a file added in a subfolder, a listed path through a link, or a
    name leading out are not ours."""
    from ditq.manifest import OURS, MODIFIED, FOREIGN, folder_status, verify_files, write_manifest, read_manifest

    d = tmp_path / "pipe"
    (d / "transformer").mkdir(parents=True)
    (d / "transformer" / "config.json").write_text("{}")
    (d / "model_index.json").write_text("{}")
    write_manifest(d, {"kind": "test"})
    assert set(read_manifest(d)["files"]) == {"model_index.json", "transformer/config.json"}
    assert folder_status(d)[0] == OURS and verify_files(d, read_manifest(d)) == []
    assert check_out_dir(d) == Path(os.path.realpath(d))
    (d / "transformer" / "extra.json").write_text("{}")  # not a top-level report: not listed, not ours
    assert folder_status(d)[0] == MODIFIED
    (d / "transformer" / "extra.json").unlink()
    outside = tmp_path / "elsewhere"
    (d / "transformer").rename(outside)
    (d / "transformer").symlink_to(outside)  # the listed file now lies behind a link: never read through it
    assert folder_status(d)[0] == MODIFIED
    assert verify_files(d, read_manifest(d)) == ["transformer/config.json is missing or not a regular file"]
    (d / "manifest.json").write_text(json.dumps({"tool": "ditq", "files": {"transformer/../../x": {"bytes": 1, "sha256": "0"}}}))
    assert folder_status(d)[0] == FOREIGN
