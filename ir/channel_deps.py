"""Channel-dependency analysis: which channels of which ops must be removed together.

Model
-----
A *space* is the set of channels a value carries: ``(value, axes, dims)`` where ``axes`` are
tensor axes in *logical* order (e.g. ``(1,)`` for NCHW conv features, ``(2,)`` for ``[N, T, D]``
tokens, ``(1, 3)`` = (head, head-dim) for ``[N, H, T, Dh]`` attention tensors) and the flat
channel index is the row-major index over ``dims`` in that order. Every element of every
space is one node (an integer id) of a *channel-coupling graph* (networkx). An edge says "these
two channels live or die together": the output channel ``c`` of a ReLU and its input channel
``c``; the channels of two operands of a residual ``Add``; channel ``c`` of a ``Concat`` input and
channel ``offset + c`` of its output; all channels of one attention head; the ``H*W`` features
a ``Flatten`` makes of one conv channel. Junction nodes (negative ids) connect many-to-many
cells without quadratic edge counts.

Spaces are created by *producers* — ops whose output channels are rows of a weight (``Conv``,
``ConvTranspose``, ``Gemm``, ``MatMul`` with a constant ``B``, ``Gather`` from a constant
embedding table) — and carried forward through every op the rule table knows. The graph is
SSA, so every value gets its space from exactly one producer rule, in topological order.

*Dependency groups* are the connected components of the coupling graph, bucketed by the set of
spaces they touch (every output channel of one conv is its own component; the components of
one conv form one group of interchangeable *units*). A group is *prunable* unless one of its
channels is *blocked*:

* it reaches a graph input or output (a model's interface never changes);
* it passes through an op the table does not know, through a subgraph op (``If``/``Loop``/
  ``Scan``) or through a known op in a form the rule cannot express (channel-mixing reshape,
  softmax over channels, dynamic shapes...): the analysis stops there, never guesses;
* its producer is protected, or its weights are shared / not constant.

Per-op coupling knowledge lives in ONE table, :data:`CHANNEL_RULES` (``op_type -> OpRule``). A
rule has a ``couple`` function: spaces, edges, blocks, the :class:`ParamSpec` s that say which
weight axis is indexed by which channel space, and the per-node facts a rewrite needs
(``ChannelDeps.info``: grouped conv, split axis, slice bounds, resize sizes). This module only
analyses; the physical removal (generic weight slicing from the ParamSpecs, and the per-op
updates of ``group``, ``Split`` sizes, ``Slice`` bounds, ``Reshape`` targets and ``Resize``
sizes in a table keyed by op_type) is :mod:`nnsculpt.passes.prune.rewrite`, so importance
criteria and the removal read the same facts.

Public API::

    deps = channel_dependencies(graph, protect=["fc"])
    for grp in deps.groups: grp.prunable, grp.n_units, grp.layers ...
    # removal: nnsculpt.passes.prune.rewrite.apply_channel_removal / zero_channels
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .errors import IRError
from .graph import Graph, Node, Value

log = logging.getLogger("nnsculpt.ir")

__all__ = ["Space", "ParamSpec", "DepGroup", "ChannelDeps", "OpRule", "CHANNEL_RULES",
           "channel_dependencies", "const_value", "shape_pieces", "coverage_table"]

_DEFAULT_DOMAINS = ("", "ai.onnx")


# =============================================================================== data
@dataclass(eq=False)
class Space:
    """The channels of one value: tensor ``axes`` (logical order) of sizes ``dims``;
    channel ids ``base .. base + size``."""

    value: Value
    axes: tuple[int, ...]
    dims: tuple[int, ...]
    base: int
    index: int

    @property
    def size(self) -> int:
        return int(np.prod(self.dims)) if self.dims else 1

    def ids(self) -> np.ndarray:
        return np.arange(self.base, self.base + self.size, dtype=np.int64).reshape(self.dims)

    @property
    def name(self) -> str:
        return self.value.name

    def __repr__(self) -> str:  # pragma: no cover
        return f"Space({self.value.name!r}, axes={self.axes}, dims={self.dims})"


@dataclass(frozen=True, eq=False)
class ParamSpec:
    """Input ``input`` (a constant) of ``node`` is indexed along ``axis`` by the channels of
    ``space``. ``component`` selects one logical component of a multi-axis space (``None``:
    the flat channel index). ``kind``: ``out`` (producer weight: filter / row), ``in``
    (consumer weight), ``norm`` (normalization scale), ``shift`` (additive: biases, norm
    offsets, constant addends), ``stat`` (running statistics), ``operand`` (other constants
    broadcast against the channels)."""

    node: Node
    input: int
    axis: int
    space: Space
    kind: str
    component: int | None = None


@dataclass
class DepGroup:
    """Components of the coupling graph touching the same spaces: interchangeable units."""

    index: int
    units: list[np.ndarray]           # channel ids of every unit
    spaces: tuple[int, ...]           # indices into ChannelDeps.spaces
    prunable: bool
    reason: str = ""
    layers: tuple[str, ...] = ()      # nodes with an out/norm param in this group (producers)
    consumers: tuple[str, ...] = ()   # nodes with an in param in this group
    lossy: bool = False               # a LayerNorm normalizes these channels: removing even
                                      # all-zero channels changes its statistics

    @property
    def n_units(self) -> int:
        return len(self.units)

    @property
    def unit_size(self) -> int:
        return int(len(self.units[0])) if self.units else 0


@dataclass
class ChannelDeps:
    graph: Graph
    spaces: list[Space]
    space_of: dict[str, Space]
    blocked: np.ndarray
    block_reasons: dict[int, str]
    ports: dict[str, dict[tuple[str, int], Space]]
    params: list[ParamSpec]
    groups: list[DepGroup]
    info: dict[str, dict[str, Any]]
    coupling_graph: Any = None
    notes: list[str] = field(default_factory=list)

    @property
    def n_channels(self) -> int:
        return int(self.blocked.size)

    def space_index_of_ids(self, ids: np.ndarray) -> np.ndarray:
        bases = np.array([s.base for s in self.spaces], dtype=np.int64)
        return np.searchsorted(bases, ids, side="right") - 1

    def prunable_groups(self) -> list[DepGroup]:
        return [g for g in self.groups if g.prunable]

    def summary(self) -> dict[str, Any]:
        pg = self.prunable_groups()
        return {"spaces": len(self.spaces), "channels": self.n_channels, "groups": len(self.groups),
                "prunable_groups": len(pg), "prunable_units": int(sum(g.n_units for g in pg))}


# ============================================================== constants (folded)
_FOLD_OPS = {"Identity", "Cast", "Reshape", "Unsqueeze", "Squeeze"}


def const_value(v: Value | None, _depth: int = 0) -> np.ndarray | None:
    """The array behind ``v``: an initializer, or a short chain of Identity / Cast / Reshape /
    (Un)Squeeze applied to constants (exporters write biases and shape pieces that way)."""
    if v is None:
        return None
    if v.is_const:
        return v.const
    p = v.producer
    if p is None or p.domain not in _DEFAULT_DOMAINS or p.op_type not in _FOLD_OPS or _depth > 16 \
            or not p.inputs or p.inputs[0] is None:
        return None
    a = const_value(p.inputs[0], _depth + 1)
    if a is None:
        return None
    try:
        if p.op_type == "Identity":
            return a
        if p.op_type == "Cast":
            from onnx import helper

            return a.astype(helper.tensor_dtype_to_np_dtype(int(p.attrs["to"])))
        if p.op_type == "Reshape":
            shp = const_value(p.input(1), _depth + 1)
            if shp is None:
                return None
            shp = [int(x) for x in shp.reshape(-1)]
            if not int(p.attrs.get("allowzero", 0)):
                shp = [a.shape[k] if e == 0 else e for k, e in enumerate(shp)]
            return a.reshape(shp)
        axes = p.attrs.get("axes")
        if axes is None and p.input(1) is not None:
            ax = const_value(p.input(1), _depth + 1)
            axes = None if ax is None else [int(x) for x in ax.reshape(-1)]
        if p.op_type == "Squeeze":
            return np.squeeze(a) if axes is None else np.squeeze(a, axis=tuple(int(x) for x in axes))
        if axes is None:
            return None
        r = a.ndim + len(axes)
        out = a
        for ax in sorted(int(x) + r if int(x) < 0 else int(x) for x in axes):
            out = np.expand_dims(out, ax)
        return out
    except Exception:  # noqa: BLE001 - not foldable: treat as non-constant
        return None


# ====================================================================== the analyzer
class _Blocked(Exception):
    """Raised inside a rule: block every spaced input of the node, outputs get no space."""


class Analyzer:
    """Builds spaces, coupling edges, blocks and param specs while walking the graph."""

    def __init__(self, g: Graph):
        self.g = g
        self.spaces: list[Space] = []
        self.space_by_value: dict[int, Space] = {}
        self.n = 0
        self.edges: list[tuple[np.ndarray, np.ndarray]] = []
        self.njunction = 0
        self.blocks: list[tuple[np.ndarray, str]] = []
        self.block_reasons: dict[int, str] = {}
        self.ports: dict[str, dict[tuple[str, int], Space]] = {}
        self.params: list[ParamSpec] = []
        self.info: dict[str, dict[str, Any]] = {}
        self.node: Node | None = None
        self._cval: dict[int, Any] = {}
        self.hints: dict[int, list] = {}
        self.lossy: set[int] = set()

    def cval(self, v: Value | None) -> np.ndarray | None:
        """Constant (possibly folded) behind ``v``."""
        if v is None:
            return None
        k = id(v)
        if k not in self._cval:
            self._cval[k] = const_value(v)
        return self._cval[k]

    def hint(self, v: Value, dims) -> None:
        """Refine the dims of ``v`` with what a rule computed (analysis-local): static sizes the
        rule knows fill unknown / symbolic entries of shape inference, never override a static
        one."""
        if dims is None or v.is_const:
            return
        cur = self.dims(v)
        if cur is None or len(cur) != len(dims):
            if cur is None:
                self.hints[id(v)] = list(dims)
            return
        self.hints[id(v)] = [d if (_is_int(d) and not _is_int(c)) else c for d, c in zip(dims, cur)]

    # ---------------------------------------------------------------- values
    def sp(self, v: Value | None) -> Space | None:
        return None if v is None else self.space_by_value.get(id(v))

    @staticmethod
    def is_const(v: Value | None) -> bool:
        return v is not None and v.is_const

    def rank(self, v: Value | None) -> int | None:
        d = self.dims(v)
        return None if d is None else len(d)

    def dims(self, v: Value | None) -> list | None:
        if v is None:
            return None
        if v.is_const:
            return [int(d) for d in v.const.shape]
        if id(v) in self.hints:
            return list(self.hints[id(v)])
        if v.shape is not None:
            # some exporters write unknown dims as -1: symbolic, not a size
            return [f"?{d}" if _is_int(d) and d < 0 else d for d in v.shape]
        c = self.cval(v)
        return None if c is None else [int(d) for d in c.shape]

    def dim(self, v: Value | None, axis: int):
        d = self.dims(v)
        if d is None or axis >= len(d) or axis < -len(d):
            return None
        x = d[axis]
        return int(x) if isinstance(x, (int, np.integer)) and not isinstance(x, bool) else None

    def const_users(self, v: Value) -> int:
        return len({id(n) for n, _ in v.uses})

    # ---------------------------------------------------------------- spaces
    def new_space(self, v: Value, axes, dims) -> Space:
        if id(v) in self.space_by_value:
            raise IRError(f"channel analysis: value '{v.name}' got two spaces")
        axes = tuple(int(a) for a in axes)
        dims = tuple(int(d) for d in dims)
        if any(d <= 0 for d in dims):
            raise _Blocked(f"empty channel axis on '{v.name}'")
        s = Space(v, axes, dims, self.n, len(self.spaces))
        self.n += s.size
        self.spaces.append(s)
        self.space_by_value[id(v)] = s
        return s

    def port(self, kind: str, i: int, s: Space | None) -> None:
        if s is not None and self.node is not None:
            self.ports.setdefault(self.node.name, {})[(kind, i)] = s

    def param(self, input_index: int, axis: int, s: Space, kind: str, component: int | None = None) -> None:
        self.params.append(ParamSpec(self.node, input_index, axis, s, kind, component))

    # ---------------------------------------------------------------- edges
    def link(self, a, b) -> None:
        a, b = np.broadcast_arrays(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
        if a.size:
            self.edges.append((a.reshape(-1).copy(), b.reshape(-1).copy()))

    def junctions(self, shape) -> np.ndarray:
        k = int(np.prod(shape)) if len(shape) else 1
        ids = -(np.arange(self.njunction, self.njunction + k, dtype=np.int64) + 1)
        self.njunction += k
        return ids.reshape(shape)

    def link_identity(self, a: Space, b: Space) -> None:
        if a.size != b.size:
            raise _Blocked(f"channel counts differ: '{a.name}' {a.dims} vs '{b.name}' {b.dims}")
        self.link(a.ids().reshape(-1), b.ids().reshape(-1))

    def link_roles(self, a: Space, ra: list, b: Space, rb: list) -> None:
        """Connect every element of ``a`` with every element of ``b`` that has the same
        indices on the roles both spaces share (no shared role: no edge)."""
        common = [r for r in ra if r in rb]
        if not common:
            return
        da, db = dict(zip(ra, a.dims)), dict(zip(rb, b.dims))
        for r in common:
            if da[r] != db[r]:
                raise _Blocked(f"channel counts differ on a shared axis: '{a.name}' vs '{b.name}'")
        pa = [ra.index(r) for r in common] + [i for i, r in enumerate(ra) if r not in common]
        pb = [rb.index(r) for r in common] + [i for i, r in enumerate(rb) if r not in common]
        ncell = int(np.prod([da[r] for r in common]))
        ia = a.ids().transpose(pa).reshape(ncell, -1)
        ib = b.ids().transpose(pb).reshape(ncell, -1)
        if ia.shape[1] == 1 and ib.shape[1] == 1:
            self.link(ia, ib)
            return
        j = self.junctions((ncell, 1))
        self.link(ia, j)
        self.link(ib, j)

    def link_units(self, ids: np.ndarray) -> None:
        """All elements along the last axis of ``ids`` (shape (cells, k)) become one unit."""
        if ids.shape[-1] > 1:
            self.link(ids, ids[..., :1])

    # ---------------------------------------------------------------- blocks
    def block(self, s: Space | None, reason: str, ids: np.ndarray | None = None) -> None:
        if s is None:
            return
        arr = s.ids().reshape(-1) if ids is None else np.asarray(ids, dtype=np.int64).reshape(-1)
        self.blocks.append((arr, reason))
        self.block_reasons.setdefault(s.index, reason)

    def block_inputs(self, node: Node, reason: str) -> None:
        for v in list(node.inputs) + list(node.implicit_inputs):
            s = self.sp(v)
            if s is not None:
                self.block(s, f"{reason} (at {node.op_type} '{node.name}')")


# ------------------------------------------------------------------------- helpers
def _norm_axis(axis: int, rank: int) -> int:
    a = int(axis)
    if a < 0:
        a += rank
    if not 0 <= a < rank:
        raise _Blocked(f"axis {axis} out of range for rank {rank}")
    return a


def _const_ints(v: Value | None) -> list[int] | None:
    a = const_value(v)
    if a is None or a.dtype.kind not in "iu":
        return None
    return [int(x) for x in a.reshape(-1).tolist()]


def _const_floats(v: Value | None) -> list[float] | None:
    a = const_value(v)
    if a is None:
        return None
    return [float(x) for x in a.reshape(-1).tolist()]


def _outputs_used_beyond(node: Node, first: int) -> bool:
    return any(o.uses or (node.graph is not None and o in node.graph.outputs) for o in node.outputs[first:])


# ================================================================== the rule table
@dataclass(frozen=True)
class OpRule:
    """How one op couples channels (``couple``), with a one-line summary (``doc``). The
    rewrite after removal lives in the pruning pass (``nnsculpt.passes.prune.rewrite``:
    weights sliced generically from the ParamSpecs, per-op attribute / shape-constant updates
    in its ``UPDATE_RULES`` table, keyed by op_type like this one)."""

    couple: Callable[[Analyzer, Node], None]
    doc: str = ""


def _carry(an: Analyzer, node: Node, s: Space, out: Value, axes=None) -> Space:
    """Output ``out`` carries the same channels as ``s`` (identity), on ``axes``."""
    o = an.new_space(out, s.axes if axes is None else axes, s.dims)
    an.port("out", list(node.outputs).index(out), o)
    an.link_identity(s, o)
    return o


# ---- unary ---------------------------------------------------------------------------------
def _unary(an: Analyzer, node: Node) -> None:
    x = node.inputs[0] if node.inputs else None
    s = an.sp(x)
    if s is None:
        return
    if len(node.outputs) > 1 and _outputs_used_beyond(node, 1):
        raise _Blocked("extra outputs are used")
    an.hint(node.outputs[0], an.dims(x))
    an.port("in", 0, s)
    _carry(an, node, s, node.outputs[0])


# ---- broadcasting elementwise ---------------------------------------------------------------
_ADDITIVE = {"Add", "Sub", "Sum"}


def _elementwise(an: Analyzer, node: Node) -> None:
    ins = [(i, v) for i, v in enumerate(node.inputs) if v is not None]
    spaced = [(i, v, an.sp(v)) for i, v in ins if an.sp(v) is not None]
    if not spaced:
        return
    out = node.outputs[0]
    R = an.rank(out)
    ranks = [an.rank(v) for _, v in ins]
    if R is None:
        if any(r is None for r in ranks):
            raise _Blocked("rank unknown")
        R = max(ranks)
        bd = []
        for k in range(R):
            cand = [an.dims(v)[k - (R - r)] for (_, v), r in zip(ins, ranks) if k - (R - r) >= 0]
            ints = [c for c in cand if _is_int(c) and c != 1]
            bd.append(ints[0] if ints else (1 if all(c == 1 for c in cand) else next(
                (c for c in cand if c != 1), None)))
        an.hint(out, bd)
    ref_axes = ref_dims = None
    for i, v, s in spaced:
        r = an.rank(v)
        if r is None:
            raise _Blocked("rank unknown")
        axes = tuple(a + R - r for a in s.axes)
        if ref_axes is None:
            ref_axes, ref_dims = axes, s.dims
        elif axes != ref_axes or s.dims != ref_dims:
            raise _Blocked(f"operands carry channels on different axes ({ref_axes} vs {axes})")
        an.port("in", i, s)
    # the other operands: broadcast (size 1) along the channel axes, or a sliceable constant
    consts = []
    for i, v in ins:
        if an.sp(v) is not None:
            continue
        r = an.rank(v)
        if r is None:
            raise _Blocked(f"operand '{v.name}' has unknown rank")
        full = []
        for k, (a, d) in enumerate(zip(ref_axes, ref_dims)):
            ax = a - (R - r)
            if ax < 0:
                continue
            dd = an.dim(v, ax)
            if dd == 1:
                continue
            if dd == d and an.cval(v) is not None:
                full.append((k, ax))
                continue
            raise _Blocked(f"operand '{v.name}' carries {dd if dd is not None else 'unknown'} channels "
                           f"of unknown origin on axis {ax}")
        if full:
            consts.append((i, full))
    o = an.new_space(out, ref_axes, ref_dims)
    an.port("out", 0, o)
    for i, v, s in spaced:
        an.link_identity(s, o)
    kind = "shift" if node.op_type in _ADDITIVE else "operand"
    for i, full in consts:
        if len(ref_axes) == 1 and len(full) == 1:
            an.param(i, full[0][1], o, kind)
        else:
            for k, ax in full:
                an.param(i, ax, o, kind, component=k)


# ---- normalization -------------------------------------------------------------------------
def _batchnorm(an: Analyzer, node: Node) -> None:
    s = an.sp(node.inputs[0])
    if s is None:
        return
    if _outputs_used_beyond(node, 1):
        raise _Blocked("training-mode statistics outputs are used")
    an.hint(node.outputs[0], an.dims(node.inputs[0]))
    an.port("in", 0, s)
    o = _carry(an, node, s, node.outputs[0])
    if 1 not in s.axes:
        return
    if s.axes != (1,):
        raise _Blocked("channel axis 1 is part of a multi-axis space")
    kinds = {1: "norm", 2: "shift", 3: "stat", 4: "stat"}
    for i, kind in kinds.items():
        v = node.inputs[i] if i < len(node.inputs) else None
        if v is None:
            continue
        c = an.cval(v)
        if c is None or c.ndim != 1 or c.shape[0] != s.size:
            raise _Blocked(f"parameter '{v.name}' is not a constant of {s.size} channels")
        an.param(i, 0, o, kind)


def _instancenorm(an: Analyzer, node: Node) -> None:
    s = an.sp(node.inputs[0])
    if s is None:
        return
    an.hint(node.outputs[0], an.dims(node.inputs[0]))
    an.port("in", 0, s)
    o = _carry(an, node, s, node.outputs[0])
    if 1 not in s.axes:
        return
    if s.axes != (1,):
        raise _Blocked("channel axis 1 is part of a multi-axis space")
    for i, kind in ((1, "norm"), (2, "shift")):
        v = node.inputs[i] if i < len(node.inputs) else None
        c = an.cval(v)
        if c is None or c.ndim != 1 or c.shape[0] != s.size:
            raise _Blocked("scale/bias are not per-channel constants")
        an.param(i, 0, o, kind)


def _layernorm(an: Analyzer, node: Node) -> None:
    x = node.inputs[0]
    s = an.sp(x)
    if s is None:
        return
    if _outputs_used_beyond(node, 1):
        raise _Blocked("mean / inv-std-dev outputs are used")
    r = an.rank(x)
    if r is None:
        raise _Blocked("rank unknown")
    a = _norm_axis(node.attrs.get("axis", -1), r)
    normed = set(range(a, r))
    an.hint(node.outputs[0], an.dims(x))
    an.port("in", 0, s)
    if not normed & set(s.axes):
        _carry(an, node, s, node.outputs[0])
        return
    if s.axes != (r - 1,) or a != r - 1:
        raise _Blocked("channels are only part of the normalized axes")
    o = _carry(an, node, s, node.outputs[0])
    an.lossy.add(s.index)
    for i, kind in ((1, "norm"), (2, "shift")):
        v = node.inputs[i] if i < len(node.inputs) else None
        if v is None:
            continue
        c = an.cval(v)
        if c is None or c.ndim < 1 or c.shape[-1] != s.size:
            raise _Blocked("scale/bias are not per-channel constants")
        an.param(i, c.ndim - 1, o, kind)


# ---- weighted producers --------------------------------------------------------------------
def _own_weight(an: Analyzer, node: Node, idx: int, what: str) -> Value:
    w = node.inputs[idx] if idx < len(node.inputs) else None
    if w is None or not w.is_const:
        raise _Blocked(f"{what} is not a constant")
    if w.const.dtype.kind != "f":
        raise _Blocked(f"{what} is not floating point")
    if an.const_users(w) > 1 or (an.g.outputs and w in an.g.outputs):
        raise _Blocked(f"{what} '{w.name}' is shared with other nodes")
    return w


def _conv(an: Analyzer, node: Node) -> None:
    x = node.inputs[0]
    s = an.sp(x)
    try:
        w = _own_weight(an, node, 1, "weight")
        if len(node.inputs) > 2 and node.inputs[2] is not None and an.cval(node.inputs[2]) is None:
            raise _Blocked("bias is not a constant")
        if s is not None and s.axes != (1,):
            raise _Blocked("input channels are not on axis 1 only")
    except _Blocked as e:
        # output channels still get a (blocked) space so that partners see a known source
        _fresh_blocked(an, node, 0, (1,), an.dim(node.outputs[0], 1), str(e))
        raise
    g = int(node.attrs.get("group", 1))
    transposed = node.op_type == "ConvTranspose"
    W = w.const
    cout = W.shape[1] * g if transposed else W.shape[0]
    cin = W.shape[0] if transposed else W.shape[1] * g
    o = an.new_space(node.outputs[0], (1,), (cout,))
    an.port("out", 0, o)
    an.port("in", 0, s)
    out_axis, in_axis = (1, 0) if transposed else (0, 1)
    if g == 1:
        an.param(1, out_axis, o, "out")
        if s is not None:
            if s.size != cin:
                raise _Blocked(f"input has {s.size} channels, the weight expects {cin}")
            an.param(1, in_axis, s, "in")
    else:
        if cin % g or cout % g:
            raise _Blocked("channels not divisible by group")
        if s is None:
            an.block(o, f"grouped {node.op_type} '{node.name}' reads channels of unknown origin")
        else:
            if s.size != cin:
                raise _Blocked(f"input has {s.size} channels, the weight expects {cin}")
            # in- and out-channels of one group are removed together (whole groups)
            ii = s.ids().reshape(g, cin // g)
            oo = o.ids().reshape(g, cout // g)
            j = an.junctions((g, 1))
            an.link(ii, j)
            an.link(oo, j)
        if s is not None:
            # whole groups: the weight slices along axis 0 belong to the removed groups
            an.param(1, 0, s if transposed else o, "out")
        an.info.setdefault(node.name, {})["grouped"] = True
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        an.param(2, 0, o, "shift")


def _fresh_blocked(an: Analyzer, node: Node, out_index: int, axes, n, reason: str) -> Space | None:
    """A blocked space on an output of a producer that cannot be pruned (shared / dynamic
    weights): consumers and partners then know where the channels come from."""
    if n is None or out_index >= len(node.outputs):
        return None
    v = node.outputs[out_index]
    if id(v) in an.space_by_value:
        return an.space_by_value[id(v)]
    try:
        o = an.new_space(v, axes, (n,))
    except _Blocked:
        return None
    an.block(o, f"{reason} (at {node.op_type} '{node.name}')")
    return o


def _gemm(an: Analyzer, node: Node) -> None:
    a, y = node.inputs[0], node.outputs[0]
    s = an.sp(a)
    try:
        b = _own_weight(an, node, 1, "B")
        if b.const.ndim != 2:
            raise _Blocked("B is not 2-D")
        c = node.inputs[2] if len(node.inputs) > 2 else None
        cc = an.cval(c)
        if c is not None and cc is None:
            raise _Blocked("C is not a constant")
        if int(node.attrs.get("transA", 0)) and s is not None:
            raise _Blocked("transA=1")
    except _Blocked as e:
        _fresh_blocked(an, node, 0, (1,), an.dim(y, 1), str(e))
        raise
    tb = int(node.attrs.get("transB", 0))
    B = b.const
    k, n = (B.shape[1], B.shape[0]) if tb else (B.shape[0], B.shape[1])
    o = an.new_space(y, (1,), (n,))
    an.port("out", 0, o)
    an.param(1, 0 if tb else 1, o, "out")
    if s is not None:
        if s.axes != (1,) or s.size != k:
            raise _Blocked("input channels do not match B")
        an.port("in", 0, s)
        an.param(1, 1 if tb else 0, s, "in")
    if c is not None and cc.ndim >= 1 and cc.shape[-1] == n and n > 1:
        an.param(2, cc.ndim - 1, o, "shift")
    elif c is not None and cc.ndim >= 1 and cc.shape[-1] not in (1, n):
        raise _Blocked("C does not broadcast over the outputs")


def _matmul(an: Analyzer, node: Node) -> None:
    a, b = node.inputs[0], node.inputs[1]
    y = node.outputs[0]
    if b is not None and b.is_const and a is not None and not a.is_const:
        s = an.sp(a)
        ra = an.rank(a)
        try:
            _own_weight(an, node, 1, "weight")
            if b.const.ndim != 2:
                raise _Blocked("weight is not 2-D")
            if ra is None or ra < 2:
                raise _Blocked("input rank unknown or < 2")
            if s is not None and s.axes != (ra - 1,):
                raise _Blocked("input channels are not on the contracted (last) axis")
        except _Blocked as e:
            ry = an.rank(y)
            if ry is not None:
                _fresh_blocked(an, node, 0, (ry - 1,), int(b.const.shape[-1]), str(e))
            raise
        k, n = b.const.shape
        an.hint(y, an.dims(a)[:-1] + [int(n)])
        o = an.new_space(y, (ra - 1,), (n,))
        an.port("out", 0, o)
        an.param(1, 1, o, "out")
        if s is not None:
            if s.size != k:
                raise _Blocked("input channels do not match the weight")
            an.port("in", 0, s)
            an.param(1, 0, s, "in")
        return
    if (a is not None and a.is_const) or (b is not None and b.is_const):
        if an.sp(a) is not None or an.sp(b) is not None:
            raise _Blocked("constant left operand")
        return
    _batched_matmul(an, node)


def _batched_matmul(an: Analyzer, node: Node) -> None:
    """MatMul of two activations (attention): batch axes (heads) couple A, B and the output;
    the contracted axis couples A with B; M / N axes couple with the output."""
    a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
    sa, sb = an.sp(a), an.sp(b)
    if sa is None and sb is None:
        return
    ra, rb = an.rank(a), an.rank(b)
    if ra is None or rb is None or ra < 2 or rb < 2:
        raise _Blocked("operand rank unknown or < 2")
    R = max(ra, rb)

    def role_a(ax):
        return ("b", ax + R - ra) if ax < ra - 2 else ("M" if ax == ra - 2 else "K")

    def role_b(ax):
        return ("b", ax + R - rb) if ax < rb - 2 else ("K" if ax == rb - 2 else "N")

    out_axis = {"M": R - 2, "N": R - 1}
    roles_a = [role_a(x) for x in sa.axes] if sa else []
    roles_b = [role_b(x) for x in sb.axes] if sb else []
    dim_of = {}
    for roles, s in ((roles_a, sa), (roles_b, sb)):
        if s is None:
            continue
        for r, d in zip(roles, s.dims):
            if dim_of.setdefault(r, d) != d:
                raise _Blocked("operands disagree on a shared axis")
    # an operand without channels must broadcast (size 1) on every role it shares
    for v, s, rolef, rk in ((a, sa, role_a, ra), (b, sb, role_b, rb)):
        if s is not None:
            continue
        for r in dim_of:
            ax = None
            for x in range(rk):
                if rolef(x) == r:
                    ax = x
            if ax is None:
                continue
            if an.dim(v, ax) != 1:
                raise _Blocked(f"operand '{v.name}' carries channels of unknown origin")
    out_roles = []
    for r in roles_a + roles_b:
        if r != "K" and r not in out_roles:
            out_roles.append(r)
    if sa:
        an.port("in", 0, sa)
    if sb:
        an.port("in", 1, sb)
    if out_roles:
        axes = [r[1] if isinstance(r, tuple) else out_axis[r] for r in out_roles]
        o = an.new_space(y, axes, [dim_of[r] for r in out_roles])
        an.port("out", 0, o)
        if sa:
            an.link_roles(sa, roles_a, o, out_roles)
        if sb:
            an.link_roles(sb, roles_b, o, out_roles)
    elif sa and sb:
        pass
    else:
        # only the contracted axis carries channels and the partner has none: cannot prune
        raise _Blocked("contracted channels meet an operand of unknown origin")
    if sa and sb:
        an.link_roles(sa, roles_a, sb, roles_b)
    if ("K" in roles_a) != ("K" in roles_b):
        raise _Blocked("contracted channels meet an operand of unknown origin")
    an.info.setdefault(node.name, {})["batched"] = True


def _gather(an: Analyzer, node: Node) -> None:
    data, idx, y = node.inputs[0], node.inputs[1], node.outputs[0]
    axis = int(node.attrs.get("axis", 0))
    if data is not None and data.is_const and an.sp(idx) is None:
        # embedding table: a producer of the last axis (its columns are the channels)
        W = data.const
        ry = an.rank(y)
        if W.dtype.kind != "f" or W.ndim != 2 or _norm_axis(axis, 2) != 0 or ry is None:
            return
        try:
            _own_weight(an, node, 0, "embedding table")
        except _Blocked as e:
            _fresh_blocked(an, node, 0, (ry - 1,), int(W.shape[1]), str(e))
            return
        o = an.new_space(y, (ry - 1,), (W.shape[1],))
        an.port("out", 0, o)
        an.param(0, 1, o, "out")
        return
    s = an.sp(data)
    if s is None:
        if an.sp(idx) is not None:
            raise _Blocked("channels used as indices")
        return
    r = an.rank(data)
    ri = an.rank(idx)
    if r is None or ri is None:
        raise _Blocked("rank unknown")
    ax = _norm_axis(axis, r)
    if ax in s.axes:
        raise _Blocked("gathers along the channel axis")
    an.port("in", 0, s)
    _carry(an, node, s, y, tuple(x if x < ax else x + ri - 1 for x in s.axes))


def _transpose(an: Analyzer, node: Node) -> None:
    s = an.sp(node.inputs[0])
    if s is None:
        return
    r = an.rank(node.inputs[0])
    if r is None:
        raise _Blocked("rank unknown")
    perm = node.attrs.get("perm")
    perm = list(reversed(range(r))) if perm is None else [int(p) for p in perm]
    d = an.dims(node.inputs[0])
    an.hint(node.outputs[0], [d[p] for p in perm])
    an.port("in", 0, s)
    _carry(an, node, s, node.outputs[0], tuple(perm.index(a) for a in s.axes))


# ---- concat / split / slice ----------------------------------------------------------------
def _concat(an: Analyzer, node: Node) -> None:
    ins = [(i, v) for i, v in enumerate(node.inputs) if v is not None]
    spaced = [(i, v, an.sp(v)) for i, v in ins if an.sp(v) is not None]
    if not spaced:
        return
    y = node.outputs[0]
    r = an.rank(y) or an.rank(spaced[0][1])
    if r is None:
        raise _Blocked("rank unknown")
    k = _norm_axis(node.attrs.get("axis", 0), r)
    if not any(k in s.axes for _, _, s in spaced):
        _elementwise_like_concat(an, node, spaced, ins, k, r)
        return
    sizes = []
    for i, v in ins:
        s = an.sp(v)
        if s is not None:
            if s.axes != (k,):
                raise _Blocked("inputs carry channels on different axes")
            sizes.append(s.size)
        else:
            d = an.dim(v, k)
            if d is None:
                raise _Blocked(f"input '{v.name}' has an unknown size on the concat axis")
            sizes.append(d)
    o = an.new_space(y, (k,), (sum(sizes),))
    an.port("out", 0, o)
    off = 0
    oid = o.ids()
    for (i, v), n in zip(ins, sizes):
        s = an.sp(v)
        if s is not None:
            an.port("in", i, s)
            an.link(s.ids(), oid[off:off + n])
        elif n:
            an.block(o, f"channels of '{v.name}' have unknown origin (at Concat '{node.name}')",
                     ids=oid[off:off + n])
        off += n


def _elementwise_like_concat(an, node, spaced, ins, k, r) -> None:
    ref = spaced[0][2]
    for i, v, s in spaced:
        if s.axes != ref.axes or s.dims != ref.dims:
            raise _Blocked("inputs carry channels on different axes")
        an.port("in", i, s)
    consts = []
    for i, v in ins:
        if an.sp(v) is not None:
            continue
        for c, (a, d) in enumerate(zip(ref.axes, ref.dims)):
            dd = an.dim(v, a)
            if dd == d and an.cval(v) is not None:
                consts.append((i, a, c))
            else:
                raise _Blocked(f"input '{v.name}' carries channels of unknown origin")
    o = an.new_space(node.outputs[0], ref.axes, ref.dims)
    an.port("out", 0, o)
    for _, _, s in spaced:
        an.link_identity(s, o)
    for i, a, c in consts:
        an.param(i, a, o, "operand", component=None if len(ref.axes) == 1 else c)


def _split_sizes(an: Analyzer, node: Node, total: int) -> list[int] | None:
    n_out = len(node.outputs)
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        return _const_ints(node.inputs[1])
    if "split" in node.attrs:
        return [int(x) for x in node.attrs["split"]]
    n = int(node.attrs.get("num_outputs", n_out))
    cs = -(-total // n)
    sizes = [cs] * (n - 1) + [total - cs * (n - 1)]
    return sizes


def _channel_operand(an: "Analyzer", node: Node):
    """``(x, space, rank)`` of a node's first input when channels reach it, else ``None``;
    blocks when the rank is unknown."""
    x = node.inputs[0]
    s = an.sp(x)
    if s is None:
        return None
    r = an.rank(x)
    if r is None:
        raise _Blocked("rank unknown")
    return x, s, r


def _split(an: Analyzer, node: Node) -> None:
    got = _channel_operand(an, node)
    if got is None:
        return
    x, s, r = got
    k = _norm_axis(node.attrs.get("axis", 0), r)
    an.port("in", 0, s)
    if k not in s.axes:
        for j, out in enumerate(node.outputs):
            _carry(an, node, s, out)
        return
    if s.axes != (k,):
        raise _Blocked("split axis is part of a multi-axis space")
    sizes = _split_sizes(an, node, s.size)
    if sizes is None or sum(sizes) != s.size or len(sizes) != len(node.outputs):
        raise _Blocked("split sizes are not constant")
    ids = s.ids()
    off = 0
    for j, (out, n) in enumerate(zip(node.outputs, sizes)):
        if n == 0:
            off += n
            continue
        o = an.new_space(out, (k,), (n,))
        an.port("out", j, o)
        an.link(ids[off:off + n], o.ids())
        off += n
    an.info.setdefault(node.name, {})["split_axis"] = k


def _slice(an: Analyzer, node: Node) -> None:
    got = _channel_operand(an, node)
    if got is None:
        return
    x, s, r = got
    starts, ends = _const_ints(node.input(1)), _const_ints(node.input(2))
    axes = _const_ints(node.input(3)) if node.input(3) is not None else None
    steps = _const_ints(node.input(4)) if node.input(4) is not None else None
    if starts is None or ends is None or (node.input(3) is not None and axes is None) \
            or (node.input(4) is not None and steps is None):
        raise _Blocked("slice bounds are not constant")
    axes = list(range(len(starts))) if axes is None else [_norm_axis(a, r) for a in axes]
    steps = [1] * len(starts) if steps is None else steps
    din = an.dims(x)
    dout = list(din)
    for a, st_, en_, sp_ in zip(axes, starts, ends, steps):
        d = din[a]
        if _is_int(d):
            dout[a] = len(range(*slice(st_, en_, sp_).indices(int(d))))
        elif not (st_ == 0 and en_ >= 2 ** 31 - 1 and sp_ == 1):
            dout[a] = f"?{node.name}:{a}"
    an.hint(node.outputs[0], dout)
    an.port("in", 0, s)
    hit = [j for j, a in enumerate(axes) if a in s.axes]
    if not hit:
        _carry(an, node, s, node.outputs[0])
        return
    if len(hit) > 1 or s.axes != (axes[hit[0]],):
        raise _Blocked("slices a multi-axis channel space")
    j = hit[0]
    if steps[j] != 1:
        raise _Blocked("strided slice of channels")
    n = s.size
    st, en = starts[j], ends[j]
    st = st + n if st < 0 else st
    en = en + n if en < 0 else en
    st, en = min(max(st, 0), n), min(max(en, 0), n)
    if en <= st:
        raise _Blocked("empty slice")
    o = an.new_space(node.outputs[0], s.axes, (en - st,))
    an.port("out", 0, o)
    an.link(s.ids()[st:en], o.ids())
    an.info.setdefault(node.name, {})["slice"] = (j, st, en)


# ---- reshape family ------------------------------------------------------------------------
def _is_int(d) -> bool:
    return isinstance(d, (int, np.integer)) and not isinstance(d, bool)


def _align(din: list, dout: list, space_axes: set[int]):
    """Group axes of a reshape: list of (in_axes, out_axes) with equal products. Symbolic dims
    match only the same symbol (or the ``None`` wildcard of a ``-1``). Returns None when the
    dims cannot be aligned."""
    i = j = 0
    rin, rout = len(din), len(dout)
    groups = []
    while True:
        while i < rin and din[i] == 1 and i not in space_axes:
            groups.append(([i], []))
            i += 1
        while j < rout and dout[j] == 1:
            groups.append(([], [j]))
            j += 1
        if i == rin and j == rout:
            return groups
        if i == rin or j == rout:
            return None
        a, b = din[i], dout[j]
        if not _is_int(a) or not _is_int(b):
            if (b is None and a is not None) or (a is not None and a == b):
                groups.append(([i], [j]))
                i += 1
                j += 1
                continue
            return None
        gi, gj, pa, pb = [i], [j], int(a), int(b)
        i += 1
        j += 1
        while pa != pb:
            if pa < pb:
                if i == rin or not _is_int(din[i]):
                    return None
                pa *= int(din[i])
                gi.append(i)
                i += 1
            else:
                if j == rout or not _is_int(dout[j]):
                    return None
                pb *= int(dout[j])
                gj.append(j)
                j += 1
        groups.append((gi, gj))


def _reshape_dims(an: Analyzer, node: Node):
    """(input dims, output dims) of a reshape-like node; output from the shape constant
    (``0`` copies, ``-1`` is a wildcard) or from inference."""
    x, y = node.inputs[0], node.outputs[0]
    din = an.dims(x)
    if din is None:
        return None, None
    op = node.op_type
    if op == "Reshape":
        shp = _const_ints(node.input(1))
        if shp is not None:
            allowzero = int(node.attrs.get("allowzero", 0))
            dout = []
            for k, e in enumerate(shp):
                if e == 0 and not allowzero:
                    dout.append(din[k] if k < len(din) else None)
                elif e == -1:
                    dout.append(None)
                else:
                    dout.append(int(e))
            # a -1 that hides a static size: take inference's value when it is static
            inf = an.dims(y)
            if inf is not None and len(inf) == len(dout):
                dout = [inf[k] if (d is None and _is_int(inf[k])) else d for k, d in enumerate(dout)]
            return din, dout
        pieces = shape_pieces(node.input(1))
        if pieces is not None:
            dout = []
            inferred = an.dims(y)
            for k, (pv, off, ln) in enumerate(pieces[1]):
                got = _piece_dims(an, pv, x, din, ln, node)
                if got is None:
                    got = [inferred[off + q] if inferred is not None and off + q < len(inferred)
                           and _is_int(inferred[off + q]) else f"?{node.name}:{off + q}" for q in range(ln)]
                dout.extend(got)
            return din, dout
        return din, an.dims(y)
    if op == "Flatten":
        r = len(din)
        ax = int(node.attrs.get("axis", 1))
        ax = ax + r if ax < 0 else ax

        def prod(ds):
            if all(_is_int(d) for d in ds):
                return int(np.prod([int(d) for d in ds])) if ds else 1
            if len(ds) == 1:
                return ds[0]
            return None
        return din, [prod(din[:ax]), prod(din[ax:])]
    if op in ("Squeeze", "Unsqueeze"):
        axes = node.attrs.get("axes")
        if axes is None and node.input(1) is not None:
            axes = _const_ints(node.input(1))
            if axes is None:
                return din, None
        if op == "Squeeze":
            if axes is None:
                return din, [d for d in din if d != 1]
            axes = {_norm_axis(a, len(din)) for a in axes}
            return din, [d for k, d in enumerate(din) if k not in axes]
        R = len(din) + len(axes)
        ins = {_norm_axis(a, R) for a in axes}
        it = iter(din)
        return din, [1 if k in ins else next(it) for k in range(R)]
    return din, an.dims(y)


def _strip(v: Value | None, ops=("Cast", "Identity")) -> Value | None:
    while v is not None and v.producer is not None and v.producer.op_type in ops and v.producer.inputs:
        v = v.producer.inputs[0]
    return v


def _piece_dims(an: Analyzer, pv: Value, x: Value, din: list, ln: int, node: Node) -> list | None:
    """Entries of one piece of a dynamic reshape target: constants (0 copies, -1 wildcard) or
    dims read from ``Shape(x)``."""
    c = an.cval(pv)
    if c is not None:
        out = []
        for e in [int(v) for v in c.reshape(-1)]:
            if e == -1:
                out.append(None)
            elif e == 0 and not int(node.attrs.get("allowzero", 0)):
                return None
            else:
                out.append(e)
        return out if len(out) == ln else None
    v = _strip(pv, ("Cast", "Identity", "Unsqueeze"))
    p = v.producer if v is not None else None
    if p is None:
        return None
    idx = None
    if p.op_type == "Slice":
        st, en = _const_ints(p.input(1)), _const_ints(p.input(2))
        src = _strip(p.inputs[0])
        if st is not None and en is not None and len(st) == 1 and src is not None and src.producer is not None \
                and src.producer.op_type == "Shape" and not src.producer.attrs.get("start"):
            r = len(din)
            idx = list(range(r))[slice(st[0], en[0])]
            src_node = src.producer
    elif p.op_type == "Gather":
        ii = _const_ints(p.input(1))
        src = _strip(p.inputs[0])
        if ii is not None and src is not None and src.producer is not None and src.producer.op_type == "Shape" \
                and not src.producer.attrs.get("start"):
            idx = [i + len(din) if i < 0 else i for i in ii]
            src_node = src.producer
    if idx is None or src_node.inputs[0] is not x or len(idx) != ln:
        return None
    return [din[i] for i in idx]


def _reshape(an: Analyzer, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    s = an.sp(x)
    if s is None:
        return
    din, dout = _reshape_dims(an, node)
    if din is None or dout is None:
        raise _Blocked("shapes unknown")
    an.hint(y, [d if d is not None else f"?{node.name}" for d in dout])
    groups = _align(din, dout, set(s.axes))
    if groups is None:
        raise _Blocked(f"cannot align reshape {din} -> {dout}")
    gof = {}
    for gidx, (gi, gj) in enumerate(groups):
        for a in gi:
            gof[a] = gidx
    touched = sorted({gof[a] for a in s.axes})
    nonid = [t for t in touched if not (len(groups[t][0]) == 1 and len(groups[t][1]) == 1)]
    if len(nonid) > 1:
        raise _Blocked("reshape regroups channels on several axes")
    comp_axes, comp_dims = [], []
    an.port("in", 0, s)
    pos = {a: c for c, a in enumerate(s.axes)}
    if not nonid:
        axes = tuple(groups[gof[a]][1][0] for a in s.axes)
        o = _carry(an, node, s, y, axes)
        an.info.setdefault(node.name, {})["reshape"] = True
        return
    t = nonid[0]
    gi, gj = groups[t]
    in_comps = [pos[a] for a in gi if a in pos]  # logical positions of this group's channel axes
    # the group's channel axes must be consecutive, ascending, in the logical order
    if in_comps != list(range(in_comps[0], in_comps[0] + len(in_comps))) \
            or [s.axes[c] for c in in_comps] != [a for a in gi if a in pos]:
        raise _Blocked("reshape reorders channel axes")
    c0, c1 = in_comps[0], in_comps[-1] + 1
    pre = int(np.prod(s.dims[:c0])) if c0 else 1
    post = int(np.prod(s.dims[c1:])) if c1 < len(s.dims) else 1
    G = int(np.prod(s.dims[c0:c1]))
    if len(gi) == 1:
        # split of one channel axis into several: units are whole slices of the outer axis
        if not all(_is_int(dout[b]) for b in gj):
            raise _Blocked("split into symbolic dims")
        if int(np.prod([int(dout[b]) for b in gj])) != G:
            raise _Blocked("split sizes do not match the channels")
        new_axes = [groups[gof[a]][1][0] for a in s.axes[:c0]] + list(gj) \
            + [groups[gof[a]][1][0] for a in s.axes[c1:]]
        new_dims = list(s.dims[:c0]) + [int(dout[b]) for b in gj] + list(s.dims[c1:])
        o = an.new_space(y, new_axes, new_dims)
        an.port("out", 0, o)
        an.link_identity(s, o)
        outer = int(dout[gj[0]])
        ids = o.ids().reshape(pre, outer, G // outer, post).transpose(0, 1, 3, 2).reshape(-1, G // outer)
        an.link_units(ids)
        return
    if len(gj) != 1:
        raise _Blocked("reshape mixes channel axes with others")
    # merge: the channel axes must be a leading prefix of the merged axes
    chan = [a for a in gi if a in pos]
    if chan != gi[:len(chan)]:
        raise _Blocked("channel axes are not the leading part of a merged axis")
    rest = gi[len(chan):]
    if not all(_is_int(din[a]) for a in rest):
        raise _Blocked("merged with symbolic dims")
    f = int(np.prod([int(din[a]) for a in rest])) if rest else 1
    new_axes = [groups[gof[a]][1][0] for a in s.axes[:c0]] + [gj[0]] + [groups[gof[a]][1][0] for a in s.axes[c1:]]
    new_dims = list(s.dims[:c0]) + [G * f] + list(s.dims[c1:])
    o = an.new_space(y, new_axes, new_dims)
    an.port("out", 0, o)
    an.link(s.ids().reshape(pre, G, 1, post), o.ids().reshape(pre, G, f, post))
    an.info.setdefault(node.name, {})["reshape"] = True


# ---- pooling, resize, pad, reductions, softmax ----------------------------------------------
def _spatial(an: Analyzer, node: Node) -> None:
    s = an.sp(node.inputs[0])
    if s is None:
        return
    if any(a >= 2 for a in s.axes):
        raise _Blocked("channels on a pooled spatial axis")
    if _outputs_used_beyond(node, 1):
        raise _Blocked("indices output is used")
    an.port("in", 0, s)
    _carry(an, node, s, node.outputs[0])


def _resize(an: Analyzer, node: Node) -> None:
    s = an.sp(node.inputs[0])
    if s is None:
        return
    scales = node.input(2) if len(node.inputs) > 2 else None
    sizes = node.input(3) if len(node.inputs) > 3 else None
    if node.op_type == "Upsample":
        scales = node.input(1)
    sc = _const_floats(scales) if scales is not None and scales.is_const and scales.const.size else None
    sz = _const_ints(sizes) if sizes is not None else None
    axes_attr = node.attrs.get("axes")
    r = an.rank(node.inputs[0])
    if r is None:
        raise _Blocked("rank unknown")
    idx = list(range(r)) if axes_attr is None else [_norm_axis(a, r) for a in axes_attr]
    for a in s.axes:
        if a not in idx:
            continue
        k = idx.index(a)
        if sc is not None:
            if k >= len(sc) or sc[k] != 1.0:
                raise _Blocked("resizes the channel axis")
        elif sz is not None:
            if k >= len(sz) or sz[k] != s.dims[s.axes.index(a)]:
                raise _Blocked("resizes the channel axis")
            an.info.setdefault(node.name, {})["sizes_index"] = [(a, k)]
        else:
            raise _Blocked("dynamic scales / sizes")
    an.port("in", 0, s)
    _carry(an, node, s, node.outputs[0])


def _pad(an: Analyzer, node: Node) -> None:
    s = an.sp(node.inputs[0])
    if s is None:
        return
    r = an.rank(node.inputs[0])
    pads = node.attrs.get("pads") if node.input(1) is None else _const_ints(node.input(1))
    if pads is None or r is None:
        raise _Blocked("dynamic pads")
    axes = list(range(r)) if node.input(3) is None else _const_ints(node.input(3))
    if axes is None:
        raise _Blocked("dynamic axes")
    axes = [_norm_axis(a, r) for a in axes]
    n = len(axes)
    for k, a in enumerate(axes):
        if a in s.axes and (pads[k] != 0 or pads[k + n] != 0):
            raise _Blocked("pads the channel axis")
    an.port("in", 0, s)
    _carry(an, node, s, node.outputs[0])


def _reduce(an: Analyzer, node: Node) -> None:
    got = _channel_operand(an, node)
    if got is None:
        return
    x, s, r = got
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        axes = _const_ints(node.inputs[1])
        if axes is None:
            raise _Blocked("dynamic reduction axes")
    if node.op_type in ("ArgMax", "ArgMin"):
        axes = [int(node.attrs.get("axis", 0))]
    if not axes:
        if int(node.attrs.get("noop_with_empty_axes", 0)):
            an.port("in", 0, s)
            _carry(an, node, s, node.outputs[0])
            return
        raise _Blocked("reduces over all axes")
    axes = sorted(_norm_axis(a, r) for a in axes)
    if set(axes) & set(s.axes):
        raise _Blocked("reduces over the channel axis")
    keep = int(node.attrs.get("keepdims", 1))
    an.port("in", 0, s)
    new = tuple(a if keep else a - sum(1 for b in axes if b < a) for a in s.axes)
    _carry(an, node, s, node.outputs[0], new)


def _softmax(an: Analyzer, node: Node) -> None:
    got = _channel_operand(an, node)
    if got is None:
        return
    x, s, r = got
    opset = an.g.opset or 13
    a = _norm_axis(node.attrs.get("axis", -1 if opset >= 13 else 1), r)
    normed = {a} if (opset >= 13 or node.op_type == "CumSum") else set(range(a, r))
    if node.op_type == "CumSum":
        ax = _const_ints(node.input(1))
        if ax is None:
            raise _Blocked("dynamic axis")
        normed = {_norm_axis(ax[0], r)}
    if normed & set(s.axes):
        raise _Blocked("normalizes across channels")
    an.hint(node.outputs[0], an.dims(x))
    an.port("in", 0, s)
    _carry(an, node, s, node.outputs[0])


def _shape(an: Analyzer, node: Node) -> None:
    """Shape of a channel-carrying value: fine as long as only non-channel dims are read."""
    got = _channel_operand(an, node)
    if got is None:
        return
    x, s, r = got
    start = int(node.attrs.get("start", 0))
    end = int(node.attrs.get("end", r))
    start = start + r if start < 0 else start
    end = end + r if end < 0 else end
    dims = list(range(max(0, start), min(r, end)))
    uses = list(node.outputs[0].uses)
    seen = 0
    while seen < len(uses):
        user, idx = uses[seen]
        if user.op_type in ("Cast", "Identity") and idx == 0:
            uses.extend(user.outputs[0].uses)
            uses.pop(seen)
            if user.outputs[0] in an.g.outputs:
                raise _Blocked("the shape is a graph output")
            continue
        seen += 1
    for user, idx in uses:
        used = None
        if user.op_type == "Gather" and idx == 0:
            ii = _const_ints(user.input(1))
            if ii is not None:
                used = [dims[i] for i in ii]
        elif user.op_type == "Slice" and idx == 0:
            st, en = _const_ints(user.input(1)), _const_ints(user.input(2))
            stp = _const_ints(user.input(4)) if user.input(4) is not None else [1]
            if st is not None and en is not None and stp is not None and len(st) == 1:
                used = dims[slice(st[0], en[0], stp[0])]
        if used is None or set(used) & set(s.axes):
            raise _Blocked(f"the channel count is read by '{user.name}'")
    if node.outputs[0] in an.g.outputs:
        raise _Blocked("the shape is a graph output")


def _passive(an: Analyzer, node: Node) -> None:
    """Ops that never carry channels (their data inputs are shapes / constants)."""
    for v in node.inputs:
        if an.sp(v) is not None:
            raise _Blocked("channels reach an op that does not carry them")


def shape_pieces(v: Value | None):
    """A dynamic reshape target built as Concat of 1-D pieces: (concat node,
    [(piece value, offset, length)]) or None. (The rewriter edits the constant pieces.)"""
    if v is None or v.producer is None or v.producer.op_type != "Concat":
        return None
    cat = v.producer
    parts, off = [], 0
    for p in cat.inputs:
        if p is None:
            return None
        shp = p.shape
        if shp is None:
            c = const_value(p)
            shp = None if c is None else c.shape
        if shp is None or len(shp) != 1 or not _is_int(shp[0]):
            return None
        parts.append((p, off, int(shp[0])))
        off += int(shp[0])
    return cat, parts


def _reshape_checked(an: Analyzer, node: Node) -> None:
    """Reshape whose target shape can be rewritten (constant, or a Concat whose pieces at the
    channel axes are constants)."""
    _reshape(an, node)
    if node.op_type != "Reshape":
        return
    o = an.sp(node.outputs[0])
    shp = node.input(1)
    if o is None or const_value(shp) is not None:
        return
    pieces = shape_pieces(shp)
    ok = pieces is not None
    if ok:
        for a in o.axes:
            hit = [p for p in pieces[1] if p[1] <= a < p[1] + p[2]]
            if not hit or const_value(hit[0][0]) is None:
                ok = False
    if not ok:
        an.block(o, f"dynamic reshape target (at Reshape '{node.name}')")
        s = an.sp(node.inputs[0])
        an.block(s, f"dynamic reshape target (at Reshape '{node.name}')")


_UNARY_OPS = ["Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish",
              "Tanh", "Softplus", "Softsign", "Gelu", "Mish", "Erf", "Exp", "Log", "Sqrt", "Neg", "Abs",
              "Reciprocal", "Identity", "Dropout", "Cast", "CastLike", "Floor", "Ceil", "Round", "Sign",
              "Sin", "Cos", "Tan", "Atan", "Asin", "Acos", "Sinh", "Cosh", "Not", "IsNaN", "IsInf",
              "ThresholdedRelu", "Shrink", "Clip"]
_ELEMENTWISE_OPS = ["Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where",
                    "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Mod"]

#: op_type -> OpRule. An op not listed stops the analysis: the channels that reach it stay.
CHANNEL_RULES: dict[str, OpRule] = {}
for _op in _UNARY_OPS:
    if not _op.endswith("_"):
        CHANNEL_RULES[_op] = OpRule(_unary, "identity on every channel")
for _op in _ELEMENTWISE_OPS:
    CHANNEL_RULES[_op] = OpRule(_elementwise,
                                "numpy broadcasting: operands' channels coupled 1:1; constant operands "
                                "sliced, size-1 ones broadcast; operands of unknown origin block")
CHANNEL_RULES.update({
    "Conv": OpRule(_conv,
                   "producer of axis 1 (filters); input channels consumed; group>1 (depthwise): in/out "
                   "channels of a group removed together, group attr updated"),
    "ConvTranspose": OpRule(_conv, "producer of axis 1 (W[:, c]); as Conv"),
    "Gemm": OpRule(_gemm, "producer of axis 1 (rows/cols of B per transB), C sliced; transA blocks"),
    "MatMul": OpRule(_matmul,
                     "const 2-D B: producer of the last axis, input channels = rows of B; two activations "
                     "(attention): batch axes (heads) couple A/B/out, contracted axis couples A with B"),
    "Gather": OpRule(_gather,
                     "constant 2-D table on axis 0 (embedding): producer of the last axis; on activations: "
                     "carries channels when it indexes another axis"),
    "BatchNormalization": OpRule(_batchnorm, "per-channel on axis 1: scale/B/mean/var sliced"),
    "InstanceNormalization": OpRule(_instancenorm, "per-channel on axis 1: scale/B sliced"),
    "LayerNormalization": OpRule(_layernorm,
                                 "channels not normalized: carried; channels = the one normalized last axis: "
                                 "scale/B sliced (statistics change: lossy)"),
    "Transpose": OpRule(_transpose, "axes permuted, channel order kept"),
    "Reshape": OpRule(_reshape_checked,
                      "axes aligned by products: identity / split (units = outer slices, e.g. heads) / "
                      "merge (channels must lead: Flatten C*H*W -> C groups of H*W); target shape rewritten"),
    "Flatten": OpRule(_reshape, "as Reshape"),
    "Squeeze": OpRule(_reshape, "as Reshape (channel axes renumbered)"),
    "Unsqueeze": OpRule(_reshape, "as Reshape (channel axes renumbered)"),
    "Concat": OpRule(_concat,
                     "on the channel axis: input i's channel c = output channel offset_i + c; inputs of "
                     "unknown origin make their range unprunable; on another axis: elementwise"),
    "Split": OpRule(_split, "on the channel axis: output j = a channel range; sizes rewritten"),
    "Slice": OpRule(_slice, "on the channel axis (step 1): a channel range; bounds rewritten"),
    "MaxPool": OpRule(_spatial, "per channel"),
    "AveragePool": OpRule(_spatial, "per channel"),
    "LpPool": OpRule(_spatial, "per channel"),
    "GlobalAveragePool": OpRule(_spatial, "per channel"),
    "GlobalMaxPool": OpRule(_spatial, "per channel"),
    "GlobalLpPool": OpRule(_spatial, "per channel"),
    "Resize": OpRule(_resize, "per channel when the channel scale is 1 / size unchanged"),
    "Upsample": OpRule(_resize, "per channel when the channel scale is 1"),
    "Pad": OpRule(_pad, "per channel when the channel axis is not padded"),
    "ReduceMean": OpRule(_reduce, "carried when the channel axes are not reduced"),
    "ReduceSum": OpRule(_reduce, "carried when the channel axes are not reduced"),
    "ReduceMax": OpRule(_reduce, "carried when the channel axes are not reduced"),
    "ReduceMin": OpRule(_reduce, "carried when the channel axes are not reduced"),
    "ReduceProd": OpRule(_reduce, "carried when the channel axes are not reduced"),
    "ReduceL1": OpRule(_reduce, "carried when the channel axes are not reduced"),
    "ReduceL2": OpRule(_reduce, "carried when the channel axes are not reduced"),
    "ReduceLogSumExp": OpRule(_reduce, "carried when the channel axes are not reduced"),
    "ReduceSumSquare": OpRule(_reduce, "carried when the channel axes are not reduced"),
    "ArgMax": OpRule(_reduce, "carried when the channel axes are not reduced"),
    "ArgMin": OpRule(_reduce, "carried when the channel axes are not reduced"),
    "Softmax": OpRule(_softmax, "carried when not normalizing across channels"),
    "LogSoftmax": OpRule(_softmax, "carried when not normalizing across channels"),
    "Hardmax": OpRule(_softmax, "carried when not normalizing across channels"),
    "CumSum": OpRule(_softmax, "carried when not accumulating across channels"),
    "Shape": OpRule(_shape, "allowed when only non-channel dims are read (Gather/Slice users)"),
    "Constant": OpRule(_passive, "no channels"),
    "ConstantOfShape": OpRule(_passive, "no channels"),
    "Range": OpRule(_passive, "no channels"),
})


def coverage_table() -> list[tuple[str, str]]:
    """``(op_type, rule summary)`` for every op the analysis knows."""
    return sorted((k, r.doc) for k, r in CHANNEL_RULES.items())


# ========================================================================= the driver
def _matches(node: Node, patterns: list[str]) -> bool:
    for p in patterns:
        if node.name == p or node.source == p or fnmatch.fnmatchcase(node.name, p) \
                or fnmatch.fnmatchcase(node.source, p):
            return True
    return False


def channel_dependencies(g: Graph, *, protect: list[str] | None = None) -> ChannelDeps:
    """Run the analysis (see the module docstring). ``protect``: node names / torch module
    paths / glob patterns whose output channels are kept. Cached on the graph version (any
    mutation invalidates it)."""
    from .analysis import cached, infer_shapes

    protect = list(protect or [])
    infer_shapes(g)
    return cached(g, f"channel_deps:{tuple(protect)!r}", lambda: _analyze(g, protect))


def _analyze(g: Graph, protect: list[str]) -> ChannelDeps:
    import networkx as nx
    an = Analyzer(g)
    for node in g.nodes:
        an.node = node
        rule = CHANNEL_RULES.get(node.op_type) if node.domain in _DEFAULT_DOMAINS and not node.has_subgraphs else None
        if rule is None:
            what = "subgraph op" if node.has_subgraphs else "op unknown to the channel rules"
            an.block_inputs(node, f"{what} {node.domain + '::' if node.domain else ''}{node.op_type}")
            continue
        try:
            rule.couple(an, node)
        except _Blocked as e:
            an.block_inputs(node, str(e))
            for o in node.outputs:
                s = an.sp(o)
                if s is not None:
                    an.block(s, f"{e} (at {node.op_type} '{node.name}')")
        if protect and _matches(node, protect):
            for o in node.outputs:
                an.block(an.sp(o), f"protected node '{node.name}'")
    an.node = None
    for o in g.outputs:
        an.block(an.sp(o), f"graph output '{o.name}'")
    for v in g.inputs:
        an.block(an.sp(v), f"graph input '{v.name}'")

    n = an.n
    blocked = np.zeros(n, dtype=bool)
    for ids, _ in an.blocks:
        blocked[ids] = True

    G = nx.Graph()
    G.add_nodes_from(range(n))
    for a, b in an.edges:
        G.add_edges_from(zip(a.tolist(), b.tolist()))

    spaces = an.spaces
    bases = np.array([s.base for s in spaces], dtype=np.int64)
    comps: dict[tuple, list[np.ndarray]] = {}
    comp_blocked: dict[tuple, list[bool]] = {}
    for comp in nx.connected_components(G):
        ids = np.fromiter((c for c in comp if c >= 0), dtype=np.int64)
        if not ids.size:
            continue
        ids.sort()
        sidx = np.searchsorted(bases, ids, side="right") - 1
        uniq, counts = np.unique(sidx, return_counts=True)
        key = tuple(zip(uniq.tolist(), counts.tolist()))
        comps.setdefault(key, []).append(ids)
        comp_blocked.setdefault(key, []).append(bool(blocked[ids].any()))

    # which nodes hold parameters of which spaces
    prod_by_space: dict[int, set[str]] = {}
    cons_by_space: dict[int, set[str]] = {}
    for p in an.params:
        tgt = prod_by_space if p.kind in ("out", "norm") else cons_by_space if p.kind == "in" else None
        if tgt is not None:
            tgt.setdefault(p.space.index, set()).add(p.node.name)

    groups: list[DepGroup] = []
    order = sorted(comps, key=lambda k: min(int(u[0]) for u in comps[k]))
    for key in order:
        units = sorted(comps[key], key=lambda u: int(u[0]))
        bl = [b for _, b in sorted(zip([int(u[0]) for u in comps[key]], comp_blocked[key]))]
        sp = tuple(k for k, _ in key)
        layers = sorted({nm for k in sp for nm in prod_by_space.get(k, ())})
        cons = sorted({nm for k in sp for nm in cons_by_space.get(k, ())})
        reason = ""
        prunable = not any(bl)
        if not prunable:
            reason = next((an.block_reasons[k] for k in sp if k in an.block_reasons), "blocked")
        elif not layers:
            prunable, reason = False, "no producer weights"
        elif len(units) < 2:
            prunable, reason = False, "a single unit"
        groups.append(DepGroup(len(groups), units, sp, prunable, reason, tuple(layers), tuple(cons),
                               lossy=bool(an.lossy & set(sp))))

    deps = ChannelDeps(graph=g, spaces=spaces, space_of={s.value.name: s for s in spaces},
                       blocked=blocked, block_reasons=an.block_reasons, ports=an.ports,
                       params=an.params, groups=groups, info=an.info, coupling_graph=G)
    return deps
