"""``streamnorm calibrate``: recalibrate the BatchNorm statistics of a saved model from data files.

MODEL is an ``.onnx`` file, a PyTorch checkpoint (a ``state_dict``, or a dict holding one under
``state_dict`` / ``model``) with ``--arch module:callable`` building the module, or a TorchScript
file (also with ``--arch``: the statistics are computed on the eager module and written back into
the TorchScript buffers). The output is written atomically; on any error nothing is written.
"""

from __future__ import annotations

import argparse
import importlib
import os
import zipfile
from collections.abc import Mapping
from typing import Any

from .._moments import atomic_write
from ..calibrate import _data
from . import UsageError

ESTIMATORS = ("population", "cumulative", "ema")
MODES = ("sequential", "one-pass")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``streamnorm calibrate``."""
    parser.add_argument(
        "model", metavar="MODEL",
        help=".onnx file, PyTorch checkpoint (needs --arch) or TorchScript file (needs --arch)",
    )  # fmt: skip
    parser.add_argument(
        "--data", required=True, metavar="PATH",
        help=".npy (memory-mapped), .npz (see --key), or a folder / glob of .npy shards",
    )  # fmt: skip
    parser.add_argument("--out", required=True, metavar="PATH", help="where to write the model")
    parser.add_argument("--estimator", default="population", choices=ESTIMATORS)
    parser.add_argument(
        "--momentum", metavar="P", default=None, help="momentum of --estimator ema (default 0.1)"
    )
    parser.add_argument(
        "--mode", default=None, choices=MODES,
        help="default: sequential for ONNX, one-pass for PyTorch",
    )  # fmt: skip
    parser.add_argument("--num-samples", metavar="N", default=None, help="use the first N samples")
    parser.add_argument("--batch-size", metavar="B", default="64", help="samples per batch (64)")
    parser.add_argument(
        "--arch", metavar="MODULE:CALLABLE", default=None,
        help="callable (no arguments) that builds the PyTorch module of a checkpoint",
    )  # fmt: skip
    parser.add_argument("--key", metavar="NAME", default=None, help="array of a .npz data file")
    parser.add_argument(
        "--input-name", metavar="NAME", default=None, help="ONNX graph input to feed"
    )
    parser.add_argument(
        "--scheduler", metavar="ADDRESS", default=None, help="run on this Dask scheduler"
    )
    parser.add_argument(
        "--workers", metavar="N", default=None, help="run on a local Dask cluster of N processes"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _int(name: str, v: str | None, positive: bool = True) -> int | None:
    if v is None:
        return None
    try:
        n = int(v)
    except ValueError:
        raise UsageError(f"{name} must be an integer, got {v!r}") from None
    if positive and n < 1:
        raise UsageError(f"{name} must be >= 1, got {n}")
    return n


def _float(name: str, v: str | None) -> float | None:
    if v is None:
        return None
    try:
        return float(v)
    except ValueError:
        raise UsageError(f"{name} must be a number, got {v!r}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _kind(path: str) -> str:
    if path.lower().endswith(".onnx"):
        return "onnx"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise ValueError(f"{path!r} is not a readable model file: {e}") from e
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
    return "checkpoint"


def build_arch(spec: str | None, why: str) -> Any:
    """Call ``module:callable`` (dotted attributes allowed) and check it gives a Module."""
    if not spec:
        raise UsageError(
            f"{why}; name the callable that builds the module with --arch module:callable"
        )
    if spec.count(":") != 1:
        raise UsageError(f"--arch must look like 'package.module:callable', got {spec!r}")
    mod_name, attr = spec.split(":")
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise UsageError(f"unknown --arch {spec!r}: cannot import {mod_name!r} ({e})") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"unknown --arch {spec!r}: {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"--arch {spec!r} is not callable")
    import torch

    model = obj()
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"--arch {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
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
    raise ValueError(
        f"{path!r} holds no state_dict: expected a dict of tensors, or a dict with one under "
        "'state_dict' or 'model'"
    )


def _load_into(model: Any, sd: Mapping[str, Any], path: str) -> None:
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"the weights in {path!r} do not fit --arch: {_first_line(e)}") from e


def _calibrate_torch(model: Any, ds: Any, args: Any, client: Any, opts: dict[str, Any]) -> Any:
    from ..torch._calibrate import recalibrate

    try:
        return recalibrate(model, ds, client=client, **opts)
    except RuntimeError as e:
        raise UsageError(f"the data {args.data!r} do not fit the model: {_first_line(e)}") from e


def _run_torch(kind: str, args: Any, ds: Any, client: Any, opts: dict[str, Any]) -> Any:
    import torch

    path, out = args.model, args.out
    if kind == "torchscript":
        try:
            scripted = torch.jit.load(path, map_location="cpu")
        except Exception as e:
            raise ValueError(
                f"{path!r} is not a readable TorchScript file: {_first_line(e)}"
            ) from e
        buffers = dict(scripted.named_buffers())
        if not any(k.endswith("running_mean") for k in buffers):
            raise UsageError(
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
        report = _calibrate_torch(model, ds, args, client, opts)
        new = model.state_dict()
        with torch.no_grad():
            for k, b in buffers.items():
                if k in new:
                    b.copy_(new[k])
        atomic_write(out, lambda f: torch.jit.save(scripted, f))
        return report
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{path!r} is not a readable PyTorch checkpoint ({_first_line(e)}); save "
            "model.state_dict() with torch.save"
        ) from e
    sd, container = _state_dict_of(obj, path)
    model = build_arch(args.arch, f"{path!r} is a checkpoint of weights only")
    _load_into(model, sd, path)
    report = _calibrate_torch(model, ds, args, client, opts)
    new = {k: v.detach().clone() for k, v in model.state_dict().items()}
    result: Any = new
    if container is not None:
        result = dict(obj)
        result[container] = new
    atomic_write(out, lambda f: torch.save(result, f))
    return report


def run(args: argparse.Namespace) -> int:
    """Recalibrate ``args.model`` on ``args.data`` and write ``args.out``; 0 on success."""
    path, out = args.model, args.out
    num = _int("--num-samples", args.num_samples)
    bs = _int("--batch-size", args.batch_size) or 64
    workers = _int("--workers", args.workers)
    momentum = _float("--momentum", args.momentum)
    if momentum is not None and args.estimator != "ema":
        raise UsageError("--momentum applies to --estimator ema only")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file {path!r} does not exist")
    if os.path.exists(out) and os.path.samefile(path, out):
        raise UsageError(f"--out {out!r} is the input model; the input is never modified")
    if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        raise FileNotFoundError(f"the folder of --out {out!r} does not exist")
    kind = _kind(path)
    if kind == "onnx" and args.estimator != "population":
        raise UsageError(
            "ONNX models are recalibrated with --estimator population (the graph always runs on "
            "stored statistics, so there are no batch statistics to average)"
        )
    if kind != "onnx" and args.input_name is not None:
        raise UsageError("--input-name applies to ONNX models only")
    ds = _data.open_data(args.data, args.key)
    progress = not args.no_progress

    def go(client: Any) -> Any:
        if kind == "onnx":
            from ..onnx import recalibrate

            return recalibrate(
                path, ds, out, mode=args.mode or "sequential", num_samples=num,
                batch_size=bs, input_name=args.input_name, progress=progress, client=client,
            )  # fmt: skip
        opts = dict(
            estimator=args.estimator, num_samples=num, mode=args.mode or "one-pass",
            progress=progress, batch_size=bs,
            momentum=0.1 if momentum is None else momentum,
        )  # fmt: skip
        return _run_torch(kind, args, ds, client, opts)

    if args.scheduler is not None or workers is not None:
        from ..calibrate._distributed import get_client

        with get_client(args.scheduler, workers) as client:
            report = go(client)
    else:
        report = go(None)
    print(report)
    print(f"wrote {out}")
    return 0
