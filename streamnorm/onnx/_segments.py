"""Sequential ONNX recalibration at about the cost of one pass: the graph cut into segments.

The sequential passes of :func:`streamnorm.onnx.recalibrate` go depth by depth; a pass from the
data recomputes the whole graph up to that depth. An ONNX graph is static, so it can instead be
cut once per recalibration into one segment per pass: segment ``s`` computes the inputs of the
layers of pass ``s`` from the *frontier*, the tensors of earlier segments that later ones read,
with the statistics and folded weights of passes ``0 .. s-1`` already written, and hands on the
next frontier. A :class:`SegmentCursor` holds one batch's frontier between passes
(:class:`streamnorm.calibrate.Cursor`), so every node runs once per batch, plus once more for a
folded Conv / Gemm: its output before its weights are adapted is the layer's input, and its
output after is what the graph reads downstream.

Which segment computes a node follows from the pass of every adapted layer: a tensor's *level*
is the last pass whose statistics or weights it depends on (-1 for none); a node runs in the
segment after the level of its outputs, which for a BatchNorm node or a folded layer of pass
``p`` is ``p + 1``. Only nodes that a later layer's input needs are kept; nodes without inputs
(``Constant``) are copied into every segment that reads them. A graph with subgraphs (``If``,
``Loop``, ``Scan``), whose bodies may read outer tensors, is not cut (:func:`segment_cursors`
then gives no cursors and every pass runs from the data).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import calibrate as core
from .._errors import InputError
from .._extras import require
from ._files import ModelInput

__all__ = ["SegmentCursor", "Target", "segment_cursors"]


@dataclass(frozen=True)
class Target:
    """One adapted layer as the segments see it.

    Attributes
    ----------
    name : str
        The layer name.
    tensor : str
        The tensor that is the layer's input: a BatchNorm's ``X``, a folded layer's output.
    node : int
        The index of the layer's node in the graph.
    folded : bool
        A folded Conv / Gemm: its own output is the layer's input (computed before its weights
        are adapted).
    """

    name: str
    tensor: str
    node: int
    folded: bool


@dataclass
class _Segment:
    """One segment: its nodes (a model built on first use) and its tensors."""

    nodes: list[Any]
    inputs: list[str]
    outputs: list[str]
    copies: set[str]
    session: Any = None


@dataclass
class _Plan:
    """The segments of one recalibration and what their cursors share."""

    model: Any
    source: ModelInput
    providers: list[str] | None
    feeds: dict[str, np.ndarray]
    passes: list[list[str]]
    targets: dict[str, Target]
    segments: list[_Segment]
    last_use: dict[str, int]
    inits: dict[str, Any] = field(default_factory=dict)
    types: dict[str, Any] = field(default_factory=dict)

    def session(self, s: int, fed: dict[str, np.ndarray]) -> Any:
        """The onnxruntime session of segment ``s`` (built from the dtypes of ``fed``)."""
        seg = self.segments[s]
        if seg.session is None:
            seg.session = _session(self._model(seg, fed), self.providers)
        return seg.session

    def _model(self, seg: _Segment, fed: dict[str, np.ndarray]) -> bytes:
        onnx = require("onnx")
        helper = onnx.helper
        m = onnx.ModelProto()
        m.ir_version = self.model.ir_version
        m.opset_import.extend(self.model.opset_import)
        m.functions.extend(self.model.functions)
        g = m.graph
        g.name = "segment"
        g.node.extend(seg.nodes)
        read = {i for n in seg.nodes for i in n.input}
        g.initializer.extend(self.inits[n] for n in sorted(read) if n in self.inits)
        for name in seg.inputs:
            elem = helper.np_dtype_to_tensor_dtype(fed[name].dtype)
            g.input.append(helper.make_tensor_value_info(name, elem, None))
        for name in seg.outputs:
            if name in self.types:
                g.output.append(helper.make_tensor_value_info(name, self.types[name], None))
            else:
                g.output.append(helper.make_empty_tensor_value_info(name))
        return bytes(m.SerializeToString())


def _session(model_bytes: bytes, providers: list[str] | None) -> Any:
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # a segment's run alternates with the core's moments kernels: threads that spin waiting for
    # the next run would take the cores those kernels run on
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(
            model_bytes, opts, providers=providers or ["CPUExecutionProvider"]
        )
    except Exception as e:
        raise InputError(f"onnxruntime cannot run a segment of the model: {e}") from e


def _has_subgraph(model: Any) -> bool:
    return any(a.HasField("g") or len(a.graphs) for n in model.graph.node for a in n.attribute)


def _elem_types(model: Any) -> dict[str, int]:
    onnx = require("onnx")
    try:
        vis = list(onnx.shape_inference.infer_shapes(model).graph.value_info)
    except Exception:  # best effort: outputs without a type are left to onnxruntime
        vis = []
    types: dict[str, int] = {}
    for v in [*model.graph.input, *model.graph.output, *model.graph.value_info, *vis]:
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    return types


def plan_segments(
    model: Any,
    targets: list[Target],
    passes: list[list[str]],
    source: ModelInput,
    feeds: dict[str, np.ndarray],
    providers: list[str] | None,
) -> _Plan:
    """Cut the calibration model ``model`` into one segment per pass (see the module).

    Parameters
    ----------
    model : onnx.ModelProto
        The calibration model (statistics and folded weights as graph inputs, fed from
        ``feeds``, which the adapter updates in place as it writes).
    targets : list of Target
        Every layer of ``passes``.
    passes : list of list of str
        The layer names of each pass, in order.
    source : ModelInput
        The data input.
    """
    g = model.graph
    by_name = {t.name: t for t in targets}
    pass_of = {name: i for i, names in enumerate(passes) for name in names}
    adapted = {by_name[name].node: i for name, i in pass_of.items()}
    folded_at = {by_name[name].node: i for name, i in pass_of.items() if by_name[name].folded}
    level: dict[str, int] = {}
    seg_of: dict[int, int] = {}
    consts: dict[str, int] = {}
    for idx, node in enumerate(g.node):
        if not [x for x in node.input if x]:
            for o in node.output:
                consts[o] = idx
            continue
        lv = max((level.get(x, -1) for x in node.input if x), default=-1)
        if idx in adapted:
            lv = max(lv, adapted[idx])
        seg_of[idx] = lv + 1
        for o in node.output:
            level[o] = lv
    # what the layers' inputs need, backwards: BatchNorm inputs and the inputs of folded layers
    need: set[str] = set()
    for t in targets:
        if t.folded:
            need.update(x for x in g.node[t.node].input if x)
        else:
            need.add(t.tensor)
    kept: set[int] = set()
    for idx in range(len(g.node) - 1, -1, -1):
        node = g.node[idx]
        if idx in seg_of and any(o in need for o in node.output):
            kept.add(idx)
            need.update(x for x in node.input if x)
    n_seg = len(passes)
    nodes: list[list[tuple[int, Any]]] = [[] for _ in range(n_seg)]
    copies: list[set[str]] = [set() for _ in range(n_seg)]
    for idx in sorted(kept):
        if seg_of[idx] < n_seg:
            nodes[seg_of[idx]].append((idx, g.node[idx]))
    for idx, p in folded_at.items():
        nodes[p].append((idx, g.node[idx]))
        copies[p].update(o for o in g.node[idx].output if o)
    reads: list[set[str]] = []
    for s in range(n_seg):
        read = {x for _, node in nodes[s] for x in node.input if x}
        have = {i for i, _ in nodes[s]}
        for i in sorted({consts[x] for x in read if x in consts} - have):
            nodes[s].append((i, g.node[i]))
        nodes[s].sort(key=lambda t: t[0])
        reads.append({x for _, node in nodes[s] for x in node.input if x})
    last_use: dict[str, int] = {}  # the last segment that reads a tensor or pass that hands it
    for s in range(n_seg):
        for x in reads[s]:
            last_use[x] = max(last_use.get(x, -1), s)
    handed: dict[str, int] = {}
    for t in targets:
        if not t.folded:
            handed[t.tensor] = max(handed.get(t.tensor, -1), pass_of[t.name])
            last_use[t.tensor] = max(last_use.get(t.tensor, -1), pass_of[t.name])
    inits = {t.name: t for t in g.initializer}
    segments = []
    for s in range(n_seg):
        own = {o for _, node in nodes[s] for o in node.output}
        inputs = sorted(x for x in reads[s] if x not in own and x not in inits)
        # a layer's input, or read by a later segment (a tensor only this one reads stays in)
        outputs = {
            o for o in own if o in copies[s] or handed.get(o, -1) >= s or (last_use.get(o, -1) > s)
        }
        outputs -= set(consts)
        segments.append(
            _Segment([node for _, node in nodes[s]], inputs, sorted(outputs), copies[s])
        )
    return _Plan(
        model,
        source,
        providers,
        feeds,
        passes,
        by_name,
        segments,
        last_use,
        inits,
        _elem_types(model),
    )


class SegmentCursor:
    """One batch's frontier between the segments (see the module)."""

    def __init__(self, plan: _Plan, batch: Any) -> None:
        self.plan = plan
        arr = np.ascontiguousarray(np.asarray(batch), dtype=plan.source.dtype)
        self.rows = arr.shape[0]
        fixed = plan.source.fixed_batch
        if fixed is not None and self.rows < fixed:
            arr = np.concatenate([arr, np.repeat(arr[:1], fixed - self.rows, axis=0)])
        self.frontier: dict[str, np.ndarray] = {plan.source.name: arr}
        self.next = 0

    @property
    def finished(self) -> bool:
        return False

    def advance(self, index: int, emit: Callable[[str, np.ndarray], None]) -> set[str]:
        """Run the segments up to ``index``; hand the inputs of the layers of pass ``index``."""
        plan = self.plan
        copies: dict[str, np.ndarray] = {}
        for s in range(self.next, index + 1):
            seg = plan.segments[s]
            fed = {x: self.frontier[x] if x in self.frontier else plan.feeds[x] for x in seg.inputs}
            try:
                got = plan.session(s, fed).run(seg.outputs, fed) if seg.outputs else []
            except Exception as e:
                if type(e).__module__.startswith("onnxruntime"):
                    raise InputError(f"onnxruntime failed on the data: {e}") from e
                raise
            for name, value in zip(seg.outputs, got, strict=True):
                if name in seg.copies:
                    if s == index:
                        copies[name] = np.asarray(value)
                else:
                    self.frontier[name] = np.asarray(value)
        self.next = index + 1
        handed = set()
        for name in plan.passes[index]:
            t = plan.targets[name]
            x = copies[t.tensor] if t.folded else self.frontier[t.tensor]
            emit(name, x[: self.rows])
            handed.add(name)
        for name in [n for n in self.frontier if plan.last_use.get(n, -1) <= index]:
            del self.frontier[name]
        return handed

    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in self.frontier.values())

    def close(self) -> None:
        self.frontier.clear()


@contextlib.contextmanager
def segment_cursors(
    model: Any,
    targets: list[Target],
    passes: list[list[core.NormLayer]],
    source: ModelInput,
    feeds: dict[str, np.ndarray],
    providers: list[str] | None,
) -> Iterator[Callable[[Any], core.Cursor] | None]:
    """``start(batch) -> SegmentCursor`` for one sequential recalibration of the calibration
    model ``model`` (``None``: a graph with subgraphs, not cut). ``feeds`` is read at every run:
    the adapter's statistics and folded weights as it writes them."""
    if _has_subgraph(model):
        yield None
        return
    plan = plan_segments(
        model, targets, [[x.name for x in group] for group in passes], source, feeds, providers
    )

    def start(batch: Any) -> core.Cursor:
        return SegmentCursor(plan, batch)

    yield start
