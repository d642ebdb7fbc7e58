"""The ``streamnorm`` command line: ``streamnorm compare | calibrate | annotate | shift | bench``.

Each subcommand lives in its own module, imported only when that subcommand runs. A module
provides ``add_arguments(parser)`` and ``run(args) -> int``.

Errors the user can fix are printed as one line on stderr with exit code 2, without a
traceback: the library's own errors (:class:`streamnorm._errors.StreamnormError`: bad input,
unreadable records, unwritable outputs, a missing optional extra) and an ``OSError`` about the
user's files (a missing, unreadable or unwritable path, a full disk). Anything else is a bug and
shows its traceback. Ctrl-C prints one line and exits with 130; ``SIGTERM`` (``kill``) is
handled the same way and exits with 143: temporary files are removed and an output that
existed is left as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from .._errors import InputError, StreamnormError

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
    "annotate": ("streamnorm.cli.annotate", "store the source moments of folded ONNX layers"),
    "shift": ("streamnorm.cli.shift", "test-time statistics under shift: corrupted digits"),
    "bench": (
        "streamnorm.cli.bench",
        "benchmark the moments kernels against numpy, torch and others",
    ),
}

#: exit codes
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 128 + 15  # SIGTERM

#: errno values that say a file of the user's cannot be written, whatever the path
_FILE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ENOSPC", "EFBIG", "EDQUOT", "EROFS", "EACCES", "EPERM", "ENAMETOOLONG")
    if hasattr(errno, name)
)


class UsageError(InputError):
    """A problem with the command-line input, reported as one line with exit code 2."""


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


def is_user_file_error(e: BaseException) -> bool:
    """An ``OSError`` about a file the user named: it carries a file name, or says the disk is
    full, the file too large, or the user lacks permission."""
    if not isinstance(e, OSError) or isinstance(e, ConnectionError):
        return False
    return e.filename is not None or e.errno in _FILE_ERRNOS


def is_interrupt(e: BaseException) -> bool:
    """A ``KeyboardInterrupt``, also one that reached us wrapped (a ``SystemError`` raised by a
    compiled kernel with the interrupt in its cause chain)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, KeyboardInterrupt):
            return True
        if not isinstance(cur, SystemError) and cur is not e:
            return False
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


@contextlib.contextmanager
def _sigterm_as_interrupt(terminated: list[int]) -> Iterator[None]:
    """Within the block, ``SIGTERM`` raises ``KeyboardInterrupt`` as Ctrl-C does (once; it is
    noted in ``terminated``), so that every ``finally`` and temporary-file cleanup runs. Only in
    the main thread, where Python delivers signals; the old handler is put back after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if not terminated:  # a second SIGTERM must not interrupt the cleanup of the first
            terminated.append(signum)
            raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _interrupted(prefix: str, terminated: list[int]) -> int:
    if terminated:
        print(f"{prefix}: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    print(f"{prefix}: interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``streamnorm`` with ``argv`` (default: ``sys.argv[1:]``); the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # only the chosen subcommand's module is imported
    name = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(name if name in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    prefix = f"streamnorm {args.command}"
    terminated: list[int] = []
    try:
        with _sigterm_as_interrupt(terminated):
            module = importlib.import_module(args._module)
            return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return _interrupted(prefix, terminated)
    except StreamnormError as e:
        print(f"{prefix}: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:
        if is_interrupt(e):
            return _interrupted(prefix, terminated)
        if is_user_file_error(e):
            print(f"{prefix}: error: {_one_line(e)}", file=sys.stderr)
            return EXIT_USER_ERROR
        raise


__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_TERMINATED",
    "EXIT_USER_ERROR",
    "SUBCOMMANDS",
    "UsageError",
    "build_parser",
    "is_interrupt",
    "is_user_file_error",
    "main",
]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
