"""Deterministic text form of a graph (MLIR-like, one line per node).

Used for ``--print-ir-after-all`` dumps and for diffing a graph pass by pass. The same
graph always prints the same text. Constants print their type and a CRC32 of their bytes
(so a diff shows which weights a pass changed), never their values.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import onnx

from .graph import Graph, Node, Value

_SHORT = {"float32": "f32", "float16": "f16", "float64": "f64", "int64": "i64", "int32": "i32",
          "int8": "i8", "uint8": "u8", "int16": "i16", "uint16": "u16", "bool": "i1"}


def type_str(v: Value) -> str:
    dt = "?" if v.dtype is None else _SHORT.get(v.dtype.name, v.dtype.name)
    if v.shape is None:
        return f"{dt}[*]"
    return f"{dt}[{','.join('?' if d is None else str(d) for d in v.shape)}]"


def _ref(v: Value | None) -> str:
    if v is None:
        return "_"
    return ("@" if v.is_const else "%") + v.name


def _fmt_attr(val: Any) -> str:
    if isinstance(val, onnx.GraphProto):
        return f"<graph {val.name!r}: {len(val.node)} nodes>"
    if isinstance(val, onnx.AttributeProto):
        return f"<attr type {val.type}>"
    if isinstance(val, np.ndarray):
        return f"<tensor {val.dtype}{list(val.shape)} crc={zlib.crc32(np.ascontiguousarray(val).tobytes()):08x}>"
    if isinstance(val, float):
        return repr(round(val, 8))
    if isinstance(val, (list, tuple)):
        return "[" + ",".join(_fmt_attr(x) for x in val) + "]"
    if isinstance(val, bytes):
        return repr(val)
    if isinstance(val, str):
        return '"' + val + '"'
    return str(val)


def format_node(n: Node) -> str:
    outs = ", ".join(f"%{o.name}: {type_str(o)}" for o in n.outputs)
    op = n.op_type if not n.domain else f"{n.domain}::{n.op_type}"
    args = ", ".join(_ref(i) for i in n.inputs)
    attrs = ""
    if n.attrs:
        attrs = " {" + ", ".join(f"{k}={_fmt_attr(n.attrs[k])}" for k in sorted(n.attrs)) + "}"
    implicit = ""
    if n.implicit_inputs:
        implicit = " captures(" + ", ".join(_ref(v) for v in n.implicit_inputs) + ")"
    prov = n.meta.get("source", "")
    hist = n.meta.get("history")
    tail = f"  // {n.name}" + (f" <- {prov}" if prov and prov != n.name else "")
    if hist:
        tail += " [" + ",".join(hist) + "]"
    return f"{outs} = {op}({args}){attrs}{implicit}{tail}"


def print_graph(g: Graph) -> str:
    """Return the text form of ``g``."""
    opsets = ", ".join(f"{d or 'ai.onnx'}={v}" for d, v in sorted(g.opset_imports.items()))
    lines = [f"graph {g.name!r} opset {{{opsets}}} {{"]
    for v in g.inputs:
        lines.append(f"  input %{v.name}: {type_str(v)}")
    for v in g.initializers.values():
        crc = zlib.crc32(np.ascontiguousarray(v.const).tobytes())
        lines.append(f"  const @{v.name}: {type_str(v)} crc={crc:08x}")
    for n in g.nodes:
        lines.append("  " + format_node(n))
    lines.append("  return " + ", ".join(_ref(v) for v in g.outputs))
    lines.append("}")
    return "\n".join(lines) + "\n"
