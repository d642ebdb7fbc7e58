"""Which Conv / Gemm layers of an ONNX graph carry a folded BatchNorm: the default selection.

A folded BatchNorm leaves no node behind, only its effect: the Conv (or Gemm) got a per-channel
scale and shift. The graph around it still shows where a BatchNorm was, because networks put
BatchNorm in few places. :func:`classify` gives every Conv / Gemm node a verdict and its reason:

Taken
    * ``Conv -> Relu`` (any activation, also ``Sigmoid`` + ``Mul`` = SiLU and the decomposed
      HardSwish ``Add -> Clip``): a Conv-BN-act block after folding.
    * ``Conv -> Mul/Add -> act``: the same block from exporters that keep a per-channel affine
      (a constant of one value or one value per output channel) between the Conv and its
      activation (paddle2onnx, tf2onnx); the affine chain is followed, not counted as a reader.
    * ``Conv -> residual Add``: the last Conv of a residual branch (ResNet, MobileNetV2/V3,
      EfficientNet, RegNet) ends with a BatchNorm and no activation. The Add must join two
      branches: its other input is not a constant and is not computed from this Conv's output
      (a Conv on the *skip* side of an ``x + f(x)``, e.g. a squeeze-excitation block's input in
      PP-OCR's RSE neck, is not taken for it).
    * ``Conv -> Conv``, when the reading Conv is taken itself: a linear bottleneck (Conv-BN
      with no activation, then the next block's Conv-BN-act).

Not taken
    * after global pooling (``GlobalAveragePool``, ``ReduceMean`` over the spatial axes, through
      ``Flatten`` / ``Reshape`` / activations / the first Conv; or a 1x1 spatial input per shape
      inference): squeeze-excitation Convs and the classifier Gemm after the pooling never had a
      BatchNorm;
    * a ``BatchNormalization`` node follows: that BatchNorm is recalibrated as a node;
    * no bias and no constant ``Add`` after it: folding a BatchNorm always leaves a per-channel
      shift, so a Conv without one has nothing folded (PP-OCR's neck Convs);
    * it feeds the graph output or a ``Softmax``: heads and classifiers carry no BatchNorm;
    * it feeds a ``Concat`` (and nothing above): in DenseNet-style pre-activation networks the
      BatchNorm that reads the Concat is a node of its own.

What it does not handle: a Conv-BN whose output goes, without activation, into a ``Concat``, a
pooling or the graph output; a BatchNorm after a global pooling (embedding heads with
``Linear -> BatchNorm1d``); a graph with the same structure with and without BatchNorm cannot be
told apart. Name such layers with ``layers=`` / ``exclude=`` (``--layers`` / ``--exclude``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = ["ACTIVATIONS", "FOLDABLE", "LayerChoice", "classify", "layer_label"]

#: operators a folded layer may be
FOLDABLE = ("Conv", "Gemm")

#: operators that, reading a Conv / Gemm output, mark it as a folded layer
ACTIVATIONS = frozenset(
    {
        "Relu",
        "LeakyRelu",
        "PRelu",
        "Clip",
        "Sigmoid",
        "HardSigmoid",
        "HardSwish",
        "Tanh",
        "Elu",
        "Selu",
        "Celu",
        "Gelu",
        "Mish",
        "Softplus",
        "Softsign",
        "ThresholdedRelu",
    }
)

_DOMAINS = ("", "ai.onnx")
_AFFINE = ("Mul", "Add", "Sub", "Div")
_GLOBAL_POOLS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
_REDUCES = frozenset({"ReduceMean", "ReduceMax", "ReduceSum", "ReduceL2", "ReduceL1"})
#: operators through which a globally pooled tensor stays global (no spatial extent comes back)
_KEEP_GLOBAL = frozenset(
    {"Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Cast", "Transpose"}
    | set(_AFFINE)
    | {"Conv", "Gemm", "MatMul", "Pow", "Sqrt", "Neg", "Abs", "Exp", "Log", "Reciprocal"}
    | ACTIVATIONS
)
#: operators through which a constant stays a constant (paddle2onnx reshapes its biases)
_CONST_OPS = frozenset({"Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten"})
_SPATIAL_AXES = ({2, 3}, {-2, -1}, {2, 3, 4}, {-3, -2, -1})
_MAX_CHAIN = 8


class LayerChoice(NamedTuple):
    """Whether one Conv / Gemm node is adapted as a folded BatchNorm, and why.

    Attributes
    ----------
    name : str
        The node's name, or its output's name when the node has none (the name the reports
        show; either is accepted wherever a layer is named).
    op : str
        ``"Conv"`` or ``"Gemm"``.
    reason : str
        Why it is taken or not, e.g. ``"Conv -> Mul/Add -> Relu"``, ``"after global pooling
        (squeeze-excitation or classifier)"``.
    chosen : bool
        Adapted by moment matching.
    """

    name: str
    op: str
    reason: str
    chosen: bool


def layer_label(node: Any) -> str:
    """The name a layer is shown by: the node's name, or its first output's name."""
    return str(node.name or (node.output[0] if node.output else node.op_type))


def _default(node: Any) -> bool:
    return node.domain in _DOMAINS


@dataclass
class _Graph:
    """The lookups the rule needs over one graph."""

    model: Any
    producers: dict[str, Any] = field(default_factory=dict)
    readers: dict[str, list[Any]] = field(default_factory=dict)
    inits: dict[str, Any] = field(default_factory=dict)
    outputs: set[str] = field(default_factory=set)
    shapes: dict[str, tuple[int | None, ...]] = field(default_factory=dict)
    _global: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def of(cls, model: Any) -> _Graph:
        g = model.graph
        self = cls(model)
        self.producers = {o: n for n in g.node for o in n.output if o}
        for n in g.node:
            for x in n.input:
                if x:
                    self.readers.setdefault(x, []).append(n)
        self.inits = {t.name: t for t in g.initializer}
        self.outputs = {o.name for o in g.output}
        self.shapes = _shapes(model)
        return self

    # constants ------------------------------------------------------------------------------
    def const_shape(self, name: str, depth: int = 0) -> tuple[int, ...] | None:
        """The shape of a constant tensor (initializer, ``Constant``, reshaped constants), or
        ``None`` when ``name`` is not a constant (or its shape cannot be told)."""
        if name in self.inits:
            return tuple(int(d) for d in self.inits[name].dims)
        node = self.producers.get(name)
        if node is None or depth > 16 or not _default(node):
            return None
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return tuple(int(d) for d in a.t.dims)
                if a.name in ("value_float", "value_int"):
                    return ()
                if a.name in ("value_floats", "value_ints"):
                    return (len(a.floats) or len(a.ints),)
            return None
        if node.op_type not in _CONST_OPS or not node.input:
            return None
        src = self.const_shape(node.input[0], depth + 1)
        if src is None or any(self.const_shape(x, depth + 1) is None for x in node.input if x):
            return None
        if node.op_type in ("Identity", "Cast"):
            return src
        size = 1
        for d in src:
            size *= d
        if node.op_type == "Reshape":
            target = self.const_ints(node.input[1]) if len(node.input) > 1 else None
            if target is None:
                return None
            out = [src[i] if d == 0 and i < len(src) else d for i, d in enumerate(target)]
            if out.count(-1) == 1:
                known = 1
                for d in out:
                    known *= d if d != -1 else 1
                out[out.index(-1)] = size // known if known else 0
            return tuple(out)
        if node.op_type == "Flatten":
            return (1, size) if size else None
        axes = self.const_ints(node.input[1]) if len(node.input) > 1 else _ints_attr(node, "axes")
        if node.op_type == "Unsqueeze" and axes is not None:
            out = list(src)
            rank = len(src) + len(axes)
            for ax in sorted(a % rank for a in axes):
                out.insert(ax, 1)
            return tuple(out)
        if node.op_type == "Squeeze":
            if axes is None:
                return tuple(d for d in src if d != 1)
            drop = {a % len(src) for a in axes} if src else set()
            return tuple(d for i, d in enumerate(src) if i not in drop)
        return None

    def const_ints(self, name: str) -> list[int] | None:
        """The values of a small integer constant (a shape, axes), or ``None``."""
        from onnx import numpy_helper

        t = self.inits.get(name)
        if t is None:
            node = self.producers.get(name)
            if node is None or node.op_type != "Constant":
                return None
            t = next((a.t for a in node.attribute if a.name == "value"), None)
            if t is None:
                ints = next((list(a.ints) for a in node.attribute if a.name == "value_ints"), None)
                return ints
        try:
            return [int(v) for v in numpy_helper.to_array(t).reshape(-1)]
        except Exception:  # external data not loaded, or not numeric
            return None

    # global pooling ---------------------------------------------------------------------------
    def is_global(self, name: str) -> bool:
        """``name`` has no spatial extent left: it comes from a global pooling (through
        operators that keep it so), or shape inference says its spatial dims are all 1."""
        if name in self._global:
            return self._global[name]
        self._global[name] = False  # guards cycles
        shape = self.shapes.get(name)
        out = False
        if shape is not None and len(shape) >= 3 and all(d == 1 for d in shape[2:]):
            out = True
        node = self.producers.get(name)
        if not out and node is not None and _default(node):
            if node.op_type in _GLOBAL_POOLS:
                out = True
            elif node.op_type in _REDUCES:
                out = self._spatial_reduce(node)
            elif node.op_type in _KEEP_GLOBAL:
                live = [x for x in node.input if x and self.const_shape(x) is None]
                if node.op_type in FOLDABLE or node.op_type == "MatMul":
                    live = live[:1]
                out = bool(live) and all(self.is_global(x) for x in live)
        self._global[name] = out
        return out

    def _spatial_reduce(self, node: Any) -> bool:
        axes = _ints_attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = self.const_ints(node.input[1])
        if not axes:
            return False
        shape = self.shapes.get(node.input[0])
        if shape is not None and len(shape) >= 3:
            rank = len(shape)
            norm = {a % rank for a in axes}
            return 0 not in norm and 1 not in norm and norm >= set(range(2, rank))
        return set(axes) in _SPATIAL_AXES

    # the affine chain after a layer -------------------------------------------------------
    def affine_other(self, node: Any, t: str, rank: int) -> str | None:
        """The constant operand of ``node`` when it is a per-channel affine of ``t``
        (``t * c``, ``t + c``, ``t - c``, ``c - t``, ``t / c``) for a layer output of ``rank``
        dims with channels on axis 1; ``None`` otherwise."""
        if node.op_type not in _AFFINE or not _default(node) or len(node.input) != 2:
            return None
        a, b = node.input
        if a == b:
            return None
        other = b if a == t else a
        if node.op_type == "Div" and a != t:
            return None
        shape = self.const_shape(other)
        if shape is None or len(shape) > rank:
            return None
        for j, d in enumerate(shape):
            if rank - len(shape) + j != 1 and d != 1:
                return None
        return other


def _ints_attr(node: Any, name: str) -> list[int] | None:
    for a in node.attribute:
        if a.name == name:
            return [int(v) for v in a.ints]
    return None


def _shapes(model: Any) -> dict[str, tuple[int | None, ...]]:
    """Static shapes by tensor name (value_info, and shape inference where it works)."""
    import onnx

    infos = [*model.graph.value_info, *model.graph.input, *model.graph.output]
    try:
        infos += list(onnx.shape_inference.infer_shapes(model).graph.value_info)
    except Exception:  # best effort: models with external data or custom ops
        pass
    out: dict[str, tuple[int | None, ...]] = {}
    for v in infos:
        tt = v.type.tensor_type if v.type.HasField("tensor_type") else None
        if tt is None or not tt.HasField("shape"):
            continue
        out[v.name] = tuple(
            int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim
        )
    return out


@dataclass
class _Seen:
    """What follows one layer's output: the affine chain and the nodes at its end."""

    ops: list[str]
    terminals: list[tuple[Any, str]]
    shifted: bool
    to_output: bool


