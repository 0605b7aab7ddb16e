"""``ditq bench``: speed, size, memory and error of quantized exports, as ratios to float ONNX Runtime.

Every variant is built from the same float model in one run and measured against the float ONNX export
on the same inputs:

- ``float``: the float graph (torch.onnx dynamo export), the baseline of every ratio;
- ``ort-int8``: ONNX Runtime's ``quantize_dynamic`` (int8 weights per tensor, uint8 activations per
  tensor) applied to that float export;
- ``ort-int4``: ONNX Runtime's ``MatMulNBitsQuantizer`` (4-bit weights, block 128, asymmetric,
  ``accuracy_level=4``) applied to that float export (it leaves Gemm layers float);
- ``wXaY[gN][@qdq|@ort]``: ditq's Q-DiT recipe exported for target ``ort`` (default) or ``qdq``.

Measured per variant, each in its own process (:mod:`ditq.runtime.bench_worker`, no torch) holding one
session: latency per denoising step (one forward at ``--batch``), the median of ``--runs`` runs taken in
turns across all variants (so drifting machine load hits them alike); the model file size (graph +
external data); the process's peak RSS (session creation included); and the relative output error
``|y - y_float| / |y_float|`` on the same inputs. With ``--quality N`` (digit models) every variant
also samples N images through ONNX Runtime (DDIM, seeded) for FID-digits and class accuracy.
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import math
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from tqdm.auto import tqdm

from ditq.adapters import adapter_for
from ditq.calib.digits import load_split, to_unit_range
from ditq.errors import DitqError
from ditq.exporter.export import export
from ditq.exporter.reference import quantize_model
from ditq.exporter.trace import export_float
from ditq.graphs.lower_ort import kernel_counts
from ditq.graphs.targets import Target
from ditq.models import load_model
from ditq.options import MAX_BATCH, MAX_RUNS, MAX_SAMPLES, MAX_STEPS, MAX_THREADS, check_int
from ditq.runtime.generate import generate
from ditq.runtime.metrics import DigitJudge, fid
from ditq.runtime.samplers import seeded_noise
from ditq.runtime.session import OrtDiT
from ditq.workflows.evaluate import EvalConfig, parse_config

ORT_BASELINES = ("ort-int8", "ort-int4")  # ONNX Runtime's own quantizers on the float export
ORT_INT4_BLOCK = 128


@dataclass(frozen=True)
class Variant:
    name: str
    kind: str  # "float" | "ort-int8" | "ort-int4" | "ditq"
    config: EvalConfig | None = None  # kind "ditq": the configuration, in ``ditq eval``'s grammar

    @property
    def target(self) -> Target | None:
        return self.config.target if self.config else None


def parse_variants(text: str, group_size: int | None) -> list[Variant]:
    """``"float,ort-int8,ort-int4,w8a8,w4a8,w4a8@qdq,w1.58a4h,recipe.json"``: the baselines, or any
    configuration ``ditq eval --configs`` reads (:func:`~ditq.workflows.evaluate.parse_config`), exported
    for target ``ort`` unless it says ``@qdq``. ``float`` is always measured (first)."""
    out = [Variant("float", "float")]
    for raw in [v.strip() for v in text.split(",") if v.strip()]:  # case kept: a recipe path
        if raw.lower() in ORT_BASELINES:
            out.append(Variant(raw.lower(), raw.lower()))
            continue
        try:
            conf = parse_config(raw, group_size, default_target="ort")
        except DitqError as e:
            raise DitqError(f"--variants: {e} (or float, ort-int8, ort-int4)") from None
        if conf.is_float:
            continue  # measured first anyway
        if conf.mixed:
            raise DitqError(f"--variants: {raw}: mixed activation bits need the model's sensitivity; "
                            "write the recipe with `ditq export --mixed` and bench that recipe .json")  # fmt: skip
        name = f"{conf.name.partition('@')[0]}@{conf.target.name}"
        out.append(Variant(name, "ditq", conf))
    if len({v.name for v in out}) != len(out):
        raise DitqError(f"--variants lists a variant twice: {text!r}")
    return out


@dataclass
class BenchRow:
    variant: str
    latency_ratio: float  # median step time / float's (below 1 = faster)
    size_ratio: float
    rss_ratio: float
    rel_error: float  # |y - y_float| / |y_float| on the same inputs
    latency_ms: float
    latency_iqr_ms: float
    file_bytes: int
    peak_rss_bytes: int
    speedup: float  # float's step time / this variant's
    fid: float | None = None
    class_accuracy: float | None = None
    kernels: dict[str, int] | None = None
    profile: dict[str, float] | None = None  # share of kernel time per op type (--profile)


@dataclass
class BenchReport:
    rows: list[BenchRow]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": [asdict(r) for r in self.rows], "settings": self.settings}

    def table(self) -> str:
        s = self.settings
        quality = any(r.fid is not None for r in self.rows)
        lines = [
            f"ditq bench {s['model']}: batch {s['batch']}, {s['tokens']} tokens, median of {s['runs']} interleaved runs, "
            f"{s['threads'] or 'default'} threads; ratios to float ONNX Runtime measured in this run",
            "",
            f"{'variant':<14} {'ms/step':>9} {'speedup':>8} {'latency':>8} {'file MB':>9} {'size':>6} {'peak RSS MB':>12} {'RSS':>6} {'rel.error':>10}"
            + (f" {'FID-digits':>10} {'class acc':>9}" if quality else ""),
        ]
        for r in self.rows:
            line = (
                f"{r.variant:<14} {r.latency_ms:>9.1f} {r.speedup:>7.2f}x {r.latency_ratio:>8.3f} {r.file_bytes / 1e6:>9.1f} "
                f"{r.size_ratio:>6.3f} {r.peak_rss_bytes / 1e6:>12.0f} {r.rss_ratio:>6.3f} {r.rel_error:>10.2e}"
            )
            if quality:
                line += f" {r.fid:>10.2f} {100 * r.class_accuracy:>8.1f}%" if r.fid is not None else ""
            lines.append(line)
        prof = [r for r in self.rows if r.profile]
        if prof:
            lines += ["", "profile: share of ONNX Runtime kernel time by op type (top 6)"]
            for r in prof:
                top = sorted(r.profile.items(), key=lambda kv: -kv[1])[:6]
                lines.append(f"  {r.variant:<14} " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in top))
        return "\n".join(lines)


def model_bytes(model_path: Path) -> int:
    """The graph file plus every external-data file it names."""

    proto = onnx.load(str(model_path), load_external_data=False)
    files = {model_path}
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                files.add(model_path.parent / e.value)
    return sum(f.stat().st_size for f in files)


def _strip_shapes(src: Path, dst: Path) -> None:
    """A copy of the float graph without ``value_info`` (the dynamo exporter's recorded shapes make
    onnx's shape inference fail inside ``quantize_dynamic``), reusing the same external data file."""
    proto = onnx.load(str(src), load_external_data=False)
    del proto.graph.value_info[:]
    onnx.save_model(proto, str(dst))


def _quiet_root_logger(fn):
    """ONNX Runtime's quantizers log advice through the root logger; keep the bench output clean."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            return fn(*args, **kwargs)
        finally:
            root.setLevel(level)

    return wrapper


@_quiet_root_logger
def _ort_int8(float_path: Path, out: Path) -> None:
    stripped = float_path.parent / "float-noshapes.onnx"
    _strip_shapes(float_path, stripped)
    out.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(str(stripped), str(out), weight_type=QuantType.QInt8, use_external_data_format=True)


@_quiet_root_logger
def _ort_int4(float_path: Path, out: Path) -> None:
    # imported here, under _quiet_root_logger: importing this module calls logging.basicConfig(level=INFO)
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    proto = onnx.load(str(float_path))
    del proto.graph.value_info[:]
    q = MatMulNBitsQuantizer(proto, block_size=ORT_INT4_BLOCK, is_symmetric=False, accuracy_level=4)
    q.process()
    out.parent.mkdir(parents=True, exist_ok=True)
    q.model.save_model_to_file(str(out), use_external_data_format=True)


class _Worker:
    def __init__(self, model: Path, inputs: Path, output: Path, threads: int | None, provider: str):
        cmd = [sys.executable, "-m", "ditq.runtime.bench_worker", "--model", str(model), "--inputs", str(inputs),
               "--output", str(output), "--threads", str(threads or 0), "--provider", provider]  # fmt: skip
        self.model = model
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def ask(self, cmd: str | None = None) -> dict:
        line = ""
        try:
            if cmd is not None:
                self.proc.stdin.write(cmd + "\n")
                self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, ConnectionResetError):  # the worker is gone: said below
            pass
        if not line:
            raise DitqError(self._death())
        return json.loads(line)

    def _death(self) -> str:
        """Why the worker stopped answering, in one line: its last error line, or the signal that ended it."""
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.returncode
        err = (self.proc.stderr.read() or "").strip().splitlines()
        if code is not None and code < 0:
            how = f"killed by signal {-code}" + (" (out of memory? it holds one session; the bench holds one per variant at once)" if -code == 9 else "")
        else:
            how = err[-1] if err else f"exit status {code}, no output"
        return f"benchmark worker for {self.model} failed: {how}"

    def close(self) -> int:
        peak = self.ask("quit")["peak_rss_bytes"]
        self.proc.wait(timeout=60)
        return int(peak)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def bench(
    model_spec: str,
    variants: list[Variant],
    *,
    batch: int = 1,
    runs: int = 10,
    threads: int | None = None,
    provider: str = "cpu",
    work_dir: str | Path | None = None,
    quality: int = 0,
    quality_steps: int = 50,
    quality_seed: int = 0,
    profile: bool = False,
    image_size: int | None = None,
    progress: bool = True,
) -> BenchReport:
    """Build and measure ``variants`` of ``model_spec`` (see the module docstring)."""

    check_int(batch, "batch", 1, MAX_BATCH)
    check_int(runs, "runs", 1, MAX_RUNS)
    check_int(quality, "quality", 0, MAX_SAMPLES)
    check_int(quality_steps, "quality_steps", 1, MAX_STEPS)
    if threads is not None:
        check_int(threads, "threads", 1, MAX_THREADS)
    loaded = load_model(model_spec, image_size=image_size)
    adapter = adapter_for(loaded.model)
    config = dict(loaded.model.config)
    pipeline = loaded.pipeline  # kept for the quality runs after the torch model is released
    tokens = adapter.spec.image_tokens(config)
    if quality and not loaded.pipeline.judged_by_digits:
        raise DitqError(f"--quality needs a model with a judge (digits); {model_spec} has none")
    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="ditq-bench-")
        work_dir = tmp.name
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    kernels: dict[str, dict[str, int]] = {}
    bar = tqdm(total=len(variants), desc="bench: build", unit="variant", disable=not progress)
    workers: dict[str, _Worker] = {}
    try:
        for v in variants:
            bar.set_postfix_str(v.name)
            d = work / v.name.replace("@", "-")
            if v.kind == "float":
                d.mkdir(exist_ok=True)
                paths[v.name] = d / "model.onnx"
                export_float(adapter, loaded.model, paths[v.name])
            elif v.kind == "ort-int8":
                paths[v.name] = d / "model.onnx"
                _ort_int8(paths["float"], paths[v.name])
            elif v.kind == "ort-int4":
                paths[v.name] = d / "model.onnx"
                _ort_int4(paths["float"], paths[v.name])
            else:
                qdit = quantize_model(loaded.model, v.config.build(loaded).recipe, progress=False, target=v.target)
                kernels[v.name] = kernel_counts(qdit.plans)
                res = export(qdit, d, source=loaded.source, pipeline=loaded.pipeline, progress=False)
                paths[v.name] = res.model_path
                del qdit
                gc.collect()
            bar.update()
        bar.close()
        example = adapter.serving_inputs(config, batch=batch, seed=1234)
        inputs = work / "inputs.npz"
        np.savez(inputs, **{name: x.numpy() for name, x in zip(adapter.input_names, example)})
        del loaded, example  # the workers need the memory, not the torch model
        gc.collect()

        outputs = {v.name: work / f"out-{v.name.replace('@', '-')}.npy" for v in variants}
        for v in tqdm(variants, desc="bench: load sessions", unit="variant", disable=not progress):
            workers[v.name] = _Worker(paths[v.name], inputs, outputs[v.name], threads, provider)
            workers[v.name].ask()  # ready
        times: dict[str, list[float]] = {v.name: [] for v in variants}
        for r in tqdm(range(runs), desc="bench: interleaved runs", unit="round", disable=not progress):
            order = variants[r % len(variants):] + variants[: r % len(variants)]
            for v in order:
                times[v.name].append(workers[v.name].ask("run")["s"])
        peaks = {name: w.close() for name, w in workers.items()}
        workers.clear()

        profiles: dict[str, dict[str, float]] = {}
        if profile:
            for v in tqdm(variants, desc="bench: profile", unit="variant", disable=not progress):
                prof = work / f"profile-{v.name.replace('@', '-')}.json"
                subprocess.run(
                    [sys.executable, "-m", "ditq.runtime.bench_worker", "--model", str(paths[v.name]), "--inputs",
                     str(inputs), "--threads", str(threads or 0), "--profile", str(prof), "--runs", "3"],
                    check=True, capture_output=True,
                )  # fmt: skip
                raw = json.loads(prof.read_text())
                total = sum(raw.values()) or 1.0
                profiles[v.name] = {k: val / total for k, val in raw.items()}

        qual: dict[str, tuple[float, float]] = {}
        if quality:
            qual = _quality(paths, config, pipeline, quality, quality_steps, quality_seed, progress)

        y_float = np.load(outputs["float"]).astype(np.float64)
        base_t = float(np.median(times["float"]))
        base_size = model_bytes(paths["float"])
        base_rss = peaks["float"]
        rows = []
        for v in variants:
            med = float(np.median(times[v.name]))
            q75, q25 = np.percentile(times[v.name], [75, 25])
            out = np.load(outputs[v.name]).astype(np.float64)
            size = model_bytes(paths[v.name])
            rows.append(
                BenchRow(
                    variant=v.name, latency_ratio=med / base_t, size_ratio=size / base_size, rss_ratio=peaks[v.name] / base_rss,
                    rel_error=float(np.linalg.norm(out - y_float) / np.linalg.norm(y_float)),
                    latency_ms=1e3 * med, latency_iqr_ms=1e3 * float(q75 - q25), file_bytes=size,
                    peak_rss_bytes=peaks[v.name], speedup=base_t / med,
                    fid=qual.get(v.name, (None, None))[0], class_accuracy=qual.get(v.name, (None, None))[1],
                    kernels=kernels.get(v.name), profile=profiles.get(v.name),
                )  # fmt: skip
            )
        settings = {
            "model": model_spec, "batch": batch, "tokens": tokens, "runs": runs, "threads": threads, "provider": provider,
            "ort_int4_block": ORT_INT4_BLOCK, "quality_samples": quality, "quality_steps": quality_steps if quality else None,
        }  # fmt: skip
        return BenchReport(rows, settings)
    finally:
        bar.close()
        for w in workers.values():
            w.kill()
        if tmp is not None:
            tmp.cleanup()


def _quality(paths, config, pipe, n, steps, seed, progress) -> dict[str, tuple[float, float]]:
    """FID-digits and class accuracy of ``n`` samples per variant (same noise and labels for all)."""

    judge = DigitJudge.load()
    real = judge.features(to_unit_range(load_split().x_test))
    labels = np.arange(n, dtype=np.int64) % pipe.conditioning.num_classes
    noise = seeded_noise(seed, n, int(config["in_channels"]), int(config["sample_size"]))
    lo, hi = pipe.value_range
    out = {}
    for name, path in tqdm(paths.items(), desc="bench: quality", unit="variant", disable=not progress):
        x = generate(OrtDiT(path), noise, labels, steps=steps, cfg=1.5, method="ddim", null_class=pipe.conditioning.null_label,
                     clip_denoised=pipe.clip_denoised, seed=seed, batch_size=n)  # fmt: skip
        imgs = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
        out[name] = (fid(judge.features(imgs), real), judge.accuracy(imgs, labels))
    return out


def check_goals(report: BenchReport) -> list[str]:
    """The deployment goals of the ``ort`` target, checked on a report (for ``--check``)."""
    rows = {r.variant: r for r in report.rows}
    fails = []
    w8, w4, qd = rows.get("w8a8@ort"), rows.get("w4a8@ort"), rows.get("ort-int8")
    if w8 is not None:
        if w8.speedup < 2.0:
            fails.append(f"w8a8@ort is {w8.speedup:.2f}x faster than float, goal 2.0x")
        if qd is not None and w8.rel_error > qd.rel_error:
            fails.append(f"w8a8@ort error {w8.rel_error:.2e} is above quantize_dynamic's {qd.rel_error:.2e}")
    if w4 is not None:
        for what, got, goal, better in (("speedup", w4.speedup, 1.2, "ge"), ("size ratio", w4.size_ratio, 0.16, "le"),
                                        ("RSS ratio", w4.rss_ratio, 0.35, "le")):  # fmt: skip
            if (better == "ge" and got < goal) or (better == "le" and got > goal) or math.isnan(got):
                fails.append(f"w4a8@ort {what} {got:.3f}, goal {'>=' if better == 'ge' else '<='} {goal}")
    return fails
