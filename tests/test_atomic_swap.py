"""Folder replacement survives a kill at any point: the final name is absent (only before a first write,
or mid-way through the fallback without ``renameat2``), the complete old output, or the complete new one
(every file checked against its manifest's SHA-256); the next write to the same folder removes what the
killed run left, and nothing else."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ditq
import ditq.files as files
from ditq.adapters import adapter_for
from ditq.manifest import read_manifest, verify_files, write_manifest
from ditq.models import build_dit
from ditq.recipe import Recipe
from tests.conftest import tiny_config

DIT = adapter_for("DiTTransformer2DModel").coverage  # the family of the models here

ROOT = Path(__file__).resolve().parents[1]

# A child process that replaces TARGET with the files of SOURCE through staged_dir, and SIGKILLs itself
# just before the KILL_AT-th file-system step of the swap (rename, exchange, unlink, rmdir; -1: never).
# It prints how many steps the swap took. LOOP: replace forever, alternating two sources.
CHILD = """
import os, shutil, signal, sys
from pathlib import Path
import ditq.files as F
from ditq.manifest import write_manifest

target, sources, kill_at, exchange, loop = Path(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3]), sys.argv[4], sys.argv[5]
if exchange == "no":
    F._RENAMEAT2 = None
state = {"armed": False, "steps": 0}

