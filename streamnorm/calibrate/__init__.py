"""Framework-free calibration core: data streaming, per-layer estimators, scheduling, reports.

Adapters (``streamnorm.torch``, ``streamnorm.onnx``, ...) find their norm layers, run batches and
write results back; everything else about recalibration lives here and imports no framework.
"""