def _follow(gr: _Graph, out: str, rank: int) -> _Seen:
    ops: list[str] = []
    terminals: list[tuple[Any, str]] = []
    shifted, to_output = False, False
    frontier, steps = [out], 0
    while frontier:
        t = frontier.pop()
        to_output |= t in gr.outputs
        for r in gr.readers.get(t, []):
            if steps < _MAX_CHAIN and gr.affine_other(r, t, rank) is not None:
                steps += 1
                if r.op_type not in ops:
                    ops.append(r.op_type)
                shifted |= r.op_type in ("Add", "Sub")
                frontier.extend(o for o in r.output if o)
            elif r.op_type == "Identity":
                frontier.extend(o for o in r.output if o)
            elif steps < _MAX_CHAIN and _se_gate(gr, r, t):
                steps += 1
                if "Mul(SE)" not in ops:
                    ops.append("Mul(SE)")
                frontier.extend(o for o in r.output if o)
            else:
                terminals.append((r, t))
    return _Seen(ops, terminals, shifted, to_output)


def _se_gate(gr: _Graph, node: Any, t: str) -> bool:
    """``node`` multiplies ``t`` by a squeeze-excitation gate (a per-channel factor computed
    from a global pooling): a per-channel scale, followed like a constant one."""
    if node.op_type != "Mul" or not _default(node) or len(node.input) != 2:
        return False
    a, b = node.input
    other = b if a == t else a
    return other != t and gr.const_shape(other) is None and gr.is_global(other)


