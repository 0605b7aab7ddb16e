"""Command-line values and the parser that reads them: a bad value is one line naming the option and
what it takes (``ditq: error: argument --steps: expected an integer in 1..1000, got '0'``), exit 2.

Every numeric option has a closed range. Floats must be finite (``nan``, ``inf`` and values that
overflow to ``inf``, such as ``1e999``, are refused). Values are echoed cut to :data:`MAX_ECHO` characters.
"""

from __future__ import annotations

import argparse
import math
import numbers
import os
from typing import Callable

from ditq.errors import DitqError, one_line, shown

MAX_ECHO = 60  # characters of a user's value repeated in a message
MAX_MESSAGE = 300  # characters of a whole command-line error message

SEED_MAX = 2**32 - 1  # seeds: 0..2^32-1
MAX_STEPS = 1000  # denoising steps: at most the 1000 training timesteps of DiT's schedule
MAX_BATCH = 4096  # samples per model call
MAX_SAMPLES = 100_000  # samples per evaluation (eval, fitness, bench --quality)
MAX_COUNT = 10**9  # counts bounded further by a memory budget downstream (sample --per-class)
MAX_CFG = 100.0  # classifier-free guidance scale
MAX_RUNS = 10_000  # timed runs per benchmark variant
MAX_THREADS = 1024  # ONNX Runtime intra-op threads
MAX_TRAIN_STEPS = 10**7  # training steps (ditq qat, ditq train-digits)


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse ``type``: a decimal integer in ``lo..hi``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:  # also integers longer than Python's 4300-digit conversion limit
            value = None
        if value is None or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer in {lo}..{hi}, got {shown(text, MAX_ECHO)}")
        return value

    parse.__name__ = f"integer in {lo}..{hi}"
    return parse


def float_in(lo: float, hi: float, *, open_lo: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a finite number in ``[lo, hi]`` (``(lo, hi]`` with ``open_lo``)."""
    span = f"{'(' if open_lo else '['}{lo:g}, {hi:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (lo < value if open_lo else lo <= value) and value <= hi):
            raise argparse.ArgumentTypeError(f"expected a finite number in {span}, got {shown(text, MAX_ECHO)}")
        return value

    parse.__name__ = f"number in {span}"
    return parse


def int_list(text: str, flag: str, lo: int, hi: int) -> list[int]:
    """``"0,1,2"``: comma-separated integers in ``lo..hi``, at least one."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DitqError(f"{flag}: expected comma-separated integers in {lo}..{hi}, got {shown(text, MAX_ECHO)}") from None
    if not values:
        raise DitqError(f"{flag} is empty")
    bad = next((v for v in values if not lo <= v <= hi), None)
    if bad is not None:
        raise DitqError(f"{flag}: expected integers in {lo}..{hi}, got {shown(str(bad), MAX_ECHO)}")
    return values


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that reports a bad command line by raising :class:`DitqError` (one line on
    stderr, exit 2, as every other bad input) instead of printing its usage and exiting.
    Subcommand parsers are made of the same class (argparse's default ``parser_class``)."""

    def error(self, message: str):
        raise DitqError(f"{one_line(message, MAX_MESSAGE)} (see {self.prog} --help)")


def check_int(value: object, name: str, lo: int, hi: int) -> int:
    """A typed API argument ``name``: an integer (not a bool) in ``lo..hi``, else a one-line :class:`DitqError`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
        raise DitqError(f"{name}: expected an integer in {lo}..{hi}, got {shown(value, MAX_ECHO)}")
    return int(value)


def check_path(value: object, name: str, *, optional: bool = False) -> str | None:
    """A typed API argument ``name`` that names a model or a file: a ``str`` or an ``os.PathLike`` (a
    ``pathlib.Path``), returned as a ``str``; ``None`` too when ``optional``. Else a one-line :class:`DitqError`."""
    if value is None and optional:
        return None
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(text, str) or not text or "\x00" in text:
        raise DitqError(f"{name}: expected a model name or a path (str or os.PathLike), got {shown(value, MAX_ECHO)}")
    return text


def is_finite_real(value: object) -> bool:
    """``value`` is a real number (not a bool) that is finite as a float: NaN, infinities and integers too
    large for a float (``10**400``, which ``math.isfinite`` cannot even convert) are not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    try:
        return math.isfinite(float(value))
    except (OverflowError, ValueError, TypeError):
        return False


def check_float(value: object, name: str, lo: float, hi: float, *, open_lo: bool = False) -> float:
    """A typed API argument ``name``: a finite real number in ``[lo, hi]`` (``(lo, hi]`` with ``open_lo``)."""
    ok = is_finite_real(value)
    if not (ok and (lo < value if open_lo else lo <= value) and value <= hi):
        span = f"{'(' if open_lo else '['}{lo:g}, {hi:g}]"
        raise DitqError(f"{name}: expected a finite number in {span}, got {shown(value, MAX_ECHO)}")
    return float(value)
