"""Export a model and per-node overlays for Google's Model Explorer (``ai-edge-model-explorer``).

``nnsculpt explore MODEL -o DIR [--report DIR/report.json]`` writes

* ``DIR/graph.json``: the graph as Model Explorer's custom-graph JSON (a ``GraphCollection``:
  one graph, one ``GraphNode`` per node with its op as the label, the module path of its provenance
  as the ``namespace`` -- ``layer1/layer1.0`` -- so Model Explorer nests and collapses layers, its
  attributes, the output shapes / dtypes as ``outputsMetadata``, and ``incomingEdges`` from the
  producers of its inputs; graph inputs are ``Input`` nodes);
* ``DIR/<overlay>.nodedata.json``: one node-data file per overlay (``ModelNodeData``: a value per
  node and a blue -> red gradient): ``params``, ``macs``, and every per-layer number of the
  report's passes (``cluster-weights:weight_rel_err``, ``svd-linear:rank``, quantize sensitivities).

Load them in Model Explorer with ``model-explorer DIR/graph.json --node_data_paths=DIR/macs.nodedata.json``.
The files are plain JSON written without importing the package; the tests load them into the
package's own dataclasses (``graph_builder`` / ``node_data_builder``) when it is installed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from .ir.graph import Graph

_GRADIENT = [{"stop": 0, "bgColor": "#d6e6ff"}, {"stop": 0.5, "bgColor": "#ffd966"}, {"stop": 1, "bgColor": "#e06666"}]


def _namespace(source: str, op: str) -> str:
    from .report_html import module_path  # one module-path rule for both views

    return "/".join(module_path(source, op))


def _attr_value(v: Any) -> str:
    if isinstance(v, np.ndarray):
        return f"tensor{list(v.shape)}"
    if hasattr(v, "node"):
        return "<subgraph>"
    if isinstance(v, bytes):
        return v.decode(errors="replace")
    return str(v)


def _shape(v) -> str:
    return "?" if v.shape is None else "[" + ",".join(str(d) for d in v.shape) + "]"


def graph_json(g: Graph, label: str | None = None) -> dict[str, Any]:
    """The graph as a Model Explorer ``GraphCollection`` dict (see the module docstring)."""
    from .ir.analysis import infer_shapes

    infer_shapes(g)
    nodes: list[dict[str, Any]] = []
    producer: dict[str, tuple[str, int]] = {}
    for i, v in enumerate(g.inputs):
        nid = f"input:{v.name}"
        producer[v.name] = (nid, 0)
        nodes.append({"id": nid, "label": "Input", "namespace": "", "subgraphIds": [],
                      "attrs": [{"key": "name", "value": v.name}], "incomingEdges": [],
                      "outputsMetadata": [{"id": "0", "attrs": [{"key": "shape", "value": _shape(v)},
                                                               {"key": "dtype", "value": str(v.dtype)}]}],
                      "inputsMetadata": []})
    for n in g.nodes:
        for k, o in enumerate(n.outputs):
            producer[o.name] = (n.name, k)
    for n in g.nodes:
        edges = []
        for j, v in enumerate(n.inputs):
            if v is None or v.is_const or v.name not in producer:
                continue
            src, k = producer[v.name]
            edges.append({"sourceNodeId": src, "sourceNodeOutputId": str(k), "targetNodeInputId": str(j)})
        attrs = [{"key": "name", "value": n.name}, {"key": "source", "value": n.source}]
        attrs += [{"key": k, "value": _attr_value(v)} for k, v in sorted(n.attrs.items())]
        consts = [f"{v.name}: {v.const.dtype}{list(v.const.shape)}" for v in n.inputs if v is not None and v.is_const]
        if consts:
            attrs.append({"key": "constants", "value": "; ".join(consts)})
        nodes.append({"id": n.name, "label": n.op_type if not n.domain else f"{n.domain}.{n.op_type}",
                      "namespace": _namespace(n.source, n.op_type), "subgraphIds": [], "attrs": attrs,
                      "incomingEdges": edges,
                      "outputsMetadata": [{"id": str(k), "attrs": [{"key": "name", "value": o.name},
                                                                    {"key": "shape", "value": _shape(o)},
                                                                    {"key": "dtype", "value": str(o.dtype)}]}
                                          for k, o in enumerate(n.outputs)],
                      "inputsMetadata": []})
    gid = label or g.name or "graph"
    return {"label": gid, "graphs": [{"id": gid, "nodes": nodes}], "graphSorting": "node_count_desc"}


def node_data_json(graph_id: str, values: dict[str, float]) -> dict[str, Any]:
    """One overlay in Model Explorer's node-data file format (what ``ModelNodeData.save_to_file`` writes:
    graph id -> ``GraphNodeData``)."""
    results = {k: {"value": float(v)} for k, v in values.items()}
    return {graph_id: {"results": results, "gradient": _GRADIENT}}


def export(g: Graph, out_dir: str | Path, report: dict[str, Any] | None = None) -> list[Path]:
    """Write ``graph.json`` and the node-data overlays into ``out_dir``; returns the files written."""
    from .ir.analysis import node_costs
    from .ir.onnx_io import write_bytes_atomic
    from .report_html import overlays_from_report

    d = Path(out_dir)
    gj = graph_json(g)
    gid = gj["graphs"][0]["id"]
    paths = [write_bytes_atomic(d / "graph.json", json.dumps(gj, indent=1).encode())]
    costs = node_costs(g)
    overlays: dict[str, dict[str, float]] = {"params": {c.name: c.params for c in costs if c.params},
                                             "macs": {c.name: c.macs for c in costs if c.macs}}
    names = {n.name for n in g.nodes}
    for k, vals in (overlays_from_report(report) if report else {}).items():
        vals = {n: v for n, v in vals.items() if n in names}
        if vals:
            overlays[k] = vals
    for k, vals in overlays.items():
        fname = re.sub(r"[^A-Za-z0-9_.-]+", "_", k) + ".nodedata.json"
        paths.append(write_bytes_atomic(d / fname, json.dumps(node_data_json(gid, vals), indent=1).encode()))
    return paths


def add_cli(sub) -> None:
    s = sub.add_parser("explore", help="export the graph and per-node overlays as Model Explorer JSON")
    s.add_argument("model")
    s.add_argument("-o", "--output", required=True, metavar="DIR", help="directory for graph.json and *.nodedata.json")
    s.add_argument("--report", help="a report.json of `compile --report` whose per-layer numbers become overlays")
    s.set_defaults(func=cmd_explore)


def cmd_explore(args) -> int:
    from .ir.errors import NNSculptError
    from .runtime.loading import load_graph

    report = None
    if args.report:
        p = Path(args.report)
        if p.is_dir():
            p = p / "report.json"
        try:
            report = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise NNSculptError(f"--report {p}: cannot read a report.json ({type(e).__name__}: {e})") from None
    g = load_graph(args.model)
    for p in export(g, args.output, report):
        print(f"wrote     {p}")
    print(f"view      model-explorer {Path(args.output) / 'graph.json'} --node_data_paths="
          f"{Path(args.output) / 'macs.nodedata.json'}")
    return 0
