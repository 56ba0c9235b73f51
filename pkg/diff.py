"""Structural and numeric diff of two models (``nnsculpt diff A B``).

Nodes are matched first by provenance (``node.source``: the torch module path or, for ONNX files,
the node name -- nnsculpt's rewrites keep the names of the nodes they change and give new nodes
names derived from the old ones), several nodes with one provenance paired by op type in graph
order; the nodes left over are then matched by structure: :class:`difflib.SequenceMatcher` over
their op types in topological order pairs the runs that agree. A matched pair is *changed* when its
op type, attributes (subgraphs excepted), weight shapes or weight values differ; unmatched nodes
of A are *removed*, of B *added*.

Numerics (ONNX Runtime, on ``inputs`` or inputs generated from A's input types): per graph output
max abs / max rel error, cosine and top-1 agreement (:func:`nnsculpt.runtime.ort.compare_outputs`),
and per layer -- for up to ``max_layers`` matched pairs whose outputs are float tensors of the same
shape in both -- the relative L2 error and cosine of B's output against A's, in A's graph order.
"""

from __future__ import annotations

import difflib
import html
from pathlib import Path
from typing import Any

import numpy as np

from .ir import print_graph
from .ir.graph import Graph, Node, constant_chain


def _key(n: Node) -> str:
    return n.source or n.name


def _attrs(n: Node) -> dict[str, Any]:
    out = {}
    for k, v in sorted(n.attrs.items()):
        if hasattr(v, "node"):      # a subgraph: not compared
            continue
        out[k] = v.tolist() if isinstance(v, np.ndarray) else v
    return out


def _weights(n: Node) -> list[tuple[str, Any]]:
    """Per input: ("const", array), ("derived", (shape, producer op)) or ("data", None)."""
    out: list[tuple[str, Any]] = []
    for v in n.inputs:
        if v is None:
            out.append(("none", None))
        elif v.const is not None:
            out.append(("const", v.const))
        elif v.producer is not None and constant_chain(v) is not None:
            out.append(("derived", (tuple(v.shape) if v.shape is not None else None, v.producer.op_type)))
        else:
            out.append(("data", None))
    return out


def match_nodes(a: Graph, b: Graph) -> list[tuple[Node, Node]]:
    """Pairs (node of A, node of B): by provenance, then by op-type runs of the rest."""
    order_a, order_b = a.topological_order(), b.topological_order()
    by_key: dict[str, list[Node]] = {}
    for n in order_b:
        by_key.setdefault(_key(n), []).append(n)
    pairs: list[tuple[Node, Node]] = []
    used_b: set[int] = set()
    rest_a: list[Node] = []
    for n in order_a:
        cands = [m for m in by_key.get(_key(n), []) if id(m) not in used_b]
        pick = next((m for m in cands if m.op_type == n.op_type), cands[0] if cands else None)
        if pick is None:
            rest_a.append(n)
            continue
        used_b.add(id(pick))
        pairs.append((n, pick))
    rest_b = [m for m in order_b if id(m) not in used_b]
    sm = difflib.SequenceMatcher(a=[n.op_type for n in rest_a], b=[m.op_type for m in rest_b], autojunk=False)
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            pairs.extend(zip(rest_a[i1:i2], rest_b[j1:j2]))
    return pairs


def _weight_change(wa: list, wb: list) -> tuple[str | None, float, str]:
    """('shape' | 'values' | 'stored' | 'inputs' | None, max relative change of the weight values, detail).
    A weight read through a decode (DequantizeLinear, a codebook Gather) is compared by its shape."""
    n = max(len(wa), len(wb))
    wa = list(wa) + [("none", None)] * (n - len(wa))
    wb = list(wb) + [("none", None)] * (n - len(wb))
    worst, kind, detail = 0.0, None, ""
    added = []
    for j, ((ka, x), (kb, y)) in enumerate(zip(wa, wb)):
        if ka in ("none", "data") and kb in ("none", "data"):
            if ka != kb:
                return "inputs", float("inf"), ""
            continue
        if ka == "none" or kb == "none":   # e.g. a bias that fold-bn added
            added.append(f"constant input {j} {'added' if ka == 'none' else 'removed'}")
            continue
        if (ka == "data") != (kb == "data"):
            return "inputs", float("inf"), ""
        sa = tuple(x.shape) if ka == "const" else x[0]
        sb = tuple(y.shape) if kb == "const" else y[0]
        if sa != sb:
            kind, worst = "shape", float("inf")
            detail = detail or f"{list(sa) if sa is not None else '?'} -> {list(sb) if sb is not None else '?'}"
            continue
        if ka != kb or (ka == "derived" and x[1] != y[1]):
            kind = kind or "stored"
            detail = detail or (f"now computed by {y[1]}" if kb == "derived" else "now a plain constant")
            continue
        if ka == "derived":
            continue
        if x.dtype != y.dtype:
            kind = kind or "stored"
            detail = detail or f"dtype {x.dtype} -> {y.dtype}"
        elif x.dtype.kind in "fc":
            d = float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max()) if x.size else 0.0
            if d > 0:
                kind = kind or "values"
                worst = max(worst, d / max(float(np.abs(x).max()), 1e-30))
        elif not np.array_equal(x, y):
            kind = kind or "values"
            worst = max(worst, 1.0)
    if added and kind is None:
        return "stored", 0.0, "; ".join(added)
    if added:
        detail = "; ".join([detail] + added) if detail else "; ".join(added)
    return kind, worst, detail


