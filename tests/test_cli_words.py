"""The command line speaks in flags: errors and warnings of the API that name its arguments
(``input_name=``, ``key=``, ``source=``, ``layers=``, ``workers=N``, ``out_path``) reach a
``streamnorm calibrate`` / ``annotate`` user as ``--input-name``, ``--key``, ``--source``, ..."""

from __future__ import annotations

import pathlib
import re
import warnings

import numpy as np
import pytest

from streamnorm._errors import InputError
from streamnorm.cli import main
from streamnorm.cli._words import cli_words, speaking_cli

#: a Python argument as the API writes it
_PYTHON_ARG = re.compile(
    r"\b(source|layers|exclude|input_name|key|workers|num_samples|client|bn_only)=|out_path"
)


@pytest.mark.parametrize(
    ("api", "cli"),
    [
        (
            "name the Conv / Gemm layers to adapt with layers= (--layers)",
            "name the Conv / Gemm layers to adapt with --layers",
        ),
        (
            "annotate the model first (streamnorm.onnx.annotate, or `streamnorm annotate MODEL "
            "--data SOURCE --out OUT`), give the source data (source=, or --source DATA), drop "
            "layers (exclude=, or --exclude NAME; ...), or on purpose (bn_only=True, or "
            "--bn-only)",
            "annotate the model first (`streamnorm annotate MODEL --data SOURCE --out OUT`), give "
            "the source data (--source DATA), drop layers (--exclude NAME; ...), or on purpose "
            "(--bn-only)",
        ),
        ("annotate it (layers=) or give source=", "annotate it (--layers) or give --source"),
        ("name it with input_name=", "name it with --input-name"),
        ("choose one with key= (--key NAME)", "choose one with --key NAME"),
        (
            "num_samples='auto' cannot run on a cluster (client=); give num_samples as a number",
            "--num-samples auto cannot run on a cluster (--scheduler / --workers); give "
            "--num-samples as a number",
        ),
        ("or use workers=N for a local cluster", "or use --workers N for a local cluster"),
        ("out_path 'a.onnx' is the input model", "--out 'a.onnx' is the input model"),
        (
            "needs mode='one-pass'; use mode='sequential'",
            "needs --mode one-pass; use --mode sequential",
        ),
        (
            "the model has 3 BatchNormalization node(s)",
            "the model has 3 BatchNormalization node(s)",
        ),
    ],
)
def test_cli_words(api: str, cli: str) -> None:
    assert cli_words(api) == cli
    assert not _PYTHON_ARG.search(cli_words(api))


def test_errors_and_warnings_of_a_block_are_reworded() -> None:
    with pytest.raises(InputError, match=r"^give the source data \(--source DATA\)$"):
        with speaking_cli():
            raise InputError("give the source data (source=, or --source DATA)")
    with pytest.warns(UserWarning, match=r"^only the BatchNorm nodes; give --source to adapt"):
        with speaking_cli():
            warnings.warn("only the BatchNorm nodes; give source= to adapt them", stacklevel=1)
    with pytest.raises(ValueError, match="source="):  # not a library error: left alone
        with speaking_cli():
            raise ValueError("source=")


def _error(capsys: pytest.CaptureFixture[str], rc: int) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    return err


def test_calibrate_and_annotate_errors_name_flags(tmp_path: pathlib.Path, capsys) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from _calib_fixtures import onnx_cnn

    x = np.random.default_rng(0).standard_normal((10, 2, 6, 6)).astype(np.float32)
    # a second graph input: the API says "name it with input_name="
    m = onnx_cnn(15)
    m.graph.input.append(onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1]))
    onnx.save(m, str(tmp_path / "two.onnx"))
    np.save(tmp_path / "x.npy", x)
    for cmd in ("calibrate", "annotate"):
        argv = [cmd, str(tmp_path / "two.onnx"), "--data", str(tmp_path / "x.npy")]
        err = _error(capsys, main([*argv, "--out", str(tmp_path / "o.onnx"), "--no-progress"]))
        assert "--input-name" in err and not _PYTHON_ARG.search(err), err
    # several arrays in a .npz: the API says "key= (--key NAME)"
    onnx.save(onnx_cnn(15), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "d.npz", a=x, b=x)
    argv = ["calibrate", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "d.npz")]
    err = _error(capsys, main([*argv, "--out", str(tmp_path / "o.onnx")]))
    assert "--key NAME" in err and not _PYTHON_ARG.search(err), err
    assert not (tmp_path / "o.onnx").exists()
