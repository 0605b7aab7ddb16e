"""Quantization numerics and calibration algorithms (RTN; GPTQ and search build on these)."""

from ditq.calib.numerics import (
    QuantizedTensor,
    choose_qparams,
    dequantize,
    fake_quantize,
    quantize,
    quantize_rtn,
    qrange,
    sqnr_db,
)

__all__ = [
    "QuantizedTensor",
    "choose_qparams",
    "dequantize",
    "fake_quantize",
    "quantize",
    "quantize_rtn",
    "qrange",
    "sqnr_db",
]
