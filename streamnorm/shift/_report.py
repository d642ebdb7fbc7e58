"""The benchmark's outputs: a terminal table, ``shift.json`` and ``shift.png``."""

from __future__ import annotations

import json
import os
from typing import Any

from .._extras import require
from .._io import atomic_write


def _pct(v: float | None) -> str:
    return "   n/a" if v is None else f"{100 * v:6.1f}"


def table(result: dict[str, Any], severity: int = 5) -> str:
    """Mean error (%) over the corruptions and gap recovered (%) per estimator and batch size."""
    s = result["summary"].get(str(severity))
    if not s:
        return f"(severity {severity} was not run)"
    sizes = list(next(iter(s["estimators"].values())))
    head = "estimator         " + "".join(f"  err@{b:<4}" for b in sizes)
    head += "".join(f"  gap@{b:<4}" for b in sizes)
    lines = [
        f"severity {severity}, mean over {len(result['config']['corruptions'])} corruptions: "
        f"source {100 * s['source']:.1f} %, oracle (AdaBN) {100 * s['oracle']:.1f} %, "
        f"clean {100 * result['clean_error']:.1f} %",
        head,
    ]
    for name, per in s["estimators"].items():
        errs = "".join(f"  {_pct(per[b]['error'])}   " for b in sizes)
        gaps = "".join(f"  {_pct(per[b]['gap_recovered'])}   " for b in sizes)
        lines.append(f"{name:<18}{errs}{gaps}")
    for key, g in result.get("goals", {}).items():
        lines.append(f"goal {key}: {json.dumps(g)}")
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str) -> None:
    """``result`` as indented JSON, written atomically."""
    text = json.dumps(result, indent=1, sort_keys=False, default=str) + "\n"
    atomic_write(path, lambda f: f.write(text), mode="w")


def plot(result: dict[str, Any], path: str) -> None:
    """Error vs severity per estimator (batch size 32, or the largest run) and gap vs batch size."""
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot")
    summary = result["summary"]
    sev = sorted(int(s) for s in summary)
    first = summary[str(sev[0])]["estimators"]
    sizes = list(next(iter(first.values())))
    bs = "32" if "32" in sizes else sizes[-1]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.plot(sev, [100 * summary[str(s)]["source"] for s in sev], "k--", label="source")
    a.plot(sev, [100 * summary[str(s)]["oracle"] for s in sev], "k:", label="oracle (AdaBN)")
    for name in first:
        ys = [summary[str(s)]["estimators"][name][bs]["error"] for s in sev]
        a.plot(sev, [None if y is None else 100 * y for y in ys], "o-", label=name)
    a.set(xlabel="severity", ylabel="error (%)", title=f"error vs severity, batch size {bs}")
    a.legend(fontsize=8)
    top = str(sev[-1])
    for name in first:
        gaps = [summary[top]["estimators"][name][s]["gap_recovered"] for s in sizes]
        b.plot(
            [int(s) for s in sizes],
            [None if g is None else 100 * g for g in gaps],
            "o-",
            label=name,
        )
    b.set_xscale("log", base=2)
    b.set(
        xlabel="test batch size",
        ylabel="gap recovered (%)",
        title=f"source-to-oracle gap recovered, severity {top}",
    )
    b.axhline(100, color="k", lw=0.5)
    b.legend(fontsize=8)
    fig.tight_layout()

    def save(f: Any) -> None:
        fig.savefig(f, format="png", dpi=110)

    try:
        atomic_write(path, save)
    finally:
        plt.close(fig)


def write_outputs(result: dict[str, Any], out_dir: str) -> list[str]:
    """``shift.json`` and ``shift.png`` in ``out_dir`` (created if needed); their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "shift.json"), os.path.join(out_dir, "shift.png")]
    write_json(result, paths[0])
    plot(result, paths[1])
    return paths
