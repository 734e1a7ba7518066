"""Weight quantization (NF4 / FP4 / int4 / int4_sym / int8), quantized linears, exports."""
from qru.quant.formats import FORMATS, QTensor, dequantize, quantize
from qru.quant.qlinear import QuantLinear, quantize_model

__all__ = ["FORMATS", "QTensor", "QuantLinear", "dequantize", "quantize", "quantize_model"]
