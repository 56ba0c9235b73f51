"""Dense ORT MatMul/Gemm vs the sparse kernel, across sparsity and batch; file sizes.

    python benchmarks/sparse_kernels.py                 # writes benchmarks/sparse.md
    python benchmarks/sparse_kernels.py --quick         # fewer shapes / runs (smoke)

Every latency is the median of ``--runs`` measurements (each the mean of enough back-to-back
calls to last >= 2 ms), dense and sparse measured in the same process, interleaved run by run,
ONNX Runtime with ``intra_op_num_threads=1`` (the sparse kernel is single threaded too), so the
ratios are the meaningful numbers; absolute times move with the load of this shared machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from nnsculpt.passes.prune_weights import _keep_largest, nm_mask
from nnsculpt.runtime import sparse

HERE = Path(__file__).resolve().parent


def pruned(k: int, n: int, rule: str, seed: int = 0) -> np.ndarray:
    """A ``k x n`` (``X @ W``) weight pruned by magnitude like ``prune-weights`` does."""
    w = np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32)
    if ":" in rule:
        nn, m = map(int, rule.split(":"))
        return np.where(nm_mask(w, nn, m, 0), w, 0).astype(np.float32)
    s = float(rule)
    keep = _keep_largest(np.abs(w).ravel(), int(round(s * w.size))).reshape(w.shape)
    return np.where(keep, w, 0).astype(np.float32)


def raw_time(fn, runs: int, min_time: float = 2e-3) -> float:
    """Median thread-CPU seconds per call of ``fn``."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    number = int(min(500, max(1, min_time / one)))
    out = []
    for _ in range(runs):
        t0 = time.thread_time()
        for _ in range(number):
            fn()
        out.append((time.thread_time() - t0) / number)
    return float(np.median(out))


def file_sizes(w: np.ndarray, tmp: Path) -> dict[str, float]:
    """Bytes of the one-layer model: dense, sparse_initializer (int64 / int32 indices) and the
    sparse-exec file (CSR tensor attributes), and the ratios to dense."""
    x = helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, ["B", w.shape[0]])
    y = helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, ["B", w.shape[1]])
    m = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "g", [x], [y],
                                            initializer=[numpy_helper.from_array(w, "W")]),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    dense = len(m.SerializeToString())
    i64 = sparse.save_sparse(m, tmp / "s64.onnx", index_dtype="int64", max_ratio=10)["bytes"]
    i32 = sparse.save_sparse(m, tmp / "s32.onnx", index_dtype="int32", max_ratio=10, check=False)["bytes"]
    bm = sparse.save_sparse(m, tmp / "bm.onnx", format="bitmask", max_ratio=10)["bytes"]
    _, exec_model = sparse._single_node_models(w, None, sparse._sparse_node_attrs("b", w, None), 17)
    ex = len(exec_model.SerializeToString())
    return {"dense": dense, "coo64": i64 / dense, "coo32": i32 / dense, "bitmask": bm / dense, "exec": ex / dense}


def bench_kernels(shapes, rules, batches, runs: int, tmp: Path) -> list[dict]:
    rows = []
    for k, n in shapes:
        for rule in rules:
            w = pruned(k, n, rule)
            sizes = file_sizes(w, tmp)
            kern_c = sparse.SparseLinear.from_dense(w, backend="auto")
            kern_sp = sparse.SparseLinear.from_dense(w, backend="scipy") if sparse._has_scipy() else None
            for b in batches:
                res = sparse.compare_dense_sparse(w, batch=b, runs=runs, threads=1)
                x = np.random.default_rng(1).standard_normal((b, k)).astype(np.float32)
                c = raw_time(lambda: kern_c(x), runs)
                sp = raw_time(lambda: kern_sp(x), runs) if kern_sp is not None else float("nan")
                row = dict(shape=f"{k}x{n}", rule=rule, batch=b, dense_us=res["dense_s"] * 1e6,
                           op_us=res["sparse_s"] * 1e6, speedup=res["speedup"], q25=res["speedup_q25"],
                           q75=res["speedup_q75"], c_us=c * 1e6,
                           scipy_us=sp * 1e6, **sizes)
                rows.append(row)
                print(f"{row['shape']:>10} {rule:>5} B={b:<3} dense {row['dense_us']:9.1f} us  sparse-op "
                      f"{row['op_us']:9.1f} us  x{row['speedup']:5.2f}   raw C {row['c_us']:9.1f}  scipy "
                      f"{row['scipy_us']:9.1f}   size coo64 {sizes['coo64']:.3f} bitmask {sizes['bitmask']:.3f}",
                      flush=True)
    return rows


