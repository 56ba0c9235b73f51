"""Core IR: :class:`Graph`, :class:`Node` and :class:`Value`.

The IR uses ONNX operator semantics (``op_type``, ``domain``, attributes, opset) so that
lowering to ONNX is 1:1. Weights are numpy arrays held by constant values
(``Value.const``). Every value knows its producer and its users, so a rewrite is
:meth:`Graph.replace_all_uses_with` rather than a scan over the node list.

Every node carries provenance in ``node.meta``:

* ``source`` -- where it came from: a torch module path such as ``layer1.0.conv1`` or the
  original ONNX node name;
* ``pass`` -- the name of the pass that created or last changed it (absent if none did).

Subgraph attributes (``If``/``Loop``/``Scan`` bodies) are kept as ``onnx.GraphProto``
objects and carried through untouched; names they read from the enclosing scope are
recorded as *implicit inputs* of the node so that use-def chains, DCE and the verifier
see them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from .errors import IRError

class Value:
    """An SSA value: a graph input, an initializer (``const`` set) or a node output.

    ``shape`` is a tuple whose entries are ints (static), strings (symbolic, e.g. ``"N"``)
    or ``None`` (unknown); ``shape`` itself is ``None`` when the rank is unknown.
    ``dtype`` is a numpy dtype or ``None`` when unknown.
    """

    __slots__ = ("name", "dtype", "shape", "const", "producer", "_uses", "graph", "meta")

    def __init__(self, name: str, dtype=None, shape=None, const: np.ndarray | None = None):
        self.name = name
        self.const = None
        self.dtype = np.dtype(dtype) if dtype is not None else None
        self.shape = tuple(shape) if shape is not None else None
        self.producer: Node | None = None
        self._uses: list[tuple[Node, int]] = []
        self.graph: Graph | None = None
        self.meta: dict[str, Any] = {}
        if const is not None:
            self.set_const(const)

    # ----------------------------------------------------------------- constants
    @property
    def is_const(self) -> bool:
        return self.const is not None

    def set_const(self, array: np.ndarray) -> None:
        """Make this value a constant (initializer) holding ``array``; updates type."""
        array = np.asarray(array)
        self.const = array
        self.dtype = array.dtype
        self.shape = tuple(int(d) for d in array.shape)
        if self.graph is not None:
            self.graph._touch()

    # ---------------------------------------------------------------------- uses
    @property
    def uses(self) -> list[tuple["Node", int]]:
        """``(node, input_index)`` pairs; index ``-1`` marks an implicit (subgraph) use."""
        return list(self._uses)

    @property
    def users(self) -> list["Node"]:
        seen: dict[int, Node] = {}
        for node, _ in self._uses:
            seen.setdefault(id(node), node)
        return list(seen.values())

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Value({self.name!r}, {self.dtype}, {self.shape}{', const' if self.is_const else ''})"


class Node:
    """An operation with ONNX semantics.

    ``attrs`` maps attribute names to python values: ``int``, ``float``, ``str``,
    ``bytes``, lists of those, ``np.ndarray`` (tensor attributes) or ``onnx.GraphProto``
    (subgraphs, carried untouched). ``attr_types`` remembers the ONNX attribute type of
    attributes read from ONNX so that ambiguous ones (empty lists) lower back exactly.
    """

    __slots__ = ("op_type", "domain", "name", "attrs", "attr_types", "_inputs", "_outputs",
                 "_implicit", "meta", "graph", "doc_string")

    def __init__(self, op_type: str, inputs: Sequence[Value | None] = (), outputs: Sequence[Value] = (),
                 attrs: dict[str, Any] | None = None, *, name: str = "", domain: str = "",
                 meta: dict[str, Any] | None = None):
        self.op_type = op_type
        self.domain = domain or ""
        self.name = name
        self.attrs: dict[str, Any] = dict(attrs or {})
        self.attr_types: dict[str, int] = {}
        self._inputs: list[Value | None] = list(inputs)
        self._outputs: list[Value] = list(outputs)
        self._implicit: list[Value] = []
        self.meta: dict[str, Any] = dict(meta or {})
        self.graph: Graph | None = None
        self.doc_string = ""

    @property
    def inputs(self) -> tuple[Value | None, ...]:
        return tuple(self._inputs)

    @property
    def outputs(self) -> tuple[Value, ...]:
        return tuple(self._outputs)

    @property
    def implicit_inputs(self) -> tuple[Value, ...]:
        """Outer-scope values read by this node's subgraphs."""
        return tuple(self._implicit)

    @property
    def has_subgraphs(self) -> bool:
        import onnx

        return any(isinstance(v, onnx.GraphProto) or (isinstance(v, list) and v and isinstance(v[0], onnx.GraphProto))
                   for v in self.attrs.values())

    def input(self, i: int) -> Value | None:
        return self._inputs[i] if i < len(self._inputs) else None

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    @property
    def source(self) -> str:
        return self.meta.get("source", self.name)

    def set_input(self, i: int, value: Value | None) -> None:
        """Rewire input ``i`` to ``value`` keeping use lists consistent."""
        old = self._inputs[i]
        if old is value:
            return
        if old is not None:
            old._uses.remove((self, i))
        self._inputs[i] = value
        if value is not None:
            value._uses.append((self, i))
        if self.graph is not None:
            self.graph._touch()

    def set_inputs(self, values: Sequence[Value | None]) -> None:
        for i, old in enumerate(self._inputs):
            if old is not None:
                old._uses.remove((self, i))
        self._inputs = list(values)
        for i, v in enumerate(self._inputs):
            if v is not None:
                v._uses.append((self, i))
        if self.graph is not None:
            self.graph._touch()

    def __repr__(self) -> str:  # pragma: no cover
        return f"Node({self.op_type}, name={self.name!r})"


