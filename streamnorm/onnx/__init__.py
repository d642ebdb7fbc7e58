"""ONNX adapter (extra ``onnx``): recalibrate the BatchNorm statistics stored in an ONNX file.

:func:`recalibrate` reads a model, runs it with onnxruntime over calibration data in batches,
hands every ``BatchNormalization`` input to the calibration core and writes a new file whose
``mean`` / ``var`` initializers hold the result. The input file is never modified.
"""

from ._calibrate import recalibrate

__all__ = ["recalibrate"]
