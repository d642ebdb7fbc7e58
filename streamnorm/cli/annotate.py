"""``streamnorm annotate``: store the source moments of an ONNX model's folded layers in it.

``streamnorm annotate MODEL --data SOURCE --out OUT`` runs the model over the source (training)
data and writes a copy whose metadata holds the per-channel moments of every Conv / Gemm output
whose BatchNorm the exporter folded away (see :func:`streamnorm.onnx.annotate`), so that
``streamnorm calibrate OUT --data TARGET --out ADAPTED`` can adapt it to new data without the
source data. It first prints every Conv / Gemm layer with whether it is taken and why (see
:func:`streamnorm.onnx.folded_layers`); ``--layers`` / ``--exclude`` change the choice. The
output is written atomically; on any error nothing is written.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import numpy as np

from .._errors import InputError
from ..calibrate import open_data
from ._args import count
from ._words import speaking_cli


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``streamnorm annotate``."""
    parser.add_argument("model", metavar="MODEL", help=".onnx file")
    parser.add_argument(
        "--data",
        required=True,
        metavar="PATH",
        help="source data: .npy (memory-mapped), .npz (see --key), or a folder / glob of .npy",
    )
    parser.add_argument(
        "--out", required=True, metavar="PATH", help="where to write the annotated model"
    )
    parser.add_argument(
        "--layers",
        metavar="NAME",
        nargs="+",
        default=None,
        help="Conv/Gemm layers (node or output names); default: those that look like folded "
        "BatchNorms (the list printed first says which and why)",
    )
    parser.add_argument(
        "--exclude",
        metavar="NAME",
        nargs="+",
        default=None,
        help="Conv/Gemm layers (node or output names) not to take (BatchNormalization nodes named "
        "here are ignored, so that one list serves annotate and calibrate)",
    )
    parser.add_argument(
        "--num-samples", metavar="N", type=count, default=None, help="use the first N samples"
    )
    parser.add_argument(
        "--batch-size", metavar="B", type=count, default=64, help="samples per batch (64)"
    )
    parser.add_argument("--key", metavar="NAME", default=None, help="array of a .npz data file")
    parser.add_argument(
        "--input-name", metavar="NAME", default=None, help="ONNX graph input to feed"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def show_layers(
    model: str,
    layers: Sequence[str] | None,
    exclude: Sequence[str] | None,
    annotated: bool = True,
) -> list[Any]:
    """Print every Conv / Gemm layer of an ONNX model, ``+`` taken as a folded BatchNorm or
    ``-`` not, with the reason; the choices (:func:`streamnorm.onnx.folded_layers`)."""
    from ..onnx import folded_layers

    choices = folded_layers(model, layers=layers, exclude=exclude, annotated=annotated)
    if not choices:
        return choices
    taken = sum(c.chosen for c in choices)
    print(
        f"Conv / Gemm layers: {taken} of {len(choices)} taken as folded BatchNorms "
        "(+ taken, - not; --layers / --exclude change it)"
    )
    width = max(len(c.name) for c in choices)
    for c in choices:
        print(f"  {'+' if c.chosen else '-'} {c.name:<{width}}  {c.op:<4}  {c.reason}")
    return choices


@speaking_cli()
def run(args: argparse.Namespace) -> int:
    """Annotate ``args.model`` with the moments measured on ``args.data``; 0 on success."""
    if not str(args.model).lower().endswith(".onnx"):
        raise InputError(f"MODEL must be an .onnx file, got {args.model!r}")
    from ..onnx import annotate

    ds = open_data(args.data, args.key)
    show_layers(args.model, args.layers, args.exclude, annotated=False)
    measured = annotate(
        args.model,
        ds,
        args.out,
        layers=args.layers,
        exclude=args.exclude,
        batch_size=args.batch_size,
        num_samples=args.num_samples,
        input_name=args.input_name,
        progress=not args.no_progress,
    )
    for name, m in measured.items():
        print(f"{name}: {np.asarray(m.mean).size} channels, {m.count} values per channel")
    if not measured:
        print("no folded layer: the BatchNormalization nodes are recalibrated as nodes")
    print(f"wrote {args.out}")
    return 0