class Graph:
    """A computation graph: ordered nodes, named values, inputs, outputs, initializers.

    Mutations go through methods (:meth:`add_node`, :meth:`remove_node`,
    :meth:`replace_all_uses_with`, :meth:`add_initializer`...) which keep use-def chains
    consistent and bump :attr:`version`, the key analyses cache on.
    """

    def __init__(self, name: str = "graph"):
        self.name = name
        self.nodes: list[Node] = []
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.initializers: dict[str, Value] = {}
        self.values: dict[str, Value] = {}
        self.opset_imports: dict[str, int] = {"": 17}
        self.ir_version: int | None = None
        self.producer_name = "nnsculpt"
        self.producer_version = ""
        self.metadata: dict[str, str] = {}
        self.doc_string = ""
        self.functions: list[Any] = []  # onnx.FunctionProto, carried untouched
        self.meta: dict[str, Any] = {}
        self.version = 0
        self._name_counter: dict[str, itertools.count] = {}

    # ------------------------------------------------------------------ bookkeeping
    def _touch(self) -> None:
        self.version += 1

    def invalidate(self) -> None:
        """Declare that something analyses read changed outside the mutation methods (e.g. a
        value's ``shape`` set by hand): bumps :attr:`version`, so cached analyses recompute."""
        self._touch()

    def replace_contents(self, new: "Graph", *, keep_node_meta: bool = True) -> None:
        """Make this graph object take over ``new``'s nodes, values, inputs, outputs,
        initializers, opsets and functions (``new`` must not be used afterwards). With
        ``keep_node_meta`` nodes whose names exist in both keep this graph's provenance.
        ``graph.meta`` entries of this graph are kept; cached analyses are dropped."""
        old_meta = {n.name: n.meta for n in self.nodes} if keep_node_meta else {}
        for attr in ("nodes", "inputs", "outputs", "initializers", "values", "opset_imports", "ir_version",
                     "functions"):
            setattr(self, attr, getattr(new, attr))
        for v in self.values.values():
            v.graph = self
        for n in self.nodes:
            n.graph = self
            if n.name in old_meta:
                n.meta = dict(old_meta[n.name])
        self._name_counter = {}
        self.__dict__.pop("_node_name_set", None)
        for k in [k for k in self.meta if k.startswith("_")]:
            del self.meta[k]
        self._touch()

    def raise_opset(self, target: int, *, who: str = "") -> bool:
        """Upgrade the default-domain opset to ``target`` in place with
        ``onnx.version_converter``, keeping node names and provenance. Returns True if it
        changed; raises :class:`UnsupportedOpError` (naming ``who``) when the converter fails."""
        from .onnx_io import raise_opset

        return raise_opset(self, target, who=who)

    @property
    def opset(self) -> int:
        """The default-domain (``ai.onnx``) opset version."""
        return int(self.opset_imports.get("", self.opset_imports.get("ai.onnx", 0)))

    def unique_name(self, base: str) -> str:
        """A value/node name not used yet, derived deterministically from ``base``."""
        base = base or "v"
        if base not in self.values and base not in self._node_names():
            return base
        counter = self._name_counter.setdefault(base, itertools.count(1))
        while True:
            cand = f"{base}_{next(counter)}"
            if cand not in self.values and cand not in self._node_names():
                return cand

    def _node_names(self) -> set[str]:
        names = self.__dict__.get("_node_name_set")
        if names is None or len(names) != len(self.nodes):  # (re)built lazily; kept up to date incrementally
            names = {n.name for n in self.nodes}
            self._node_name_set = names
        return names

    def rename_value(self, v: Value, new: str) -> None:
        """Rename ``v`` (keeps the initializer table in step). Subgraphs that capture it by
        name would break, so that is refused."""
        if v.name == new:
            return
        if new in self.values:
            raise IRError(f"value name '{new}' already defined in graph '{self.name}'")
        if any(i == -1 for _, i in v._uses):
            raise IRError(f"cannot rename '{v.name}': a subgraph reads it by name")
        del self.values[v.name]
        if self.initializers.get(v.name) is v:
            del self.initializers[v.name]
            self.initializers[new] = v
        v.name = new
        self.values[new] = v
        self._touch()

    def rename_node(self, node: Node, new: str) -> None:
        """Rename a node (names are unique within a graph)."""
        if node.name == new:
            return
        names = self._node_names()
        if new in names:
            raise IRError(f"node name '{new}' already used in graph '{self.name}'")
        names.discard(node.name)
        node.name = new
        names.add(new)
        self._touch()

    def _register_value(self, value: Value) -> Value:
        if value.graph is self and self.values.get(value.name) is value:
            return value
        if value.name in self.values and self.values[value.name] is not value:
            raise IRError(f"value name '{value.name}' already defined in graph '{self.name}'")
        value.graph = self
        self.values[value.name] = value
        return value

    # -------------------------------------------------------------------- creation
    def add_input(self, name: str, dtype, shape) -> Value:
        v = self._register_value(Value(name, dtype, shape))
        self.inputs.append(v)
        self._touch()
        return v

    def add_initializer(self, name: str, array: np.ndarray, *, unique: bool = True) -> Value:
        """Add a constant; with ``unique`` the name is made unique, else it must be free."""
        if unique:
            name = self.unique_name(name)
        v = self._register_value(Value(name, const=np.asarray(array)))
        self.initializers[name] = v
        self._touch()
        return v

    def new_value(self, name: str, dtype=None, shape=None) -> Value:
        """A fresh (unregistered until used as an output) value with a unique name."""
        return Value(self.unique_name(name), dtype, shape)

    def add_node(self, op_type: str, inputs: Sequence[Value | None], outputs: int | Sequence[Value | str] = 1,
                 attrs: dict[str, Any] | None = None, *, name: str | None = None, domain: str = "",
                 meta: dict[str, Any] | None = None, before: Node | None = None,
                 after: Node | None = None) -> Node:
        """Create a node, wire it and insert it (at the end, or before/after a node).

        ``outputs`` is a count (names derived from the node name) or a list of values or
        names. Returns the node; its outputs are ``node.outputs``.
        """
        name = self.unique_name(name or op_type.lower())
        if isinstance(outputs, int):
            outs = [Value(self.unique_name(f"{name}_out" if outputs == 1 else f"{name}_out{i}"))
                    for i in range(outputs)]
            for o in outs:  # reserve names
                self._register_value(o)
        else:
            outs = []
            for o in outputs:
                v = Value(self.unique_name(o)) if isinstance(o, str) else o
                self._register_value(v)
                outs.append(v)
        node = Node(op_type, inputs, outs, attrs, name=name, domain=domain, meta=meta)
        self.insert_node(node, before=before, after=after)
        return node

    def insert_node(self, node: Node, *, before: Node | None = None, after: Node | None = None) -> Node:
        """Insert an already-built node, registering its outputs and uses."""
        if node.graph is not None:
            raise IRError(f"node '{node.name}' already belongs to a graph")
        node.graph = self
        for o in node._outputs:
            self._register_value(o)
            if o.producer is not None and o.producer is not node:
                raise IRError(f"value '{o.name}' already produced by '{o.producer.name}'")
            o.producer = node
        for i, v in enumerate(node._inputs):
            if v is not None:
                self._ensure_known(v)
                v._uses.append((node, i))
        for v in node._implicit:
            v._uses.append((node, -1))
        self._node_names().add(node.name)
        if before is not None:
            self.nodes.insert(self.nodes.index(before), node)
        elif after is not None:
            self.nodes.insert(self.nodes.index(after) + 1, node)
        else:
            self.nodes.append(node)
        self._touch()
        return node

    def _ensure_known(self, v: Value) -> None:
        if v.graph is None:
            if v.is_const:
                self._register_value(v)
                self.initializers[v.name] = v
            else:
                raise IRError(f"value '{v.name}' is not part of graph '{self.name}'")

    def set_implicit_inputs(self, node: Node, values: Iterable[Value]) -> None:
        for v in node._implicit:
            v._uses.remove((node, -1))
        node._implicit = list(values)
        for v in node._implicit:
            v._uses.append((node, -1))
        self._touch()

    # -------------------------------------------------------------------- removal
    def remove_node(self, node: Node, *, force: bool = False) -> None:
        """Remove ``node``; its outputs must be unused unless ``force``."""
        for o in node._outputs:
            if not force and (o._uses or o in self.outputs):
                raise IRError(f"cannot remove node '{node.name}': output '{o.name}' is still used")
        for i, v in enumerate(node._inputs):
            if v is not None:
                v._uses.remove((node, i))
        for v in node._implicit:
            v._uses.remove((node, -1))
        for o in node._outputs:
            o.producer = None
            if self.values.get(o.name) is o:
                del self.values[o.name]
        self._node_names().discard(node.name)
        self.nodes.remove(node)
        node.graph = None
        self._touch()

    def remove_initializer(self, value: Value) -> None:
        if value._uses or value in self.outputs:
            raise IRError(f"cannot remove initializer '{value.name}': still used")
        self.initializers.pop(value.name, None)
        if self.values.get(value.name) is value:
            del self.values[value.name]
        value.graph = None
        self._touch()

    def remove_initializer_if_unused(self, value: Value | None) -> bool:
        """Drop ``value`` when it is an initializer that nothing reads (no explicit or implicit
        use) and that is not a graph output. Returns True if it was removed."""
        if value is None or not value.is_const or self.initializers.get(value.name) is not value:
            return False
        if value.uses or any(o is value for o in self.outputs):
            return False
        self.remove_initializer(value)
        return True

    def replace_all_uses_with(self, old: Value, new: Value) -> None:
        """Make every user of ``old`` (and graph outputs) read ``new`` instead.

        When ``old`` is a graph output, the output keeps its public name: ``new`` is
        renamed to ``old``'s name if it is not itself an input/output/initializer
        (a model's interface never changes under a pass); otherwise an Identity keeps it.
        """
        if old is new:
            return
        self._ensure_known(new)
        captured_by = [n.name for n, i in old._uses if i == -1]
        if captured_by and new.name != old.name:
            raise IRError(f"cannot replace '{old.name}' with '{new.name}': subgraphs of {captured_by} read it "
                          "by name (rename instead, or leave the region alone)")
        for node, idx in list(old._uses):
            if idx == -1:
                node._implicit[node._implicit.index(old)] = new
                old._uses.remove((node, -1))
                new._uses.append((node, -1))
            else:
                node.set_input(idx, new)
        if old in self.outputs:
            public = old.name
            can_rename = (new.producer is not None and new not in self.outputs and new not in self.inputs
                          and not any(n.has_subgraphs for n, _ in new._uses))
            positions = [i for i, o in enumerate(self.outputs) if o is old]
            if can_rename:
                if self.values.get(public) is old:
                    del self.values[public]
                old.name = self.unique_name(public + "_replaced")
                self.values[old.name] = old
                del self.values[new.name]
                new.name = public
                self.values[public] = new
                for i in positions:
                    self.outputs[i] = new
            else:
                if self.values.get(public) is old:
                    del self.values[public]
                old.name = self.unique_name(public + "_replaced")
                self.values[old.name] = old
                out = Value(public, new.dtype, new.shape)
                self.add_node("Identity", [new], [out], name=self.unique_name(public + "_identity"))
                for i in positions:
                    self.outputs[i] = out
        self._touch()

    # --------------------------------------------------------------------- queries
    def node_by_name(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise IRError(f"no node named '{name}' in graph '{self.name}'")

    def find(self, op_type: str | None = None, *, domain: str | None = None) -> list[Node]:
        return [n for n in self.nodes if (op_type is None or n.op_type == op_type)
                and (domain is None or n.domain == domain)]

    def consumers(self, value: Value) -> list[Node]:
        return value.users

    def topological_sort(self) -> None:
        """Reorder ``nodes`` topologically, stable w.r.t. the current order."""
        out = self.topological_order()
        if out != self.nodes:
            self.nodes = out
            self._touch()

    def topological_order(self) -> list[Node]:
        """The nodes in topological order (stable w.r.t. the current order); no mutation."""
        order = {id(n): i for i, n in enumerate(self.nodes)}
        indeg: dict[int, int] = {}
        succ: dict[int, list[Node]] = {id(n): [] for n in self.nodes}
        for n in self.nodes:
            preds = {id(v.producer) for v in list(n._inputs) + n._implicit
                     if v is not None and v.producer is not None and v.producer.graph is self}
            indeg[id(n)] = len(preds)
            for p in preds:
                succ[p].append(n)
        import heapq

        ready = [(order[id(n)], id(n), n) for n in self.nodes if indeg[id(n)] == 0]
        heapq.heapify(ready)
        out: list[Node] = []
        while ready:
            _, _, n = heapq.heappop(ready)
            out.append(n)
            for s in succ[id(n)]:
                indeg[id(s)] -= 1
                if indeg[id(s)] == 0:
                    heapq.heappush(ready, (order[id(s)], id(s), s))
        if len(out) != len(self.nodes):
            cyc = [n.name for n in self.nodes if indeg[id(n)] > 0][:5]
            raise IRError(f"graph '{self.name}' has a cycle through nodes {cyc}")
        return out

    def _is_weight(self, v: Value) -> bool:
        """Float initializers, and integer ones that are quantized weights (DequantizeLinear x).
        BatchNormalization running mean / variance are statistics, not parameters (as in torch)."""
        if v.const is None:
            return False
        if v._uses and all(n.op_type == "BatchNormalization" and i in (3, 4) for n, i in v._uses):
            return False
        if v.const.dtype.kind == "f":
            return True
        return any(n.op_type == "DequantizeLinear" and i == 0 for n, i in v._uses)

    def param_count(self) -> int:
        """Number of weight elements: float initializers plus quantized integer weights, without
        BatchNormalization running statistics (so it equals torch's ``numel`` of parameters). A weight
        stored as codes into a codebook (``cluster-weights``: integer codes -> Cast / unpack ->
        ``Gather(codebook)``) counts the elements of the weight it decodes to, plus its codebook."""
        n = sum(v.const.size for v in self.initializers.values() if self._is_weight(v))
        for node in self.nodes:
            if node.op_type == "Gather" and len(node.inputs) == 2 and node.inputs[0] is not None \
                    and node.inputs[0].is_const and node.inputs[0].const.dtype.kind == "f" \
                    and node.inputs[1] is not None and not node.inputs[1].is_const \
                    and _integer_chain(node.inputs[1]) and node.outputs[0].shape is not None \
                    and all(isinstance(d, int) for d in node.outputs[0].shape):
                n += int(np.prod(node.outputs[0].shape))
        return int(n)

    def weight_bytes(self) -> int:
        """Bytes of all initializers as stored (4-bit types count half a byte per element)."""
        total = 0.0
        for v in self.initializers.values():
            if v.const is None:
                continue
            name = v.const.dtype.name
            total += v.const.size / 2 if name in ("int4", "uint4") else v.const.nbytes
        return int(total)

    def iter_values(self) -> Iterator[Value]:
        return iter(self.values.values())

    def copy(self) -> "Graph":
        """A deep copy (weights copied too), built by walking the graph (no recursion)."""
        import copy as _copy

        g = Graph(self.name)
        g.opset_imports = dict(self.opset_imports)
        g.ir_version, g.producer_name, g.producer_version = self.ir_version, self.producer_name, self.producer_version
        g.metadata, g.doc_string = dict(self.metadata), self.doc_string
        g.functions = list(self.functions)
        g.meta = {k: _copy.deepcopy(v) for k, v in self.meta.items() if not k.startswith("_")}
        vmap: dict[int, Value] = {}

        def clone(v: Value) -> Value:
            nv = Value(v.name, v.dtype, v.shape, const=None if v.const is None else v.const.copy())
            nv.meta = _copy.deepcopy(v.meta)
            vmap[id(v)] = nv
            return nv

        for v in self.inputs:
            g.inputs.append(g._register_value(clone(v)))
        for name, v in self.initializers.items():
            g.initializers[name] = g._register_value(clone(v))
        for n in self.nodes:
            outs = [clone(o) for o in n.outputs]
            nn_ = Node(n.op_type, [None if i is None else vmap[id(i)] for i in n.inputs], outs,
                       _copy.deepcopy(n.attrs), name=n.name, domain=n.domain, meta=_copy.deepcopy(n.meta))
            nn_.attr_types = dict(n.attr_types)
            nn_.doc_string = n.doc_string
            nn_._implicit = [vmap[id(v)] for v in n.implicit_inputs]
            g.insert_node(nn_)
        g.outputs = [vmap[id(v)] for v in self.outputs]
        g.version = 0
        return g

    def __repr__(self) -> str:  # pragma: no cover
        return f"Graph({self.name!r}, {len(self.nodes)} nodes, {len(self.initializers)} initializers)"


def constant_chain(v: Value, max_nodes: int = 64) -> list[Node] | None:
    """The nodes (in dependency order) that compute ``v`` from initializers alone -- a weight decode such
    as ``codes -> Cast -> Div / Mod -> Gather`` or a DequantizeLinear of a constant -- or None when ``v``
    depends on a graph input or an unknown value, or the chain has more than ``max_nodes`` nodes. An
    initializer itself has the empty chain."""
    order: list[Node] = []
    seen: set[int] = set()

    def visit(x: Value) -> bool:
        if x.is_const:
            return True
        p = x.producer
        if p is None:
            return False
        if id(p) in seen:
            return True
        seen.add(id(p))
        if len(seen) > max_nodes or not all(i is None or visit(i) for i in p.inputs):
            return False
        order.append(p)
        return True

    return order if visit(v) else None


def _integer_chain(v: Value) -> bool:
    """Whether ``v`` is computed (by at least one node) from integer initializers only: the codes of a codebook."""
    chain = constant_chain(v)
    return bool(chain) and all(x.const.dtype.kind in "iu" for n in chain for x in n.inputs if x is not None and x.is_const)


def mark_changed(node: Node, pass_name: str) -> None:
    """Record that ``pass_name`` created or changed ``node`` (provenance)."""
    node.meta["pass"] = pass_name
    hist = node.meta.setdefault("history", [])
    if not hist or hist[-1] != pass_name:
        hist.append(pass_name)
