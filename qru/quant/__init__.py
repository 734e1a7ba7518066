"""Weight quantization (NF4 / FP4 / int4 / int4_sym / int8, llama.cpp's GGUF block formats),
quantized linears, exports."""
from qru.quant.formats import ALL_FORMATS, FORMATS, GGUF_FORMATS, QTensor, dequantize, quantize
from qru.quant.qlinear import QuantLinear, quantize_model

__all__ = ["ALL_FORMATS", "FORMATS", "GGUF_FORMATS", "QTensor", "QuantLinear", "dequantize", "quantize",
           "quantize_model"]
