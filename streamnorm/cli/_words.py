"""The library's messages in command-line words.

Errors and warnings of the Python API name its arguments (``source=``, ``layers=``,
``workers=N``, ``out_path``); on the command line the same advice must name the flags
(``--source``, ``--layers``, ``--workers N``, ``--out``). :func:`cli_words` rewrites a message;
:func:`speaking_cli` rewrites the errors and warnings that leave a block of CLI code. Messages
that already give both forms (``layers= (--layers)``, ``(source=, or --source DATA)``) keep
the command-line one only.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .._errors import StreamnormError

__all__ = ["cli_words", "speaking_cli"]

#: Python argument -> flag (``name=value`` becomes ``--flag value``)
_FLAGS = {
    "source": "--source",
    "layers": "--layers",
    "exclude": "--exclude",
    "input_name": "--input-name",
    "key": "--key",
    "workers": "--workers",
    "scheduler": "--scheduler",
    "num_samples": "--num-samples",
    "estimator": "--estimator",
    "mode": "--mode",
    "tol": "--tol",
    "batch_size": "--batch-size",
    "momentum": "--momentum",
}

_FLAG = r"--[a-z][\w-]*(?: [A-Z]+)?"


def _assignment(m: re.Match[str]) -> str:
    flag = _FLAGS[m.group(1)]
    return f"{flag} {m.group(3)}" if m.group(3) else flag


def _bare(m: re.Match[str]) -> str:
    return _FLAGS[m.group(1)]


#: applied in order
_RULES: list[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]]] = [
    # "(streamnorm.onnx.annotate, or `streamnorm annotate ...`)" -> "(`streamnorm annotate ...`)"
    (re.compile(r"\(streamnorm\.[\w.]+, or (`[^`]+`)\)"), r"(\1)"),
    # "(source=, or --source DATA)", "(bn_only=True, or --bn-only)" -> the flag
    (re.compile(rf"\(\w+=(?:\w+)?, or ({_FLAG})"), r"(\1"),
    # "layers= (--layers)", "bn_only=True (--bn-only)", "key= (--key NAME)" -> the flag
    (re.compile(rf"\b\w+=(?:True)? \(({_FLAG})\)"), r"\1"),
    (re.compile(r"\bbn_only=True\b"), "--bn-only"),
    (re.compile(r"\bclient=(?:\w+)?"), "--scheduler / --workers"),
    # name=value, name='value', name=
    (re.compile(r"\b(" + "|".join(_FLAGS) + r")=('?)([^\s',;)]*)\2"), _assignment),
    (re.compile(r"\bout_path\b"), "--out"),
    (re.compile(r"\bmodel_path\b"), "MODEL"),
    (re.compile(r"\b(num_samples|batch_size|input_name|tol)\b"), _bare),
    (re.compile(r"\bstreamnorm\.onnx\.folded_layers\b"), "the layer list above"),
    # a flag given twice in a row ("--layers (--layers)") once
    (re.compile(rf"({_FLAG}) \(\1\)"), r"\1"),
]


def cli_words(text: str) -> str:
    """``text`` with the Python argument names of the API replaced by the CLI's flags.

    Examples
    --------
    >>> cli_words("name the Conv / Gemm layers to adapt with layers= (--layers)")
    'name the Conv / Gemm layers to adapt with --layers'
    >>> cli_words("give the source data (source=, or --source DATA)")
    'give the source data (--source DATA)'
    >>> cli_words("num_samples='auto' cannot run on a cluster (client=); or use workers=N")
    '--num-samples auto cannot run on a cluster (--scheduler / --workers); or use --workers N'
    """
    for pattern, repl in _RULES:
        text = pattern.sub(repl, text)
    return text


@contextmanager
def speaking_cli() -> Iterator[None]:
    """Rewrite the library errors (:class:`~streamnorm._errors.StreamnormError`) and the
    warnings raised inside the block with :func:`cli_words`; warnings are issued again, after
    the block, where they were raised (so the warning filters apply as before)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        except StreamnormError as e:
            if e.args and isinstance(e.args[0], str):
                e.args = (cli_words(e.args[0]), *e.args[1:])
            raise
        finally:
            pending = list(caught)
    for w in pending:
        warnings.warn_explicit(
            cli_words(str(w.message)), w.category, w.filename, w.lineno, source=w.source
        )
