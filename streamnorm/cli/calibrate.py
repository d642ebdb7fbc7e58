"""``streamnorm calibrate``: recalibrate the BatchNorm statistics of a saved model from data files.

MODEL is an ``.onnx`` file, a PyTorch checkpoint (a ``state_dict``, or a dict holding one under
``state_dict`` / ``model``) with ``--arch module:callable`` building the module, or a TorchScript
file (also with ``--arch``: the statistics are computed on the eager module and written back into
the TorchScript buffers), or a Keras 3 ``.keras`` file (``--momentum`` then in Keras' convention,
default 0.99). The output is written atomically; on any error nothing is written.

An ONNX model whose BatchNorms were folded into its Conv / Gemm layers at export is adapted by
moment matching, with the source moments from its metadata (``streamnorm annotate``) or measured
on ``--source``; the list printed first says which Conv / Gemm layers and why, ``--layers`` /
``--exclude`` change it, ``--bn-only`` recalibrates the BatchNormalization nodes alone.
"""

from __future__ import annotations

import argparse
import importlib
import os
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

from .._errors import InputError, InputNotFoundError, OutputPathError
from .._extras import require
from .._io import atomic_write, check_outputs
from ..calibrate import ESTIMATORS, MODES, Dataset, open_data
from ._args import count
from ._words import speaking_cli
from .annotate import show_layers


def _samples(text: str) -> int | str:
    """An integer >= 1 or ``auto`` (argparse ``type=``)."""
    return "auto" if text.strip().lower() == "auto" else count(text)


