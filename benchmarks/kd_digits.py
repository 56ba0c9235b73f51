"""Knowledge distillation on the scikit-learn digits (16x16): does KD from the pretrained
``digits_resnet`` teacher beat training the same small student on labels alone?

    python benchmarks/kd_digits.py                      # writes benchmarks/kd_digits.md
    python benchmarks/kd_digits.py --seeds 0 1 2 --skip-ddp --out /tmp/kd.md

Setting (every row uses the same student architecture, initialisation per seed, optimizer,
schedule, epochs, batch size, data order and best-val-epoch selection; only the loss differs):

* teacher: ``zoo:digits_resnet`` pretrained (ResNet-8, widths 16/32/32), trained on the full
  1,257-image train split;
* student: the same ResNet-8 at widths 4/8/8 (~13x fewer parameters), plain init seeded
  with the seed;
* low-label regime: the first ``--n-labeled`` (200) train images with labels, ``--epochs``
  (30) epochs, SGD (Nesterov 0.9, lr 0.05, wd 5e-4, cosine), batch 64; the weights of the
  epoch with the best val accuracy (269 images) are kept; test accuracy on the 271 test
  images is reported;
* labels only = ``distill(alpha=0, beta=1)``, i.e. plain cross-entropy through the same loop.

Sections: (A) low-label regime, (B) the full labeled train split, (C) the CLI run by one
process and by ``torchrun --nproc_per_node=2`` (gloo), compared.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nnsculpt import models
from nnsculpt.models.data import digits_npz, load_digits_dataset
from nnsculpt.models.train import evaluate
from nnsculpt.runtime.distill import distill

STUDENT_WIDTHS = (4, 8, 8)
HINTS = {"layer1": "layer1", "layer2": "layer2", "layer3": "layer3"}
LR_GRID = (0.02, 0.05, 0.1, 0.2)
CE_TUNED = "labels only (CE), lr tuned on val ∈ {.02,.05,.1,.2}"
KD_TUNED = "KD T=4 α=0.9 β=0.1, lr tuned on val ∈ {.02,.05,.1,.2}"


def make_student(seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return models.model_spec("digits_resnet").builder(widths=STUDENT_WIDTHS)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def export_teacher(path: Path) -> Path:
    """The teacher as ONNX through nnsculpt's own frontend (zoo -> IR -> ONNX)."""
    from nnsculpt.runtime import save
    from nnsculpt.runtime.loading import load_zoo

    save(load_zoo("digits_resnet", pretrained=True), path)
    return path


def mean_std(xs):
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(xs):
    m, s = mean_std(xs)
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def run_rows(rows, seeds, data, val, test, log):
    """rows: [(label, fn(seed) -> (module, seconds))] -> {label: [test acc per seed]}"""
    res, secs = {}, {}
    for label, fn in rows:
        res[label], secs[label] = [], []
        for seed in seeds:
            t0 = time.perf_counter()
            m = fn(seed)
            secs[label].append(time.perf_counter() - t0)
            acc = evaluate(m, *test)
            res[label].append(acc)
            log(f"  {label:<48} seed {seed}: test {acc:.4f}  ({secs[label][-1]:.1f}s)")
    return res, secs


def table(res, secs, seeds):
    lines = ["| student training | test top-1 % (mean ± std) | per seed | s/run |",
             "|---|---|---|---|"]
    for label, accs in res.items():
        per = " / ".join(f"{100 * a:.1f}" for a in accs)
        lines.append(f"| {label} | **{fmt(accs)}** | {per} | {statistics.mean(secs[label]):.1f} |")
    return "\n".join(lines)


