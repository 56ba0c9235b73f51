"""Deep compression (Han et al. 2016: prune -> cluster -> Huffman) and binary / ternary weights on
trained digits classifiers: file size vs the fp32 ONNX file and test top-1, every model run by
ONNX Runtime from the file that is measured.

    python benchmarks/deep_compression.py                  # writes benchmarks/deep_compression.md
    python benchmarks/deep_compression.py --quick --out /tmp/dc.md

Models (the fp32 reference and every stored model have BatchNorm folded, as deployment graphs have
it; pruning and binarization are trained with BatchNorm still in the graph, then folded):

* ``digits_resnet``: the bundled checkpoint (ResNet-8, 16/32/32, 44 k parameters);
* ``digits_vgg``: VGG-11-BN's first eight blocks at width 0.5 (the last two convs and pools dropped so
  every conv of a 16x16 input sees at least 2x2), 1.19 M parameters, trained here from a fixed seed
  (SGD, cosine, 30 epochs, random shifts).

Pipelines (all fine-tuning is ``nnsculpt.runtime.distill`` from the fp32 model as teacher, Adam,
best-val-epoch kept, the starting weights included; the 269-image val split chooses, the 271-image test split is reported):

* ``prune -> KD -> cluster -> KD -> pack``: ``prune-weights{sparsity=S}`` (VGG: ``scope=global``;
  ResNet: per layer, layers under 1000 weights kept dense), distill (zeros kept), ``fold-bn``,
  ``cluster-weights{bits=B}`` (zero pinned), distill (codebooks trained, codes fixed),
  ``nnsculpt pack`` (Huffman-coded indices with relative-index sparse storage);
* ``cluster -> KD -> pack`` (no pruning);
* ``binary / ternary -> STE KD -> int8 codes -> pack``: ``binarize-weights{store=float}``, distill
  with the straight-through estimator, ``fold-bn`` (a per-channel scale: still binary / ternary per
  channel), ``binarize-weights`` (int8 codes + per-channel scales), pack;
* reference points: the fp32 file under xz (``lzma`` preset 9e), and ORT's ``quantize_dynamic``
  int8 weights (no fine-tuning) packed the same way.

The size column is the container's bytes (the whole model: graph, names, biases, codebooks), and
"x" is fp32 ONNX bytes / those bytes. Top-1 is measured on the ONNX file unpacked from the
container (``unpack`` is byte-identical, checked).
"""

from __future__ import annotations

import argparse
import lzma
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nnsculpt.ir import from_onnx  # noqa: E402
from nnsculpt.ir.onnx_io import to_onnx_model  # noqa: E402
from nnsculpt.ir.torch_frontend import from_torch  # noqa: E402
from nnsculpt.models import architectures as A  # noqa: E402
from nnsculpt.models.data import load_digits_dataset  # noqa: E402
from nnsculpt.models.train import random_shift, train_classifier  # noqa: E402
from nnsculpt.passes import PassContext, parse_pipeline  # noqa: E402
from nnsculpt.runtime.distill import _zoo_module, distill  # noqa: E402
from nnsculpt.runtime.pack import pack, unpack  # noqa: E402

VGG_CFG = [64, "M", 128, "M", 256, 256, "M", 512, 512]


def data(split):
    X, y = load_digits_dataset(16, split)
    return X, y


def top1_onnx(model_bytes: bytes, X, y) -> float:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    s = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    logits = s.run(None, {s.get_inputs()[0].name: X})[0]
    return float((logits.argmax(1) == y).mean())


def apply(g, spec: str, calib=None):
    for p in parse_pipeline(spec):
        p(g, PassContext(calib_data=calib))
    return g


def graph_of(module: torch.nn.Module):
    """The module's graph with its BatchNorm layers (they re-normalize while pruned / binarized
    weights are trained, as XNOR-Net keeps them); ``fold-bn`` comes after training."""
    module.eval()
    return from_torch(module, (torch.zeros(1, 1, 16, 16),), input_names=["input"], output_names=["logits"])


def kd(g, teacher, epochs: int, lr: float):
    Xt, yt = data("train")
    Xv, yv = data("val")
    return distill(g, teacher, {"input": Xt, "labels": yt}, epochs=epochs, optimizer="adam", lr=lr,
                   val_data={"input": Xv, "labels": yv}, progress=False, seed=0, best_checkpoint=True)


def train_vgg(epochs: int) -> torch.nn.Module:
    torch.manual_seed(0)
    m = A.VGG(VGG_CFG, batch_norm=True, num_classes=10, in_channels=1, width_mult=0.5)
    X, y = data("train")
    Xv, yv = data("val")
    train_classifier(m, X, y, epochs=epochs, lr=0.05, batch_size=64, seed=0, augment=random_shift(1),
                     X_val=Xv, y_val=yv)
    return m.eval()


def row(name, stages, model_bytes: bytes, fp32_bytes: int, X, y, base_top1, seconds):
    blob, stats = pack(model_bytes)
    assert unpack(blob) == model_bytes
    acc = top1_onnx(model_bytes, X, y)
    return {"model": name, "pipeline": stages, "onnx_bytes": len(model_bytes), "packed": len(blob),
            "ratio": fp32_bytes / len(blob), "top1": acc, "drop": 100 * (base_top1 - acc), "s": seconds}