def _descendants(gr: _Graph, start: str) -> set[str]:
    seen = {start}
    todo = [start]
    while todo:
        for r in gr.readers.get(todo.pop(), []):
            for o in r.output:
                if o and o not in seen:
                    seen.add(o)
                    todo.append(o)
    return seen


def _rank(gr: _Graph, node: Any) -> int:
    if node.op_type == "Gemm":
        return 2
    shape = gr.const_shape(node.input[1]) if len(node.input) > 1 else None
    if shape:
        return len(shape)
    out = gr.shapes.get(node.output[0])
    return len(out) if out else 4


def _path(op: str, ops: list[str], end: str) -> str:
    middle = f" -> {'/'.join(ops)}" if ops else ""
    return f"{op}{middle} -> {end}"


def _verdict(gr: _Graph, node: Any) -> tuple[bool | None, str, list[Any]]:
    """``(taken, reason, reading Convs)``; ``taken`` is ``None`` when it depends on whether a
    Conv that reads the output is taken."""
    op = node.op_type
    if len(node.input) > 0 and node.input[0] and gr.is_global(node.input[0]):
        return False, "after global pooling (squeeze-excitation or classifier)", []
    rank = _rank(gr, node)
    seen = _follow(gr, node.output[0], rank)
    kinds = [r.op_type for r, _ in seen.terminals]
    if "BatchNormalization" in kinds:
        return False, "a BatchNormalization node follows (recalibrated as a node)", []
    has_bias = len(node.input) > 2 and bool(node.input[2])
    if not has_bias and not seen.shifted:
        return False, "no bias (folding a BatchNorm leaves one): nothing folded", []
    if seen.to_output:
        return False, "feeds the graph output (a head or classifier)", []
    if any(k in ("Softmax", "LogSoftmax") for k in kinds):
        return False, "feeds a Softmax (a classifier)", []
    acts = [k for k in kinds if k in ACTIVATIONS]
    if acts:
        return True, _path(op, seen.ops, acts[0]), []
    mine: set[str] | None = None
    for r, t in seen.terminals:
        if r.op_type not in ("Add", "Sum") or not _default(r):
            continue
        others = [x for x in r.input if x and x != t]
        if not others or any(gr.const_shape(x) is not None for x in others):
            continue
        if mine is None:
            mine = _descendants(gr, node.output[0])
        if not any(x in mine for x in others):
            return True, _path(op, seen.ops, "residual Add"), []
    convs = [r for r, _ in seen.terminals if r.op_type in FOLDABLE and _default(r)]
    if convs:
        return None, _path(op, seen.ops, convs[0].op_type), convs
    if "Concat" in kinds:
        return False, "feeds a Concat (the BatchNorm after it, if any, is a node)", []
    if mine is not None:
        return False, "on the skip side of an Add (x + f(x)), no activation after it", []
    what = ", ".join(sorted(set(kinds))) or "nothing"
    return False, f"no activation, residual Add or Conv-BN after it (read by {what})", []


