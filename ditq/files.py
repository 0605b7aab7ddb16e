"""Atomic writes: a file or folder appears under its final name complete, or not at all.

A file (:func:`atomic_path`) is written as a temporary sibling and renamed over its final name.

A folder (:func:`staged_dir`) replaces only what is ditq's to replace (the rule of :mod:`ditq.manifest`,
checked by :func:`check_out_dir`: an empty folder or a previous ditq output; never the input model, the
current folder, a link or a file; missing parent folders are made), and is swapped in so that at every
instant the final name ``NAME`` is absent (before a first write completes), the complete old folder, or
the complete new one (without ``renameat2``, ``NAME`` is also absent between the fallback's two renames,
and a kill there is undone by the next run, see below)::

    .NAME.ditq-PID-R      lock: a small JSON file naming the writing process (host, PID, start time)
    .NAME.partial-PID-R   the new folder, filled by the caller, which ends by writing its manifest
    swap                  renameat2(stage, NAME, RENAME_EXCHANGE): one atomic step (Linux, glibc >= 2.28);
                          the stage's name now holds the old folder, which is removed
                          without it: NAME -> .NAME.old-PID-R, stage -> NAME, the old folder removed
    done                  the lock is removed last

A run killed at any point leaves its lock. The next write to the same ``NAME`` finishes what each lock of
a process that is gone left (same host; PID not running, a zombie, or running since another time):
it removes the stage, and an old folder, which it first renames back to ``NAME`` when ``NAME`` is absent
(the fallback was killed between its two renames; the old folder is complete then, because it is only
removed once the new one is in place). Nothing a lock does not name is removed.

Output errors (a read-only or full file system, a file where a folder is expected) are
:class:`~ditq.errors.DitqError`: one line, and the previous output, if any, unchanged.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from ditq import errors
from ditq.errors import DitqError
from ditq.manifest import FOREIGN, MODIFIED, OURS, folder_status
from ditq.untrusted import parse_json, read_regular

# errors of a write that ran out of room: the file system, a quota, or RLIMIT_FSIZE
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
PATH_SHOWN = 160  # characters of a path repeated in a message


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_error(shown: str, e: OSError) -> DitqError:
    return DitqError(f"cannot write {shown}: {e.strerror or e}")


@contextlib.contextmanager
def _full_disk_is_an_error(shown: str) -> Iterator[None]:
    """A write in the block that runs out of room (:data:`DISK_FULL`) is one :class:`DitqError` naming
    ``shown``; any other error passes through."""
    try:
        yield
    except OSError as e:
        if e.errno in DISK_FULL:
            raise _write_error(shown, e) from None
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it is renamed over ``path``."""
    path = Path(path)
    shown = errors.shown(path, PATH_SHOWN, quote=False)
    if path.is_dir():
        raise DitqError(f"{shown} is a folder; expected a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(shown, e) from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        with _full_disk_is_an_error(shown):
            yield tmp
        try:
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except OSError as e:
            raise _write_error(shown, e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------ folders
def _target(final: str | Path) -> Path:
    """``final`` as an absolute path whose folder part has its links resolved (not its own name)."""
    text = os.fspath(final)
    if not text:
        raise DitqError("the output folder name is empty")
    if Path(text).name in ("", ".", ".."):  # ".", "x/..", "/": an alias of a folder, resolved whole
        return Path(os.path.realpath(text))
    return Path(os.path.realpath(Path(text).parent)) / Path(text).name


def check_out_dir(final: str | Path, *, protect: Iterable[str | Path] = (), force: bool = False) -> Path:
    """Refuse an output folder ditq must not replace (see the module docstring); returns its absolute path.

    ``protect``: the inputs (model folder or checkpoint file), which ``final`` may neither be, hold, nor lie
    in. ``force`` also replaces a ditq folder that changed since ditq wrote it, nothing else."""
    shown = errors.shown(final, PATH_SHOWN, quote=False)
    target = _target(final)
    if target.parent == target:
        raise DitqError(f"--out {shown} is the root folder")
    if Path(os.path.realpath(os.getcwd())).is_relative_to(target):
        raise DitqError(f"--out {shown} is the current folder or holds it; choose a new or empty folder")
    for p in protect:
        inp = Path(os.path.realpath(p))
        if inp.is_relative_to(target) or target.is_relative_to(inp):
            raise DitqError(f"--out {shown} is, holds or lies in the input model {errors.shown(p, PATH_SHOWN, quote=False)}; choose another folder")
    ancestor = target.parent
    while not os.path.lexists(ancestor):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DitqError(f"cannot write {shown}: {errors.shown(ancestor, PATH_SHOWN, quote=False)} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise DitqError(f"cannot write {shown}: {errors.shown(ancestor, PATH_SHOWN, quote=False)} is read-only or not writable by this user")
    if not os.path.lexists(target):
        return target
    if target.is_symlink():
        raise DitqError(f"--out {shown} is a symbolic link; give the folder itself")
    if not target.is_dir():
        raise DitqError(f"--out {shown} exists and is not a folder")
    try:
        status, reason = folder_status(target)
    except OSError as e:
        raise DitqError(f"cannot read --out {shown}: {e.strerror or e}") from None
    if status == MODIFIED and not force:
        raise DitqError(
            f"--out {shown} is a ditq output that changed since ditq wrote it ({reason}); "
            "pass --force to replace it, or choose another folder"
        )
    if status == FOREIGN:
        raise DitqError(
            f"--out {shown} is a folder ditq did not write ({reason}); ditq replaces only empty folders "
            "and its own outputs: choose a new or empty folder"
        )
    return target


@contextlib.contextmanager
def staged_dir(final: str | Path, *, protect: Iterable[str | Path] = (), force: bool = False) -> Iterator[Path]:
    """Yield an empty staging folder for ``final``; on success (the caller wrote a manifest) it is swapped
    in place of ``final`` as the module docstring describes. ``protect``, ``force``: see :func:`check_out_dir`."""
    protect = list(protect)
    shown = errors.shown(final, PATH_SHOWN, quote=False)
    target = check_out_dir(final, protect=protect, force=force)
    if recover(target):  # a folder put back by the recovery is checked like any other
        check_out_dir(final, protect=protect, force=force)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock, stage, old = _begin(target)
    except OSError as e:
        raise _write_error(shown, e) from None
    try:
        with _full_disk_is_an_error(shown):
            yield stage
        status, reason = folder_status(stage)
        if status != OURS:  # every writer ends with write_manifest: a bug of ours
            raise RuntimeError(f"the staged folder of {target} is not complete: {reason or status}")
        check_out_dir(final, protect=protect, force=force)  # the target may have changed meanwhile
        try:
            replace_dir(stage, target, old)
        except OSError as e:
            raise _write_error(shown, e) from None
    except BaseException:
        _rmtree(stage)
        lock.unlink(missing_ok=True)
        raise
    lock.unlink(missing_ok=True)


def replace_dir(new: Path, final: Path, old: Path) -> None:
    """Put the finished folder ``new`` at ``final``: a rename, or an atomic exchange with an existing
    ``final`` (then ``new``'s name holds the old folder, which is removed); where the system has no
    exchange, ``final`` is first renamed to ``old``. The staging folder was made private; the result gets
    the permissions a plainly created folder would have."""
    os.chmod(new, 0o777 & ~_umask())
    if not os.path.lexists(final):
        os.rename(new, final)  # onto nothing, or onto an empty folder made meanwhile
    elif exchange(new, final):
        _rmtree(new)
    else:
        os.rename(final, old)
        try:
            os.rename(new, final)
        except OSError:
            os.rename(old, final)
            raise
        _rmtree(old)


def _load_renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _load_renameat2()


def exchange(a: Path, b: Path) -> bool:
    """Exchange the paths ``a`` and ``b`` in one atomic step; False where the system or the file system
    cannot (then nothing changed)."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def _rmtree(path: Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------ leftovers
def _paths(target: Path, pid: int | str, tag: str) -> tuple[Path, Path, Path]:
    """The lock, stage and old-folder names of one write of ``target``."""
    return tuple(target.parent / f".{target.name}.{kind}-{pid}-{tag}" for kind in ("ditq", "partial", "old"))


def _begin(target: Path) -> tuple[Path, Path, Path]:
    """Create the lock, then the private staging folder, of a write of ``target`` by this process."""
    info = {"tool": "ditq", "host": socket.gethostname(), "pid": os.getpid(), "started": _start_time(os.getpid())}
    data = json.dumps(info).encode()
    while True:
        lock, stage, old = _paths(target, os.getpid(), secrets.token_hex(4))
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            continue
    try:
        os.write(fd, data)  # one write: a lock is either empty (no stage yet) or complete
    finally:
        os.close(fd)
    os.mkdir(stage, 0o700)
    return lock, stage, old


def _start_time(pid: int) -> int | None:
    """The start time of process ``pid`` (clock ticks since boot, /proc), or None where unknown."""
    stat = _proc_stat(pid)
    return None if stat is None else int(stat[19])


def _proc_stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from the 3rd (state) on; the name may hold spaces


def _gone(info: dict[str, Any]) -> bool:
    """Whether the process a lock names has ended (a process of another host is never judged)."""
    if info.get("tool") != "ditq" or info.get("host") != socket.gethostname() or type(info.get("pid")) is not int:
        return False
    pid = info["pid"]
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, ValueError):
        return False
    stat = _proc_stat(pid)
    if stat is None:
        return False
    return stat[0] == "Z" or (info.get("started") is not None and int(stat[19]) != info["started"])


def recover(target: Path) -> list[Path]:
    """Finish what killed writes of ``target`` left (see the module docstring); returns the paths removed
    or restored. Best effort: what cannot be removed now stays for a later run."""
    done = []
    pattern = re.compile(re.escape(f".{target.name}.ditq-") + r"(\d+)-([0-9a-f]{8})")
    try:
        names = os.listdir(target.parent)
    except OSError:
        return done
    for name in names:
        m = pattern.fullmatch(name)
        if not m:
            continue
        lock, stage, old = _paths(target, m[1], m[2])
        try:
            raw = read_regular(lock, follow_links=False)  # never a FIFO (reading one blocks) nor a link
            if not raw:  # killed before the lock was written, so before its stage was made
                if _gone({"tool": "ditq", "host": socket.gethostname(), "pid": int(m[1])}):
                    lock.unlink()
                    done.append(lock)
                continue
            info = parse_json(raw, lock.name)
            if not isinstance(info, dict) or info.get("pid") != int(m[1]) or not _gone(info):
                continue
            if os.path.isdir(old) and not os.path.islink(old):
                if not os.path.lexists(target):
                    os.rename(old, target)  # killed between the fallback's two renames: the old is complete
                else:
                    _rmtree(old)
                done.append(old)
            if os.path.isdir(stage) and not os.path.islink(stage):
                _rmtree(stage)
                done.append(stage)
            lock.unlink()
            done.append(lock)
        except (OSError, DitqError):  # not a lock of ours (DitqError: not a regular file of JSON), or busy
            continue
    return done