def mlp(dims: list[int], rule: str) -> "sparse.Graph":
    """An MLP (Gemm + Relu) with pruned weights, as an IR graph."""
    from nnsculpt.ir import from_onnx

    nodes, inits, cur = [], [], "x"
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        w = pruned(a, b, rule, seed=i)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.zeros(b, np.float32) + 0.01, f"b{i}")]
        nodes.append(helper.make_node("Gemm", [cur, f"w{i}", f"b{i}"], [f"h{i}"], name=f"fc{i}"))
        cur = f"h{i}"
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [cur], [f"r{i}"], name=f"relu{i}"))
            cur = f"r{i}"
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", dims[0]])],
                          [helper.make_tensor_value_info(cur, onnx.TensorProto.FLOAT, ["B", dims[-1]])],
                          initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return from_onnx(m)


def bench_model(rule: str, batches, runs: int) -> list[dict]:
    """End to end: lower_sparse on a pruned MLP, whole-model latency dense vs lowered."""
    from nnsculpt.runtime.ort import session as ort_session

    dims = [1024, 4096, 1024, 1024]
    g = mlp(dims, rule)
    rows = []
    for b in batches:
        t0 = time.perf_counter()
        low, rep = sparse.lower_sparse(g, batch=b, runs=runs, min_speedup=1.1)
        t_lower = time.perf_counter() - t0
        feed = {"x": np.random.default_rng(2).standard_normal((b, dims[0])).astype(np.float32)}
        ds, ss = ort_session(g, threads=1), sparse.session(low, threads=1)
        ref, got = ds.run(None, feed)[0], ss.run(None, feed)[0]
        err = float(np.abs(ref - got).max() / max(1.0, np.abs(ref).max()))
        td, tsp = [], []
        for _ in range(runs):  # thread CPU time (1 intra-op thread: everything runs on this thread)
            td.append(sparse.time_session(ds, feed, runs=1))
            tsp.append(sparse.time_session(ss, feed, runs=1))
        ratio = float(np.median(np.asarray(td) / np.asarray(tsp)))
        chosen = [k for k, v in rep["layers"].items() if v["decision"] == "sparse"]
        rows.append(dict(rule=rule, batch=b, dense_us=np.median(td) * 1e6, sparse_us=np.median(tsp) * 1e6, ratio=ratio,
                         layers=rep["layers"], chosen=chosen, err=err, lower_s=t_lower))
        print(f"mlp {rule} B={b}: dense {rows[-1]['dense_us']:.1f} us, lowered {rows[-1]['sparse_us']:.1f} us, "
              f"sparse layers {chosen}, rel err {err:.1e}", flush=True)
    return rows


def bench_accuracy() -> list[tuple[str, float, float, float]]:
    """One-shot pruning (no fine-tuning) of the trained digits_resnet on the digits test split."""
    from nnsculpt.models.data import load_digits_dataset
    from nnsculpt.passes import PassManager, parse_pipeline
    from nnsculpt.runtime.loading import load_graph
    from nnsculpt.runtime.ort import session as ort_session

    g0 = load_graph("zoo:digits_resnet")
    x, y = load_digits_dataset(split="test")
    name = g0.inputs[0].name
    ref = ort_session(g0).run(None, {name: x})[0].argmax(1)
    out = [("(dense)", 1.0, float((ref == y).mean()), 0.0)]
    for spec in ["prune-weights{sparsity=0.3}", "prune-weights{sparsity=0.5}",
                 "prune-weights{sparsity=0.5,scope=global}", "prune-weights{sparsity=0.5,min_params=200}",
                 "prune-weights{pattern=2:4}"]:
        g = g0.copy()
        r = PassManager(parse_pipeline(spec)).run(g)
        got = ort_session(g).run(None, {name: x})[0].argmax(1)
        out.append((spec, float((got == ref).mean()), float((got == y).mean()),
                    float(g.meta["sparsity"]["total"]["sparsity"])))
        del r
    return out


