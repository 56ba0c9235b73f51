"""``DIR/report.html``: one self-contained page for a pipeline run (``nnsculpt compile --report DIR``).

No network: the layout library (@dagrejs/dagre 3.1.3, MIT, vendored unmodified in
``nnsculpt/_vendor/dagre.min.js``) and everything else is inlined, so the file opens from disk.
dagre (a maintained layered-DAG layout, Sugiyama-style, ~50 kB) is used rather than Graphviz
``dot`` because it runs in the browser: no binary to install, and collapsing / expanding a module
re-lays the graph out on the spot. Sections:

* the pipeline as a timeline: per pass its time, whether it changed the graph, nodes / params /
  MACs / weight bytes before -> after, drift vs the input, warnings and notes;
* plots (inline SVG): size, MACs, drift (cosine, top-1 agreement) and, with ``--report-latency``, ORT
  latency per stage, per-layer metrics from the passes' artifacts
  (weight / output errors, ranks, bits, sparsities, sensitivities), the calibration histograms of
  quantize with the clip range its method chose and, dashed, what max / percentile / mse / kl would
  choose (the 12 most clipped tensors), the budget search curve;
* the graph at any stage (input, after each pass that changed it), drawn with dagre, collapsed
  by module path (provenance ``layer1.0.conv1`` -> ``layer1`` / ``layer1.0``; click a box to
  expand or collapse it), searchable, zoomable (wheel) and pannable (drag), with per-node
  overlays coloured on a scale with a legend: params, MACs, output channels, the share of params /
  MACs / channels removed against the compared stage, and every per-layer number the passes
  reported;
* a diff between any two stages: nodes added / changed (op, attributes or constant inputs) shown
  on the later graph, removed ones listed, and the IR text diff of every pass that changed the graph.
"""

from __future__ import annotations

import difflib
import html
import json
import math
from pathlib import Path
from typing import Any

_VENDOR = Path(__file__).with_name("_vendor")
#: numeric per-layer fields of pass artifacts shown as overlays / bar charts (others are skipped)
_SKIP_FIELDS = {"shape", "source", "op", "weight", "applied", "storage", "granularity", "decision", "mode",
                "reduction_axis", "rule"}


def module_path(source: str, op: str) -> list[str]:
    from .runtime.torch_lowering import source_components

    try:
        parts = source_components(source, op)
    except Exception:  # pragma: no cover - provenance of unusual shape: no grouping
        parts = [source]
    return [p for p in parts[:-1] if p]


