"""ONNX <-> IR conversion: :func:`from_onnx` (frontend) and :func:`to_onnx_model` (lowering).

``from_onnx`` accepts any default-domain opset >= 11 (older models are upgraded with
``onnx.version_converter`` and the graph records it), turns ``Constant`` nodes of the main
graph into initializers, loads external data, keeps dynamic dims symbolic, and carries
subgraph ops and unknown-domain ops untouched.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import ModelLoadError
from .graph import Graph, Node, Value

log = logging.getLogger("nnsculpt.ir")

MIN_OPSET = 11

_SIMPLE_ATTR = {
    onnx.AttributeProto.FLOAT, onnx.AttributeProto.INT, onnx.AttributeProto.STRING,
    onnx.AttributeProto.FLOATS, onnx.AttributeProto.INTS, onnx.AttributeProto.STRINGS,
    onnx.AttributeProto.TENSOR, onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS,
    onnx.AttributeProto.TENSORS,
}


# --------------------------------------------------------------------------- dtypes
def np_dtype(elem_type: int):
    if elem_type == 0:
        return None
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except Exception:  # exotic types (float8...) without a numpy dtype
        return None


def onnx_dtype(dtype) -> int:
    if dtype is None:
        return 0
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


# ------------------------------------------------------------------------ loading
def parse_model_bytes(data: bytes, name: str) -> onnx.ModelProto:
    """The ModelProto in ``data`` (external data not loaded); ModelLoadError naming ``name`` when it is
    empty, not a protobuf, or a protobuf without a graph."""
    if not data:
        raise ModelLoadError(f"{name}: empty file")
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as e:  # google.protobuf.message.DecodeError and friends
        raise ModelLoadError(f"{name}: not a valid ONNX model (truncated or not ONNX): {e}") from None
    if model.ir_version <= 0 or not model.HasField("graph") or (not model.graph.node and not model.graph.output):
        raise ModelLoadError(f"{name}: not an ONNX model (no graph / ir_version in the protobuf)")
    return model


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file with external data, turning every failure into ModelLoadError."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file")
    if p.is_dir():
        raise ModelLoadError(f"{p}: is a directory, expected an .onnx file")
    model = parse_model_bytes(p.read_bytes(), str(p))
    try:
        from onnx.external_data_helper import load_external_data_for_model, uses_external_data

        if any(uses_external_data(t) for t in model.graph.initializer):
            load_external_data_for_model(model, str(p.parent))
    except Exception as e:
        raise ModelLoadError(f"{p}: cannot load external data: {e}") from None
    return model


def from_onnx(model: "str | os.PathLike | onnx.ModelProto", *, infer_shapes: bool = True) -> Graph:
    """Import an ONNX model (path or ModelProto) into an IR :class:`Graph`."""
    name_hint = None
    if not isinstance(model, onnx.ModelProto):
        name_hint = Path(model).stem
        model = load_model(model)
    try:
        onnx.checker.check_model(model)
        checker_msg = None
    except Exception as e:  # pedantic checks (e.g. outputs without shapes): warn, ORT decides
        checker_msg = str(e).splitlines()[0]
        log.warning("%s: onnx.checker: %s", name_hint or model.graph.name, checker_msg)
    g = from_onnx_model(model, _infer=infer_shapes)
    if checker_msg:
        g.meta["checker_warning"] = checker_msg
    if name_hint and not g.name:
        g.name = name_hint
    return g


def _opset_of(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 0


def from_onnx_model(model: onnx.ModelProto, _infer: bool = True) -> Graph:
    opset = _opset_of(model)
    upgraded_from = None
    if 0 < opset < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
            upgraded_from = opset
            log.info("upgraded model from opset %d to %d", opset, MIN_OPSET)
        except Exception as e:
            raise ModelLoadError(f"model '{model.graph.name}' has opset {opset} < {MIN_OPSET} and could not "
                                 f"be upgraded: {e}") from None
    original_nodes = list(model.graph.node)  # subgraphs are carried exactly as given (no inferred value_info)
    if _infer:
        try:
            model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
        except Exception as e:  # shape inference is best effort
            log.warning("ONNX shape inference failed (%s); continuing with declared shapes", e)

    mg = model.graph
    g = Graph(mg.name or "graph")
    g.opset_imports = {(o.domain if o.domain != "ai.onnx" else ""): o.version for o in model.opset_import}
    g.ir_version = model.ir_version
    g.producer_name = model.producer_name
    g.producer_version = model.producer_version
    g.doc_string = model.doc_string
    g.metadata = {p.key: p.value for p in model.metadata_props}
    g.functions = list(model.functions)
    if upgraded_from:
        g.meta["upgraded_from_opset"] = upgraded_from

    types: dict[str, tuple[Any, Any]] = {}
    for vi in list(mg.value_info) + list(mg.input) + list(mg.output):
        types[vi.name] = type_of_value_info(vi)

    init_names = set()
    for t in mg.initializer:
        arr = numpy_helper.to_array(t)
        v = Value(t.name, const=arr)
        g._register_value(v)
        g.initializers[t.name] = v
        init_names.add(t.name)
    for st in mg.sparse_initializer:
        arr = sparse_to_dense(st)
        name = st.values.name
        v = Value(name, const=arr)
        g._register_value(v)
        g.initializers[name] = v
        init_names.add(name)

    for vi in mg.input:
        if vi.name in init_names:  # IR < 4 style: initializers listed as inputs
            continue
        dt, shape = types[vi.name]
        g.inputs.append(g._register_value(Value(vi.name, dt, shape)))

    def get(name: str) -> Value | None:
        if name == "":
            return None
        v = g.values.get(name)
        if v is None:
            raise ModelLoadError(f"model '{mg.name}': value '{name}' is used but never defined")
        return v

    used_names: set[str] = set()
    for idx, n in enumerate(mg.node):
        nname = n.name or f"{n.op_type}_{idx}"
        if nname in used_names:
            nname = f"{nname}__{idx}"
        used_names.add(nname)
        # Constant node of the main graph -> initializer
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.output) == 1:
            arr = _constant_value(n)
            if arr is not None:
                v = Value(n.output[0], const=arr)
                v.meta["from_constant_node"] = nname
                g._register_value(v)
                g.initializers[v.name] = v
                continue
        attrs, attr_types = _read_attrs(original_nodes[idx] if len(original_nodes) == len(mg.node) else n)
        outs = []
        for o in n.output:
            dt, shape = types.get(o, (None, None))
            outs.append(Value(o, dt, shape) if o else Value(g.unique_name(f"{nname}_unused")))
        node = Node(n.op_type, [get(i) for i in n.input], outs, attrs, name=nname, domain=n.domain,
                    meta={"source": n.name or nname})
        node.attr_types = attr_types
        node.doc_string = n.doc_string
        if node.has_subgraphs:
            implicit = []
            for name in sorted(_outer_names(n)):
                v = g.values.get(name)
                if v is not None:
                    implicit.append(v)
            node._implicit = implicit
        g.insert_node(node)
        if any(o == "" for o in n.output):
            for i, o in enumerate(n.output):
                if o == "":
                    node._outputs[i].meta["optional_unused"] = True

    for vi in mg.output:
        v = g.values.get(vi.name)
        if v is None:
            raise ModelLoadError(f"model '{mg.name}': graph output '{vi.name}' is never produced")
        dt, shape = types[vi.name]
        if v.dtype is None:
            v.dtype = dt
        if shape is not None:
            v.shape = shape
        g.outputs.append(v)
    g.version = 0
    return g


def type_of_value_info(vi: onnx.ValueInfoProto):
    t = vi.type
    if not t.HasField("tensor_type"):
        return None, None
    tt = t.tensor_type
    dt = np_dtype(tt.elem_type)
    if not tt.HasField("shape"):
        return dt, None
    dims = []
    for d in tt.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_value"):  # -1 (Paddle's dynamic batch) or 0: symbolic, not a size
            dims.append(None)
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return dt, tuple(dims)


def sparse_to_dense(st: onnx.SparseTensorProto) -> np.ndarray:
    values = numpy_helper.to_array(st.values)
    idx = numpy_helper.to_array(st.indices)
    dims = tuple(st.dims)
    dense = np.zeros(int(np.prod(dims)), dtype=values.dtype)
    if idx.ndim == 1:
        dense[idx] = values
    else:
        dense[np.ravel_multi_index(idx.T, dims)] = values
    return dense.reshape(dims)


def _constant_value(n: onnx.NodeProto) -> np.ndarray | None:
    for a in n.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None  # sparse_value / strings: keep the node


def _read_attrs(n: onnx.NodeProto):
    attrs: dict[str, Any] = {}
    types: dict[str, int] = {}
    for a in n.attribute:
        types[a.name] = a.type
        if a.ref_attr_name or a.type not in _SIMPLE_ATTR:
            attrs[a.name] = a  # carried as the raw AttributeProto
            continue
        val = helper.get_attribute_value(a)
        if a.type == onnx.AttributeProto.TENSOR:
            val = numpy_helper.to_array(val)
        elif a.type == onnx.AttributeProto.TENSORS:
            val = [numpy_helper.to_array(t) for t in val]
        elif a.type == onnx.AttributeProto.STRING:
            val = _maybe_decode(val)
        elif a.type == onnx.AttributeProto.STRINGS:
            val = [_maybe_decode(s) for s in val]
        elif a.type in (onnx.AttributeProto.INTS, onnx.AttributeProto.FLOATS, onnx.AttributeProto.GRAPHS):
            val = list(val)
        attrs[a.name] = val
    return attrs, types


def _maybe_decode(b: bytes):
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return b


def _outer_names(n: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from enclosing scopes."""
    out: set[str] = set()
    for a in n.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []
        for sg in graphs:
            out |= _free_names(sg)
    return out


