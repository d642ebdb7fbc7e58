"""Graph surgery for ONNX recalibration.

:func:`prepare` finds every ``BatchNormalization`` node of the main graph and makes sure each one
reads its ``mean`` and ``var`` from an initializer of its own (copying shared initializers and
statistics that reach the node through ``Identity`` or ``Constant`` nodes), so that writing one
node's statistics can never change another node. :func:`calibration_model` turns those
initializers into graph inputs (fed at run time, so one session serves every pass) and exposes
every BatchNorm input as a graph output.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .._errors import InputError
from .._extras import require

MIN_OPSET = 9


@dataclass
class BNNode:
    """One ``BatchNormalization`` node.

    Attributes
    ----------
    name : str
        The node's name (made unique; ``BatchNormalization_<i>`` when it has none).
    x : str
        Name of its input tensor ``X``, shape (N, C, ...).
    mean, var : str
        Names of its own statistics initializers, shape (C,).
    eps : float
    channels : int
    depth : int
        1 + the largest depth of a BatchNorm node upstream (1 when there is none): nodes of the
        same depth do not depend on each other's statistics.
    x_is_input : bool
        ``X`` is a graph input (its moments are those of the data).
    index : int
        Position of the node in the graph (topological order).
    """

    name: str
    x: str
    mean: str
    var: str
    eps: float
    channels: int
    depth: int
    x_is_input: bool
    index: int = -1


def opset_version(model: Any) -> int:
    """The model's default-domain opset."""
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return 0


def _has_bn(graph: Any) -> bool:
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            return True
        for a in node.attribute:
            subs = ([a.g] if a.HasField("g") else []) + list(a.graphs)
            if any(_has_bn(g) for g in subs):
                return True
    return False


def _unique(base: str, taken: set[str]) -> str:
    base = re.sub(r"[^0-9A-Za-z_./:-]", "_", base) or "bn"
    name, i = base, 1
    while name in taken:
        name = f"{base}_{i}"
        i += 1
    taken.add(name)
    return name


def prepare(model: Any, *, allow_none: bool = False) -> list[BNNode]:
    """Give every BatchNorm node its own statistics initializers (in place); list the nodes.

    Parameters
    ----------
    model : onnx.ModelProto
        Loaded with its external data. Changed in place.
    allow_none : bool, default False
        Return an empty list for a model without BatchNorm nodes instead of raising.

    Returns
    -------
    list of BNNode
        In graph (topological) order.

    Raises
    ------
    ValueError
        For an opset below 9, no BatchNorm node, a node in training mode or inside a subgraph,
        statistics fed as graph inputs or computed by the graph.
    """
    opset = opset_version(model)
    if opset < MIN_OPSET:
        raise InputError(
            f"the model uses opset {opset}; recalibration supports opset {MIN_OPSET} and later: "
            "convert it first with onnx.version_converter.convert_version(model, 15)"
        )
    g = model.graph
    bn_idx = [
        i
        for i, n in enumerate(g.node)
        if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")
    ]
    for n in g.node:
        for a in n.attribute:
            subs = ([a.g] if a.HasField("g") else []) + list(a.graphs)
            if any(_has_bn(s) for s in subs):
                raise InputError(
                    f"node {n.name!r} ({n.op_type}) holds BatchNormalization nodes in a subgraph, "
                    "which recalibration does not reach; inline or export the model without "
                    "control flow"
                )
    if not bn_idx and allow_none:
        return []
    if not bn_idx:
        raise InputError(
            "the model has no BatchNormalization node to recalibrate (exporters fold BatchNorm "
            "into the preceding Conv when constant folding is on: export with "
            "do_constant_folding=False)"
        )
    ctx = GraphIndex.of(model)
    depth = depths(model, set(bn_idx))
    out = [_one(g.node[i], i, depth[i], ctx) for i in bn_idx]
    ctx.drop_unused()
    return out


def depths(model: Any, adapted: set[int]) -> dict[int, int]:
    """The depth of every adapted node (by index in ``model.graph.node``, topological order):
    1 + the largest depth of an adapted node upstream, 1 when there is none. Nodes of one depth
    do not depend on each other's statistics."""
    depth: dict[str, int] = {}
    out: dict[int, int] = {}
    for i, node in enumerate(model.graph.node):
        d_in = max((depth.get(x, 0) for x in node.input if x), default=0)
        if i in adapted:
            out[i] = d_in + 1
        for o in node.output:
            depth[o] = d_in + (1 if i in adapted else 0)
    return out