def diff_models(a: Graph, b: Graph, *, inputs: Any = None, seed: int = 0, max_layers: int = 256,
                numerics: bool = True) -> dict[str, Any]:
    """The diff of ``b`` against ``a`` as a JSON-ready dict (see the module docstring)."""
    from .ir.analysis import graph_stats, snapshot

    pairs = match_nodes(a, b)
    matched_a = {id(x) for x, _ in pairs}
    matched_b = {id(y) for _, y in pairs}
    changed, same = [], 0
    for x, y in pairs:
        why = []
        if x.op_type != y.op_type or x.domain != y.domain:
            why.append(f"op {x.op_type} -> {y.op_type}")
        if _attrs(x) != _attrs(y):
            why.append("attributes")
        kind, rel, detail = _weight_change(_weights(x), _weights(y))
        if kind == "inputs":
            why.append("constant inputs added, removed or now computed")
        elif kind == "shape":
            why.append(f"weight shape {detail}")
        elif kind == "stored":
            why.append(f"weight {detail}")
        elif kind:
            why.append(f"weight values (max rel change {rel:.3g})" + (f"; {detail}" if detail else ""))
        sx = x.outputs[0].shape if x.outputs else None
        sy = y.outputs[0].shape if y.outputs else None
        if sx is not None and sy is not None and tuple(sx) != tuple(sy):
            why.append(f"output shape {list(sx)} -> {list(sy)}")
        if why:
            changed.append({"a": x.name, "b": y.name, "source": _key(x), "op": x.op_type, "op_b": y.op_type,
                            "why": why})
        else:
            same += 1
    removed = [{"name": n.name, "op": n.op_type, "source": _key(n)} for n in a.topological_order()
               if id(n) not in matched_a]
    added = [{"name": n.name, "op": n.op_type, "source": _key(n)} for n in b.topological_order()
             if id(n) not in matched_b]
    sa, sb = graph_stats(a).as_dict(), graph_stats(b).as_dict()
    hist_a, hist_b = sa.get("op_histogram", {}), sb.get("op_histogram", {})
    ops = {k: [hist_a.get(k, 0), hist_b.get(k, 0)] for k in sorted(set(hist_a) | set(hist_b))
           if hist_a.get(k, 0) != hist_b.get(k, 0)}
    out: dict[str, Any] = {
        "a": a.name, "b": b.name,
        "stats": {k: [sa[k], sb[k]] for k in ("nodes", "params", "flops", "macs", "weight_bytes", "model_bytes")},
        "op_histogram_delta": ops,
        "matched": len(pairs), "unchanged": same, "changed": changed, "removed": removed, "added": added,
        "ir_a": print_graph(a), "ir_b": print_graph(b),
        "snapshots": [{"index": 0, "label": f"A: {a.name}", **snapshot(a)},
                      {"index": 1, "label": f"B: {b.name}", **snapshot(b)}],
    }
    if numerics:
        out.update(_numerics(a, b, pairs, inputs, seed, max_layers))
        drift = {r["a"]: r for r in out.get("layers", [])}
        for c in changed:
            r = drift.get(c["a"])
            c["drift"] = None if r is None else {"rel_l2": r["rel_l2"], "cosine": r["cosine"]}
    out["identical"] = not changed and not removed and not added and (
        not numerics or all(m.get("max_abs", 1.0) == 0.0 for m in out.get("outputs", {}).values()))
    return out


