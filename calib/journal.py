"""The search's journal: one JSON line per finished evaluation, after a header with the search settings.

Lines (keys sorted, UTF-8, each ended by ``\\n``)::

    {"journal": "ditq-search", "settings": {...}, "settings_digest": "<16 hex>"}
    {"key": "64,32,...", "genome": [64, 32, ...], "fitness": 12.3, "cost": ..., "generation": 0, ...}
    {"key": "...", "genome": [...], "fitness": null, "failed": "fitness is nan", ...}

A journal is read back on every resume, so it is input like any other: every line is checked, and a bad
one is an error naming the journal and the line. Each record is appended by one write and fsynced before
the search uses it; a kill or a full disk can only leave the last line without its line end, which the
next open repairs (see :class:`Journal`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from ditq.errors import DitqError, shown
from ditq.untrusted import JsonError, parse_json

JOURNAL_FORMAT = "ditq-search"


def genome_key(genome: tuple[int, ...]) -> str:
    """A genome's record key: its group sizes, comma-separated."""
    return ",".join(str(g) for g in genome)


# how a line names what parse_json refused ({} is parse_json's reason)
_LINE_REFUSED = {
    "utf8": "is not UTF-8 text",
    "syntax": "is corrupt (not JSON)",
    "digits": "holds an integer too long to read",
    "nesting": "is nested too deeply",
    "constant": "{}",  # holds NaN (not a finite number)
    "size": "is too long to be a record ({})",
}


def _finite(v: Any) -> bool:
    """A JSON number that is a finite float (not a bool; not an integer beyond float range)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


def fitness_of(rec: dict[str, Any]) -> float:
    """A record's fitness for ranking: a failed evaluation ranks after every other (+inf)."""
    return math.inf if rec.get("failed") else float(rec["fitness"])