@dataclass
class GraphIndex:
    """What the graph surgery knows about the main graph while it rewrites it.

    Attributes
    ----------
    model : onnx.ModelProto
    inits : dict of str to onnx.TensorProto
        The initializers by name.
    graph_inputs : set of str
    producers : dict of str to onnx.NodeProto
        The node that computes each tensor.
    uses : collections.Counter of str
        How many node inputs (and graph outputs) read each tensor.
    taken : set of str
        Every tensor and node name (new names avoid them).
    names : set of str
        The layer names given out so far.
    """

    model: Any
    inits: dict[str, Any]
    graph_inputs: set[str]
    producers: dict[str, Any]
    uses: Counter[str]
    taken: set[str]
    names: set[str]

    @classmethod
    def of(cls, model: Any) -> GraphIndex:
        g = model.graph
        inits = {t.name: t for t in g.initializer}
        graph_inputs = {i.name for i in g.input}
        producers = {o: n for n in g.node for o in n.output}
        uses: Counter[str] = Counter(i for n in g.node for i in n.input)
        uses.update(o.name for o in g.output)
        taken = set(inits) | graph_inputs | set(producers) | {v.name for v in g.value_info}
        taken |= {n.name for n in g.node}
        return cls(model, inits, graph_inputs, producers, uses, taken, set())

    def layer_name(self, node: Any, i: int) -> str:
        """A unique layer name for ``node`` (the ``i``-th node): its name, or its first
        output's name when it has none (``<op>_<i>`` when it has neither)."""
        base = node.name or (node.output[0] if node.output and node.output[0] else "")
        base = base or f"{node.op_type}_{i}"
        name = base
        k = 1
        while name in self.names:
            name = f"{base}_{k}"
            k += 1
        self.names.add(name)
        return name

    def own_input(self, node: Any, slot: int, owner: str, what: str) -> tuple[str, np.ndarray]:
        """Make input ``slot`` of ``node`` an initializer that no other input reads (copying a
        shared one, or a value reached through ``Identity`` / ``Constant``); its name and value.

        ``owner`` and ``what`` name the copy (``<owner>.<what>``) and the errors.
        """
        onnx = require("onnx")
        uses = self.uses
        src = node.input[slot]
        value, direct = _resolve(src, f"{node.op_type} node {owner!r}", what, self)
        if not direct or uses[src] > 1:
            new = _unique(f"{owner}.{what}", self.taken)
            t = onnx.numpy_helper.from_array(np.ascontiguousarray(value), new)
            self.add_initializer(t)
            node.input[slot] = new
            uses[src] -= 1
            uses[new] += 1
            src = new
        return src, value

    def add_initializer(self, t: Any) -> None:
        """Append the initializer ``t`` (listed as a graph input too below IR version 4)."""
        onnx = require("onnx")
        model = self.model
        model.graph.initializer.append(t)
        self.inits[t.name] = t
        self.taken.add(t.name)
        if model.ir_version < 4:  # initializers must be listed as inputs there
            model.graph.input.append(
                onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
            )
            self.graph_inputs.add(t.name)

    def new_name(self, base: str) -> str:
        """A tensor name no tensor or node of the graph has."""
        return _unique(base, self.taken)

    def drop_unused(self) -> None:
        """Drop the initializers no node reads any more (their users got copies)."""
        g = self.model.graph
        keep = [t for t in g.initializer if self.uses[t.name] > 0 or t.name in self.graph_inputs]
        if len(keep) != len(g.initializer):
            del g.initializer[:]
            g.initializer.extend(keep)


#: nodes without side effects that :func:`prune` drops when nothing reads their output
_PURE = ("Constant", "Identity")


def _subgraph_reads(graph: Any) -> set[str]:
    """Every tensor name read by a node inside a subgraph of ``graph`` (at any depth): the outer
    tensors a subgraph may read by name."""
    out: set[str] = set()
    for n in graph.node:
        for a in n.attribute:
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                out.update(i for s in sub.node for i in s.input)
                out.update(o.name for o in sub.output)
                out |= _subgraph_reads(sub)
    return out


def prune(model: Any) -> None:
    """Drop from the main graph what nothing reads (in place): ``Constant`` and ``Identity``
    nodes whose outputs no node, subgraph or graph output reads (such as the old statistics and
    weights whose readers got copies of their own), then the initializers nothing reads (with
    their graph-input entry below IR version 4, where every initializer is listed as one; above
    it, an initializer that is also a graph input stays).

    Run it last: node indices (:attr:`BNNode.index`) change.
    """
    g = model.graph
    uses: Counter[str] = Counter(i for n in g.node for i in n.input)
    uses.update(o.name for o in g.output)
    outer = _subgraph_reads(g)
    nodes = list(g.node)
    dead: set[int] = set()
    for k in range(len(nodes) - 1, -1, -1):
        n = nodes[k]
        if n.op_type not in _PURE or n.domain not in ("", "ai.onnx"):
            continue
        if any(uses[o] > 0 or o in outer for o in n.output):
            continue
        dead.add(k)
        for i in n.input:
            uses[i] -= 1
    gone = {o for k in dead for o in nodes[k].output}
    if dead:
        keep_nodes = [n for k, n in enumerate(nodes) if k not in dead]
        del g.node[:]
        g.node.extend(keep_nodes)
    inputs = {i.name for i in g.input}
    old_ir = model.ir_version < 4
    unread = {
        t.name
        for t in g.initializer
        if uses[t.name] <= 0 and t.name not in outer and (old_ir or t.name not in inputs)
    }
    if unread:
        keep = [t for t in g.initializer if t.name not in unread]
        del g.initializer[:]
        g.initializer.extend(keep)
        if old_ir and inputs & unread:
            keep_in = [i for i in g.input if i.name not in unread]
            del g.input[:]
            g.input.extend(keep_in)
    gone |= unread
    if gone and any(v.name in gone for v in g.value_info):
        keep_vi = [v for v in g.value_info if v.name not in gone]
        del g.value_info[:]
        g.value_info.extend(keep_vi)


