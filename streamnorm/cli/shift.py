"""``streamnorm shift``: the corrupted-digits benchmark of the test-time estimators."""

from __future__ import annotations

import argparse
import sys

from . import UsageError


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def _names(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``streamnorm shift``."""
    from ..shift import ShiftConfig

    d = ShiftConfig()
    parser.add_argument("--out", default="shift", help="output folder (default ./shift)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed (default 0)")
    parser.add_argument("--epochs", type=int, default=d.epochs, help="training epochs")
    parser.add_argument(
        "--corruptions",
        type=_names,
        default=d.corruptions,
        help="comma-separated corruption names (default: all eight)",
    )
    parser.add_argument(
        "--severities",
        type=_ints,
        default=d.severities,
        help="comma-separated severities 1..5 (default: all)",
    )
    parser.add_argument(
        "--batch-sizes",
        type=_ints,
        default=d.batch_sizes,
        help="comma-separated test batch sizes (default 1,8,32,128)",
    )
    parser.add_argument(
        "--estimators",
        type=_names,
        default=d.estimators,
        help="comma-separated adapt names (default: all five)",
    )
    parser.add_argument(
        "--online-samples",
        type=int,
        default=d.online_samples,
        help="stream length at batch size 1 per cell",
    )
    parser.add_argument(
        "--max-batches",
        type=int,
        default=d.max_batches,
        help="batches streamed per estimator and batch size > 1 (default 16)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=d.warmup,
        help="samples streamed before the frozen batch-size-1 check",
    )
    parser.add_argument(
        "--threads", type=int, default=d.threads, help="PyTorch and Numba threads (default 1)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark, print the table, write shift.json and shift.png."""
    from .._io import check_output_dir
    from ..shift import ShiftConfig, table, write_outputs
    from ..shift import run as run_shift

    try:
        out = check_output_dir(args.out)
        cfg = ShiftConfig(
            seed=args.seed,
            epochs=args.epochs,
            corruptions=args.corruptions,
            severities=args.severities,
            batch_sizes=args.batch_sizes,
            estimators=args.estimators,
            online_samples=args.online_samples,
            max_batches=args.max_batches,
            warmup=args.warmup,
            threads=args.threads,
            progress=not args.no_progress,
        ).checked()
    except ValueError as e:
        raise UsageError(str(e)) from None
    result = run_shift(cfg)
    top = max(cfg.severities)
    print(table(result, top))
    paths = write_outputs(result, out)
    print(f"wrote {', '.join(paths)} in {result['seconds']:.0f} s", file=sys.stderr)
    return 0