def evaluation_record(genome: tuple[int, ...], cost: float, generation: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """The journal line of one evaluation. Non-finite metrics are written as null (JSON has no NaN); a
    fitness that is not a finite number makes the evaluation failed, with the reason."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    rec = {"key": genome_key(genome), "genome": [int(g) for g in genome], "cost": cost, "generation": generation, **clean}
    if not _finite(metrics.get("fitness")):
        rec["fitness"] = None
        rec["failed"] = f"fitness is {shown(metrics.get('fitness'))}"
    return rec


class Journal:
    """Append-only JSON lines: a header line with the search settings, then one line per evaluation.

    A record is an object with ``key`` (``genome_key`` of its ``genome``, a list of integers) and a finite
    number ``fitness`` plus the ``metrics`` named (finite numbers too), or, for a failed evaluation, a
    ``failed`` reason and a null ``fitness``. Opening checks every line: anything else is an error naming
    the journal and the line. The one exception is a last line without its line end, left by a write that
    was cut short: a complete record is kept and its line ended, anything else is dropped (and evaluated
    again); ``notes`` says which. Appends therefore always start on a new line.
    """

    def __init__(self, path: str | Path, settings: dict[str, Any], metrics: Iterable[str] = ()):
        self.path = Path(path)
        self.settings = settings
        self.metrics = tuple(metrics)
        self.records: dict[str, dict[str, Any]] = {}
        self.notes: list[str] = []
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        header = {"journal": JOURNAL_FORMAT, "settings": settings, "settings_digest": digest}
        if self.path.exists() and not self.path.is_file():
            raise DitqError(f"{self.path}: the journal is not a regular file")
        data = self._read() if self.path.exists() else b""
        if data:
            data = self._load(data, digest, self._line(header).rstrip(b"\n"))
        if not data:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise DitqError(f"{self.path}: cannot create the journal's folder ({e.strerror})") from None
            self._append(header)

    # reading
    def _read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError as e:
            raise DitqError(f"{self.path}: cannot read the journal ({e.strerror})") from None

    def _load(self, data: bytes, digest: str, header_line: bytes) -> bytes:
        """Take the records of ``data``; returns the bytes kept (empty: start a new journal)."""
        lines = data.split(b"\n")
        torn = lines.pop()  # b"" when the file ends with a line end
        if not lines and header_line.startswith(torn):  # only a cut write of this very header reads so
            self._cut(0, "its header line was cut short by an interrupted write; started it again")
            return b""
        head = self._parse(lines[0] if lines else torn, 1)
        if not isinstance(head, dict) or head.get("journal") != JOURNAL_FORMAT:
            raise DitqError(f"{self.path}: not a ditq search journal (line 1 is not its header)")
        if head.get("settings_digest") != digest:
            raise DitqError(f"{self.path}: journal of a search with other settings; use another --journal or the same options")
        if not lines:  # the header, written otherwise than by ditq, without its line end
            self._end_line()
            return data + b"\n"
        for i, raw in enumerate(lines[1:], 2):
            rec = self._parse(raw, i)
            self._check(rec, i)
            self.records[rec["key"]] = rec
        if torn:
            n = len(lines) + 1
            try:
                rec = self._parse(torn, n)
                self._check(rec, n)
            except DitqError:
                self._cut(len(data) - len(torn), f"dropped line {n}, cut short by an interrupted write; it is evaluated again")
                return data[: len(data) - len(torn)]
            self._end_line()
            self.records[rec["key"]] = rec
            self.notes.append(f"{self.path}: line {n} had no line end (a write cut short); ended it, the record is complete")
        return data

    def _parse(self, raw: bytes, i: int) -> Any:
        where = f"{self.path}: journal line {i}"
        try:
            return parse_json(raw, where, allow_nan=False)  # JSON has no NaN: a line holding one was not ours
        except JsonError as e:
            raise DitqError(f"{where} {_LINE_REFUSED[e.kind].format(e.reason)}") from None

    def _problem(self, rec: Any) -> str | None:
        """Why ``rec`` is not a record, or None."""
        if not isinstance(rec, dict):
            return "is not a JSON object"
        key, genome = rec.get("key"), rec.get("genome")
        if not isinstance(key, str):
            return "has no string 'key'"
        if not isinstance(genome, list) or not all(isinstance(g, int) and not isinstance(g, bool) for g in genome):
            return "has no 'genome' list of integers"
        if genome_key(tuple(genome)) != key:
            return "has a 'key' that is not its genome's"
        if "fitness" not in rec:
            return "has no 'fitness'"
        if rec.get("failed") is not None:
            if not isinstance(rec["failed"], str) or rec["fitness"] is not None:
                return "is failed without a reason string and a null 'fitness'"
            return None
        bad = [m for m in ("fitness", *self.metrics) if not _finite(rec.get(m))]
        return f"has no finite number {bad[0]!r}" if bad else None

    def _check(self, rec: Any, i: int) -> None:
        why = self._problem(rec)
        if why:
            raise DitqError(f"{self.path}: journal line {i} {why}")

    # writing
    def _cut(self, size: int, note: str) -> None:
        try:
            os.truncate(self.path, size)
        except OSError as e:
            raise DitqError(f"{self.path}: cannot repair the journal ({e.strerror})") from None
        self.notes.append(f"{self.path}: {note}")

    def _end_line(self) -> None:
        self._write(b"\n")

    @staticmethod
    def _line(obj: dict[str, Any]) -> bytes:
        return (json.dumps(obj, sort_keys=True, allow_nan=False) + "\n").encode()

    def _write(self, data: bytes) -> None:
        try:
            with open(self.path, "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise DitqError(f"{self.path}: cannot write the journal ({e.strerror})") from None

    def _append(self, obj: dict[str, Any]) -> None:
        self._write(self._line(obj))

    def add(self, rec: dict[str, Any]) -> None:
        """Append one evaluation (see :func:`evaluation_record`); a malformed record is refused."""
        why = self._problem(rec)
        if why:
            raise DitqError(f"{self.path}: refused a record that {why}")
        self._append(rec)
        self.records[rec["key"]] = rec
