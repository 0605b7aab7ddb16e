"""ONNX graph passes (store low-bit weights, insert dynamic activation quantization) and structural checks."""