def _one(node: Any, i: int, depth: int, ctx: GraphIndex) -> BNNode:
    name = ctx.layer_name(node, i)
    for a in node.attribute:
        if a.name == "training_mode" and a.i:
            raise InputError(
                f"BatchNormalization node {name!r} has training_mode=1 (it normalizes with batch "
                "statistics and ignores the stored ones); export the model in inference mode"
            )
    if len(node.input) < 5:
        raise InputError(f"BatchNormalization node {name!r} has {len(node.input)} inputs, not 5")
    eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
    values = []
    for slot, what in ((3, "mean"), (4, "var")):
        src, value = ctx.own_input(node, slot, name, what)
        if value.ndim != 1:
            raise InputError(
                f"BatchNormalization node {name!r}: {what} {node.input[slot]!r} has shape "
                f"{value.shape}, expected (C,)"
            )
        values.append((src, value))
    (mean_name, mean), (var_name, var) = values
    if mean.shape != var.shape:
        raise InputError(
            f"BatchNormalization node {name!r}: mean has shape {mean.shape} but var {var.shape}"
        )
    x = node.input[0]
    return BNNode(
        name=name,
        x=x,
        mean=mean_name,
        var=var_name,
        eps=float(eps),
        channels=int(mean.shape[0]),
        depth=depth,
        x_is_input=x in ctx.graph_inputs and x not in ctx.inits,
        index=i,
    )


def _resolve(src: str, node: str, what: str, ctx: GraphIndex) -> tuple[np.ndarray, bool]:
    """The stored value of an input (``node`` says which node, e.g. "BatchNormalization node
    'bn1'"), and whether it is the initializer itself."""
    numpy_helper = require("onnx").numpy_helper
    inits, graph_inputs, producers = ctx.inits, ctx.graph_inputs, ctx.producers
    name, direct = src, True
    for _ in range(10_000):
        if name in inits:
            return numpy_helper.to_array(inits[name]), direct
        if name in graph_inputs:
            raise InputError(
                f"the {what} of {node} is the graph input {name!r}, fed at run time, so the "
                "file stores no value to rewrite; export the model with its statistics and "
                "weights as initializers (constants)"
            )
        prod = producers.get(name)
        if prod is None:
            raise InputError(f"the {what} of {node} ({name!r}) is undefined")
        if prod.op_type == "Identity":
            name, direct = prod.input[0], False
            continue
        if prod.op_type == "Constant":
            for a in prod.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t), False
        raise InputError(
            f"the {what} of {node} is computed by a {prod.op_type} node ({prod.name!r}), not "
            "stored; recalibration can only rewrite stored statistics and weights"
        )
    raise InputError(f"the {what} of {node} forms a cycle")


def _elem_types(model: Any) -> dict[str, int]:
    onnx = require("onnx")
    types: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        vis = list(inferred.graph.value_info)
    except Exception:  # shape inference is best effort; types then fall back below
        vis = []
    for v in [*model.graph.input, *model.graph.output, *model.graph.value_info, *vis]:
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    return types


def calibration_model(
    model: Any, bns: list[BNNode], fed: Sequence[str] = (), exposed: Sequence[str] = ()
) -> Any:
    """A copy of ``model`` with statistics as graph inputs and BatchNorm inputs as outputs.

    ``fed`` names further initializers to turn into graph inputs (the weights and biases of
    folded layers) and ``exposed`` further tensors to add as graph outputs (their outputs).
    """
    onnx = require("onnx")
    cal = onnx.ModelProto()
    cal.CopyFrom(model)
    g = cal.graph
    types = _elem_types(model)
    stats = {n for b in bns for n in (b.mean, b.var)} | set(fed)
    moved = [t for t in g.initializer if t.name in stats]
    keep = [t for t in g.initializer if t.name not in stats]
    del g.initializer[:]
    g.initializer.extend(keep)
    inputs = {i.name for i in g.input}
    for t in moved:
        if t.name not in inputs:
            g.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    outputs = {o.name for o in g.output}
    wanted = [b.x for b in bns if not b.x_is_input] + list(exposed)
    for x in wanted:
        if x in outputs:
            continue
        elem = types.get(x, onnx.TensorProto.FLOAT)
        g.output.append(onnx.helper.make_tensor_value_info(x, elem, None))
        outputs.add(x)
    return cal
