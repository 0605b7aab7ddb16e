"""ONNX Runtime sessions for exported DiTs (no torch import on this path).

``exact=True`` (the default for ``qdq`` models) sets ``session.qdq_matmulnbits_accuracy_level=0``: ONNX
Runtime fuses a weight-only ``DequantizeLinear -> MatMul`` into ``MatMulNBits`` and by default (level 4)
quantizes that kernel's *activations* to int8, which changes the numbers a QDQ graph specifies
(measured: 50 dB instead of 123 dB agreement with the reference on a W4A16 DiT). Level 0 keeps fp32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ditq.errors import DitqError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def _ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise DitqError("onnxruntime is not installed: pip install 'ditq[cpu]' (or 'ditq[gpu]' for CUDA)") from None
    return ort


def create_session(
    model: str | Path | bytes,
    *,
    provider: str = "cpu",
    exact: bool = True,
    threads: int | None = None,
    profile_prefix: str | None = None,
):
    """An ``onnxruntime.InferenceSession`` for a model file (or serialized model with its weights inline)
    on ``provider`` (``cpu`` or ``cuda``); ``profile_prefix`` turns on ONNX Runtime's profiler."""
    ort = _ort()
    if provider not in PROVIDERS:
        raise DitqError(f"unknown provider {provider!r}; choose from {list(PROVIDERS)}")
    if provider == "cuda" and PROVIDERS["cuda"] not in ort.get_available_providers():
        raise DitqError("CUDA is not available to ONNX Runtime here (install onnxruntime-gpu with CUDA, or use --provider cpu)")
    if not isinstance(model, bytes) and not Path(model).is_file():
        raise DitqError(f"model file not found: {model}")
    where = "in-memory model" if isinstance(model, bytes) else str(model)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if exact:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        so.intra_op_num_threads = threads
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so, providers=providers)
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        raise DitqError(f"{where}: ONNX Runtime cannot load the model ({' '.join(str(e).split())[:300]})") from None


class OrtDiT:
    """A DiT as a callable over numpy arrays: ``(sample, timestep, class_labels) -> output``.

    ``io_binding`` (default: on for CUDA) binds the inputs and lets ONNX Runtime allocate the output on
    the provider's device, copying it back once per call, instead of ``run``'s per-call staging."""

    def __init__(self, model_path: str | Path, *, io_binding: bool | None = None, **session_kwargs):
        self.session = create_session(model_path, **session_kwargs)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name
        provider = session_kwargs.get("provider", "cpu")
        self.io_binding = provider == "cuda" if io_binding is None else io_binding
        self.device = "cuda" if provider == "cuda" else "cpu"

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, class_labels: np.ndarray) -> np.ndarray:
        arrays = (np.ascontiguousarray(sample, np.float32), np.ascontiguousarray(timestep, np.int64), np.ascontiguousarray(class_labels, np.int64))
        if not self.io_binding:
            return self.session.run(None, dict(zip(self.input_names, arrays)))[0]
        binding = self.session.io_binding()
        for name, arr in zip(self.input_names, arrays):
            binding.bind_cpu_input(name, arr)
        binding.bind_output(self.output_name, self.device)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]
