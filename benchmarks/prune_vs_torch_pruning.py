"""nnsculpt ``prune-channels`` side by side with Torch-Pruning (DepGraph) on a trained model.

    pip install --no-deps torch-pruning==1.6.1
    python benchmarks/prune_vs_torch_pruning.py                  # ratio 0.5, 10 epochs, 3 seeds
    python benchmarks/prune_vs_torch_pruning.py --ratio 0.7 --epochs 10 --seeds 0 1 2

Setting -- every row starts from the same trained ``zoo:digits_resnet`` (ResNet-8, widths
16/32/32, 99.6 % test top-1 on the scikit-learn digits at 16x16), removes the same fraction of
the channels of every prunable group (the classifier's outputs are kept by both tools), and
gets the same recovery budget: ``--epochs`` epochs over the 1,257-image train split, SGD
(Nesterov 0.9, lr 0.02, wd 5e-4, cosine over the whole budget), batch 64, random shifts of one
pixel, seeded per seed -- either plain fine-tuning (cross entropy) or knowledge distillation from
the unpruned model (``nnsculpt.runtime.distill.kd_loss``: T=4, alpha=0.9, beta=0.1). The
iterative row prunes in 3 steps with one epoch of fine-tuning after each of the first two and
the rest of the budget after the last (each phase a fresh cosine); the soft-filter-pruning row
trains the zeroed model one epoch per step for the whole budget and removes the channels at the
end (no extra training). Top-1 is on the
271 test images (one image = 0.37 %), mean ± std over seeds; "one-shot" is before any training.

Torch-Pruning: ``MetaPruner`` with ``GroupMagnitudeImportance(p=2)`` (group L2 with mean
normalization, its default), ``ignored_layers=[fc]``, ``pruning_ratio=R``; nnsculpt:
:func:`nnsculpt.prune.prune_module` (``from_torch -> prune-channels -> to_torch``).
Latency: both pruned models are lowered by the same ``from_torch`` and run in ONNX Runtime
(CPU, one thread, batch ``--batch``), medians of paired runs in the same process.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from nnsculpt import models
from nnsculpt.ir import from_torch, graph_stats
from nnsculpt.ir.onnx_io import to_onnx_model
from nnsculpt.models.data import load_digits_dataset
from nnsculpt.models.train import evaluate, random_shift
from nnsculpt.prune import prune_module

LR, WD, BATCH = 0.02, 5e-4, 64


# --------------------------------------------------------------------------- training
class Budget:
    """A cosine schedule over ``total`` epochs that several calls can share (iterative and
    soft schedules train in pieces between pruning steps)."""

    def __init__(self, total: int, n_train: int, seed: int):
        self.total_steps = max(1, total * math.ceil(n_train / BATCH))
        self.step = 0
        self.gen = torch.Generator().manual_seed(seed)
        self.seed = seed

    def lr(self) -> float:
        return 0.5 * LR * (1 + math.cos(math.pi * min(self.step, self.total_steps) / self.total_steps))


def train_epochs(model, X, y, epochs: int, budget: Budget, teacher=None) -> None:
    X, y = torch.from_numpy(X), torch.from_numpy(y)
    opt = torch.optim.SGD(model.parameters(), lr=budget.lr(), momentum=0.9, nesterov=True, weight_decay=WD)
    aug = random_shift(1)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=budget.gen)
        for i in range(0, len(y), BATCH):
            idx = perm[i:i + BATCH]
            xb, yb = aug(X[idx], budget.gen), y[idx]
            for g in opt.param_groups:
                g["lr"] = budget.lr()
            out = model(xb)
            if teacher is None:
                loss = F.cross_entropy(out, yb)
            else:
                from nnsculpt.runtime.distill import kd_loss

                with torch.no_grad():
                    t = teacher(xb)
                loss = kd_loss(out, t, yb, temperature=4.0, alpha=0.9, beta=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            budget.step += 1
    model.eval()


# ------------------------------------------------------------------------------ methods
def tp_prune(model, example, ratio):
    import torch_pruning as tp

    imp = tp.importance.GroupMagnitudeImportance(p=2)
    pruner = tp.pruner.MetaPruner(model, example, importance=imp, pruning_ratio=ratio, ignored_layers=[model.fc])
    pruner.step()
    return model


def run_method(name, kind, ratio, epochs, seed, data, teacher):
    Xtr, ytr, Xte, yte = data
    base = models.get_model("digits_resnet", pretrained=True)
    ex = models.example_inputs("digits_resnet")
    budget = Budget(epochs, len(ytr), seed)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    kd = teacher if "KD" in name else None
    if kind == "tp":
        model = tp_prune(base, ex, ratio)
        one_shot = evaluate(model, Xte, yte)
        train_epochs(model, Xtr, ytr, epochs, budget, kd)
    elif kind == "oneshot":
        model, graph = prune_module(base, ex, ratio=ratio, importance="l2", return_graph=True)
        one_shot = evaluate(model, Xte, yte)
        train_epochs(model, Xtr, ytr, epochs, budget, kd)
    elif kind == "oneshot_taylor":
        model, graph = prune_module(base, ex, ratio=ratio, importance="taylor", calib_data=Xtr[:512],
                                    labels=ytr[:512], return_graph=True)
        one_shot = evaluate(model, Xte, yte)
        train_epochs(model, Xtr, ytr, epochs, budget, kd)
    elif kind.startswith("iter"):
        # one epoch after every intermediate step, the rest of the budget after the last one
        # (each phase its own cosine schedule)
        k = int(kind[4:])
        per = [1] * (k - 1) + [epochs - (k - 1)]

        def ft(m, step):
            train_epochs(m, Xtr, ytr, per[step - 1], Budget(per[step - 1], len(ytr), seed * 100 + step), kd)

        model, graph = prune_module(base, ex, ratio=ratio, importance="l2", steps=k, finetune=ft, return_graph=True)
        one_shot = float("nan")
    elif kind == "soft":
        def ft(m, step):
            train_epochs(m, Xtr, ytr, 1, budget, kd)

        model, graph = prune_module(base, ex, ratio=ratio, importance="l2", soft=True, steps=epochs, finetune=ft,
                                    return_graph=True)
        one_shot = float("nan")
    else:
        raise ValueError(kind)
    acc = evaluate(model, Xte, yte)
    sec = time.perf_counter() - t0
    if kind == "tp":
        graph = from_torch(model.eval(), ex, input_names=["input"], output_names=["logits"])
    else:
        from nnsculpt.runtime import write_back

        write_back(graph, model)  # the fine-tuned weights, for the ONNX Runtime latency
    widths = [int(n.inputs[1].const.shape[0]) for n in graph.nodes if n.op_type == "Conv"]
    return graph, one_shot, acc, sec, widths


# ------------------------------------------------------------------------------ latency
def ort_latency(graphs: dict, batch: int, runs: int = 9, iters: int = 20) -> dict:
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((batch, 1, 16, 16)).astype(np.float32)
    sess = {}
    for k, g in graphs.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        s = ort.InferenceSession(to_onnx_model(g).SerializeToString(), so, providers=["CPUExecutionProvider"])
        feed = {s.get_inputs()[0].name: x}
        for _ in range(3):
            s.run(None, feed)
        sess[k] = (s, feed)
    times = {k: [] for k in sess}
    keys = list(sess)
    for r in range(runs):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            s, feed = sess[k]
            t = time.perf_counter()
            for _ in range(iters):
                s.run(None, feed)
            times[k].append((time.perf_counter() - t) / iters)
    ref = keys[0]
    return {k: (1e3 * statistics.median(v), statistics.median([a / b for a, b in zip(times[ref], v)]))
            for k, v in times.items()}


METHODS = [
    ("Torch-Pruning 1.6.1, group L2, fine-tune", "tp"),
    ("nnsculpt one-shot L2, fine-tune", "oneshot"),
    ("nnsculpt one-shot Taylor (512 calib imgs), fine-tune", "oneshot_taylor"),
    ("nnsculpt iterative L2 (3 steps), fine-tune", "iter3"),
    ("nnsculpt soft filter pruning (1 epoch / step)", "soft"),
    ("Torch-Pruning 1.6.1, group L2, KD", "tp"),
    ("nnsculpt one-shot L2, KD", "oneshot"),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--methods", nargs="*", help="subset of method kinds (tp oneshot oneshot_taylor iter3 soft)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    Xtr, ytr = load_digits_dataset(16, "train")
    Xte, yte = load_digits_dataset(16, "test")
    data = (Xtr, ytr, Xte, yte)
    teacher = models.get_model("digits_resnet", pretrained=True).eval()
    base_acc = evaluate(teacher, Xte, yte)
    ex = models.example_inputs("digits_resnet")
    g_base = from_torch(teacher, ex, input_names=["input"], output_names=["logits"])
    st_base = graph_stats(g_base)
    rows = []
    graphs = {"unpruned": g_base}
    for label, kind in METHODS:
        if args.methods and kind not in args.methods:
            continue
        accs, shots, secs = [], [], []
        g = None
        for s in args.seeds:
            g, shot, acc, sec, widths = run_method(label, kind, args.ratio, args.epochs, s, data, teacher)
            accs.append(acc)
            shots.append(shot)
            secs.append(sec)
        st = graph_stats(g)
        graphs[label] = g
        rows.append((label, st, accs, shots, secs))
        print(f"{label}: acc {np.mean(accs):.4f} ± {np.std(accs):.4f} one-shot {np.nanmean(shots):.4f} "
              f"params {st.params} flops {st.flops} conv widths {widths}", file=sys.stderr, flush=True)
    lat = ort_latency(graphs, args.batch)
    print(f"ratio {args.ratio}, {args.epochs} epochs, seeds {args.seeds}; unpruned: {st_base.params:,} params, "
          f"{st_base.flops / 1e6:.2f} MFLOPs, test top-1 {base_acc:.4f}, ORT {lat['unpruned'][0]:.3f} ms "
          f"(batch {args.batch})\n")
    print("| method | params | MFLOPs | one-shot top-1 | top-1 after recovery (mean ± std) | per-seed | "
          f"ORT ms (batch {args.batch}) | speedup | wall s / seed |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|")
    for label, st, accs, shots, secs in rows:
        shot = "-" if np.isnan(np.nanmean(shots)) else f"{np.nanmean(shots) * 100:.1f} %"
        ms, sp = lat[label]
        print(f"| {label} | {st.params:,} | {st.flops / 1e6:.2f} | {shot} | {np.mean(accs) * 100:.2f} ± "
              f"{np.std(accs) * 100:.2f} % | {' / '.join(f'{a * 100:.1f}' for a in accs)} | {ms:.3f} | "
              f"{sp:.2f}× | {np.mean(secs):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
