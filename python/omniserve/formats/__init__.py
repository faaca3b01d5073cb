"""Run-time number formats: precisions, weight, activation and KV cache quantization, QServe int4
packing, the torch reference GEMMs, and the quantized checkpoint formats the loader reads.

What layers and kernels store and compute with, so this imports none of them (nor models); the
offline tools that produce these formats from a model are `omniserve.quantize`.
"""
