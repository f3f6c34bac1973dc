"""Quantization on torchao: post-training (`quantize_model`, ``lit-bigmodel quantize``), quantization-aware
training (`QuantizationAware`), float8 training (`Float8Training`) and quantized exports (`save_quantized`).

Needs torchao (``pip install 'lit-bigmodel[quantization]'``); it is imported when a function runs.
"""

from lit_bigmodel.quantization.layers import (
    convert_fake_quantized,
    fake_quantize,
    find_targets,
    quantize_network,
    quantized_layers,
    weight_bytes,
)
from lit_bigmodel.quantization.save import export_quantized, save_quantized
from lit_bigmodel.quantization.schemes import SCHEMES, Scheme, check_scheme

__all__ = [
    "SCHEMES",
    "Scheme",
    "check_scheme",
    "convert_fake_quantized",
    "export_quantized",
    "fake_quantize",
    "find_targets",
    "quantize_network",
    "quantized_layers",
    "save_quantized",
    "weight_bytes",
]