def classify(model: Any) -> list[tuple[int, LayerChoice]]:
    """The default verdict for every Conv / Gemm node of the main graph (see the module
    docstring), as ``(node index, LayerChoice)`` in graph order."""
    gr = _Graph.of(model)
    nodes = list(model.graph.node)
    index = {id(n): i for i, n in enumerate(nodes)}
    taken: dict[int, bool] = {}
    reasons: dict[int, str] = {}
    pending: dict[int, list[Any]] = {}
    for i, node in enumerate(nodes):
        if node.op_type not in FOLDABLE or not _default(node) or not node.output:
            continue
        verdict, why, convs = _verdict(gr, node)
        if verdict is None:
            pending[i] = convs
            reasons[i] = why
        else:
            taken[i], reasons[i] = verdict, why
    changed = True
    while changed:  # a chain of linear bottlenecks resolves from its end
        changed = False
        for i, convs in list(pending.items()):
            hit = next((c for c in convs if taken.get(index[id(c)])), None)
            if hit is not None:
                taken[i] = True
                reasons[i] += " (linear bottleneck: a Conv-BN block follows)"
                del pending[i]
                changed = True
    for i, convs in pending.items():
        taken[i] = False
        names = ", ".join(repr(layer_label(c)) for c in convs[:2])
        reasons[i] = f"read by {names}, which carries no folded BatchNorm either"
    return [
        (i, LayerChoice(layer_label(nodes[i]), nodes[i].op_type, reasons[i], taken[i]))
        for i in sorted(taken)
    ]


def chosen(choices: Iterable[tuple[int, LayerChoice]]) -> list[int]:
    """The node indices of the taken layers."""
    return [i for i, c in choices if c.chosen]