def _numerics(a: Graph, b: Graph, pairs, inputs, seed: int, max_layers: int) -> dict[str, Any]:
    from .runtime.ort import compare_outputs, make_inputs, run

    if inputs is None:
        inputs = make_inputs(a, batch=2, seed=seed)
    out_a, out_b = [o.name for o in a.outputs], {o.name for o in b.outputs}
    # per layer: matched pairs with a float output of the same (static) shape on both sides
    cands = []
    for x, y in pairs:
        vx, vy = x.outputs[0] if x.outputs else None, y.outputs[0] if y.outputs else None
        if vx is None or vy is None or vx.dtype is None or vy.dtype is None:
            continue
        if vx.dtype.kind != "f" or vy.dtype.kind != "f" or vx.shape is None or vx.shape != vy.shape:
            continue
        cands.append((x, y))
    if len(cands) > max_layers:
        idx = np.linspace(0, len(cands) - 1, max_layers).round().astype(int)
        cands = [cands[i] for i in sorted(set(idx.tolist()))]
    # one ORT run per model: its graph outputs plus the matched layers' outputs exposed as extra outputs
    ga, gb = a.copy(), b.copy()
    for g, names in ((ga, [x.outputs[0].name for x, _ in cands]), (gb, [y.outputs[0].name for _, y in cands])):
        vals = {v.name: v for v in g.iter_values()}
        have = {o.name for o in g.outputs}
        g.outputs.extend(vals[n] for n in dict.fromkeys(names) if n not in have)
    extra: dict[str, Any] = {}
    try:
        ra, rb = run(ga, inputs), run(gb, inputs)
    except Exception as e:  # an intermediate ORT cannot expose: per-output numbers only
        extra["layers_error"] = str(e).splitlines()[0][:300]
        ra, rb, cands = run(a, inputs), run(b, inputs), []
    common = {k: rb[k] for k in out_a if k in out_b}
    outputs = compare_outputs({k: ra[k] for k in common}, common) if common else {}
    layers = []
    for x, y in cands:
        p, q = np.asarray(ra[x.outputs[0].name], np.float64), np.asarray(rb[y.outputs[0].name], np.float64)
        if p.shape != q.shape:
            continue
        den = float(np.linalg.norm(p))
        rel = float(np.linalg.norm(p - q) / den) if den > 0 else float(np.linalg.norm(q))
        cos = float((p * q).sum() / max(np.linalg.norm(p) * np.linalg.norm(q), 1e-30))
        layers.append({"a": x.name, "b": y.name, "source": _key(x), "op": x.op_type, "rel_l2": rel, "cosine": cos})
    return {"outputs": outputs, "layers": layers, **extra}


# ------------------------------------------------------------------------------ output
def format_text(d: dict[str, Any], *, limit: int = 20) -> str:
    """The diff as the text the CLI prints."""
    lines = [f"diff      {d['a']} -> {d['b']}"]
    if d.get("identical"):
        return "\n".join(lines + [f"identical: {d['matched']} nodes, the same ops, attributes and weights"
                                   + (", the same outputs" if "outputs" in d else "")])
    for k, (x, y) in d["stats"].items():
        r = f"  x{y / x:.3f}" if x else ""
        lines.append(f"  {k:<13} {x:>14,} -> {y:<14,}{r}")
    lines.append(f"nodes     {d['matched']} matched ({d['unchanged']} unchanged, {len(d['changed'])} changed), "
                 f"{len(d['removed'])} removed, {len(d['added'])} added")
    if d["op_histogram_delta"]:
        lines.append("ops       " + ", ".join(f"{k} {x}->{y}" for k, (x, y) in d["op_histogram_delta"].items()))

    def block(title, rows, fmt):
        if rows:
            lines.append(f"{title} ({len(rows)}):")
            lines.extend("  " + fmt(r) for r in rows[:limit])
            if len(rows) > limit:
                lines.append(f"  ... {len(rows) - limit} more (--json for all)")

    def changed_line(r):
        dr = r.get("drift")
        tail = "" if "drift" not in r else (f"  drift rel_l2 {dr['rel_l2']:.3e} cosine {dr['cosine']:.6f}" if dr
                                             else "  drift n/a (output not comparable)")
        return f"{r['a']} [{r['op']}]: " + "; ".join(r["why"]) + tail

    block("changed", d["changed"], changed_line)
    block("removed", d["removed"], lambda r: f"{r['name']} [{r['op']}]")
    block("added", d["added"], lambda r: f"{r['name']} [{r['op']}]")
    if "outputs" in d:
        for k, m in d["outputs"].items():
            t1 = f"  top-1 agreement {m['top1_agreement']:.4f}" if "top1_agreement" in m else ""
            lines.append(f"output    {k}: max_abs {m['max_abs']:.3e}  max_rel {m['max_rel']:.3e}  "
                         f"cosine {m['cosine']:.6f}{t1}")
        if d.get("layers"):
            worst = sorted(d["layers"], key=lambda r: -r["rel_l2"])[:min(limit, 10)]
            lines.append(f"layers    per-layer drift on {len(d['layers'])} matched layers; largest:")
            lines.extend(f"  {r['a']:<40} [{r['op']}] rel_l2 {r['rel_l2']:.3e}  cosine {r['cosine']:.6f}"
                         for r in worst)
    return "\n".join(lines)


