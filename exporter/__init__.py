"""Torch -> ONNX: tracing, the PyTorch reference modules, and the export pipeline."""
