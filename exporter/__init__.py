"""Torch -> ONNX: tracing, the PyTorch reference modules, and the export pipeline.

The constants below are importable without torch (the CLI builds its parser from them)."""

TARGETS = ("qdq", "ort")  # portable QDQ graph | ONNX Runtime low-bit kernels (ditq.graphs.lower_ort)
DEFAULT_OPSET = 21  # blocked QuantizeLinear/DequantizeLinear and int4/uint4 (ONNX opset 21)
INT2_OPSET, INT2_IR = 25, 13  # the first opset / IR version with INT2/UINT2 tensors (2-bit weight codes)
MODEL_FILE = "model.onnx"  # the graph inside an exported folder
