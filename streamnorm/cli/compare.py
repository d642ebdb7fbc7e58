"""``streamnorm compare``: train the digits CNN and compare the test-time estimators."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from . import UsageError
from ._args import keywords


def _drop(text: str) -> float | int:
    """An int number of epochs ("2") or a float fraction ("0.25")."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an int number of epochs or a fraction in [0, 0.5), got {text!r}"
        ) from None


def _seeds(text: str) -> int | list[int]:
    """A count ("3": seeds 0, 1, 2) or a comma-separated list ("4,7")."""
    try:
        if "," in text:
            return [int(s) for s in text.split(",") if s.strip()]
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of seeds (3) or a comma-separated list (0,4,7), got {text!r}"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``streamnorm compare``."""
    parser.add_argument("--epochs", type=int, default=12, help="training epochs (default 12)")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="samples per training step (default 32)"
    )
    parser.add_argument(
        "--momentum",
        type=float,
        default=0.1,
        help="momentum p of the PyTorch-convention EMA, m <- (1-p) m + p x (default 0.1)",
    )
    parser.add_argument(
        "--drop-first",
        type=_drop,
        default=0.25,
        help="epochs the windowed average drops at the start: int count or fraction (0.25)",
    )
    parser.add_argument(
        "--drop-last",
        type=_drop,
        default=0.25,
        help="epochs the windowed average drops at the end: int count or fraction (0.25)",
    )
    parser.add_argument(
        "--seeds",
        type=_seeds,
        default=3,
        help="number of seeds (3 = seeds 0,1,2) or a comma-separated list (default 3)",
    )
    parser.add_argument(
        "--out",
        default="./streamnorm-compare",
        help="folder for compare.json and compare.png (default ./streamnorm-compare)",
    )
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    parser.add_argument(
        "--schedule",
        choices=("constant", "cosine"),
        default="constant",
        help="learning-rate schedule (default constant)",
    )
    parser.add_argument(
        "--no-plot", action="store_true", help="write compare.json only (no matplotlib needed)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="PyTorch threads for the run (default 1: fastest for this small network)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: Any) -> int:
    """Train, compare, print the table, write the files."""
    from .._extras import require
    from .._io import check_output_dir
    from ..compare import compare

    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size < 2:
        raise UsageError(
            f"--batch-size must be >= 2 (BatchNorm needs two samples), got {args.batch_size}"
        )
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out must be a folder, but {args.out!r} is a file")
    check_output_dir(args.out)  # fail before training, not after
    if not args.no_plot:
        require("matplotlib")
    result = compare(**keywords(compare, args, progress=not args.quiet))
    paths = result.save(args.out, plot=not args.no_plot)
    print(result.table())
    print()
    for p in paths.values():
        print(f"wrote {p}")
    sys.stdout.flush()
    return 0