def ddp_section(seeds, epochs, workdir: Path, log):
    """CLI single process vs torchrun 2 processes on the full train split."""
    tr = digits_npz(workdir / "train.npz", "train")
    va = digits_npz(workdir / "val.npz", "val")
    te = digits_npz(workdir / "test.npz", "test")
    import onnxruntime as ort

    def test_acc(p):
        with np.load(te) as z:
            x, y = z["input"], z["labels"]
        return float((ort.InferenceSession(str(p)).run(["logits"], {"input": x})[0].argmax(-1) == y).mean())

    common = ["zoo:digits_resnet", "--student-kwargs", '{"widths": [4, 8, 8]}', "--teacher", "zoo:digits_resnet",
              "--data", str(tr), "--val", str(va), "--epochs", str(epochs), "--batch-size", "32", "--lr", "0.1",
              "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = {"single": [], "ddp": []}
    cmds = {}
    for seed in seeds:
        for kind in ("single", "ddp"):
            o = workdir / f"{kind}_{seed}" / "student.onnx"
            pre = [sys.executable, "-m"] + (["torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m"]
                                           if kind == "ddp" else [])
            cmd = pre + ["nnsculpt.runtime.distill", *common, "--seed", str(seed), "-o", str(o)]
            cmds.setdefault(kind, cmd)
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if p.returncode != 0:
                raise RuntimeError(f"{kind} seed {seed} failed:\n{p.stderr[-3000:]}")
            files = sorted(f.name for f in o.parent.iterdir())
            acc = test_acc(o)
            out[kind].append(acc)
            log(f"  CLI {kind:<6} seed {seed}: test {acc:.4f}  ({time.perf_counter() - t0:.1f}s, files {files})")
    return out, cmds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--n-labeled", type=int, default=200)
    ap.add_argument("--full-epochs", type=int, default=5, help="epochs of section B (full train split)")
    ap.add_argument("--ddp-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--ddp-epochs", type=int, default=5)
    ap.add_argument("--skip-ddp", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: reproducible, and "
                                                            "fastest on a shared 2-core machine)")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("kd_digits.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/kd_digits.py", *(argv or sys.argv[1:])])
    t_start = time.perf_counter()

    def log(msg):
        print(msg, flush=True)

    Xtr, ytr = load_digits_dataset(16, "train")
    val, test = load_digits_dataset(16, "val"), load_digits_dataset(16, "test")
    teacher = models.get_model("digits_resnet", pretrained=True)
    t_acc = evaluate(teacher, *test)
    n = args.n_labeled
    lab = (Xtr[:n], ytr[:n])
    log(f"teacher test {t_acc:.4f}; student params {n_params(make_student(0)):,} vs teacher {n_params(teacher):,}")

    tmp = Path(tempfile.mkdtemp(prefix="kd_digits_"))
    t_onnx = export_teacher(tmp / "teacher.onnx")
    from nnsculpt.runtime import run as ort_run

    with torch.no_grad():
        ref_logits = teacher(torch.from_numpy(Xtr)).numpy()
    logit_diff = float(np.abs(ort_run(str(t_onnx), {"input": Xtr})["logits"] - ref_logits).max())
    log(f"teacher logits, ORT vs torch: max abs diff {logit_diff:.1e} (max |logit| {np.abs(ref_logits).max():.1f})")
    common = dict(epochs=args.epochs, val_data=val, progress=False, batch_size=64)

    def ce(lr):
        return lambda s: distill(make_student(s), teacher, lab, alpha=0.0, beta=1.0, lr=lr, seed=s, **common)

    def tuned(**loss):
        """lr picked per seed by best val accuracy over the grid (test never looked at)."""
        def fn(s):
            best = None
            for lr in LR_GRID:
                recs = []
                m = distill(make_student(s), teacher, lab, lr=lr, seed=s, on_epoch_end=recs.append, **loss,
                            **common)
                v = max(r["val_acc"] for r in recs)
                if best is None or v > best[0]:
                    best = (v, m)
            return best[1]
        return fn

    rows_a = [
        ("labels only (CE), lr 0.05", ce(0.05)),
        ("KD T=4 α=0.9 β=0.1, torch teacher", lambda s: distill(make_student(s), teacher, lab, seed=s, **common)),
        ("KD T=4 α=0.9 β=0.1, ONNX teacher (ORT)",
         lambda s: distill(make_student(s), str(t_onnx), lab, seed=s, **common)),
        (CE_TUNED, tuned(alpha=0.0, beta=1.0)),
        (KD_TUNED, tuned()),
        ("KD + hints layer1-3 (1×1 adapters)",
         lambda s: distill(make_student(s), teacher, lab, seed=s, hints=HINTS, **common)),
    ]
    log(f"== A: {n} labeled images, {args.epochs} epochs")
    res_a, secs_a = run_rows(rows_a, args.seeds, lab, val, test, log)
    # extra: the teacher labels all 1,257 train images (no ground-truth labels at all)
    unl = {"input": Xtr}
    rows_a2 = [("KD soft-only on all 1,257 train images, no labels",
                lambda s: distill(make_student(s), teacher, unl, seed=s, **common))]
    res_a2, secs_a2 = run_rows(rows_a2, args.seeds, unl, val, test, log)

    log(f"== B: all {len(ytr)} labeled train images, {args.full_epochs} epochs")
    full = (Xtr, ytr)
    cb = dict(common, epochs=args.full_epochs)
    rows_b = [("labels only (CE), lr 0.05",
               lambda s: distill(make_student(s), teacher, full, alpha=0.0, beta=1.0, seed=s, **cb)),
              ("KD T=4 α=0.9 β=0.1", lambda s: distill(make_student(s), teacher, full, seed=s, **cb))]
    res_b, secs_b = run_rows(rows_b, args.seeds, full, val, test, log)

    def show_cmd(cmd):
        return " ".join(shlex.quote(a) for a in cmd).replace(str(tmp), "$TMP").replace(sys.executable, "python")

    ddp = None
    if not args.skip_ddp:
        log(f"== C: CLI, 1 process vs torchrun 2 processes, {args.ddp_epochs} epochs")
        ddp, ddp_cmds = ddp_section(args.ddp_seeds, args.ddp_epochs, tmp, log)

    ce_a = res_a["labels only (CE), lr 0.05"]
    kd_a = res_a["KD T=4 α=0.9 β=0.1, torch teacher"]
    kd_o = res_a["KD T=4 α=0.9 β=0.1, ONNX teacher (ORT)"]
    gain = [k - c for k, c in zip(kd_a, ce_a)]
    total = time.perf_counter() - t_start
    md = [
        "# Knowledge distillation on digits (16×16)",
        "",
        "Produced by:",
        "",
        "```",
        command,
        "```",
        "",
        f"torch {torch.__version__}, Python {platform.python_version()}, CPU, {args.threads} intra-op thread(s); "
        f"seeds {args.seeds}; total {total / 60:.1f} min. Numbers are top-1 accuracy (%) on the 271-image "
        "test split of `load_digits_dataset(16)`, mean ± sample std over the seeds, with the weights of the "
        "best-val epoch (269-image val split) kept by `distill(best_checkpoint=True)`.",
        "",
        f"* teacher: `zoo:digits_resnet` pretrained (ResNet-8, widths 16/32/32, {n_params(teacher):,} params), "
        f"test **{100 * t_acc:.1f} %**; trained on all {len(ytr):,} train images.",
        f"* student: the same ResNet-8 at widths {'/'.join(map(str, STUDENT_WIDTHS))} "
        f"({n_params(make_student(0)):,} params, {n_params(teacher) / n_params(make_student(0)):.0f}× fewer), "
        "plain init seeded by the seed (same init for every row of a seed).",
        "* every row: SGD (Nesterov 0.9, wd 5e-4), lr 0.05 unless stated (\"lr tuned\": the lr of the grid with "
        "the best val accuracy, per seed and per row), per-step cosine schedule, batch 64, same "
        "data order per seed; only the loss differs. *Labels only* is `distill(alpha=0, beta=1)` = plain "
        "cross-entropy through the same loop. KD is the default `kd_loss`: "
        "α·T²·KL(softmax(t/T) ‖ softmax(s/T)) + β·CE.",
        "",
        f"## A. Low-label regime: {n} labeled train images, {args.epochs} epochs",
        "",
        table({**res_a, **res_a2}, {**secs_a, **secs_a2}, args.seeds),
        "",
        f"KD − labels-only (lr 0.05), per seed: {' / '.join(f'{100 * g:+.1f}' for g in gain)} points "
        f"(mean {100 * statistics.mean(gain):+.1f}); KD beats labels-only on "
        f"{sum(g > 0 for g in gain)}/{len(gain)} seeds. ONNX-teacher vs torch-teacher KD, largest per-seed "
        f"difference: {100 * max(abs(a - b) for a, b in zip(kd_a, kd_o)):.1f} points.",
        "",
        f"## B. All {len(ytr):,} labeled train images, {args.full_epochs} epochs",
        "",
        table(res_b, secs_b, args.seeds),
        "",
    ]
    if ddp is not None:
        diff = [a - b for a, b in zip(ddp["ddp"], ddp["single"])]
        md += [
            f"## C. Data parallel: `nnsculpt distill` CLI, 1 process vs `torchrun --nproc_per_node=2` (gloo)",
            "",
            f"Full train split, {args.ddp_epochs} epochs, global batch 32 (16 per rank under DDP), lr 0.1, "
            "student `zoo:digits_resnet --student-kwargs '{\"widths\": [4, 8, 8]}'` (zoo random init), teacher "
            "`zoo:digits_resnet`; test accuracy of the written ONNX file run by ONNX Runtime. Only rank 0 "
            "writes (each output directory holds just `student.onnx`). Commands (first seed):",
            "",
            "```",
            show_cmd(ddp_cmds["single"]),
            show_cmd(ddp_cmds["ddp"]),
            "```",
            "",
            "| run | test top-1 % (mean ± std) | per seed |",
            "|---|---|---|",
            f"| 1 process | {fmt(ddp['single'])} | {' / '.join(f'{100 * a:.1f}' for a in ddp['single'])} |",
            f"| torchrun, 2 processes | {fmt(ddp['ddp'])} | {' / '.join(f'{100 * a:.1f}' for a in ddp['ddp'])} |",
            "",
            f"2-process − 1-process per seed: {' / '.join(f'{100 * d:+.1f}' for d in diff)} points (mean "
            f"{100 * statistics.mean(diff):+.1f}; the seed-to-seed std of the 1-process runs is "
            f"{100 * mean_std(ddp['single'])[1]:.1f}). The runs are not bit-identical by design: BatchNorm sees "
            "16-sample per-rank batches instead of 32, and the DistributedSampler deals the same per-epoch "
            "permutation out to the two ranks, so batches are composed differently.",
            "",
        ]
    kd_b = res_b["KD T=4 α=0.9 β=0.1"]
    ce_b = res_b["labels only (CE), lr 0.05"]
    ce_t, kd_t = res_a[CE_TUNED], res_a[KD_TUNED]
    gain_t = [k - c for k, c in zip(kd_t, ce_t)]
    hint = res_a["KD + hints layer1-3 (1×1 adapters)"]
    md += [
        "## Reading",
        "",
        f"* Low-label regime, same lr (0.05): KD {fmt(kd_a)} vs labels-only {fmt(ce_a)} "
        f"({100 * statistics.mean(gain):+.1f} points on average, KD ahead on {sum(g > 0 for g in gain)}/{len(gain)} "
        f"seeds). Each with its own lr tuned on val: KD {fmt(kd_t)} vs labels-only {fmt(ce_t)} "
        f"({100 * statistics.mean(gain_t):+.1f} points, KD ahead on {sum(g > 0 for g in gain_t)}/{len(gain_t)} "
        "seeds) -- the fair comparison, since lr 0.05 is not the best lr for plain cross-entropy here. "
        "Caveat: the teacher was trained on all "
        f"{len(ytr):,} labeled train images, so part of the gain is label information from the other "
        f"{len(ytr) - n:,} images passed through the teacher's soft targets -- the standard setting for "
        "distilling from a stronger teacher, but not 'the same information, used better'. The soft-only row "
        "uses no ground-truth labels at all and shows how much the teacher alone carries.",
        f"* Feature hints on top of KD: {fmt(hint)} vs {fmt(kd_a)} without -- "
        + ("no clear gain at this scale (within noise)." if abs(statistics.mean(hint) - statistics.mean(kd_a))
           < max(statistics.stdev(hint) if len(hint) > 1 else 0, statistics.stdev(kd_a) if len(kd_a) > 1 else 0)
           else ("better." if statistics.mean(hint) > statistics.mean(kd_a) else "worse.")),
        f"* With all labels (section B, {args.full_epochs} epochs): KD {fmt(kd_b)} vs labels-only {fmt(ce_b)} "
        f"({100 * (statistics.mean(kd_b) - statistics.mean(ce_b)):+.1f} points; both at lr 0.05, not tuned per row: "
        "a short schedule, where the teacher's soft targets speed learning up).",
        f"* ONNX teacher (the same network exported through nnsculpt's IR, run by ONNX Runtime): {fmt(kd_o)} vs "
        f"{fmt(kd_a)} with the torch teacher; largest per-seed difference "
        f"{100 * max(abs(a - b) for a, b in zip(kd_a, kd_o)):.1f} points. The two teachers' logits differ by at most "
        f"{logit_diff:.0e} (float rounding; logits reach ±{np.abs(ref_logits).max():.0f}); over 120 SGD steps that "
        "grows into a slightly different trajectory, i.e. the same result within seed noise.",
        "",
    ]
    args.out.write_text("\n".join(md))
    log(f"wrote {args.out} in {total / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
