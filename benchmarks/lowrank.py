"""Low-rank factorization of the trained digits ResNet: nnsculpt's factorize-conv / spatial-svd /
tucker-conv vs tensorly-torch's FactorizedConv (CP and Tucker) at equal parameter counts.

Per configuration: top-1 on the 271-image test split (ORT) before fine-tuning and after a short
distillation (``distill``: adam, lr 1e-3, a few epochs, teacher = the dense model), MACs and
params of the whole model, and the ORT latency ratio vs the dense model (batch 1, 1 thread,
median of interleaved runs in this one process). Ours also with ``min_speedup=1.0``. The seven
3x3 convs (stem + 6 block convs) are the factorized layers in every row. Writes
benchmarks/lowrank.md.

    python benchmarks/lowrank.py [--epochs 2] [--no-distill]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

from _bench import interleaved_median, single_thread_sessions
from nnsculpt import models
from nnsculpt.ir import from_onnx
from nnsculpt.ir.analysis import graph_stats
from nnsculpt.models.data import load_digits_dataset
from nnsculpt.passes import PassManager, parse_pipeline
from nnsculpt.runtime import to_onnx
from nnsculpt.runtime.distill import distill
from nnsculpt.runtime.loading import load_graph

ROOT = Path(__file__).resolve().parent
CONVS = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "layer2.0.conv2", "layer3.0.conv1",
         "layer3.0.conv2"]
OURS = ["factorize-conv{rank=1}", "factorize-conv{rank=3}", "factorize-conv{rank=5}", "spatial-svd{rank=8}",
        "spatial-svd{rank=16}", "spatial-svd{rank=32}", "tucker-conv{rank_ratio=0.25}", "tucker-conv{rank_ratio=0.5}",
        "tucker-conv{rank_ratio=0.75}"]


def top1(model_bytes: bytes, X, y) -> float:
    s = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    out = s.run(None, {s.get_inputs()[0].name: X})[0]
    return float((out.argmax(1) == y).mean() * 100)


def torch_onnx(m: torch.nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.onnx.export(m.eval(), (torch.zeros(1, 1, 16, 16),), buf, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False)
    return buf.getvalue()


def conv_params(g) -> int:
    """Weights of the factorized layers: the nodes whose provenance starts with a 3x3 conv's name
    (bias / BN folded into them counted)."""
    tot = 0
    for n in g.nodes:
        if any(n.source == c or n.source.startswith(c + "/") for c in CONVS):
            tot += sum(int(v.const.size) for v in n.inputs if v is not None and v.is_const)
    return tot


def latency(models_bytes: dict[str, bytes], X1, repeats: int, n: int) -> dict[str, float]:
    """Median µs per inference (1 thread, ``repeats`` interleaved rounds of ``n`` runs, 20 warm-up runs)."""
    med = interleaved_median(single_thread_sessions(models_bytes), {"input": X1}, rounds=repeats, inner=n, warmup=20)
    return {k: v * 1e6 for k, v in med.items()}


def tltorch_model(base: torch.nn.Module, factorization: str, rank: float) -> torch.nn.Module:
    import copy

    import tltorch

    m = copy.deepcopy(base)
    for name in CONVS:
        parent, _, leaf = name.rpartition(".")
        holder = m.get_submodule(parent) if parent else m
        conv = getattr(holder, leaf)
        setattr(holder, leaf, tltorch.FactorizedConv.from_conv(conv, rank=rank, factorization=factorization,
                                                               decompose_weights=True, implementation="factorized"))
    return m


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--no-distill", action="store_true")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=str(ROOT / "lowrank.md"))
    args = ap.parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    Xte, yte = load_digits_dataset(16, "test")
    Xtr, ytr = load_digits_dataset(16, "train")
    X1 = Xte[:1]
    teacher = models.get_model("digits_resnet", pretrained=True).eval()
    dense_g = load_graph("zoo:digits_resnet")
    PassManager(parse_pipeline("fold-bn")).run(dense_g)
    rows = []     # dict(name, kind, bytes, params, conv_params, macs, top1, top1_ft)
    dense_bytes = to_onnx(dense_g).SerializeToString()
    st = graph_stats(dense_g)
    rows.append(dict(name="dense (fold-bn)", tool="-", bytes=dense_bytes, params=st.params, cparams=conv_params(dense_g),
                     macs=st.macs, top1=top1(dense_bytes, Xte, yte), top1_ft=None))

    def ours(spec: str) -> None:
        g = load_graph("zoo:digits_resnet")
        res = PassManager(parse_pipeline(spec)).run(g)
        fac = [p for p in res.report["passes"] if not p.get("inserted")][0]
        b = to_onnx(g).SerializeToString()
        s = graph_stats(g)
        row = dict(name=spec, tool="nnsculpt", bytes=b, params=s.params, cparams=conv_params(g), macs=s.macs,
                   top1=top1(b, Xte, yte), top1_ft=None, factored=fac["metrics"]["factored"])
        if not args.no_distill and row["factored"]:
            g2 = distill(g, teacher, (Xtr, ytr), epochs=args.epochs, optimizer="adam", lr=1e-3, seed=0,
                         progress=False, best_checkpoint=False)
            row["top1_ft"] = top1(to_onnx(g2).SerializeToString(), Xte, yte)
        rows.append(row)

    for spec in OURS:
        ours(spec)
        ours(spec.replace("}", ",min_speedup=1.0}"))
    # tensorly-torch at the parameter fraction of each of our (untimed) configs
    try:
        import tensorly
        import tltorch
        tl_version = f"tensorly {tensorly.__version__}, tensorly-torch {getattr(tltorch, '__version__', '?')}"
    except ImportError as e:
        tl_version = f"not installed ({e})"
    if not tl_version.startswith("not"):
        fracs = sorted({round(r["cparams"] / rows[0]["cparams"], 3) for r in rows[1:] if "min_speedup" not in r["name"]})
        for frac in fracs:
            for fz in ("cp", "tucker"):
                try:
                    m = tltorch_model(teacher, fz, frac)
                    b = torch_onnx(m)
                except Exception as e:  # noqa: BLE001 - record what happened
                    rows.append(dict(name=f"FactorizedConv {fz} rank={frac}", tool="tltorch", error=str(e)[:120]))
                    continue
                g = from_onnx(onnx.load_from_string(b))
                PassManager(parse_pipeline("fold-constants,fold-bn")).run(g)  # CP / Tucker weights: Reshape chains
                s = graph_stats(g)
                fparams = sum(p.numel() for n, p in m.named_parameters() if any(n.startswith(c + ".") for c in CONVS))
                row = dict(name=f"FactorizedConv {fz}, rank={frac}", tool="tltorch", bytes=b, params=s.params,
                           cparams=int(fparams), macs=s.macs, top1=top1(b, Xte, yte), top1_ft=None)
                if not args.no_distill:
                    m2 = distill(m, teacher, (Xtr, ytr), epochs=args.epochs, optimizer="adam", lr=1e-3, seed=0,
                                 progress=False, best_checkpoint=False)
                    row["top1_ft"] = top1(torch_onnx(m2), Xte, yte)
                rows.append(row)
    lat = latency({r["name"]: r["bytes"] for r in rows if "bytes" in r}, X1, args.repeats, 200)
    d_us = lat[rows[0]["name"]]
    aimet = aimet_status()
    lines = ["# Low-rank factorization on digits (16×16): nnsculpt vs tensorly-torch", "", "Produced by:", "", "```",
             "pip install tensorly tensorly-torch", "python benchmarks/lowrank.py" + (" --no-distill" if args.no_distill
                                                                                   else f" --epochs {args.epochs}"),
             "```", "",
             f"onnxruntime {ort.__version__}, torch {torch.__version__}, {tl_version}, Python "
             f"{platform.python_version()}, {platform.machine()}; total {(time.time() - t_start) / 60:.1f} min. "
             f"Model: `zoo:digits_resnet` (trained ResNet-8). The seven 3×3 convs (stem + 6 block convs) are "
             f"factorized in every row; *conv params* are those layers' weights (dense: {rows[0]['cparams']:,}). "
             f"top-1 on the 271-image test split in ORT; *ft*: after `distill` ({args.epochs} epochs, adam lr 1e-3, "
             f"batch 64, teacher = the dense torch model, all 1,257 train images, last epoch kept). "
             f"MACs / params of the whole model (BN folded). Latency: batch 1, 1 intra-op thread, "
             f"median over {args.repeats} interleaved runs of 200 inferences in one process; *speedup* = dense / "
             f"model time (dense: {d_us:.1f} µs). tensorly-torch rows use `FactorizedConv.from_conv(rank=F, "
             f"decompose_weights=True, implementation='factorized')` with F = our row's conv-params fraction.",
             "", "| model | tool | conv params | params | MACs | top-1 % | top-1 % ft | ORT speedup |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['tool']} | failed: {r['error']} | | | | | |")
            continue
        ft = "-" if r["top1_ft"] is None else f"{r['top1_ft']:.1f}"
        name = r["name"] + (f" ({r['factored']}/7 factored)" if "factored" in r else "")
        lines.append(f"| `{name}` | {r['tool']} | {r['cparams']:,} | {r['params']:,} | {r['macs']:,} | "
                     f"{r['top1']:.1f} | {ft} | x{d_us / lat[r['name']]:.2f} |")
    lines += ["", "## aimet-torch", "", aimet, ""]
    out = Path(args.out)
    if out.exists() and "\n## Reading\n" in out.read_text():   # the hand-written reading of the numbers is kept
        lines += ["## Reading" + out.read_text().split("\n## Reading", 1)[1].rstrip(), ""]
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def aimet_status() -> str:
    try:
        import aimet_torch  # noqa: F401

        return "aimet-torch is importable (spatial SVD comparison not run by this script yet)."
    except ImportError:
        pass
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "aimet-torch==2.42"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PIP_NO_INPUT": "1"})
    out = (r.stdout + r.stderr).strip().splitlines()
    would = next((line for line in out if line.startswith("Would install")), "")
    pkgs = would.split()[2:]
    if r.returncode == 0 and would:
        torch_new = [p for p in pkgs if p.startswith("torch-")]
        nvidia = [p for p in pkgs if p.startswith("nvidia-")]
        return (f"`pip install --dry-run aimet-torch==2.42` resolves, but it would install {len(pkgs)} packages, "
                f"among them {', '.join(torch_new) or 'no torch'} (replacing this environment's torch "
                f"{torch.__version__}) and {len(nvidia)} CUDA wheels (`nvidia-*`), in a CPU-only environment shared "
                f"with the rest of the project. It was therefore **not installed**, and aimet's spatial SVD is not "
                f"compared here (a separate virtualenv with aimet-torch's own torch would be needed).")
    return ("`pip install --dry-run aimet-torch==2.42` fails:\n\n```\n" + "\n".join(out[-3:]) + "\n```\n\n"
            "so aimet's spatial SVD is not compared here.")

if __name__ == "__main__":
    raise SystemExit(main())
