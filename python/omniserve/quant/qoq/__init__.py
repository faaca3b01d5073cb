"""QoQ (quattuor-octo-quattuor) quantization of Llama-family checkpoints: rotation, smoothing,
SmoothAttention, clipping, channel reordering and GPTQ, calibrated one layer at a time
(quantizer.py has the pipeline; study §4)."""

from omniserve.quant.qoq.calibration import CalibrationData, load_calibration
from omniserve.quant.qoq.quantizer import QoQOptions, QoQReport, quantize_checkpoint

__all__ = [
    "CalibrationData",
    "QoQOptions",
    "QoQReport",
    "load_calibration",
    "quantize_checkpoint",
]
