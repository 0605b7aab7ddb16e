"""ONNX Runtime sessions for exported DiTs (no torch import on this path).

A model records the session configuration entries it needs in its ``ditq.session_config`` metadata (a
JSON object of ``SessionOptions`` config entries; ``ditq export`` writes it, the manifest repeats it), and
:func:`create_session` applies what the file records. For a ``qdq`` graph that is
``session.qdq_matmulnbits_accuracy_level=0``: ONNX Runtime fuses a weight-only ``DequantizeLinear ->
MatMul`` into ``MatMulNBits`` and by default (level 4) quantizes that kernel's *activations* to int8,
which changes the numbers the QDQ graph specifies (measured on the digits DiT: 42-55 dB instead of
129-133 dB agreement with the reference at W4A16). Level 0 keeps fp32.

ONNX Runtime's own in-model configuration (``ort_config`` metadata, read when
``ORT_LOAD_CONFIG_FROM_MODEL=1``) cannot carry config entries (1.31 reads thread counts, execution mode,
optimization level and profiling only), so a deployer sets the recorded entries on its session options.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ditq.errors import DitqError, one_line, shown
from ditq.fileformat import ACCURACY_LEVEL, EXACT_QDQ_CONFIG, META_SESSION_CONFIG
from ditq.untrusted import parse_json_object

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# the entries (and their values) a model may record: ONNX Runtime's accuracy levels 0 (fp32) .. 4 (int8)
ALLOWED_SESSION_CONFIG = {ACCURACY_LEVEL: ("0", "1", "2", "3", "4")}


def _ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise DitqError("onnxruntime is not installed: pip install 'ditq[cpu]' (or 'ditq[gpu]' for CUDA)") from None
    return ort


def recorded_session_config(meta: Mapping[str, str], where: str = "model") -> dict[str, str] | None:
    """The session config entries a model's metadata records (:data:`META_SESSION_CONFIG`); None when it
    records none. The entries reach ONNX Runtime, so only :data:`ALLOWED_SESSION_CONFIG` is accepted:
    anything else (another key, another value, JSON that is not an object) is one :class:`DitqError`."""
    text = meta.get(META_SESSION_CONFIG)
    if text is None:
        return None
    what = f"{where}: {META_SESSION_CONFIG}"
    config = parse_json_object(text, what)
    for key, value in config.items():
        if key not in ALLOWED_SESSION_CONFIG:
            raise DitqError(f"{what}: {shown(key, 60)} is not a config entry ditq applies (only {ACCURACY_LEVEL})")
        if not isinstance(value, str) or value not in ALLOWED_SESSION_CONFIG[key]:
            raise DitqError(f"{what}: {key} must be one of {', '.join(map(repr, ALLOWED_SESSION_CONFIG[key]))}, "
                            f"got {shown(value)}")  # fmt: skip
    return config


def model_session_config(model: str | Path | bytes) -> dict[str, str]:
    """The config entries ditq's sessions apply to a model file or serialized model
    (:func:`applied_session_config` of its metadata)."""
    import onnx
    from google.protobuf.message import DecodeError

    where = "in-memory model" if isinstance(model, bytes) else str(model)
    try:
        proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model), load_external_data=False)
    except (DecodeError, OSError, ValueError) as e:
        raise DitqError(f"{where}: not a readable ONNX model ({one_line(e, 200)})") from None
    return applied_session_config({p.key: p.value for p in proto.metadata_props}, where)


def applied_session_config(meta: Mapping[str, str], where: str = "model") -> dict[str, str]:
    """What the metadata records or, for a model that records nothing (written before ditq recorded it, or
    by another tool), :data:`EXACT_QDQ_CONFIG`, which runs any weight ``DequantizeLinear -> MatMul`` in
    the fp32 its graph states."""
    recorded = recorded_session_config(meta, where)
    return dict(EXACT_QDQ_CONFIG) if recorded is None else recorded


def create_session(
    model: str | Path | bytes,
    *,
    provider: str = "cpu",
    config: Mapping[str, str] | None = None,
    threads: int | None = None,
    profile_prefix: str | None = None,
):
    """An ``onnxruntime.InferenceSession`` for a model file (or serialized model with its weights inline)
    on ``provider`` (``cpu`` or ``cuda``) with the session config entries ``config`` (None: those the
    model records, :func:`model_session_config`; ``{}``: ONNX Runtime's defaults); ``profile_prefix``
    turns on ONNX Runtime's profiler."""
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
    for key, value in (model_session_config(model) if config is None else config).items():
        so.add_session_config_entry(key, value)
    if threads:
        so.intra_op_num_threads = threads
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so, providers=providers)
    except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        raise DitqError(f"{where}: ONNX Runtime cannot load the model ({one_line(e, 300)})") from None