def _free_names(sg: onnx.GraphProto) -> set[str]:
    defined = {i.name for i in sg.input} | {t.name for t in sg.initializer} | {t.values.name for t in sg.sparse_initializer}
    free: set[str] = set()
    for n in sg.node:
        for i in n.input:
            if i and i not in defined:
                free.add(i)
        for inner in _outer_names(n):
            if inner not in defined:
                free.add(inner)
        defined |= set(n.output)
    for o in sg.output:
        if o.name not in defined:
            free.add(o.name)
    return free


# ------------------------------------------------------------------------ lowering
def make_attribute(name: str, value: Any, attr_type: int | None) -> onnx.AttributeProto:
    if isinstance(value, onnx.AttributeProto):
        a = onnx.AttributeProto()
        a.CopyFrom(value)
        a.name = name
        return a
    if isinstance(value, np.ndarray):
        return helper.make_attribute(name, numpy_helper.from_array(value))
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], np.ndarray):
        return helper.make_attribute(name, [numpy_helper.from_array(v) for v in value])
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (list, tuple)):
        value = [v.item() if isinstance(v, np.generic) else v for v in value]
        if not value and attr_type is None:
            attr_type = onnx.AttributeProto.INTS
    if attr_type in (onnx.AttributeProto.FLOATS,) and value:
        value = [float(v) for v in value]
    if attr_type == onnx.AttributeProto.FLOAT:
        value = float(value)
    return helper.make_attribute(name, value, attr_type=attr_type)


