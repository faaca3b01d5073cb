"""QoQ (quattuor-octo-quattuor) quantization of Llama-family checkpoints: rotation, smoothing,
SmoothAttention, clipping, channel reordering and GPTQ, calibrated one layer at a time
(quantizer.py has the pipeline; docs/architecture.md#offline-quantization)."""

from omniserve.quantize.qoq.calibration import CalibrationData, load_calibration
from omniserve.quantize.qoq.quantizer import QoQOptions, QoQReport, quantize_checkpoint

__all__ = [
    "CalibrationData",
    "QoQOptions",
    "QoQReport",
    "load_calibration",
    "quantize_checkpoint",
]