def overlays_from_report(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{"pass:field": {node name: value}}`` from the per-layer artifacts of every pass."""
    out: dict[str, dict[str, float]] = {}
    for e in report.get("passes", []):
        art = e.get("artifacts") or {}
        # per-layer tables: artifacts["layers"], or one level down (prune-weights: artifacts["sparsity"]["layers"])
        tables = [art.get("layers")] + [v.get("layers") for v in art.values() if isinstance(v, dict)]
        for layers in tables:
            if not isinstance(layers, dict):
                continue
            for node, entry in layers.items():
                if not isinstance(entry, dict):
                    continue
                for k, v in entry.items():
                    if k in _SKIP_FIELDS or isinstance(v, bool) or not isinstance(v, (int, float)):
                        continue
                    if isinstance(v, float) and not math.isfinite(v):
                        continue
                    out.setdefault(f"{e['name']}:{k}", {})[node] = float(v)
        sens = art.get("sensitivity")
        if isinstance(sens, dict):
            for node, v in sens.items():
                val = v.get("error") if isinstance(v, dict) else v
                if isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(float(val)):
                    out.setdefault(f"{e['name']}:sensitivity", {})[node] = float(val)
    return out


# ------------------------------------------------------------------------------ SVG plots
def _bars(title: str, labels: list[str], values: list[float], fmt: str = "{:.3g}", width: int = 760) -> str:
    if not values:
        return ""
    bar_h, left = 16, 260
    vmax = max(max(values), 1e-30)
    h = 30 + bar_h * len(values)
    rows = []
    for i, (lab, v) in enumerate(zip(labels, values)):
        y = 24 + i * bar_h
        w = max(1.0, (width - left - 70) * v / vmax)
        rows.append(f'<text x="{left - 6}" y="{y + 11}" text-anchor="end">{html.escape(lab[-40:])}</text>'
                    f'<rect x="{left}" y="{y + 2}" width="{w:.1f}" height="{bar_h - 4}" fill="#4a7fb5"/>'
                    f'<text x="{left + w + 4:.1f}" y="{y + 11}">{html.escape(fmt.format(v))}</text>')
    return (f'<figure><svg class="plot" width="{width}" height="{h}"><text x="4" y="14" font-weight="bold">'
            f'{html.escape(title)}</text>{"".join(rows)}</svg></figure>')


def _curve(title: str, pts: list[tuple[float, float]], xlab: str, ylab: str, width: int = 520, height: int = 300) -> str:
    if len(pts) < 1:
        return ""
    x0, y0, x1, y1 = 60, 20, width - 20, height - 40
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xmin, xmax = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    ymin, ymax = 0.0, max(ys) if max(ys) > 0 else 1.0

    def sx(x):
        return x0 + (x1 - x0) * (x - xmin) / (xmax - xmin)

    def sy(y):
        return y1 - (y1 - y0) * (y - ymin) / (ymax - ymin)

    dots = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="#c0392b"><title>{x:.3g}, {y:.3g}</title>'
                   f'</circle>' for x, y in pts)
    path = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(sorted(pts)))
    return (f'<figure><svg class="plot" width="{width}" height="{height}"><text x="4" y="14" font-weight="bold">'
            f'{html.escape(title)}</text><line x1="{x0}" y1="{y1}" x2="{x1}" y2="{y1}" stroke="#333"/>'
            f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="#333"/>'
            f'<text x="{(x0 + x1) / 2}" y="{height - 8}" text-anchor="middle">{html.escape(xlab)} '
            f'({xmin:.3g} .. {xmax:.3g})</text><text x="8" y="{(y0 + y1) / 2}" transform="rotate(-90 8 '
            f'{(y0 + y1) / 2})" text-anchor="middle">{html.escape(ylab)} (0 .. {ymax:.3g})</text>'
            f'<path d="{path}" fill="none" stroke="#c0392b" stroke-opacity=".4"/>{dots}</svg></figure>')


_METHOD_COLOURS = {"max": "#2c3e50", "percentile": "#8e44ad", "mse": "#16a085", "kl": "#d68910"}


def _histogram(name: str, h: dict[str, Any], width: int = 300, height: int = 120) -> str:
    counts = h.get("counts") or []
    if not counts:
        return ""
    x0, x1, y1 = 6, width - 6, height - 30
    cmax = max(max(counts), 1)
    bw = (x1 - x0) / len(counts)
    span = (h["max"] - h["min"]) or 1.0

    def sx(v):
        return x0 + (x1 - x0) * (v - h["min"]) / span

    bars = "".join(f'<rect x="{x0 + i * bw:.1f}" y="{y1 - (y1 - 22) * math.sqrt(c / cmax):.1f}" width="{bw:.1f}" '
                   f'height="{(y1 - 22) * math.sqrt(c / cmax):.1f}" fill="#7f9fc0"/>' for i, c in enumerate(counts))
    lines = "".join(f'<line x1="{sx(v):.1f}" x2="{sx(v):.1f}" y1="20" y2="{y1}" stroke="#c0392b" stroke-width="2"/>'
                    for v in (h["lo"], h["hi"]) if h["min"] <= v <= h["max"])
    # the other methods' choices, dashed, one colour each (the legend is under the heading)
    for m, (lo, hi) in (h.get("ranges") or {}).items():
        lines += "".join(f'<line x1="{sx(v):.1f}" x2="{sx(v):.1f}" y1="20" y2="{y1}" stroke="{_METHOD_COLOURS.get(m, "#555")}" '
                         f'stroke-width="1.2" stroke-dasharray="3 2"><title>{m}: {v:.4g}</title></line>'
                         for v in (lo, hi) if h["min"] <= v <= h["max"])
    return (f'<figure><svg class="plot" width="{width}" height="{height}"><text x="4" y="13">'
            f'{html.escape(name[-44:])}</text>{bars}{lines}<text x="4" y="{height - 14}">data [{h["min"]:.3g}, '
            f'{h["max"]:.3g}]  clip [{h["lo"]:.3g}, {h["hi"]:.3g}]</text><text x="4" y="{height - 2}">'
            f'(sqrt count scale)</text></svg></figure>')


def _plots(report: dict[str, Any], overlays: dict[str, dict[str, float]]) -> str:
    parts = []
    stages = [("input", report.get("before") or {})] + [(e["name"], e.get("after") or {}) for e in report["passes"]]
    for key, title in (("weight_bytes", "weight bytes per stage"), ("macs", "MACs per stage")):
        vals = [float(s.get(key, 0) or 0) for _, s in stages]
        parts.append(_bars(title, [f"{i}. {n}" for i, (n, _) in enumerate(stages)], vals, "{:,.0f}"))
    lat = report.get("stage_latency") or []
    if lat:
        parts.append(_bars("ORT latency per stage (one sample, 1 thread; x = ratio to the input)", [f"{s['index']}. {s['label']} (x{s['ratio']:.2f})" for s in lat],
                           [float(s["ms"]) for s in lat], "{:.3f} ms"))
    drift = [(e["name"], e["drift_vs_input"]) for e in report["passes"] if e.get("drift_vs_input")]
    if drift:
        labels = [f"{i}. {n}" for i, (n, _) in enumerate(drift, 1)]
        parts.append(_bars("output cosine vs the input model, per stage", labels,
                           [float(d.get("cosine", 1.0)) for _, d in drift], "{:.5f}"))
        if all("top1_agreement" in d for _, d in drift):
            parts.append(_bars("top-1 agreement with the input model, per stage", labels,
                               [float(d["top1_agreement"]) for _, d in drift], "{:.4f}"))
    for name, vals in sorted(overlays.items()):
        items = sorted(vals.items(), key=lambda kv: -kv[1])[:40]
        parts.append(_bars(f"{name} per layer" + (" (largest 40)" if len(vals) > 40 else ""),
                           [k for k, _ in items], [v for _, v in items]))
    for e in report["passes"]:
        cal = (e.get("artifacts") or {}).get("calibration")
        if isinstance(cal, dict) and cal:
            from .runtime.calibrate import clipped_share

            # the tensors whose chosen range clips the most of the data range first
            items = sorted(cal.items(), key=lambda kv: -clipped_share(kv[1]))[:12]
            legend = ", ".join(f'<span style="color:{c}">{m}</span>' for m, c in _METHOD_COLOURS.items())
            parts.append(f"<h3>{html.escape(e['name'])}: calibration histograms (12 most clipped of {len(cal)}; "
                         f"red: the range {html.escape(str(items[0][1].get('method')))} chose; dashed: what "
                         f"{legend} would choose)</h3>")
            parts.extend(_histogram(name, h) for name, h in items)
    for e in report["passes"]:
        curve = (e.get("artifacts") or {}).get("budget_curve")
        if isinstance(curve, list) and curve and isinstance(curve[0], dict):
            pts = [(float(c.get("integer_flops_share", 0)), float(c.get("error", 0))) for c in curve
                   if c.get("error") is not None and math.isfinite(float(c.get("error")))]
            parts.append(_curve(f"{e['name']}: budget search (error vs integer-FLOPs share)", pts,
                                "integer-FLOPs share", "error"))
    return "".join(p for p in parts if p)


# ------------------------------------------------------------------------------ page
def _timeline(report: dict[str, Any]) -> str:
    rows = []
    keys = ("nodes", "params", "macs", "weight_bytes")
    for i, e in enumerate(report["passes"], 1):
        b, a = e.get("before") or {}, e.get("after") or {}
        cells = "".join(f"<td>{b.get(k, 0):,} &rarr; {a.get(k, 0):,}</td>" for k in keys)
        d = e.get("drift_vs_input") or {}
        drift = (f"max_rel {d['max_rel']:.2e}, cos {d.get('cosine', 1):.5f}" + (
            f", top-1 {d['top1_agreement']:.3f}" if "top1_agreement" in d else "")) if d else ""
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in e.get("notes", []))
        tag = " <i>(inserted for " + html.escape(str(e.get("inserted_for"))) + ")</i>" if e.get("inserted") else ""
        cls = "changed" if e.get("changed") else "noop"
        rows.append(f'<tr class="{cls}"><td>{i}</td><td>{html.escape(e["name"])}{tag}</td>'
                    f'<td>{"changed" if e.get("changed") else "no-op"}</td><td>{1e3 * e.get("time_s", 0):.1f}</td>'
                    f'{cells}<td>{drift}</td><td>{"<details><summary>" + str(len(e.get("notes", []))) + " note(s)</summary><ul>" + notes + "</ul></details>" if notes else ""}</td></tr>')
    head = "".join(f"<th>{k}</th>" for k in ("#", "pass", "", "ms") + keys + ("drift vs input", "notes"))
    return f'<table class="timeline"><tr>{head}</tr>{"".join(rows)}</table>'


def _ir_diffs(snaps: list[dict[str, Any]]) -> str:
    out = []
    for prev, cur in zip(snaps, snaps[1:]):
        diff = difflib.unified_diff(prev["ir"].splitlines(), cur["ir"].splitlines(), f"{prev['index']}-{prev['label']}",
                                    f"{cur['index']}-{cur['label']}", lineterm="", n=1)
        lines = []
        for ln in diff:
            c = "add" if ln.startswith("+") else "del" if ln.startswith("-") else "ctx"
            lines.append(f'<span class="{c}">{html.escape(ln)}</span>')
        plus = sum(1 for x in lines if x.startswith('<span class="add">'))
        minus = sum(1 for x in lines if x.startswith('<span class="del">'))
        body = "\n".join(lines)
        out.append(f"<details><summary>IR diff after pass {cur['index']} ({html.escape(cur['label'])}): "
                   f"{plus} lines +, {minus} lines -</summary><pre>{body}</pre></details>")
    return "".join(out) or "<p><i>no pass changed the graph</i></p>"


GRAPH_CSS = """#graphbox{border:1px solid #aaa;height:70vh;position:relative;overflow:hidden;background:#fcfcfc}
#graph{width:100%;height:100%;cursor:grab} #controls > *{margin-right:.6em} #side{font-size:12px;max-height:12em;overflow:auto}
.node rect{stroke:#555;stroke-width:1} .node text{font-size:11px;pointer-events:none} .group rect{stroke-dasharray:4 2;fill:#eef}
.hit rect{stroke:#e67e22;stroke-width:3} .added rect{stroke:#27ae60;stroke-width:3} .changed rect{stroke:#d35400;stroke-width:3}
#legend{display:inline-block;vertical-align:middle}"""


def graph_section(snaps: list[dict[str, Any]], overlays: dict[str, dict[str, float]], *, stage: int | None = None,
                  base: int = -1) -> str:
    """The interactive graph view (controls, SVG, data and scripts) of ``snaps`` (snapshot dicts with
    ``index`` / ``label``), with per-node ``overlays``; ``stage`` / ``base``: the stages shown and
    compared first (default: the last one, no comparison). Needs :data:`GRAPH_CSS` in the page."""
    stages = []
    for sn in snaps:
        nodes = [{**n, "path": module_path(n["source"], n["op"])} for n in sn["nodes"]]
        stages.append({"index": sn["index"], "label": sn["label"], "nodes": nodes, "inputs": sn["inputs"],
                       "outputs": sn["outputs"]})
    data = {"stages": stages, "overlays": overlays,
            "defaults": {"stage": len(stages) - 1 if stage is None else stage, "base": base}}
    payload = json.dumps(data, separators=(",", ":"), default=float).replace("</", "<\\/")
    dagre = (_VENDOR / "dagre.min.js").read_text()
    return f"""<div id="controls">stage <select id="stage"></select> compare with <select id="base"></select>
overlay <select id="overlay"></select> <input id="search" placeholder="search name / op / module" size="28">
<button id="expand">expand all</button><button id="collapse">collapse all</button><button id="fit">fit</button>
<span id="legend"></span> <span id="status"></span></div>
<div id="graphbox"><svg id="graph"></svg></div><div id="side"></div>
<script>window.addEventListener('error', e => {{ const b = document.body.dataset;
b.errors = String(+(b.errors || 0) + 1); b.errmsg = String(e.message).slice(0, 300); }});</script>
<script type="application/json" id="data">{payload}</script>
<script>{dagre}</script>
<script>{_JS}</script>"""


def build_html(report: dict[str, Any], snaps: list[dict[str, Any]]) -> str:
    """The page as a string (see the module docstring)."""
    overlays = overlays_from_report(report)
    warnings = "".join(f"<li>{html.escape(w)}</li>" for w in report.get("warnings", []))
    title = html.escape(str(report.get("model", "model")))
    summ = report.get("summary") or {}
    summary = " &middot; ".join(f"{k} {v['before']:,} &rarr; {v['after']:,}" for k, v in summ.items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>nnsculpt report: {title}</title>
<style>
body{{font:14px system-ui,sans-serif;margin:1em 1.5em;color:#222}} h2{{margin:1.2em 0 .4em}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:2px 6px;font-size:12.5px;vertical-align:top}}
th{{background:#eee}} p.pipe code{{word-break:break-all;font-size:11.5px;color:#555}} tr.noop{{color:#888}} .warn{{background:#fff3cd;border:1px solid #e0c060;padding:.5em 1em}}
svg.plot text{{font-size:11px}} figure{{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}}
pre{{font:12px monospace;background:#f7f7f7;padding:.5em;overflow:auto;max-height:30em}} .add{{color:#1e7e34}} .del{{color:#b02a37}}
{GRAPH_CSS}
</style></head><body>
<h1>nnsculpt report: {title}</h1>
<p class="pipe">pipeline <code>{html.escape(str(report.get("pipeline", "")))}</code><br>{summary}</p>
{('<div class="warn"><b>warnings</b><ul>' + warnings + '</ul></div>') if warnings else ''}
<h2>Pipeline</h2>{_timeline(report)}
<h2>Plots</h2>{_plots(report, overlays)}
<h2>Graph</h2>
{graph_section(snaps, overlays)}
<h2>IR diffs</h2>{_ir_diffs(snaps)}
</body></html>
"""


def write_report_html(report: dict[str, Any], snaps: list[dict[str, Any]], directory: str | Path) -> Path:
    """Write ``DIR/report.html`` atomically; returns its path."""
    from .ir.onnx_io import write_bytes_atomic

    return write_bytes_atomic(Path(directory) / "report.html", build_html(report, snaps).encode())


_JS = r"""
(function(){
const D = JSON.parse(document.getElementById('data').textContent);
const $ = id => document.getElementById(id);
const svg = $('graph'), NS = 'http://www.w3.org/2000/svg';
const stageSel = $('stage'), baseSel = $('base'), ovSel = $('overlay');
D.stages.forEach((s, i) => {
  stageSel.add(new Option(`${s.index}. ${s.label} (${s.nodes.length} nodes)`, i));
  baseSel.add(new Option(`${s.index}. ${s.label}`, i));
});
baseSel.add(new Option('none', -1), 0); baseSel.value = D.defaults.base; stageSel.value = D.defaults.stage;
const DELTAS = ['Δ params vs compare', 'Δ MACs vs compare', 'Δ channels vs compare'];
['none', 'params', 'macs', 'channels'].concat(DELTAS, Object.keys(D.overlays).sort()).forEach(k => ovSel.add(new Option(k, k)));
const chans = n => (n.shape && n.shape.length > 1 && typeof n.shape[1] === 'number') ? n.shape[1] : null;
function overlayValues(ov, st, base) {   // node name -> value of the chosen overlay
  if (ov === 'params' || ov === 'macs') return new Map(st.nodes.map(n => [n.name, n[ov]]));
  if (ov === 'channels') return new Map(st.nodes.filter(n => chans(n) !== null && (n.params || n.macs)).map(n => [n.name, chans(n)]));
  if (DELTAS.includes(ov)) {             // the share removed against the compare stage (same node name)
    if (!base) return new Map();
    const f = ov.startsWith('Δ params') ? n => n.params : ov.startsWith('Δ MACs') ? n => n.macs : chans;
    const b = new Map(base.nodes.map(n => [n.name, n])), out = new Map();
    st.nodes.forEach(n => { const m = b.get(n.name); if (!m) return; const x = f(m), y = f(n);
      if (x && y !== null && x > 0) out.set(n.name, Math.max(0, (x - y) / x)); });
    return out;
  }
  return ov !== 'none' ? new Map(Object.entries(D.overlays[ov] || {})) : new Map();
}
let expanded = new Set(), view = {x: 0, y: 0, w: 1000, h: 800}, layoutBox = null;
const key = p => p.join('.');
function groupOf(n) {            // the collapsed group a node is drawn in, or null (drawn itself)
  for (let d = 1; d <= n.path.length; d++) { const k = key(n.path.slice(0, d)); if (!expanded.has(k)) return k; }
  return null;
}
function colour(t) { const h = (1 - t) * 220; return `hsl(${h},70%,${85 - 35 * t}%)`; }
function render() {
  const t0 = performance.now();
  const st = D.stages[+stageSel.value], bi = +baseSel.value, base = bi >= 0 ? D.stages[bi] : null;
  const q = $('search').value.trim().toLowerCase(), ov = ovSel.value;
  const baseSig = base ? new Map(base.nodes.map(n => [n.name, n.sig])) : null;
  const status = new Map();
  if (base) st.nodes.forEach(n => status.set(n.name, !baseSig.has(n.name) ? 'added' : baseSig.get(n.name) !== n.sig ? 'changed' : ''));
  const vals = overlayValues(ov, st, base);
  let vmax = 0; vals.forEach(v => { if (v > vmax) vmax = v; });
  const g = new dagre.graphlib.Graph({multigraph: false}); g.setGraph({rankdir: 'TB', nodesep: 18, ranksep: 28}); g.setDefaultEdgeLabel(() => ({}));
  const producer = new Map(), members = new Map();
  st.nodes.forEach(n => {
    const grp = groupOf(n), id = grp ? 'g:' + grp : 'n:' + n.name;
    n.outputs.forEach(o => producer.set(o, id));
    if (!members.has(id)) members.set(id, []);
    members.get(id).push(n);
  });
  members.forEach((ns, id) => {
    const grp = id.startsWith('g:');
    const label = grp ? `${id.slice(2)}  (${ns.length})` : `${ns[0].op}  ${ns[0].name.slice(-28)}`;
    g.setNode(id, {label, width: Math.max(70, 7 * label.length), height: 26, grp, ns});
  });
  st.nodes.forEach(n => {
    const to = producer.get(n.outputs[0]);
    n.inputs.forEach(i => { const from = producer.get(i); if (from && from !== to && !g.hasEdge(from, to)) g.setEdge(from, to); });
  });
  dagre.layout(g);
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const root = document.createElementNS(NS, 'g'); svg.appendChild(root);
  g.edges().forEach(e => {
    const pts = g.edge(e).points, p = document.createElementNS(NS, 'polyline');
    p.setAttribute('points', pts.map(q => `${q.x},${q.y}`).join(' ')); p.setAttribute('fill', 'none'); p.setAttribute('stroke', '#999');
    root.appendChild(p);
  });
  let hits = 0;
  g.nodes().forEach(id => {
    const nd = g.node(id), el = document.createElementNS(NS, 'g');
    const hit = q && nd.ns.some(n => (n.name + ' ' + n.op + ' ' + n.source).toLowerCase().includes(q));
    const st2 = nd.ns.map(n => status.get(n.name)).find(s => s) || '';
    let v = null; nd.ns.forEach(n => { if (vals.has(n.name)) v = Math.max(v ?? -Infinity, vals.get(n.name)); });
    el.setAttribute('class', 'node' + (nd.grp ? ' group' : '') + (hit ? ' hit' : '') + (st2 ? ' ' + st2 : ''));
    if (hit) hits++;
    const r = document.createElementNS(NS, 'rect');
    r.setAttribute('x', nd.x - nd.width / 2); r.setAttribute('y', nd.y - nd.height / 2); r.setAttribute('width', nd.width); r.setAttribute('height', nd.height); r.setAttribute('rx', 4);
    r.setAttribute('fill', v !== null && vmax > 0 ? colour(v / vmax) : nd.grp ? '#eef' : '#fff');
    const tt = document.createElementNS(NS, 'title');
    tt.textContent = nd.ns.slice(0, 12).map(n => `${n.name} [${n.op}] params ${n.params} MACs ${n.macs}` + (vals.has(n.name) ? ` ${ov}=${vals.get(n.name)}` : '')).join('\n') + (nd.ns.length > 12 ? `\n... ${nd.ns.length - 12} more` : '');
    const tx = document.createElementNS(NS, 'text'); tx.setAttribute('x', nd.x); tx.setAttribute('y', nd.y + 4); tx.setAttribute('text-anchor', 'middle'); tx.textContent = nd.label;
    el.appendChild(r); el.appendChild(tt); el.appendChild(tx); root.appendChild(el);
    el.addEventListener('click', () => {
      const n0 = nd.ns[0];
      if (nd.grp) { expanded.add(id.slice(2)); } else if (n0.path.length) { // collapse the node's innermost group
        let k = key(n0.path); for (const x of [...expanded]) if (x === k || x.startsWith(k + '.')) expanded.delete(x); expanded.delete(k); }
      render();
    });
  });
  const gr = g.graph(); layoutBox = {w: gr.width || 100, h: gr.height || 100};
  if (!render.fitted) { fit(); render.fitted = true; } else applyView();
  if (ov !== 'none' && vmax > 0) $('legend').innerHTML = `<svg width="170" height="16">${[0, .25, .5, .75, 1].map((t, i) => `<rect x="${i * 30}" width="30" height="16" fill="${colour(t)}"/>`).join('')}</svg> 0 .. ${vmax.toPrecision(3)}`;
  else $('legend').innerHTML = '';
  const removed = base ? base.nodes.filter(n => !st.nodes.some(m => m.name === n.name)) : [];
  $('side').innerHTML = base ? `<b>vs ${base.label}:</b> ${[...status.values()].filter(s => s === 'added').length} added, ${[...status.values()].filter(s => s === 'changed').length} changed, ${removed.length} removed` + (removed.length ? ': ' + removed.slice(0, 200).map(n => `${n.name} [${n.op}]`).join(', ') : '') : '';
  $('status').textContent = `${g.nodeCount()} boxes, ${hits ? hits + ' match(es), ' : ''}drawn in ${(performance.now() - t0).toFixed(0)} ms`;
  document.body.dataset.rendered = String(Math.round(performance.now() - t0));
}
function applyView() { svg.setAttribute('viewBox', `${view.x} ${view.y} ${view.w} ${view.h}`); }
function fit() { const b = svg.getBoundingClientRect(), sw = layoutBox.w / (b.width || 1);
  // the whole graph when that keeps labels readable; else natural size from the top (pan / wheel for the rest)
  let s = Math.max(sw, layoutBox.h / (b.height || 1), 0.2); if (s > 2.5) s = Math.max(sw, 1);
  view = {x: -10, y: -10, w: (b.width || 1000) * s + 20, h: (b.height || 800) * s + 20}; applyView(); }
svg.addEventListener('wheel', ev => { ev.preventDefault(); const f = ev.deltaY > 0 ? 1.15 : 1 / 1.15, b = svg.getBoundingClientRect();
  const mx = view.x + view.w * (ev.clientX - b.left) / b.width, my = view.y + view.h * (ev.clientY - b.top) / b.height;
  view = {x: mx - (mx - view.x) * f, y: my - (my - view.y) * f, w: view.w * f, h: view.h * f}; applyView(); }, {passive: false});
let drag = null;
svg.addEventListener('mousedown', ev => { drag = {x: ev.clientX, y: ev.clientY, v: {...view}}; });
window.addEventListener('mouseup', () => { drag = null; });
window.addEventListener('mousemove', ev => { if (!drag) return; const b = svg.getBoundingClientRect();
  view.x = drag.v.x - (ev.clientX - drag.x) * view.w / b.width; view.y = drag.v.y - (ev.clientY - drag.y) * view.h / b.height; applyView(); });
function expandFor(q) { if (!q) return; D.stages[+stageSel.value].nodes.forEach(n => { if ((n.name + ' ' + n.op + ' ' + n.source).toLowerCase().includes(q)) for (let d = 1; d <= n.path.length; d++) expanded.add(key(n.path.slice(0, d))); }); }
$('search').addEventListener('change', () => { expandFor($('search').value.trim().toLowerCase()); render(); });
[stageSel, baseSel, ovSel].forEach(s => s.addEventListener('change', render));
$('expand').onclick = () => { D.stages.forEach(s => s.nodes.forEach(n => { for (let d = 1; d <= n.path.length; d++) expanded.add(key(n.path.slice(0, d))); })); render(); };
$('collapse').onclick = () => { expanded.clear(); render(); };
$('fit').onclick = fit;
// report.html#expand&overlay=macs&base=0&stage=2 opens that view (links, tests)
const opts = new Map(location.hash.slice(1).split('&').filter(x => x).map(x => { const [k, v] = x.split('='); return [k, v === undefined ? '1' : decodeURIComponent(v)]; }));
if (opts.has('expand')) D.stages.forEach(s => s.nodes.forEach(n => { for (let d = 1; d <= n.path.length; d++) expanded.add(key(n.path.slice(0, d))); }));
if (opts.has('overlay') && [...ovSel.options].some(o => o.value === opts.get('overlay'))) ovSel.value = opts.get('overlay');
if (opts.has('base')) baseSel.value = opts.get('base');
if (opts.has('stage')) stageSel.value = opts.get('stage');
render();
})();
"""