def run_model(name: str, module: torch.nn.Module, cfgs: dict, quick: bool) -> list[dict]:
    X, y = data("test")
    g_bn = graph_of(module)
    g0 = apply(g_bn.copy(), "fold-bn")
    fp32 = to_onnx_model(g0).SerializeToString()
    base = top1_onnx(fp32, X, y)
    n_params = g0.param_count()
    rows = [{"model": name, "pipeline": f"fp32 ONNX ({n_params / 1e6:.2f} M params)", "onnx_bytes": len(fp32),
             "packed": len(fp32), "ratio": 1.0, "top1": base, "drop": 0.0, "s": 0.0},
            {"model": name, "pipeline": "fp32, xz -9e of the file", "onnx_bytes": len(fp32),
             "packed": len(lzma.compress(fp32, preset=9 | lzma.PRESET_EXTREME)), "top1": base, "drop": 0.0,
             "s": 0.0}]
    rows[-1]["ratio"] = len(fp32) / rows[-1]["packed"]
    ep = 2 if quick else cfgs["epochs"]
    # ORT dynamic int8 (weights only, no fine-tuning) as a reference point
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as td:
        src, dst = Path(td) / "f.onnx", Path(td) / "q.onnx"
        src.write_bytes(fp32)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        rows.append(row(name, "ORT quantize_dynamic int8 -> pack", dst.read_bytes(), len(fp32), X, y, base, 0.0))
    for sparsity, bits in cfgs["prune_cluster"]:
        t0 = time.perf_counter()
        g = apply(g_bn.copy(), f"prune-weights{{sparsity={sparsity},{cfgs['prune_scope']}}}")
        g = kd(g, module, ep, cfgs["lr"])
        g = apply(g, f"fold-bn,cluster-weights{{bits={bits}}}")
        g = kd(g, module, ep, cfgs["lr"])
        rows.append(row(name, f"prune {sparsity:.0%} -> KD -> cluster {bits}-bit -> KD -> pack",
                        to_onnx_model(g).SerializeToString(), len(fp32), X, y, base, time.perf_counter() - t0))
    for bits in cfgs["cluster"]:
        t0 = time.perf_counter()
        g = apply(g0.copy(), f"cluster-weights{{bits={bits}}}")
        acc0 = top1_onnx(to_onnx_model(g).SerializeToString(), X, y)
        g = kd(g, module, ep, cfgs["lr"])
        r = row(name, f"cluster {bits}-bit -> KD -> pack (before KD: {100 * acc0:.1f} %)",
                to_onnx_model(g).SerializeToString(), len(fp32), X, y, base, time.perf_counter() - t0)
        rows.append(r)
    for ternary in (False, True):
        t0 = time.perf_counter()
        t = str(ternary).lower()
        g = apply(g_bn.copy(), f"binarize-weights{{ternary={t},store=float}}")
        acc0 = top1_onnx(to_onnx_model(g).SerializeToString(), X, y)
        g = kd(g, module, cfgs["ste_epochs"] if not quick else 2, cfgs["lr"])
        # BN folds into a per-output-channel scale: the weights stay binary / ternary per channel
        g = apply(g, f"fold-bn,binarize-weights{{ternary={t}}}")
        rows.append(row(name, f"{'ternary' if ternary else 'binary'} -> STE KD -> int8 codes -> pack "
                              f"(before KD: {100 * acc0:.1f} %)",
                        to_onnx_model(g).SerializeToString(), len(fp32), X, y, base, time.perf_counter() - t0))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "deep_compression.md"))
    ap.add_argument("--quick", action="store_true", help="2 epochs everywhere (a smoke run)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    t_all = time.perf_counter()
    rows = []
    resnet = _zoo_module("zoo:digits_resnet").eval()
    # the 44 k-parameter ResNet: per-layer sparsity, layers under 1000 weights (first conv, fc) dense
    rows += run_model("digits_resnet", resnet, {"epochs": 12, "ste_epochs": 20, "lr": 1e-3,
                                                 "prune_scope": "min_params=1000",
                                                 "prune_cluster": [(0.6, 4), (0.75, 3)], "cluster": [4, 2]},
                      args.quick)
    vgg = train_vgg(3 if args.quick else 30)
    rows += run_model("digits_vgg", vgg, {"epochs": 8, "ste_epochs": 12, "lr": 1e-3, "prune_scope": "scope=global",
                                          "prune_cluster": [(0.9, 4), (0.95, 4), (0.97, 3), (0.98, 2)], "cluster": [4, 2]},
                      args.quick)
    total = time.perf_counter() - t_all
    lines = ["## Deep compression and binary / ternary weights on digits", "",
             "Command: `python benchmarks/deep_compression.py`" + (" --quick" if args.quick else "") + ".  "
             f"torch {torch.__version__}, onnxruntime {ort.__version__}, Python {platform.python_version()}, "
             f"2-core CPU; total {total / 60:.1f} min. Sizes are bytes of the whole model as stored "
             "(`nnsculpt pack` container; the fp32 row is the plain ONNX file), x = fp32 ONNX bytes / stored "
             "bytes; top-1 on the 271-image test split, run by ONNX Runtime from the unpacked file.", "",
             "| model | pipeline | ONNX bytes | stored bytes | x smaller | top-1 % | drop (points) | time s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['pipeline']} | {r['onnx_bytes']:,} | {r['packed']:,} | "
                     f"{r['ratio']:.1f} | {100 * r['top1']:.2f} | {r['drop']:+.2f} | {r['s']:.0f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
