"""ONNX adapter (extra ``onnx``): recalibrate the BatchNorm statistics stored in an ONNX file.

:func:`recalibrate` reads a model, runs it with onnxruntime over calibration data in batches,
hands every ``BatchNormalization`` input to the calibration core and writes a new file whose
``mean`` / ``var`` initializers hold the result. The input file is never modified.

Exporters fold a BatchNorm that follows a Conv into the Conv's weights (``torch.onnx.export``
in eval mode does by default). :func:`annotate` stores the per-channel moments of those Conv /
Gemm outputs on the source data in the model's metadata; :func:`recalibrate` then adapts them
to new data by moment matching folded into their weights, together with the remaining
``BatchNormalization`` nodes. :func:`export` exports a PyTorch model with a record of the node
that carries each BatchNorm and its eps, weight, bias and statistics; the folded layers of such
a file are recalibrated exactly, eps included, without source data.
"""

from ._calibrate import annotate, recalibrate
from ._export import export
from ._folded import LayerChoice, folded_layers

__all__ = ["LayerChoice", "annotate", "export", "folded_layers", "recalibrate"]
