"""The ``nnsculpt`` command line.

Commands::

    nnsculpt inspect MODEL                       ops, params, FLOPs, bytes, I/O, per-layer table
    nnsculpt compile MODEL -p PIPELINE -o OUT.onnx [--calib-data X.npz|DIR] [--report DIR]
                                 [--print-ir-after-all | --print-ir-after-change |
                                  --print-ir-after PASS] [--verify]
    nnsculpt compare A B [--inputs X.npz|DIR]    max abs / rel error, cosine, top-1 agreement
    nnsculpt bench MODEL [MODEL ...] [--inputs X.npz|DIR]   ORT latency (median of runs), size
    nnsculpt distill STUDENT --teacher T --data train.npz [--val val.npz] --epochs N -o OUT.onnx
    nnsculpt diff A B [--inputs X.npz] [-o diff.html]   structural + numeric diff of two models
    nnsculpt pack MODEL.onnx -o M.nnz / unpack M.nnz -o M.onnx   lossless compressed container
    nnsculpt explore MODEL -o DIR [--report DIR]   Model Explorer graph JSON + node-data overlays
    nnsculpt passes                              registered passes, options, summaries

MODEL is an ``.onnx`` path or ``zoo:NAME`` (``nnsculpt inspect zoo:list`` lists the zoo).
``--calib-data`` / ``--inputs`` take an ``.npz`` file or a directory of them (one batch per
file, in sorted name order; shapes may differ between files -- text lines of different widths;
``labels`` arrays are concatenated), see :func:`nnsculpt.runtime.ort.load_inputs`.
Errors print one line ``nnsculpt: error: <ErrorName>: <message>`` and exit with status 2;
no output file is created on error.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import os
import sys
import time
from pathlib import Path

import numpy as np

from .ir.errors import NNSculptError, PipelineError

log = logging.getLogger("nnsculpt")


# --------------------------------------------------------------------------- helpers
def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.4g}{suffix}{unit}" if suffix else f"{n:.6g}{unit}"
        n /= 1000.0
    return f"{n:.4g}P{unit}"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    fmt = "  ".join("{:<%d}" % w for w in widths)
    out = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    out += [fmt.format(*[str(c) for c in r]) for r in rows]
    return "\n".join(out)


def _inputs_for(graph, path: str | None, seed: int, batch: int):
    """Inputs from ``path`` (an .npz: dense; a directory of .npz: ragged) or generated."""
    from .runtime.ort import load_inputs, make_inputs

    if path:
        return load_inputs(path, graph)
    return make_inputs(graph, batch=batch, seed=seed)


def _shape_str(shape) -> str:
    return "?" if shape is None else "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


# -------------------------------------------------------------------------- commands
def cmd_inspect(args: argparse.Namespace) -> int:
    if args.model == "zoo:list":
        from . import models

        print("\n".join(f"zoo:{n}" for n in models.list_models()))
        return 0
    from .ir.analysis import graph_stats, node_costs
    from .runtime.loading import load_graph

    g = load_graph(args.model)
    st = graph_stats(g)
    costs = node_costs(g)
    if args.json:
        print(json.dumps({
            "model": g.name, "opset": g.opset_imports, "frontend": g.meta.get("frontend", "onnx"),
            "inputs": [{"name": v.name, "dtype": str(v.dtype), "shape": list(v.shape or [])} for v in g.inputs],
            "outputs": [{"name": v.name, "dtype": str(v.dtype), "shape": list(v.shape or [])} for v in g.outputs],
            **st.as_dict(),
            "layers": [c.__dict__ | {"output_shape": list(c.output_shape) if c.output_shape else None}
                       for c in costs]}, indent=2))
        return 0
    opsets = ", ".join(f"{d or 'ai.onnx'}={v}" for d, v in sorted(g.opset_imports.items()))
    print(f"model     {args.model}  (graph '{g.name}', frontend {g.meta.get('frontend', 'onnx')}, opset {opsets})")
    for v in g.inputs:
        print(f"input     {v.name}: {v.dtype} {_shape_str(v.shape)}")
    for v in g.outputs:
        print(f"output    {v.name}: {v.dtype} {_shape_str(v.shape)}")
    print(f"nodes     {st.nodes}")
    print(f"params    {st.params:,} ({_human(st.params)})")
    print(f"FLOPs     {st.flops:,} ({_human(st.flops)}; MACs {_human(st.macs)}; symbolic dims counted as 1)")
    print(f"bytes     weights {st.weight_bytes:,}, ONNX file {st.model_bytes:,}")
    print("ops       " + ", ".join(f"{k}×{v}" for k, v in sorted(st.op_histogram.items(), key=lambda kv: (-kv[1], kv[0]))))
    if not args.summary:
        rows = [[c.name, c.op_type, _shape_str(c.output_shape), f"{c.params:,}", _human(c.macs),
                 c.source if c.source != c.name else ""] for c in costs]
        print()
        print(_table(rows, ["layer", "op", "output", "params", "MACs", "source"]))
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from .ir.onnx_io import save, to_onnx_model
    from .ir.verifier import verify
    from .passes.base import PassContext
    from .passes.manager import PassManager
    from .passes.pipeline import resolve_pipeline
    from .runtime.loading import load_graph
    from .runtime.ort import load_inputs

    out = Path(args.output)
    if out.suffix.lower() != ".onnx":
        raise NNSculptError(f"-o {out}: the output must be an .onnx path")
    passes = resolve_pipeline(args.pipeline)  # bad pass names / options fail before any work
    g = load_graph(args.model)
    calib = load_inputs(args.calib_data, g) if args.calib_data else None
    labels = None
    if args.calib_data:  # labels (if any) feed data-driven criteria such as Taylor importance
        from .runtime.ort import load_labels

        labels = load_labels(args.calib_data)
    ctx = PassContext(calib_data=calib, seed=args.seed, labels=labels)
    check_inputs = load_inputs(args.inputs, g) if args.inputs else None
    printing = args.print_ir_after_all or args.print_ir_after_change or bool(args.print_ir_after)
    if args.print_ir_after:
        known = {p.name for p in passes} | {"fold-bn", "raise-opset", "fuse-layernorm", "fuse-gelu"}
        bad = [n for n in args.print_ir_after if n not in known]
        if bad:
            raise PipelineError(f"--print-ir-after {bad[0]}: no pass of that name in the pipeline "
                                f"({', '.join(p.name for p in passes)})")
    when = "all" if args.print_ir_after_all else "change" if args.print_ir_after_change else list(args.print_ir_after)
    dump_dir = Path(args.report) / "ir" if (args.report and printing) else None
    # numerics are always checked when a lossy pass runs (never a silently broken model)
    lossy = any(not p.exact for p in passes)
    check = args.verify or (lossy and not args.no_check)
    pm = PassManager(passes, verify=args.verify, check_numerics=check, dump_dir=dump_dir,
                     print_ir=sys.stderr if printing else None, print_ir_after=when,
                     min_top1=args.min_top1, min_cosine=args.min_cosine, max_rel_drift=args.max_drift,
                     fail_on_drift=args.fail_on_drift, enforce_exact=args.verify, sample_inputs=check_inputs,
                     snapshots=bool(args.report), stage_latency=args.report_latency)
    result = pm.run(g, ctx)
    if not args.verify:
        verify(result.graph)
    model = to_onnx_model(result.graph)
    save(model, out)
    rep = result.report
    rep["output"] = str(out)
    if args.report:
        path = result.write_report(args.report)
        print(f"report    {path}")
        from .report_html import write_report_html

        print(f"report    {write_report_html(rep, result.snapshots, args.report)}")
    s = rep.get("summary", {})
    rows = [[k, f"{v['before']:,}", f"{v['after']:,}", f"{v['ratio']:.3f}" if v["ratio"] is not None else "-"]
            for k, v in s.items()]
    print(_table(rows, ["metric", "before", "after", "ratio"]))
    for e in rep["passes"]:
        line = f"pass {e['name']:<20} {'changed' if e['changed'] else 'no-op  '} {e['time_s'] * 1000:8.1f} ms"
        if e.get("inserted"):
            line += f"  (inserted: {e['inserted_for']} requires {e['requirement']})"
        if "drift_vs_input" in e:
            line += f"  drift max_rel={e['drift_vs_input']['max_rel']:.2e}"
        print(line)
        for note in e.get("notes", []):
            print(f"    note: {note}")
    for w in rep.get("warnings", []):
        print(f"nnsculpt: warning: {w} (--fail-on-drift makes this an error)", file=sys.stderr)
    print(f"wrote     {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .runtime.loading import load_graph
    from .runtime.ort import compare_outputs, is_ragged, num_samples, run, session

    ga, gb = load_graph(args.a), load_graph(args.b)
    inputs = _inputs_for(ga, args.inputs, args.seed, args.batch)
    ra = run(session(ga), inputs)
    rb = run(session(gb), {k: v for k, v in inputs.items() if k in {i.name for i in gb.inputs}})
    if set(ra) != set(rb):  # compare positionally when names differ
        rb = dict(zip(ra, rb.values()))
    res = compare_outputs(ra, rb)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    rows = []
    for name, e in res.items():
        if "shape_mismatch" in e:
            rows.append([name, "shape mismatch", "", "", ""])
            continue
        rows.append([name, f"{e['max_abs']:.3e}", f"{e['max_rel']:.3e}", f"{e['cosine']:.6f}",
                     f"{e['top1_agreement']:.4f}" if "top1_agreement" in e else "-"])
    labels = None
    if args.inputs:
        from .runtime.ort import load_labels

        labels = load_labels(args.inputs)
    ragged = is_ragged(inputs)
    n = num_samples(inputs) if ragged else (len(next(iter(inputs.values()))) if inputs else 0)
    if labels is not None and len(labels) == n:
        first = next(iter(ra))
        ya, yb = ra[first], rb[first]
        if ragged and all(np.ndim(y) == 2 for y in ya) and len({np.shape(y)[1] for y in ya}) == 1:
            ya, yb = np.concatenate(ya), np.concatenate(yb)
        if np.ndim(ya) == 2 and ya.shape[1] > 1:
            acc_a = float((ya.argmax(1) == labels).mean())
            acc_b = float((yb.argmax(1) == labels).mean())
            print(f"top-1 vs labels: A {acc_a:.4f}  B {acc_b:.4f}  (B - A = {100 * (acc_b - acc_a):+.2f} points)")
    src = f"random, seed {args.seed}"
    if args.inputs:
        src = f"from {args.inputs}" + (f", {len(next(iter(inputs.values())))} files" if ragged else "")
    print(f"compared on {n} samples ({src})")
    print(_table(rows, ["output", "max_abs", "max_rel", "cosine", "top1_agree"]))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .ir.onnx_io import to_onnx_model
    from .runtime.loading import load_graph
    from .runtime.ort import feed_batches, is_ragged, num_samples, session

    rows, base = [], None
    results = []
    for spec in args.models:
        g = load_graph(spec)
        model_bytes = to_onnx_model(g).SerializeToString()
        size = Path(spec).stat().st_size if not spec.startswith("zoo:") else len(model_bytes)
        inputs = _inputs_for(g, args.inputs, args.seed, args.batch)
        sess = session(model_bytes, threads=args.threads)
        # a directory of inputs (ragged): one run = every file's batch once, each fed to fit
        feeds = list(feed_batches(sess, inputs)) if is_ragged(inputs) else [inputs]
        for _ in range(args.warmup):
            for feed in feeds:
                sess.run(None, feed)
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            for feed in feeds:
                sess.run(None, feed)
            times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        p90 = float(np.percentile(times, 90))
        base = base or med
        results.append({"model": spec, "median_ms": med * 1e3, "p90_ms": p90 * 1e3, "bytes": size,
                        "speedup_vs_first": base / med, "runs": args.runs})
        rows.append([spec, f"{med * 1e3:.3f}", f"{p90 * 1e3:.3f}", f"{base / med:.2f}x", f"{size:,}"])
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        if is_ragged(inputs):
            b = f"{num_samples(inputs)} samples in {len(feeds)} feeds per run (from {args.inputs})"
        else:
            b = f"batch {len(next(iter(inputs.values()))) if inputs else 0}"
        print(f"ONNX Runtime CPU, {b}, {args.runs} runs after {args.warmup} warm-up, "
              f"threads={args.threads or 'default'}")
        print(_table(rows, ["model", "median ms", "p90 ms", "speedup", "bytes"]))
    return 0


def cmd_passes(args: argparse.Namespace) -> int:
    from .passes.base import list_passes

    for cls in list_passes():
        kind = "exact" if cls.exact else "lossy"
        print(f"{cls.name}  [{kind}]  {cls.summary()}")
        try:  # with default options (some passes' needs depend on their options)
            reqs = cls().requirements()
        except NNSculptError:
            reqs = cls.requires
        if reqs:
            print(f"    requires: {', '.join(sorted(reqs))} (with default options)")
        for name, tname, default in cls.option_specs():
            print(f"    {name}: {tname} = {default!r}")
        if args.verbose_docs:
            import inspect

            print("\n".join("    " + ln for ln in (inspect.getdoc(cls) or "").splitlines()[1:]))
    return 0


# ------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnsculpt", description="Graph-level compression passes for ONNX and "
                                "torch models. MODEL is an .onnx path or zoo:NAME.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the frontends and passes do")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("inspect", help="ops, params, FLOPs, bytes, inputs/outputs and a per-layer table")
    s.add_argument("model", help=".onnx path, zoo:NAME, or zoo:list to list the zoo")
    s.add_argument("--summary", action="store_true", help="omit the per-layer table")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("compile", help="run a pass pipeline and write ONNX")
    s.add_argument("model")
    s.add_argument("-p", "--pipeline", required=True,
                   help="MLIR-style pipeline, e.g. 'fold-bn,dce', or a .toml recipe path")
    s.add_argument("-o", "--output", required=True, help="output .onnx path")
    s.add_argument("--calib-data", help=".npz of sample inputs (input name -> array with batch dim), or a "
                   "directory of such .npz files whose shapes may differ from file to file")
    s.add_argument("--inputs", help="held-out inputs for the output-drift check (.npz or a directory of .npz "
                   "files; default: the first samples of --calib-data, else generated from the input types)")
    s.add_argument("--report", metavar="DIR", help="write report.json and report.html (a self-contained page: "
                   "timeline, plots, the graph at every stage with overlays and diffs) into DIR")
    s.add_argument("--report-latency", action="store_true",
                   help="also time every stage (the input, after each pass that changed the graph) in ONNX Runtime "
                        "(one sample, 1 thread) for report.json / report.html")
    s.add_argument("--print-ir-after-all", action="store_true",
                   help="print the IR after every pass to stderr (and to DIR/ir/NN-pass.ir.txt with --report)")
    s.add_argument("--print-ir-after-change", action="store_true",
                   help="the same, only after the passes that changed the graph (MLIR's spelling)")
    s.add_argument("--print-ir-after", action="append", default=[], metavar="PASS",
                   help="the same, only after the pass named (repeatable)")
    s.add_argument("--verify", action="store_true",
                   help="verify the IR after every pass and check numerics against the input model "
                        "(numerics are checked anyway when the pipeline has a lossy pass)")
    s.add_argument("--no-check", action="store_true",
                   help="skip the output-drift check of lossy passes (not recommended)")
    s.add_argument("--min-top1", type=float, default=0.98,
                   help="warn when top-1 agreement with the input model falls below this (default 0.98)")
    s.add_argument("--min-cosine", type=float, default=0.99,
                   help="warn when the output cosine similarity falls below this (default 0.99)")
    s.add_argument("--max-drift", type=float, default=None,
                   help="warn when the max relative output error exceeds this")
    s.add_argument("--fail-on-drift", action="store_true",
                   help="make a drift warning an error (DriftError, exit 2, no output file)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_compile)

    s = sub.add_parser("compare", help="compare the outputs of two models on the same inputs")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--inputs", help=".npz of inputs, or a directory of .npz files whose shapes may differ "
                   "(default: random from A's input types)")
    s.add_argument("--batch", type=int, default=8, help="batch size of random inputs")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("bench", help="ONNX Runtime latency (median of runs) and size")
    s.add_argument("models", nargs="+", metavar="MODEL")
    s.add_argument("--inputs", help=".npz of inputs, or a directory of .npz files (default: random)")
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--runs", type=int, default=50)
    s.add_argument("--warmup", type=int, default=5)
    s.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ORT default)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_bench)

    from .runtime.distill import add_cli as add_distill_cli

    add_distill_cli(sub)
    from .runtime.pack import add_cli as add_pack_cli

    add_pack_cli(sub)
    from .diff import add_cli as add_diff_cli

    add_diff_cli(sub)
    from .model_explorer_export import add_cli as add_explore_cli

    add_explore_cli(sub)

    s = sub.add_parser("passes", help="list registered passes with options")
    s.add_argument("--docs", dest="verbose_docs", action="store_true", help="print full docstrings")
    s.set_defaults(func=cmd_passes)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except NNSculptError as e:
        msg = str(e).strip()
        first, _, rest = msg.partition("\n")
        print(f"nnsculpt: error: {type(e).__name__}: {first}", file=sys.stderr)
        if rest and args.verbose:
            print(rest, file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # pragma: no cover
        return 130
    except BrokenPipeError:  # pragma: no cover - `nnsculpt ... | head`
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
