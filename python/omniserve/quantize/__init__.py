"""Offline quantization tools: QoQ (`qoq/`), RTN checkpoints, KV8 scale calibration, and the
DeepCompressor converter. They run or read models, so they sit above `omniserve.models`; what they
write is a format of `omniserve.formats`."""
