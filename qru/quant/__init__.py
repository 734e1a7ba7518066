"""Weight quantization (NF4 / FP4 / int4 / int4_sym / int8)."""
from qru.quant.formats import FORMATS, QTensor, dequantize, quantize

__all__ = ["FORMATS", "QTensor", "dequantize", "quantize"]