def _run_options():
    """Run options that keep ONNX Runtime's own log quiet: a failed run is reported once, as a DitqError."""
    opts = _ort().RunOptions()
    opts.log_severity_level = 4  # fatal only
    return opts


def _failure(where: str, e: Exception) -> DitqError:
    # ORT's messages carry C++ source paths and signatures: one_line keeps the start and the cause
    text = one_line(str(e).lstrip().removeprefix("[ONNXRuntimeError] : "), 300)
    return DitqError(f"{where}: ONNX Runtime failed while running the model ({text})")


def run_session(session, feeds: dict[str, np.ndarray], outputs: list[str] | None = None, *, where: str) -> list[np.ndarray]:
    """``session.run(outputs, feeds)``; any failure inside ONNX Runtime (memory that cannot be allocated,
    a shape the graph rejects, a kernel error) becomes one :class:`DitqError` naming ``where``."""
    try:
        return session.run(outputs, feeds, _run_options())
    except Exception as e:  # ORT raises its own exception types (Fail, RuntimeException, InvalidArgument, ...)
        raise _failure(where, e) from None


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
                "tensor(bool)": np.bool_, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class OrtDiT:
    """An exported model as a callable over numpy arrays in its graph's input order (a DiT's ``(sample,
    timestep, class_labels)``; any family's inputs by :meth:`run_feeds`) -> the first output. Each array
    is converted to the element type the graph declares for it.

    ``io_binding`` (default: on for CUDA) binds the inputs and lets ONNX Runtime allocate the output on
    the provider's device, copying it back once per call, instead of ``run``'s per-call staging."""

    def __init__(self, model_path: str | Path, *, io_binding: bool | None = None, **session_kwargs):
        self.session = create_session(model_path, **session_kwargs)
        self.where = "in-memory model" if isinstance(model_path, bytes) else str(model_path)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.input_types = {i.name: _NUMPY_TYPES.get(i.type) for i in self.session.get_inputs()}
        self.output_name = self.session.get_outputs()[0].name
        provider = session_kwargs.get("provider", "cpu")
        self.io_binding = provider == "cuda" if io_binding is None else io_binding
        self.device = "cuda" if provider == "cuda" else "cpu"

    def __call__(self, *arrays: np.ndarray) -> np.ndarray:
        return self.run_feeds(dict(zip(self.input_names, arrays)))

    def run_feeds(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """The first output for ``feeds`` (input name -> array)."""
        feeds = {n: np.ascontiguousarray(a, self.input_types.get(n)) for n, a in feeds.items()}
        if not self.io_binding:
            return run_session(self.session, feeds, where=self.where)[0]
        try:
            binding = self.session.io_binding()
            for name, arr in feeds.items():
                binding.bind_cpu_input(name, arr)
            binding.bind_output(self.output_name, self.device)
            self.session.run_with_iobinding(binding, _run_options())
            return binding.copy_outputs_to_cpu()[0]
        except Exception as e:  # as in run_session
            raise _failure(self.where, e) from None
