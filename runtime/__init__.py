"""ONNX Runtime side: sessions as model callables and validation. Importing this package imports no torch."""