def write_md(path: Path, rows, model_rows, acc, args, env) -> None:
    L = []
    L.append("# Sparse weights: storage and execution on CPU\n")
    L.append("Produced by `benchmarks/sparse_kernels.py`. Exact command:\n")
    L.append(f"```\n{env['command']}\n```\n")
    L.append(f"Machine: {env['cpu']}, {env['cores']} cores shared with other jobs (load average "
             f"{env['load0']} at start, {env['load1']} at end); Python {env['python']}, onnxruntime "
             f"{env['ort']}, onnxruntime-extensions {env['ortx']}; sparse kernel: {env['kernel']}.\n")
    L.append("Method: `Y = X[B, K] @ W[K, N]`, W pruned by magnitude (`prune-weights` rules). "
             "*dense* = ONNX Runtime `MatMul` (MLAS) in a one-node model; *sparse op* = the same model with "
             f"the `{sparse.OP_TYPE}` custom op (onnxruntime-extensions PyOp -> ctypes -> C kernel on CSR of W^T); "
             "both sessions `intra_op_num_threads=1`, `ORT_ENABLE_ALL`. Times are CPU time of the calling "
             "thread (`time.thread_time`; with one intra-op thread ORT and the PyOp run every kernel on it), so "
             "time spent descheduled by other jobs is left out; median of "
             f"{args.runs} measurements (each >= 2 ms of back-to-back calls), dense and sparse interleaved. "
             "*speedup* = median of the per-run ratios dense / sparse op (> 1: sparse wins), interquartile "
             "range in brackets. *raw C* / *raw scipy* = the kernel "
             "called directly from Python (no ORT): sparse op - raw C is the PyOp bridge cost. "
             "Sizes: whole one-layer ONNX file relative to the dense file; *coo64* = `sparse_initializer` with "
             "int64 indices (spec / onnx.checker valid), *coo32* = int32 indices (ORT loads it, onnx.checker "
             "rejects it), *bitmask* = `save_sparse(format=\"bitmask\")` (1 bit per element + nonzero values, "
             "decoded by standard ops that ORT constant-folds at load), *exec* = the sparse-exec file (CSR "
             "int32 in node attributes).\n")
    L.append("| W (KxN) | sparsity | batch | dense ORT us | sparse op us | speedup (IQR) | raw C us | raw scipy us "
             "| coo64 size | coo32 size | bitmask size | exec size |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rule = f"{float(r['rule']):.0%}" if ":" not in r["rule"] else f"{r['rule']} (50%)"
        L.append(f"| {r['shape']} | {rule} | {r['batch']} | {r['dense_us']:.1f} | {r['op_us']:.1f} | "
                 f"**{r['speedup']:.2f}** ({r['q25']:.2f}-{r['q75']:.2f}) | {r['c_us']:.1f} | {r['scipy_us']:.1f} | {r['coo64']:.3f} | "
                 f"{r['coo32']:.3f} | {r['bitmask']:.3f} | {r['exec']:.3f} |")
    L.append("")
    if model_rows:
        L.append("## End to end: `lower_sparse` on a pruned MLP 1024-4096-1024-1024 (Gemm+Relu)\n")
        L.append("`lower_sparse(graph, batch=B, min_speedup=1.1)` times every layer (dense vs sparse op) and "
                 "swaps only winners; then the whole model is timed (1 thread, thread CPU time, medians, interleaved; "
                 "speedup = median of per-run ratios).\n")
        L.append("| rule | batch | dense model us | lowered model us | speedup | layers made sparse (layer speedup) | max rel err |")
        L.append("|---|---|---|---|---|---|---|")
        for r in model_rows:
            lay = ", ".join(f"{k} ({v.get('speedup', float('nan')):.2f}{'' if v['decision'] == 'sparse' else ', kept dense'})"
                            for k, v in r["layers"].items())
            L.append(f"| {r['rule']} | {r['batch']} | {r['dense_us']:.1f} | {r['sparse_us']:.1f} | "
                     f"**{r['ratio']:.2f}** | {lay} | {r['err']:.1e} |")
        L.append("")
    if acc:
        L.append("## Accuracy context: one-shot pruning of `zoo:digits_resnet` (no fine-tuning)\n")
        L.append("271 test digits; agreement = same top-1 as the dense model.\n")
        L.append("| pipeline | sparsity of pruned weights | top-1 agreement | accuracy |")
        L.append("|---|---|---|---|")
        for spec, agree, accy, sp in acc:
            L.append(f"| `{spec}` | {sp:.1%} | {agree:.1%} | {accy:.1%} |")
        L.append("")
    L.append(env["notes"])
    path.write_text("\n".join(L) + "\n")


NOTES = """## Reading the numbers (honest summary)

* **Storage** is exact and works on a plain ORT. `sparse_initializer` (COO) is expanded by ORT into
  dense initializers at session creation, a `bitmask` file is decoded by standard ops that ORT
  constant-folds at session creation: in both cases run time, memory and outputs are those of the
  dense model (outputs bitwise identical; tested). Spec-valid COO (int64 indices, 12 bytes per
  nonzero) pays only above 2/3 sparsity: 0.60 of the file at 80 %, 0.30 at 90 %, 0.15 at 95 %.
  int32 indices (8 bytes) pay above 50 % but fail `onnx.checker`. The bitmask format (1 bit per
  element + 4 bytes per nonzero, ~1.6 kB of decode nodes per tensor) gives 0.53 at 50 % (this is
  also what a 2:4 model gets), 0.33 at 70 %, 0.13 at 90 %, 0.08 at 95 %. `save_sparse` leaves a
  tensor dense unless its compact form saves >= 10 %.
* **Sparse execution loses at 50 %, and with 2:4 patterns, everywhere on this CPU** (0.25-0.85x):
  MLAS's dense kernels stream the weight with perfect locality at 16 lanes per FMA; the CSR kernel
  pays an index load plus a gather (batch 1) or a broadcast plus a random row read (batch 32) per
  nonzero. There is no CPU analogue of the sparse tensor cores 2:4 is made for, so 2:4 only helps
  storage here (0.53 with the bitmask format).
* **70 %**: about break-even (0.3-1.3x; small wins at batch 32 only). **80 %**: wins at batch 32
  (1.7-1.9x) and on the 4096x1024 layer at batch 1 (1.7x), loses on 1024x1024 at batch 1.
  **90 %**: 2.7-4x except 1024x1024 at batch 1 (0.67x). **95 %**: wins everywhere, 1.8-5.2x.
* Why 1024x1024 at batch 1 is the hard case: its 4 MB weight stays in cache in a one-layer loop,
  so ORT's dense GEMV takes only ~75 us, and the PyOp bridge (sparse op - raw C: GIL, numpy
  wrapping, Python call; 10-50 us at batch 1, 0-140 us at batch 32 in this noisy run) eats the kernel's gain
  (the raw C kernel alone breaks even at 90 %). The 16 MB 4096x1024 weight does not stay in cache,
  dense GEMV becomes memory bound and the sparse kernel, reading 10x fewer bytes at 90 %, wins.
  A native ORT custom op (C API) would remove the bridge; see runtime/sparse.py for why there is none.
* Dense ORT ran with one intra-op thread for a like-for-like ratio; ORT's dense kernels scale
  with threads and this single-threaded sparse kernel does not, so wins shrink with more threads.
* This is a 2-core machine shared with other jobs (load average in the header). Thread CPU time
  removes the time we were descheduled, not the cache and memory-bandwidth contention: absolute
  times moved by up to ~1.5x between runs of this script; the per-run paired ratios are steadier
  (IQR in brackets). Decisions near 1.0x can flip between runs, which is why `lower_sparse`
  wants `min_speedup=1.1` by default and measures on the machine it lowers for.
* End to end, `lower_sparse` kept the layers it measured as losers dense (e.g. fc2, the
  1024x1024 layer, at batch 1) and the lowered model matched the dense one to ~3e-7 relative.
* Accuracy: one-shot magnitude pruning of the tiny trained digits_resnet (39k weights) costs
  accuracy fast (50 % layer-wise: 99.6 % -> 68 %; global ranking or `min_params` to spare the
  144-weight first conv: 87-88 %): prune, then fine-tune/distill (the distillation engine keeps
  the exact zeros).
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="one shape, two sparsities, 5 runs (smoke)")
    ap.add_argument("--no-model", action="store_true", help="skip the end-to-end MLP section")
    ap.add_argument("--no-accuracy", action="store_true", help="skip the digits_resnet accuracy section")
    ap.add_argument("-o", "--output", default=str(HERE / "sparse.md"))
    args = ap.parse_args(argv)
    if not sparse.extensions_available():
        print("onnxruntime-extensions is not installed: pip install onnxruntime-extensions", file=sys.stderr)
        return 2
    shapes = [(1024, 1024), (4096, 1024)]
    rules = ["0.5", "2:4", "0.7", "0.8", "0.9", "0.95"]
    if args.quick:
        shapes, rules, args.runs = [(1024, 1024)], ["0.5", "0.9"], max(5, min(args.runs, 5))
    import onnxruntime
    import onnxruntime_extensions

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    cli_args = list(sys.argv[1:] if argv is None else argv)
    env = dict(command=" ".join(["python", "benchmarks/sparse_kernels.py"] + cli_args),
               cpu=cpu, cores=os.cpu_count(), load0=", ".join(f"{x:.1f}" for x in os.getloadavg()),
               python=platform.python_version(), ort=onnxruntime.__version__, ortx=onnxruntime_extensions.__version__,
               kernel=str(sparse.kernel_info()), notes=NOTES)
    import tempfile

    with tempfile.TemporaryDirectory() as td:
        rows = bench_kernels(shapes, rules, [1, 32], args.runs, Path(td))
    model_rows = []
    if not args.no_model:
        for rule in (["0.9"] if args.quick else ["0.7", "0.9", "0.95"]):
            model_rows += bench_model(rule, [1, 32], args.runs)
    acc = [] if args.no_accuracy else bench_accuracy()
    env["load1"] = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    write_md(Path(args.output), rows, model_rows, acc, args, env)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