def _number(text: str) -> float:
    """A real number (argparse ``type=``); its range is checked by the estimator."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``streamnorm calibrate``."""
    parser.add_argument(
        "model",
        metavar="MODEL",
        help=".onnx file, PyTorch checkpoint (needs --arch) or TorchScript file (needs --arch)",
    )
    parser.add_argument(
        "--data",
        required=True,
        metavar="PATH",
        help=".npy (memory-mapped), .npz (see --key), or a folder / glob of .npy shards",
    )
    parser.add_argument("--out", required=True, metavar="PATH", help="where to write the model")
    parser.add_argument("--estimator", default="population", choices=ESTIMATORS)
    parser.add_argument(
        "--momentum",
        metavar="P",
        type=_number,
        default=None,
        help="momentum of --estimator ema (default 0.1)",
    )
    parser.add_argument(
        "--mode",
        default=None,
        choices=MODES,
        help="one-pass: one pass with every BatchNorm (ONNX: also every folded layer) "
        "normalizing by batch statistics, as PyTorch's train mode; sequential: one pass per "
        "depth, each layer after the layers upstream (the fixed point). Default: sequential "
        "for ONNX, one-pass for PyTorch",
    )
    parser.add_argument(
        "--num-samples",
        metavar="N",
        type=_samples,
        default=None,
        help="use the first N samples; 'auto': until every standard error is below --tol",
    )
    parser.add_argument(
        "--tol",
        metavar="T",
        type=_number,
        default=None,
        help="tolerance of --num-samples auto (0.01): mean in sigma, variance relative",
    )
    parser.add_argument(
        "--plot",
        metavar="PATH",
        default=None,
        help="PNG of the error against the samples seen, with the standard-error band",
    )
    parser.add_argument(
        "--batch-size", metavar="B", type=count, default=64, help="samples per batch (64)"
    )
    parser.add_argument(
        "--arch",
        metavar="MODULE:CALLABLE",
        default=None,
        help="callable (no arguments) that builds the PyTorch module of a checkpoint",
    )
    parser.add_argument("--key", metavar="NAME", default=None, help="array of a .npz data file")
    parser.add_argument(
        "--input-name", metavar="NAME", default=None, help="ONNX graph input to feed"
    )
    parser.add_argument(
        "--source",
        metavar="PATH",
        default=None,
        help="ONNX: source data for the source moments of folded Conv/Gemm layers "
        "(default: the model's metadata, see `streamnorm annotate`)",
    )
    parser.add_argument(
        "--layers",
        metavar="NAME",
        nargs="+",
        default=None,
        help="ONNX: the folded Conv/Gemm layers to adapt (node or output names)",
    )
    parser.add_argument(
        "--exclude",
        metavar="NAME",
        nargs="+",
        default=None,
        help="ONNX: layers to leave as they are (node or output names): Conv/Gemm layers not to "
        "adapt, BatchNormalization nodes whose stored statistics are kept",
    )
    parser.add_argument(
        "--bn-only",
        action="store_true",
        help="ONNX: recalibrate the BatchNormalization nodes only, adapt no folded layer",
    )
    parser.add_argument(
        "--scheduler", metavar="ADDRESS", default=None, help="run on this Dask scheduler"
    )
    parser.add_argument(
        "--workers",
        metavar="N",
        type=count,
        default=None,
        help="run on a local Dask cluster of N processes",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _kind(path: str) -> str:
    if path.lower().endswith(".onnx"):
        return "onnx"
    if path.lower().endswith(".keras"):
        return "keras"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise InputError(f"{path!r} is not a readable model file: {e}") from e
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
    return "checkpoint"


def build_arch(spec: str | None, why: str) -> Any:
    """Call ``module:callable`` (dotted attributes allowed) and check it gives a Module."""
    if not spec:
        raise InputError(
            f"{why}; name the callable that builds the module with --arch module:callable"
        )
    if spec.count(":") != 1:
        raise InputError(f"--arch must look like 'package.module:callable', got {spec!r}")
    mod_name, attr = spec.split(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise InputError(f"unknown --arch {spec!r}: cannot import {mod_name!r} ({e})") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"unknown --arch {spec!r}: {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"--arch {spec!r} is not callable")
    import torch

    model = obj()
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"--arch {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _state_dict_of(obj: Any, path: str) -> tuple[Mapping[str, Any], str | None]:
    import torch

    if isinstance(obj, Mapping):
        for k in ("state_dict", "model"):
            v = obj.get(k)
            if (
                isinstance(v, Mapping)
                and v
                and all(isinstance(t, torch.Tensor) for t in v.values())
            ):
                return v, k
        if obj and all(isinstance(t, torch.Tensor) for t in obj.values()):
            return obj, None
    raise InputError(
        f"{path!r} holds no state_dict: expected a dict of tensors, or a dict with one under "
        "'state_dict' or 'model'"
    )


def _load_into(model: Any, sd: Mapping[str, Any], path: str) -> None:
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise InputError(f"the weights in {path!r} do not fit --arch: {_first_line(e)}") from e


def _write(out: str, save: Callable[[Any], Any]) -> None:
    """Write ``out`` atomically; an ``OSError`` (full disk, no permission) becomes one line."""
    try:
        atomic_write(out, save)
    except OSError as e:
        raise OutputPathError(f"cannot write {out!r}: {e.strerror or e}") from e


def _calibrate_torch(model: Any, ds: Dataset, args: Any, client: Any) -> Any:
    from ..torch import recalibrate

    try:
        return recalibrate(
            model,
            ds,
            estimator=args.estimator,
            num_samples=args.num_samples,
            mode=args.mode or "one-pass",
            progress=not args.no_progress,
            batch_size=args.batch_size,
            momentum=0.1 if args.momentum is None else args.momentum,
            client=client,
            tol=args.tol,
        )
    except RuntimeError as e:
        raise InputError(f"the data {args.data!r} do not fit the model: {_first_line(e)}") from e


def _run_torchscript(args: Any, ds: Dataset, client: Any) -> Any:
    import torch

    path = args.model
    try:
        scripted = torch.jit.load(path, map_location="cpu")
    except Exception as e:
        raise InputError(f"{path!r} is not a readable TorchScript file: {_first_line(e)}") from e
    buffers = dict(scripted.named_buffers())
    if not any(k.endswith("running_mean") for k in buffers):
        raise InputError(
            f"{path!r} is a TorchScript module without BatchNorm buffers (frozen or "
            "optimized: its statistics are folded into constants and cannot be written "
            "back); recalibrate the checkpoint or an ONNX export instead"
        )
    model = build_arch(
        args.arch,
        "TorchScript modules cannot be hooked, so the statistics are computed on the eager "
        "module and written back",
    )
    _load_into(model, scripted.state_dict(), path)
    report = _calibrate_torch(model, ds, args, client)
    new = model.state_dict()
    with torch.no_grad():
        for k, b in buffers.items():
            if k in new:
                b.copy_(new[k])
    _write(args.out, lambda f: torch.jit.save(scripted, f))
    return report


def _run_checkpoint(args: Any, ds: Dataset, client: Any) -> Any:
    import torch

    path = args.model
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(
            f"{path!r} is not a readable PyTorch checkpoint ({_first_line(e)}); save "
            "model.state_dict() with torch.save"
        ) from e
    sd, container = _state_dict_of(obj, path)
    model = build_arch(args.arch, f"{path!r} is a checkpoint of weights only")
    _load_into(model, sd, path)
    report = _calibrate_torch(model, ds, args, client)
    new = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result: Any = new
    if container is not None:
        result = dict(obj)
        result[container] = new
    _write(args.out, lambda f: torch.save(result, f))
    return report


def _check_model_path(path: str) -> None:
    if os.path.isdir(path):
        raise InputError(f"model {path!r} is a directory; give the model file")
    if not os.path.isfile(path):
        raise InputNotFoundError(f"model file {path!r} does not exist")


def _check_out(args: Any, kind: str, ds: Dataset, source: Dataset | None) -> None:
    """Before the run: every output (--out, the external data file of an ONNX --out, --plot) is
    a writable file path, none of the inputs (the model, its external data, --data, --source)
    and no other output."""
    path, out = args.model, args.out
    if os.path.exists(out) and os.path.samefile(path, out):
        raise InputError(f"--out {out!r} is the input model; the input is never modified")
    reads = [path, args.data, *(p.path for p in ds.parts)]
    if source is not None:
        reads += [args.source, *(p.path for p in source.parts)]
    writes = [out]
    if kind == "onnx":
        from ..onnx._files import model_files

        model_reads, writes = model_files(path, out)
        reads += model_reads
    if args.plot is not None:
        writes.append(args.plot)
    check_outputs(writes, reads)


def _check_options(args: Any, kind: str) -> None:
    if args.momentum is not None and args.estimator != "ema":
        raise InputError("--momentum applies to --estimator ema only")
    if kind == "onnx" and args.estimator != "population":
        raise InputError(
            "ONNX models are recalibrated with --estimator population (the graph always runs on "
            "stored statistics, so there are no batch statistics to average)"
        )
    if kind != "onnx" and args.input_name is not None:
        raise InputError("--input-name applies to ONNX models only")
    onnx_only = (args.source, args.layers, args.exclude, args.bn_only or None)
    if kind != "onnx" and any(x is not None for x in onnx_only):
        raise InputError("--source / --layers / --exclude / --bn-only apply to ONNX models only")
    if args.tol is not None and args.num_samples != "auto":
        raise InputError("--tol applies to --num-samples auto only")
    if kind == "keras" and args.num_samples == "auto":
        raise InputError("--num-samples auto applies to PyTorch and ONNX models")
    if kind == "keras" and (args.scheduler is not None or args.workers is not None):
        raise InputError("--scheduler / --workers do not apply to Keras models (run locally)")


def _run_keras(args: Any, ds: Dataset) -> Any:
    from ..keras import recalibrate_file

    return recalibrate_file(
        args.model,
        ds,
        args.out,
        estimator=args.estimator,
        mode=args.mode or "one-pass",
        num_samples=args.num_samples,
        batch_size=args.batch_size,
        momentum=0.99 if args.momentum is None else args.momentum,
        progress=not args.no_progress,
    )


def _go(kind: str, args: Any, ds: Dataset, source: Dataset | None, client: Any) -> Any:
    if kind == "keras":
        return _run_keras(args, ds)
    if kind == "onnx":
        from ..onnx import recalibrate

        if not args.bn_only:
            show_layers(args.model, args.layers, args.exclude, annotated=args.source is None)
        return recalibrate(
            args.model,
            ds,
            args.out,
            mode=args.mode or "sequential",
            num_samples=args.num_samples,
            batch_size=args.batch_size,
            input_name=args.input_name,
            progress=not args.no_progress,
            client=client,
            tol=args.tol,
            source=source,
            layers=args.layers,
            exclude=args.exclude,
            bn_only=args.bn_only,
        )
    if kind == "torchscript":
        return _run_torchscript(args, ds, client)
    return _run_checkpoint(args, ds, client)


@speaking_cli()
def run(args: argparse.Namespace) -> int:
    """Recalibrate ``args.model`` on ``args.data`` and write ``args.out``; 0 on success.

    Everything that can be checked before the run is: the model path, the options, the data
    (opened, not read) and the output paths (writable files, none of them an input or another
    output).
    """
    _check_model_path(args.model)
    kind = _kind(args.model)
    _check_options(args, kind)
    ds = open_data(args.data, args.key)
    source = None if args.source is None else open_data(args.source, args.key)
    if args.plot is not None:
        require("matplotlib")
    _check_out(args, kind, ds, source)
    if args.scheduler is not None or args.workers is not None:
        from ..calibrate import get_client

        with get_client(args.scheduler, args.workers) as client:
            report = _go(kind, args, ds, source, client)
    else:
        report = _go(kind, args, ds, source, None)
    print(report)
    print(f"wrote {args.out}")
    if args.plot is not None:
        from ..calibrate import plot_samples

        plot_samples(report, args.plot)
        print(f"wrote {args.plot}")
    return 0
