"""``streamnorm shift``: the corrupted-digits benchmark of the test-time estimators."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from . import UsageError
from ._args import keywords


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


#: The flags that set a :class:`~streamnorm.shift.ShiftConfig` field of the same name
#: (``--batch-sizes`` -> ``batch_sizes``), in ``--help`` order: ``(flag, argparse type, help)``.
#: Their defaults are the config's.
_CONFIG_FLAGS: tuple[tuple[str, Callable[[str], Any], str], ...] = (
    ("--seed", int, "seed (default 0)"),
    ("--epochs", int, "training epochs"),
    ("--corruptions", _names, "comma-separated corruption names (default: all eight)"),
    ("--severities", _ints, "comma-separated severities 1..5 (default: all)"),
    ("--batch-sizes", _ints, "comma-separated test batch sizes (default 1,8,32,128)"),
    ("--estimators", _names, "comma-separated adapt names (default: all five)"),
    ("--online-samples", int, "stream length at batch size 1 per cell"),
    ("--max-batches", int, "batches streamed per estimator and batch size > 1 (default 16)"),
    ("--warmup", int, "samples streamed before the frozen batch-size-1 check"),
    ("--threads", int, "PyTorch and Numba threads (default 1)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``streamnorm shift``."""
    from ..shift import ShiftConfig

    d = ShiftConfig()
    parser.add_argument("--out", default="shift", help="output folder (default ./shift)")
    for flag, kind, text in _CONFIG_FLAGS:
        default = getattr(d, flag[2:].replace("-", "_"))
        parser.add_argument(flag, type=kind, default=default, help=text)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table, write shift.json and shift.png."""
    from .._io import check_output_dir
    from ..shift import ShiftConfig, table, write_outputs
    from ..shift import run as run_shift

    try:
        out = check_output_dir(args.out)
        flags = keywords(ShiftConfig, args, progress=not args.no_progress)
        cfg = ShiftConfig(**flags).checked()
    except ValueError as e:
        raise UsageError(str(e)) from None
    result = run_shift(cfg)
    top = max(cfg.severities)
    print(table(result, top))
    paths = write_outputs(result, out)
    print(f"wrote {', '.join(paths)} in {result['seconds']:.0f} s", file=sys.stderr)
    return 0
