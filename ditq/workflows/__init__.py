"""Workflows: the top layer. Each module orchestrates the layers below it (load, quantize, export,
validate, sample, judge) for one job the CLI and the Python API offer; nothing below imports them."""
