"""Quantization: weights, activations and the KV cache."""
