"""Is channel pruning's speed real? ONNX Runtime latency of pruned zoo models vs. the FLOPs cut.

    python benchmarks/prune_latency.py                       # resnet18 + mobilenetv2, ratio 0.5
    python benchmarks/prune_latency.py --models resnet18 mobilenetv2 vgg11_bn resnet56 \\
        --pipelines "prune-channels{ratio=0.5}" "prune-channels{ratio=0.5,round_to=8}" \\
                    "prune-channels{target=flops:0.5,global=true}" --batch 8 --runs 9

Method: every model and its pruned variants run in the same process, one ONNX Runtime CPU
session each (``intra_op_num_threads=1``, ``inter_op_num_threads=1``, sequential execution,
all graph optimizations on), on the same random batch. After a warm-up, each *run* times
``--iters`` inferences of every variant back to back (the order rotates between runs, so a
noisy neighbour hits all variants alike); a variant's latency is the median over ``--runs``
runs of its per-inference mean, and its speedup is the median over runs of the *paired* ratio
base / variant measured in the same run. "FLOPs cut" is base FLOPs / pruned FLOPs (the IR's
``graph_stats`` count); the acceptance check is speedup >= 0.8 x FLOPs cut.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import onnxruntime as ort

from nnsculpt import models
from nnsculpt.ir import from_torch, graph_stats
from nnsculpt.ir.onnx_io import to_onnx_model
from nnsculpt.passes import PassManager, parse_pipeline

DEFAULT_PIPELINES = ["prune-channels{ratio=0.5}", "prune-channels{ratio=0.5,round_to=8}"]


def session(model_bytes: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def time_block(sess: ort.InferenceSession, feed: dict, iters: int) -> float:
    t = time.perf_counter()
    for _ in range(iters):
        sess.run(None, feed)
    return (time.perf_counter() - t) / iters


def bench_model(name: str, pipelines: list[str], batch: int, runs: int, iters: int, seed: int = 0) -> list[dict]:
    g0 = from_torch(models.get_model(name), models.example_inputs(name), input_names=list(models.input_names(name)),
                    output_names=list(models.output_names(name)))
    variants = [("base", g0)]
    for p in pipelines:
        g = g0.copy()
        PassManager(parse_pipeline(p), verify=True).run(g)
        variants.append((p, g))
    shape = (batch,) + tuple(models.model_spec(name).input_shape)
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    feed = {g0.inputs[0].name: x}
    rows = []
    sessions = []
    for label, g in variants:
        mb = to_onnx_model(g).SerializeToString()
        st = graph_stats(g)
        s = session(mb)
        for _ in range(3):
            s.run(None, feed)
        sessions.append(s)
        rows.append({"model": name, "variant": label, "flops": st.flops, "params": st.params,
                     "onnx_bytes": len(mb), "times": []})
    for r in range(runs):
        order = list(range(len(sessions)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in order:
            rows[i]["times"].append(time_block(sessions[i], feed, iters))
    base_times = list(rows[0]["times"])
    for row in rows:
        row["latency_ms"] = 1e3 * float(np.median(row["times"]))
        row["speedup"] = float(np.median([b / t for b, t in zip(base_times, row["times"])]))
        row["flops_cut"] = rows[0]["flops"] / row["flops"]
        row["ratio"] = row["speedup"] / row["flops_cut"]
        row["times_ms"] = [round(t * 1e3, 4) for t in row.pop("times")]
    return rows


def thirdparty_table(keys: list[str], pipeline: str, runs: int, iters: int) -> str:
    """Real third-party ONNX models (tests/thirdparty.py): dependency groups, removal of
    zeroed channels (exact?), output shapes and ORT latency of ``pipeline`` vs the original."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from tests.thirdparty import locate, make_inputs

    from nnsculpt.ir import from_onnx
    from nnsculpt.ir.channel_deps import channel_dependencies
    from nnsculpt.passes.prune.rewrite import zero_channels
    from nnsculpt.runtime import run

    out = ["| model | nodes | groups (prunable) | prunable units | analysis s | params after | zeroed-channel "
           "removal max rel. err | outputs | ORT speedup |", "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for k in keys:
        path = locate(k)
        if path is None:
            out.append(f"| {k} | (package not installed) |||||||")
            continue
        g = from_onnx(path)
        feed = make_inputs(k)
        ref = run(g, feed)
        t = time.perf_counter()
        deps = channel_dependencies(g)
        ta = time.perf_counter() - t
        st0 = graph_stats(g)
        s0 = session(to_onnx_model(g).SerializeToString())
        # 1) zero half of every prunable group, 2) the pipeline must remove exactly those
        z = g.copy()
        dz = channel_dependencies(z)
        rng = np.random.default_rng(0)
        zero_channels(z, dz, {gr.index: sorted(rng.choice(gr.n_units, gr.n_units // 2, replace=False).tolist())
                              for gr in dz.prunable_groups()})
        zref = run(z, feed)
        PassManager(parse_pipeline(pipeline.replace("round_to=16", "round_to=1")), verify=True).run(z)
        zout = run(z, feed)
        err = max(float(np.abs(zout[n] - zref[n]).max() / max(1.0, float(np.abs(zref[n]).max()))) for n in zref)
        same = all(zout[n].shape == ref[n].shape for n in ref)
        p = g.copy()
        PassManager(parse_pipeline(pipeline), verify=True).run(p)
        s1 = session(to_onnx_model(p).SerializeToString())
        ta_, tb_ = [], []
        for r in range(runs):
            pair = [(s0, ta_), (s1, tb_)] if r % 2 == 0 else [(s1, tb_), (s0, ta_)]
            for sess, acc in pair:
                acc.append(time_block(sess, feed, iters))
        sp = float(np.median([a / b for a, b in zip(ta_, tb_)]))
        sm = deps.summary()
        out.append(f"| {k} | {st0.nodes} | {sm['groups']} ({sm['prunable_groups']}) | {sm['prunable_units']} | "
                   f"{ta:.2f} | {graph_stats(p).params / st0.params:.3f} | {err:.1e} | "
                   f"{'same shapes' if same else 'CHANGED'} | {sp:.2f}× |")
    return "\n".join(out)


def markdown(rows: list[dict], batch: int) -> str:
    out = [f"| model | variant | MFLOPs | params | ONNX KB | latency ms (batch {batch}) | speedup | FLOPs cut "
           f"| speedup / FLOPs cut | ≥ 0.8 |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in rows:
        ok = "" if r["variant"] == "base" else ("yes" if r["ratio"] >= 0.8 else "**no**")
        out.append(f"| {r['model']} | `{r['variant']}` | {r['flops'] / 1e6:.1f} | {r['params']:,} | "
                   f"{r['onnx_bytes'] / 1024:.0f} | {r['latency_ms']:.2f} | {r['speedup']:.2f}× | "
                   f"{r['flops_cut']:.2f}× | {r['ratio']:.2f} | {ok} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet18", "mobilenetv2"])
    ap.add_argument("--pipelines", nargs="+", default=DEFAULT_PIPELINES)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json", help="also write the rows (with per-run times) to this file")
    ap.add_argument("--thirdparty", nargs="*", metavar="KEY",
                    help="instead: real third-party ONNX models (tests/thirdparty.py keys; none = the default set)")
    args = ap.parse_args(argv)
    if args.runs < 5:
        ap.error("--runs must be >= 5 (medians of at least 5 runs)")
    if args.thirdparty is not None:
        keys = args.thirdparty or ["nudenet_yolov8n", "pplcnet_orientation", "ppocr_cls_v2", "picodet_layout_cdla",
                                   "ppocr_det_v4", "ppocr_rec_v4", "silero_vad_op15"]
        pipe = args.pipelines[0] if args.pipelines != DEFAULT_PIPELINES else "prune-channels{ratio=0.5,round_to=16}"
        print(f"pipeline `{pipe}`; ORT speedup: median of {args.runs} paired runs x {args.iters} iters, "
              f"the inputs of tests/thirdparty.py\n")
        print(thirdparty_table(keys, pipe, args.runs, args.iters))
        return 0
    rows = []
    for m in args.models:
        rows += bench_model(m, args.pipelines, args.batch, args.runs, args.iters)
    print(f"onnxruntime {ort.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs visible, intra_op_num_threads=1, median of {args.runs} runs x {args.iters} iters\n")
    print(markdown(rows, args.batch))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["ratio"] >= 0.8 for r in rows if r["variant"] != "base") else 1


if __name__ == "__main__":
    sys.exit(main())
