"""Torch -> ONNX: tracing through a model-family adapter, the PyTorch reference modules, and the export
workflow's graph building. The file contract it writes is :mod:`ditq.fileformat`."""