def write_html(d: dict[str, Any], path: str | Path) -> Path:
    """A self-contained HTML page of the diff (no scripts from the network): the summary, the changed /
    removed / added nodes, per-output and per-layer drift, B's graph with added / changed nodes outlined
    against A and the per-layer drift as an overlay (the report's viewer), and the side-by-side IR text
    diff."""
    from .ir.onnx_io import write_bytes_atomic

    esc = html.escape

    def table(rows, cols):
        if not rows:
            return "<p><i>none</i></p>"
        head = "".join(f"<th>{esc(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{esc(str(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in rows)
        return f"<table><tr>{head}</tr>{body}</table>"

    def fold(body: str, n: int) -> str:
        return body if n <= 20 else f"<details><summary>show {n} rows</summary>{body}</details>"

    stats = [{"metric": k, "A": f"{x:,}", "B": f"{y:,}", "B/A": f"{y / x:.3f}" if x else "-"}
             for k, (x, y) in d["stats"].items()]
    changed = [{"node": r["a"], "op": r["op"], "why": "; ".join(r["why"])} for r in d["changed"]]
    outs = [{"output": k, **{m: f"{v:.4g}" for m, v in s.items()}} for k, s in d.get("outputs", {}).items()]
    layers = [{"node": r["a"], "op": r["op"], "rel_l2": f"{r['rel_l2']:.3e}", "cosine": f"{r['cosine']:.6f}"}
              for r in d.get("layers", [])]
    from .report_html import GRAPH_CSS, graph_section

    drift = {r["b"]: r["rel_l2"] for r in d.get("layers", [])}
    graph = graph_section(d["snapshots"], {"drift rel_l2": drift} if drift else {}, stage=1, base=0)
    irdiff = difflib.HtmlDiff(wrapcolumn=110).make_table(d["ir_a"].splitlines(), d["ir_b"].splitlines(),
                                                         fromdesc=esc(d["a"]), todesc=esc(d["b"]), context=True,
                                                         numlines=2)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>nnsculpt diff</title><style>
body{{font:14px system-ui,sans-serif;margin:1.5em;max-width:1400px}} table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:left}} th{{background:#eee}}
table.diff td{{font:12px monospace;border:none}} .diff_add{{background:#cfc}} .diff_chg{{background:#ffb}}
.diff_sub{{background:#fcc}} h2{{margin-top:1.2em}}
{GRAPH_CSS}</style></head><body>
<h1>diff {esc(d['a'])} &rarr; {esc(d['b'])}</h1>
<p>{d['matched']} nodes matched ({d['unchanged']} unchanged, {len(d['changed'])} changed), {len(d['removed'])} removed,
{len(d['added'])} added.</p>{table(stats, ["metric", "A", "B", "B/A"])}
<h2>Outputs</h2>{table(outs, list(outs[0].keys()) if outs else [])}
<h2>Changed nodes</h2>{table(changed, ["node", "op", "why"])}
<h2>Graph (B, outlined against A; overlay: per-layer drift)</h2>{graph}
<h2>Removed nodes ({len(d['removed'])})</h2>{fold(table(d['removed'], ["name", "op"]), len(d['removed']))}
<h2>Added nodes ({len(d['added'])})</h2>{fold(table(d['added'], ["name", "op"]), len(d['added']))}
<h2>Per-layer drift</h2>{fold(table(layers, ["node", "op", "rel_l2", "cosine"]), len(layers))}
<h2>IR text diff</h2>{irdiff}</body></html>"""
    return write_bytes_atomic(Path(path), page.encode())


def add_cli(sub) -> None:
    s = sub.add_parser("diff", help="structural and numeric diff of two models (text; HTML with -o)")
    s.add_argument("a", metavar="A")
    s.add_argument("b", metavar="B")
    s.add_argument("--inputs", help=".npz of inputs or a directory of .npz files (default: generated from A)")
    s.add_argument("-o", "--output", help="write a self-contained HTML page of the diff here")
    s.add_argument("--json", action="store_true", help="print the diff as JSON")
    s.add_argument("--no-numerics", action="store_true", help="structural diff only")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_diff)


def cmd_diff(args) -> int:
    import json

    from .ir.errors import NNSculptError
    from .runtime.loading import load_graph
    from .runtime.ort import load_inputs

    if args.output and not args.output.lower().endswith((".html", ".htm")):
        raise NNSculptError(f"-o {args.output}: the diff page must be an .html path")
    a, b = load_graph(args.a), load_graph(args.b)
    inputs = load_inputs(args.inputs, a) if args.inputs else None
    d = diff_models(a, b, inputs=inputs, seed=args.seed, numerics=not args.no_numerics)
    if args.json:
        print(json.dumps({k: v for k, v in d.items() if k not in ("ir_a", "ir_b", "snapshots")}, indent=1,
                         default=float))
    else:
        print(format_text(d))
    if args.output:
        print(f"wrote     {write_html(d, args.output)}")
    return 0