def step(fn):
    def counted(*args, **kwargs):
        if state["armed"] and state["steps"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        result = fn(*args, **kwargs)
        state["steps"] += state["armed"]
        return result
    return counted

replace_dir = F.replace_dir

def armed_replace_dir(*args):
    state["armed"] = True
    return replace_dir(*args)

F.replace_dir = armed_replace_dir
F.exchange = step(F.exchange)
os.rename, os.unlink, os.rmdir = step(os.rename), step(os.unlink), step(os.rmdir)
print("ready", flush=True)
i = 0
while True:
    with F.staged_dir(target) as stage:
        for p in Path(sources[i % len(sources)]).iterdir():
            if p.name != "manifest.json":
                shutil.copyfile(p, stage / p.name)
        write_manifest(stage, {"kind": "test"})
    i += 1
    if loop != "loop":
        break
print(state["steps"], flush=True)
"""


def fake_output(folder: Path, seed: int, n_files: int = 3, size: int = 64 << 10) -> Path:
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    for i in range(n_files + seed):  # the two versions differ in their files too
        (folder / f"part{i}.bin").write_bytes(rng.randbytes(size))
    write_manifest(folder, {"kind": "test"})
    return folder


def version_of(folder: Path, versions: dict[str, Path]) -> str:
    """Which complete version ``folder`` is, by its files' bytes and its manifest's hashes (computed
    here with hashlib); fails if it is neither."""
    manifest = json.loads((folder / "manifest.json").read_text())
    names = sorted(os.listdir(folder))
    assert names == sorted([*manifest["files"], "manifest.json"]), names
    for name, info in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert len(data) == info["bytes"] and hashlib.sha256(data).hexdigest() == info["sha256"], name
    for label, src in versions.items():
        if sorted(os.listdir(src)) == names and all((src / n).read_bytes() == (folder / n).read_bytes() for n in manifest["files"]):
            return label
    raise AssertionError(f"{folder} is neither version: {names}")


def leftovers(target: Path) -> list[str]:
    return sorted(n for n in os.listdir(target.parent) if n.startswith(f".{target.name}."))


def child(target: Path, sources: list[Path], kill_at: int, exchange: bool, loop: bool = False) -> subprocess.Popen:
    args = [str(target), ",".join(map(str, sources)), str(kill_at), "yes" if exchange else "no", "loop" if loop else "once"]
    return subprocess.Popen([sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, text=True, cwd=ROOT)


@pytest.fixture
def versions(tmp_path) -> dict[str, Path]:
    return {"old": fake_output(tmp_path / "src" / "old", 0), "new": fake_output(tmp_path / "src" / "new", 1)}


def test_exchange_is_available_on_linux():
    if sys.platform.startswith("linux"):
        assert files._RENAMEAT2 is not None


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "fallback"])
def test_a_kill_between_any_two_swap_steps(tmp_path, versions, exchange):
    """Kill the swap before each of its file-system steps in turn, for a first write and a replacement."""
    out = tmp_path / "out" / "m"
    steps = {}
    for first_write in (True, False):  # how many steps each kind of swap takes
        probe = child(out, [versions["new"]], -1, exchange)
        steps[first_write] = int(probe.communicate()[0].split()[-1])
        assert probe.returncode == 0 and version_of(out, versions) == "new" and leftovers(out) == []
    assert steps[True] >= 2 and steps[False] >= 4  # (exchange,) rename + the lock; the old folder's removal
    for first_write in (True, False):
        for kill_at in range(steps[first_write] + 1):
            shutil.rmtree(out)
            if not first_write:
                shutil.copytree(versions["old"], out)
            proc = child(out, [versions["new"]], kill_at, exchange)
            proc.communicate()
            where = f"first write {first_write}, killed before step {kill_at} of {steps[first_write]}"
            if os.path.exists(out):
                got = version_of(out, versions)
                assert got == "new" or not first_write, where
            else:  # only a first write killed before its rename, or the fallback between its renames
                assert first_write or not exchange, where
                assert proc.returncode == -signal.SIGKILL, where
            assert proc.returncode in (0, -signal.SIGKILL), where
            # the next run: finds the leftovers of the dead process, then writes the new version
            again = child(out, [versions["new"]], -1, exchange)
            again.communicate()
            assert again.returncode == 0 and version_of(out, versions) == "new", where
            assert leftovers(out) == [], where


def test_recovery_restores_the_old_folder_after_a_fallback_killed_between_its_renames(tmp_path, versions):
    out = tmp_path / "m"
    shutil.copytree(versions["old"], out)
    proc = child(out, [versions["new"]], 2, exchange=False)  # steps: exchange (unavailable), final -> .old, stage -> final
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    assert [n.split("-")[0] for n in leftovers(out)] == [".m.ditq", ".m.old", ".m.partial"]
    restored = files.recover(out.resolve())
    assert len(restored) == 3 and version_of(out, versions) == "old" and leftovers(out) == []


def test_recovery_leaves_what_ditq_did_not_make(tmp_path, versions):
    """Look-alike names without a lock of a dead ditq process, and the locks of a live one, stay."""
    out = tmp_path / "m"
    shutil.copytree(versions["old"], out)
    for name in (".m.partial-999999-0000abcd", ".m.old-1-x", ".m.ditq-notapid-00000000"):
        (tmp_path / name).mkdir()
    (tmp_path / ".m.ditq-1-0000abcd").write_text(json.dumps({"tool": "other", "pid": 1}))  # not ditq's lock
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stage = tmp_path / f".m.partial-{live.pid}-0000beef"
        stage.mkdir()
        lock = {"tool": "ditq", "host": socket.gethostname(), "pid": live.pid, "started": files._start_time(live.pid)}
        (tmp_path / f".m.ditq-{live.pid}-0000beef").write_text(json.dumps(lock))
        before = sorted(os.listdir(tmp_path))
        assert files.recover(out.resolve()) == []
        assert sorted(os.listdir(tmp_path)) == before
    finally:
        live.kill()
        live.wait()
    assert files.recover(out.resolve()) == [tmp_path.resolve() / f".m.partial-{live.pid}-0000beef",
                                            tmp_path.resolve() / f".m.ditq-{live.pid}-0000beef"]  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == sorted(n for n in before if f"-{live.pid}-" not in n)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "fallback"])
def test_random_kills_of_repeated_replacement(tmp_path, versions, exchange):
    """A process replacing the folder again and again, alternately with two versions, killed at random."""
    out = tmp_path / "m"
    shutil.copytree(versions["old"], out)
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    for i in range(8):
        proc = child(out, [versions["old"], versions["new"]], -1, exchange, loop=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.25))
        proc.kill()
        proc.wait()
        proc.stdout.close()
        where = f"seed {seed}, kill {i}"
        if exchange or out.exists():
            assert version_of(out, versions) in ("old", "new"), where
        with files.staged_dir(out) as stage:  # the next run (this process)
            for p in versions["new"].iterdir():
                shutil.copyfile(p, stage / p.name)
        assert version_of(out, versions) == "new" and leftovers(out) == [], where


@pytest.mark.slow  # real exports killed at random moments: about 20 s
def test_a_killed_export_leaves_the_old_or_the_new_export(tmp_path):
    """A real ``ditq export`` over an earlier one, killed at a random moment once it has begun writing
    (its staging folder exists), then exported again."""
    model = tmp_path / "dit"
    build_dit(tiny_config(), seed=0).save_pretrained(model)
    loaded = ditq.load_model(str(model))
    out = tmp_path / "m"
    t0 = time.perf_counter()
    ditq.export(ditq.quantize(loaded.model, Recipe.qdit(DIT, 4, 8, 32)), out, source=loaded.source)
    delay = random.uniform(0.0, 1.2 * (time.perf_counter() - t0))  # the writing phase is most of an export
    argv = [sys.executable, "-m", "ditq.cli", "--quiet", "export", "--model", str(model), "--wbits", "8", "--abits", "8",
            "--group-size", "32", "--out", str(out)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    while proc.poll() is None and not any(n.startswith(".m.partial-") for n in os.listdir(tmp_path)):
        time.sleep(0.01)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.kill()
    _, err = proc.communicate()
    where = f"killed {delay:.2f} s after the stage appeared"
    assert proc.returncode in (0, -signal.SIGKILL), err
    recipe = Recipe.load(out / "recipe.json")
    assert recipe in (Recipe.qdit(DIT, 4, 8, 32), Recipe.qdit(DIT, 8, 8, 32)), where
    assert verify_files(out, read_manifest(out)) == [], where
    ditq.export(ditq.quantize(loaded.model, Recipe.qdit(DIT, 8, 8, 32)), out, source=loaded.source)
    assert Recipe.load(out / "recipe.json") == Recipe.qdit(DIT, 8, 8, 32)
    assert leftovers(out) == [], where