def _value_info(v: Value) -> onnx.ValueInfoProto:
    shape = None if v.shape is None else [d if d is not None else None for d in v.shape]
    elem = onnx_dtype(v.dtype)
    return helper.make_tensor_value_info(v.name, elem, shape)


def to_onnx_model(graph: Graph, *, check: bool = True, value_info: bool = False) -> onnx.ModelProto:
    """Lower a :class:`Graph` to an ``onnx.ModelProto`` (validated by onnx.checker).

    The output is deterministic: nodes in the graph's (topological) order, attributes
    sorted by name, initializers in insertion order. Graph outputs of unknown type get
    their type from shape inference first.
    """
    if check and any(v.dtype is None or v.shape is None for v in graph.outputs):
        from .analysis import infer_shapes

        infer_shapes(graph)
    nodes = []
    for n in graph.topological_order():
        attrs = [make_attribute(k, n.attrs[k], n.attr_types.get(k)) for k in sorted(n.attrs)]
        outs = ["" if o.meta.get("optional_unused") else o.name for o in n.outputs]
        np_ = helper.make_node(n.op_type, [i.name if i is not None else "" for i in n.inputs], outs,
                               name=n.name, domain=n.domain or None)
        np_.attribute.extend(attrs)
        if n.doc_string:
            np_.doc_string = n.doc_string
        nodes.append(np_)
    inits = [numpy_helper.from_array(np.asarray(v.const, order="C"), v.name)
             for v in graph.initializers.values()]
    inputs = [_value_info(v) for v in graph.inputs]
    outputs = [_value_info(v) for v in graph.outputs]
    vis = []
    if value_info:
        io = {v.name for v in graph.inputs} | {v.name for v in graph.outputs}
        for n in graph.topological_order():
            for o in n.outputs:
                if o.name not in io and o.dtype is not None and not o.meta.get("optional_unused"):
                    vis.append(_value_info(o))
    og = helper.make_graph(nodes, graph.name, inputs, outputs, initializer=inits, value_info=vis,
                           doc_string=graph.doc_string or None)
    opsets = [helper.make_opsetid(d, v) for d, v in sorted(graph.opset_imports.items())]
    model = helper.make_model(og, opset_imports=opsets, producer_name=graph.producer_name or "nnsculpt",
                              producer_version=graph.producer_version or "")
    model.ir_version = _ir_version(graph)
    if graph.doc_string:
        model.doc_string = graph.doc_string
    for k in sorted(graph.metadata):
        p = model.metadata_props.add()
        p.key, p.value = k, graph.metadata[k]
    model.functions.extend(graph.functions)
    if check:
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as e:
            from .errors import IRError

            msg = str(e).splitlines()[0]
            unshaped = [v.name for v in graph.inputs + graph.outputs if v.shape is None]
            if unshaped and "shape" in msg:  # rank unknown even to shape inference: not fatal
                log.warning("lowered model '%s': %s (values of unknown rank: %s)", graph.name, msg, unshaped)
            else:
                raise IRError(f"lowered model '{graph.name}' fails onnx.checker: {msg}") from None
    return model


