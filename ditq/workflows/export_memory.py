"""Peak memory of ``ditq export``, as a ratio to the model's float32 weights.

    ratio = peak RSS of the export / float32 weight bytes         (goal: at most 1.3 for large models)

Each export runs alone in a child process (``python -m ditq.workflows.export_memory --child ...``), so
its peak is its own: the child imports the export's stack (torch, onnx, onnxscript, diffusers, ditq),
notes its RSS then (``baseline``: about 0.35-0.5 GB whatever the model), runs what ``ditq export`` runs
(:func:`~ditq.models.load_model`, then :func:`~ditq.workflows.export.export_model` with
``consume_model=True``) and reports its ``VmHWM`` (:func:`ditq.runtime.bench_worker.peak_rss_bytes`;
``getrusage(RUSAGE_CHILDREN)`` would count the parent's size at fork). The weights are the model's
parameters, 4 bytes each. On a small model the baseline is most of the peak:
``(peak - baseline) / weights`` is the part that grows with the model, ``baseline / weights`` the rest.

    python -m ditq.workflows.export_memory --models digits,dit-s-2,dit-b-2 --variants w4a8,w8a8@ort
    make bench-export-memory    # the same on digits, DiT-S/2, DiT-B/2 and DiT-XL/2
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path


from ditq.errors import DitqError, one_line
from ditq.models import load_model
from ditq.recipe import AUTO_GROUP
from ditq.runtime.bench_worker import peak_rss_bytes
from ditq.workflows.evaluate import parse_config
from ditq.workflows.export import RecipeOptions, export_model

DEFAULT_VARIANTS = ("w4a8", "w8a8@ort")


@dataclass(frozen=True)
class ExportMemory:
    """One export's peak RSS against its model's float32 weight bytes."""

    model: str
    variant: str  # a ``ditq eval`` configuration: wXaY[gN][@qdq|@ort]
    weight_bytes: int  # 4 x the model's parameters
    peak_rss_bytes: int  # the export process's VmHWM
    baseline_bytes: int  # its RSS with the export's modules imported, before the model is loaded
    file_bytes: int  # the exported model (graph + external data)
    seconds: float  # load + export

    @property
    def ratio(self) -> float:
        return self.peak_rss_bytes / self.weight_bytes

    @property
    def ratio_above_baseline(self) -> float:
        return (self.peak_rss_bytes - self.baseline_bytes) / self.weight_bytes


STACK = ("torch", "onnxscript", "diffusers")  # what every export imports, whatever the model


def measure_export(model: str, variant: str = "w4a8", *, work_dir: str | Path | None = None, seed: int = 0,
                   timeout: float | None = None) -> ExportMemory:  # fmt: skip
    """Export ``model`` (a ``--model`` spec) as ``variant`` in a child process and measure it (see the
    module docstring). The export is written under ``work_dir`` (a temporary folder when None) and deleted."""
    variant_options(variant)  # refused here, before a child starts
    with tempfile.TemporaryDirectory(prefix="ditq-export-memory-", dir=work_dir) as tmp:
        cmd = [sys.executable, "-m", "ditq.workflows.export_memory", "--child", model, variant, str(Path(tmp) / "out"), str(seed)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DitqError(f"export of {model} ({variant}) took more than {timeout} s") from None
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["(no output)"]
        raise DitqError(f"export of {model} ({variant}) failed: {one_line(lines[-1].removeprefix('ditq: error: '), 300)}")
    return ExportMemory(**json.loads(proc.stdout.strip().splitlines()[-1]))


def variant_options(variant: str) -> tuple[RecipeOptions, str]:
    """The recipe options and the target of ``variant`` (``ditq eval``'s grammar, group size ``auto``)."""
    try:
        conf = parse_config(variant, AUTO_GROUP)
    except DitqError as e:
        raise DitqError(f"--variants: {e}") from None
    if conf.options() is None or conf.mixed:
        raise DitqError(f"--variants: {variant}: expected a quantized configuration such as w4a8 or w8a8@ort")
    return conf.options(), conf.target.name


def table(rows: list[ExportMemory]) -> str:
    head = (f"{'model':<10} {'variant':<10} {'weights MB':>10} {'peak RSS MB':>11} {'ratio':>6} "
            f"{'baseline MB':>11} {'baseline/W':>10} {'(peak-base)/W':>13} {'file MB':>8} {'s':>6}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.model:<10} {r.variant:<10} {r.weight_bytes / 1e6:>10.0f} {r.peak_rss_bytes / 1e6:>11.0f} {r.ratio:>6.2f} "
                     f"{r.baseline_bytes / 1e6:>11.0f} {r.baseline_bytes / r.weight_bytes:>10.2f} {r.ratio_above_baseline:>13.2f} "
                     f"{r.file_bytes / 1e6:>8.1f} {r.seconds:>6.0f}")  # fmt: skip
    return "\n".join(lines)


def _child(model: str, variant: str, out: str, seed: int) -> None:
    """The measured process: ``ditq export``'s calls, then one JSON line on stdout."""
    options, target = variant_options(variant)
    for stack in STACK:  # the export's modules, all in memory before the baseline is read
        importlib.import_module(stack)
    baseline = _rss_bytes()
    t0 = time.perf_counter()
    loaded = load_model(model, seed=seed)
    weight_bytes = 4 * sum(p.numel() for p in loaded.model.parameters())
    done = export_model(loaded, options, out, target=target, consume_model=True)
    print(json.dumps(asdict(ExportMemory(model, variant, weight_bytes, peak_rss_bytes(), baseline, done.result.file_bytes,
                                         time.perf_counter() - t0))))  # fmt: skip


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ditq.workflows.export_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="digits,dit-s-2,dit-b-2", help="comma-separated --model specs")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated wXaY[gN][@qdq|@ort]")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--child", nargs=4, metavar=("MODEL", "VARIANT", "OUT", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        if args.child:
            _child(*args.child[:3], int(args.child[3]))
            return 0
        rows, variants = [], [v.strip() for v in args.variants.split(",") if v.strip()]
        for variant in variants:
            variant_options(variant)  # every one refused before the first export
        for model in [m.strip() for m in args.models.split(",") if m.strip()]:
            for variant in variants:
                rows.append(measure_export(model, variant))
                print(table(rows[-1:]).splitlines()[-1] if len(rows) > 1 else table(rows), flush=True)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps([{**asdict(r), "ratio": r.ratio} for r in rows], indent=1) + "\n")
    except DitqError as e:
        print(f"ditq: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
