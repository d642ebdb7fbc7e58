"""The ``streamnorm`` command line: ``streamnorm compare | calibrate | bench``.

Each subcommand lives in its own module, imported only when that subcommand runs. A module
provides ``add_arguments(parser)`` and ``run(args) -> int``. Errors the user can fix
(``ValueError``, ``TypeError``, ``FileNotFoundError``, a missing optional extra) are printed as one
line on stderr with exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "compare": (
        "streamnorm.cli.compare",
        "train a small BN network on digits and compare test-time estimators",
    ),
    "calibrate": (
        "streamnorm.cli.calibrate",
        "recalibrate the BatchNorm statistics of a saved PyTorch or ONNX model",
    ),
    "bench": (
        "streamnorm.cli.bench",
        "benchmark the moments kernels against numpy, torch and others",
    ),
}


class UsageError(Exception):
    """A problem with the user's input, reported as one line with exit code 2."""


def build_parser(load: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``load`` names the subcommand whose module adds its arguments."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="streamnorm", description="Fast, exact BatchNorm test-time statistics."
    )
    parser.add_argument("--version", action="version", version=f"streamnorm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        if name == load:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # only the chosen subcommand's module is imported
    name = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(name if name in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except (UsageError, ValueError, TypeError, FileNotFoundError, ImportError) as e:
        print(f"streamnorm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"streamnorm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