def _ir_version(graph: Graph) -> int:
    try:
        need = helper.find_min_ir_version_for(
            [helper.make_opsetid(d, v) for d, v in graph.opset_imports.items()], ignore_unknown=True)
    except TypeError:  # older onnx without ignore_unknown
        need = 7
    cur = graph.ir_version or 0
    # ORT supports up to onnx.IR_VERSION of the onnx it was built against; stay modest
    return max(cur, need, 7)


def save(graph_or_model, path: str | os.PathLike) -> Path:
    """Write a Graph / ModelProto atomically: nothing half-written is left on failure."""
    model = graph_or_model if isinstance(graph_or_model, onnx.ModelProto) else to_onnx_model(graph_or_model)
    return write_bytes_atomic(Path(path), model.SerializeToString())


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def raise_opset(graph: Graph, target: int, *, who: str = "") -> bool:
    """Upgrade the default-domain opset of ``graph`` (in place) to ``target`` with
    ``onnx.version_converter``; node names and provenance are kept. Returns True if changed."""
    if graph.opset >= target:
        return False
    from .errors import UnsupportedOpError

    model = to_onnx_model(graph, check=False)
    try:
        converted = onnx.version_converter.convert_version(model, target)
    except Exception as e:
        label = f"pass '{who}': " if who else ""
        raise UnsupportedOpError(f"{label}cannot raise the opset of '{graph.name}' from {graph.opset} "
                                 f"to {target} with onnx.version_converter: {str(e).splitlines()[0]}") from None
    graph.replace_contents(from_onnx_model(converted))
    graph.meta["upgraded_opset"] = target
    return True
