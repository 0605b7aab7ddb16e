"""Torch -> ONNX: tracing, the PyTorch reference modules, and the export pipeline.

The constants below are importable without torch (the CLI builds its parser from them)."""

TARGETS = ("qdq", "ort")  # portable QDQ graph | ONNX Runtime low-bit kernels (ditq.graphs.lower_ort)
DEFAULT_OPSET = 21  # blocked QuantizeLinear/DequantizeLinear and int4/uint4 (ONNX opset 21)
MODEL_FILE = "model.onnx"  # the graph inside an exported folder
