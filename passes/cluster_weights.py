"""Weight clustering into codebooks (scalar k-means and product quantization), lowered to small
ONNX files that run in plain ONNX Runtime."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from ..ir.errors import PassOptionError
from ..ir.graph import Graph, Node, Value, mark_changed
from ._util import has_implicit_uses, is_graph_output
from ._lowrank import check_layer_patterns, drop_if_unused, layer_name, plain_candidate, selected, weight_array
from .base import Pass, PassContext, PassResult, register

#: ops whose constant weight (input index) this pass clusters
WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
#: more points than this are reduced to weighted bins of a fine grid before 1-D k-means
_MAX_POINTS = 1 << 16
#: the fraction of exact zeros from which ``pin_zero`` gives them a centroid of their own (a pruned layer)
PIN_ZERO_MIN = 0.05
#: product quantization fits its codebook on at most this many sub-vectors (all are then assigned)
_MAX_PQ_FIT = 1 << 15


@dataclass
class _Layer:
    node: Node
    weight: Value
    w: np.ndarray          # the stored weight
    out_axis: int          # the weight's output-channel axis (groups run along it)
    in_axis: int           # the axis its input channels run along (activation weighting, PQ rows)


@register
class ClusterWeights(Pass):
    """Cluster Conv / ConvTranspose / Gemm / MatMul weights into a codebook of 2^bits values (k-means) or
    of sub-vectors (product quantization); the ONNX file stores indices plus the codebook.

    Rewrite rules: the selected weight initializer ``W`` is replaced by a small chain that
    computes the clustered weight ``W'`` from stored indices (every consumer then reads ``W'``):

    * ``mode=scalar``, ``granularity=per-tensor``: ``W'[i] = codebook[idx[i]]`` with
      ``k = 2^bits`` centroids from k-means over the weights: ``solver=optimal`` (default) is the
      globally optimal weighted 1-D clustering (Ckmeans.1d.dp's dynamic program, ``ckwrap``);
      ``solver=lloyd`` is scikit-learn's ``KMeans`` from ``init=kmeans++ | linear | density``.
      More than 65536 weights are first reduced to the weighted means of a 65536-bin grid, then
      every weight is assigned to its nearest centroid and each centroid refitted to the mean of
      its members. Chain:
      ``codes -> [unpack] -> Cast(int64) -> Gather(codebook)``;
    * ``granularity=per-grouped-channel``: one codebook per ``group_size`` output channels
      (coremltools' grouping); the codes are offset by ``group * k`` (an ``Add`` of an int64
      per-channel offset) and gathered from the concatenated codebooks;
    * ``mode=pq,subvector=d``: each output channel's weights (in input-major order, ``I*kh*kw``
      for a Conv) are cut into sub-vectors of ``d`` consecutive values, and the sub-vectors of
      the layer are clustered into ``2^bits`` centroids of dimension ``d`` (Gather of a
      ``(k, d)`` codebook, then Reshape / Transpose back to the weight's layout). A layer whose row
      length is not a multiple of ``d`` is left alone and noted;
    * codes narrower than 8 bits are packed: ``bits <= 1/2/4`` use 1/2/4-bit slots (3 bits use
      4-bit slots, 5-7 bits a byte), little-endian within a byte, unpacked in the graph by
      ``Div`` / ``Mod`` by powers of two. ``pack=false`` stores one uint8 per code.
    * A codebook whose centroids are all integer multiples of one step (binary and ternary
      weights, or ``init=linear`` that k-means left uniform) becomes ``DequantizeLinear`` of
      int8 codes (per tensor, or per output channel when each group is uniform on its own) so
      integer kernels apply to it.

    Weights that are exactly zero in a pruned layer (at least 5 % of a codebook's weights) keep a
    pinned zero centroid: they stay zero and the other ``k - 1`` centroids cluster the non-zero
    weights (``pin_zero=false``, or fewer zeros: zeros are clustered like any weight). Sensitive
    k-means (``weighting=``): ``activation`` weights each
    element by the energy ``E[x^2]`` of the input channel it multiplies on the calibration data
    (ORT); ``fisher`` by its squared gradient ``(dL/dw)^2`` summed over calibration batches of 8
    (torch lowering; ``L`` = cross entropy against the model's own top-1 for a 2-D output,
    ``0.5 * mean(y^2)`` otherwise). For ``mode=pq`` the weighting is per input dimension
    (activation) or per element (fisher, averaged over the rows).

    **Output-aware centroids** (``refit=``, needs calibration data; ``mode=scalar``): k-means chooses
    the assignments, then the centroid values are re-solved to minimize the layer's output error on
    up to ``refit_rows`` sampled rows of its input (im2col patches of a ``group=1`` Conv, the input
    vectors of Gemm / MatMul): per codebook a k x k least-squares problem with the codes fixed
    (pinned zeros stay 0). ``refit=output`` takes each layer's input from the float model;
    ``refit=sequential`` takes it from the model with the layers before it clustered already and
    fits the float model's outputs of the layer, so each layer corrects the error of the ones
    before (the idea of GPTQ / AdaRound's sequential mode, for codebooks). The artifacts give
    ``calib_output_rel_err_kmeans`` and ``calib_output_rel_err`` per layer. Depthwise / grouped
    convs and ConvTranspose keep their k-means centroids (noted).

    In the torch lowering the codebook is a trainable parameter and the codes a buffer, so
    ``nnsculpt distill`` fine-tunes the centroids with the gradients of all weights sharing them
    summed (Han et al.), codes fixed, pinned zeros kept at zero.

    Selection: default-domain nodes of ``ops`` whose weight is a float initializer with at least
    ``min_elements`` elements (a smaller one costs more in codebook than it saves); ``layers=`` /
    ``exclude=`` by node name, provenance, op type or glob (a ``layers`` entry matching no node is
    an error). Shared weights are clustered once. Preconditions: opset >= 13 (requirement
    ``opset>=13``). Lossy: drift is reported, and ``weight_rel_err`` per layer.

    Artifacts: ``layers`` (node -> ``source``, ``shape``, ``bits``, ``centroids``, ``storage``:
    ``gather`` | ``dequantize``, ``weight_rel_err``, ``bytes_before`` / ``bytes_after`` of the
    weight as stored) and the totals.
    """

    name = "cluster-weights"
    exact = False
    requires = frozenset({"opset>=13"})
    requirement_hints = {"calib-data": "weighting=activation / fisher weights the k-means by calibration data: give "
                                       "--calib-data, or use weighting=none"}
    drift_hint = "more bits, granularity=per-grouped-channel, weighting=activation, or recover with " \
                 "`nnsculpt distill --teacher INPUT` (the codebook is trainable)"

    @dataclass
    class Options:
        bits: int = 4
        granularity: Literal["per-tensor", "per-grouped-channel"] = "per-tensor"
        group_size: int = 16
        mode: Literal["scalar", "pq"] = "scalar"
        subvector: int = 4
        solver: Literal["optimal", "lloyd"] = "optimal"
        init: Literal["kmeans++", "linear", "density"] = "kmeans++"
        weighting: Literal["none", "activation", "fisher"] = "none"
        ops: list[str] = field(default_factory=lambda: ["Conv", "ConvTranspose", "Gemm", "MatMul"])
        layers: list[str] = field(default_factory=list)
        exclude: list[str] = field(default_factory=list)
        min_elements: int = 2048
        pin_zero: bool = True
        refit: Literal["none", "output", "sequential"] = "none"
        refit_rows: int = 2048
        pack: bool = True
        max_iter: int = 300
        batch_size: int = 16

    def __init__(self, **options: Any):
        super().__init__(**options)
        o = self.options

        def bad(key: str, why: str) -> PassOptionError:
            return PassOptionError(f"pass '{self.name}': option '{key}' has bad value {getattr(o, key)!r}: {why}")

        if not 1 <= o.bits <= 8:
            raise bad("bits", "must be an integer from 1 to 8 (2^bits centroids)")
        if o.group_size < 1:
            raise bad("group_size", "must be >= 1 (output channels per codebook)")
        if o.subvector < 1:
            raise bad("subvector", "must be >= 1")
        if o.min_elements < 1:
            raise bad("min_elements", "must be >= 1")
        unknown = [x for x in o.ops if x not in WEIGHT_INPUT]
        if unknown:
            raise bad("ops", f"{unknown[0]!r} is not one of {sorted(WEIGHT_INPUT)}")
        if o.refit_rows < 16:
            raise bad("refit_rows", "must be >= 16")
        if o.mode == "pq" and o.refit != "none":
            raise bad("refit", "refit refits scalar codebooks (mode=scalar)")
        if o.mode == "pq" and o.granularity != "per-tensor":
            raise bad("granularity", "mode=pq clusters the sub-vectors of a whole layer: use granularity=per-tensor")

    def requirements(self) -> frozenset[str]:
        need = set(self.requires)
        if self.options.weighting != "none" or self.options.refit != "none":
            need.add("calib-data")
        return frozenset(need)

    # ------------------------------------------------------------------------------ run
    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        layers = select_weight_layers(self.name, graph, ctx, o)
        if not layers:
            ctx.note("no weight to cluster")
            return PassResult(changed=False)
        importance = self._importance(graph, layers, ctx)
        # refit=output: rows of each layer's input in the float model; sequential: also the float outputs,
        # and each layer's input is re-collected from the graph with the layers before it clustered
        rows = layer_input_rows(graph, layers, ctx, o.refit_rows, o.batch_size) if o.refit != "none" else {}
        targets = {lay.node.name: rows[lay.node.name] @ _matrix(np.moveaxis(lay.w, lay.out_axis, 0)).astype(np.float64)
                   for lay in layers if lay.node.name in rows} if o.refit == "sequential" else {}
        report: dict[str, dict[str, Any]] = {}
        before = after = 0
        changed = False
        for lay in layers:
            imp = importance.get(lay.weight.name)
            if o.mode == "pq":
                got = self._pq(lay, imp, ctx)
            else:
                if o.refit != "none" and lay.node.name not in rows:
                    ctx.note(f"{layer_name(lay.node)}: refit={o.refit} handles Conv (group=1), Gemm and MatMul; "
                             f"this {lay.node.op_type} keeps its k-means centroids")
                x = rows.get(lay.node.name)
                if x is not None and o.refit == "sequential" and changed:
                    x = layer_input_rows(graph, [lay], ctx, o.refit_rows, o.batch_size)[lay.node.name]
                got = self._scalar(lay, imp, ctx, x, targets.get(lay.node.name))
            if got is None:
                continue
            entry, build = got
            w_new = build(graph)
            entry["weight_rel_err"] = rel_error(lay.w, w_new)
            report[lay.node.name] = entry
            before += entry["bytes_before"]
            after += entry["bytes_after"]
            changed = True
        if not changed:
            return PassResult(changed=False, artifacts={"layers": report})
        ratio = before / max(after, 1)
        ctx.note(f"clustered {len(report)} weight(s) to {o.bits}-bit "
                 f"{'product ' if o.mode == 'pq' else ''}codebooks ({o.granularity}): "
                 f"{before / 1e6:.3f} MB -> {after / 1e6:.3f} MB of stored weights (x{ratio:.2f})")
        return PassResult(changed=True, artifacts={"layers": report, "bytes_before": before, "bytes_after": after},
                          metrics={"layers_clustered": len(report), "weight_bytes_ratio": ratio,
                                   "max_weight_rel_err": max(e["weight_rel_err"] for e in report.values())})

    # ----------------------------------------------------------------- importance
    def _importance(self, graph: Graph, layers: list[_Layer], ctx: PassContext) -> dict[str, np.ndarray]:
        """Per-element k-means weights (in the weight's layout) for ``weighting=``."""
        o = self.options
        if o.weighting == "none":
            return {}
        if o.weighting == "fisher":
            from .prune.importance import taylor_products

            stats = taylor_products(graph, ctx.calib_data, labels=ctx.labels, batch_size=8, stat="fisher")
            return {lay.weight.name: stats[lay.weight.name] for lay in layers if lay.weight.name in stats}
        from ..runtime.calibrate import collect_second_moments

        axis: dict[str, int] = {}
        for lay in layers:
            x = lay.node.input(0).name
            axis[x] = 1 if lay.node.op_type in ("Conv", "ConvTranspose") else (
                0 if lay.node.op_type == "Gemm" and int(lay.node.attrs.get("transA", 0)) else -1)
        moments = collect_second_moments(graph, list(axis), ctx.calib_data, axis=axis, batch_size=o.batch_size,
                                         progress=False)
        out: dict[str, np.ndarray] = {}
        for lay in layers:
            m = moments.get(lay.node.input(0).name)
            if m is None:
                continue
            energy = np.diag(m).astype(np.float64)
            w = lay.w
            if lay.node.op_type in ("Conv", "ConvTranspose"):
                group = int(lay.node.attrs.get("group", 1))
                cin = energy.size
                if lay.node.op_type == "Conv":  # W[O, I/g, k...]: output o reads input group o // (O/g)
                    per_out = w.shape[0] // group
                    cols = (np.arange(w.shape[0])[:, None] // per_out) * (cin // group) + np.arange(w.shape[1])[None, :]
                    e = energy[cols]
                else:  # ConvTranspose W[I, O/g, k...]: axis 0 is the input channel
                    e = np.broadcast_to(energy[:, None], w.shape[:2])
                e = e.reshape(e.shape + (1,) * (w.ndim - 2))
            else:
                shape = [1, 1]
                shape[lay.in_axis] = -1
                e = energy.reshape(shape)
            out[lay.weight.name] = np.broadcast_to(e, w.shape).astype(np.float64)
        return out

    # --------------------------------------------------------------------- scalar
    def _scalar(self, lay: _Layer, imp: np.ndarray | None, ctx: PassContext, x_rows: np.ndarray | None = None,
                target: np.ndarray | None = None):
        o = self.options
        w = lay.w
        k = 1 << o.bits
        wm = np.moveaxis(w, lay.out_axis, 0)               # [O, ...]
        im = None if imp is None else np.moveaxis(imp, lay.out_axis, 0)
        n_out = wm.shape[0]
        gs = n_out if o.granularity == "per-tensor" else min(o.group_size, n_out)
        groups = [(s, min(s + gs, n_out)) for s in range(0, n_out, gs)]
        books = np.zeros((len(groups), k), np.float64)
        codes = np.zeros(wm.shape, np.int64)
        used = 0
        pinned = False
        for g, (a, b) in enumerate(groups):
            vals = wm[a:b].reshape(-1).astype(np.float64)
            wts = None if im is None else im[a:b].reshape(-1)
            book, code, pin = kmeans_1d(vals, wts, k, solver=o.solver, init=o.init, seed=ctx.seed + g,
                                        pin_zero=o.pin_zero, max_iter=o.max_iter)
            pinned |= pin
            books[g, :book.size] = book
            books[g, book.size:] = book[-1] if book.size else 0.0
            used = max(used, book.size)
            codes[a:b] = code.reshape(wm[a:b].shape)
        entry_refit: dict[str, Any] = {}
        if x_rows is not None:
            books, entry_refit = refit_centroids(x_rows, wm, codes, books, groups, pinned, target)
        books = books.astype(w.dtype)
        sizes = [b - a for a, b in groups]
        grp = np.repeat(np.arange(len(groups)), sizes).reshape((n_out,) + (1,) * (wm.ndim - 1))
        dense = np.moveaxis(books[grp, codes], 0, lay.out_axis)
        step = _uniform_step(books, per_group=len(groups) > 1)
        entry: dict[str, Any] = {"op": lay.node.op_type, "source": lay.node.source, "weight": lay.weight.name,
                                 "shape": list(w.shape), "bits": o.bits, "granularity": o.granularity,
                                 "groups": len(groups), "centroids": int(used), "zero_pinned": bool(pinned),
                                 "bytes_before": int(w.nbytes), **entry_refit}
        dq = step is not None

        def build(graph: Graph) -> np.ndarray:
            if dq:
                scale = np.repeat(step, sizes) if step.size > 1 else step
                q = np.moveaxis(np.rint(np.moveaxis(dense, lay.out_axis, 0).astype(np.float64) /
                                        scale.reshape((-1,) + (1,) * (wm.ndim - 1))), 0, lay.out_axis)
                q = np.clip(q, -127, 127).astype(np.int8)
                entry["storage"] = "dequantize"
                entry["bytes_after"] = int(q.nbytes + scale.size * w.itemsize)
                replace_with_dequantize(graph, lay, q, scale.astype(w.dtype), self.name)
                return dense
            # the code offset of each output channel's codebook, in the weight's layout
            offsets = np.moveaxis(grp * k, 0, lay.out_axis).astype(np.int64) if len(groups) > 1 else None
            flat_codes = np.moveaxis(codes, 0, lay.out_axis)
            stored = _build_gather(graph, lay, flat_codes, books.reshape(-1), o.bits, o.pack, offsets, self.name)
            entry["storage"] = "gather"
            entry["bytes_after"] = int(stored + books.nbytes + (0 if offsets is None else offsets.nbytes))
            return dense

        return entry, build

    # ------------------------------------------------------------------------- pq
    def _pq(self, lay: _Layer, imp: np.ndarray | None, ctx: PassContext):
        from sklearn.cluster import KMeans

        o = self.options
        w = lay.w
        d = o.subvector
        rows = _pq_rows(w, lay)                           # (R, L) rows in input-major order
        if rows.shape[1] % d:
            ctx.note(f"left {lay.node.op_type} {layer_name(lay.node)} alone: mode=pq needs its row length "
                     f"{rows.shape[1]} to be a multiple of subvector={d}")
            return None
        k = 1 << o.bits
        sub = rows.reshape(-1, d).astype(np.float64)       # (R * L/d, d)
        scale = np.ones(d)
        if imp is not None:                               # diagonal metric: per sub-vector dimension
            irows = _pq_rows(imp, lay).reshape(-1, d)
            scale = np.sqrt(np.maximum(irows.mean(axis=0), 0) + 1e-12)
        x = sub * scale
        uniq = np.unique(x, axis=0)
        if uniq.shape[0] <= k:
            centers = uniq
        else:
            rng = np.random.default_rng(ctx.seed)
            fit = x if x.shape[0] <= _MAX_PQ_FIT else x[np.sort(rng.choice(x.shape[0], _MAX_PQ_FIT, replace=False))]
            km = KMeans(n_clusters=k, init="k-means++", n_init=1, random_state=ctx.seed, max_iter=o.max_iter,
                        tol=1e-7).fit(fit)
            centers = km.cluster_centers_
        code = _nearest_rows(x, centers)
        # refit every centroid to the mean of all its members (the fit may have used a subsample)
        for c in range(centers.shape[0]):
            m = code == c
            if m.any():
                centers[c] = x[m].mean(axis=0)
        book = (centers / scale).astype(w.dtype)
        if book.shape[0] < k:
            book = np.concatenate([book, np.repeat(book[-1:], k - book.shape[0], axis=0)])
        codes = code.reshape(rows.shape[0], rows.shape[1] // d)
        dense = _pq_unrows(book[codes].reshape(rows.shape), w, lay)
        entry: dict[str, Any] = {"op": lay.node.op_type, "source": lay.node.source, "weight": lay.weight.name,
                                 "shape": list(w.shape), "bits": o.bits, "mode": "pq", "subvector": d,
                                 "centroids": int(min(k, uniq.shape[0])), "storage": "gather",
                                 "bytes_before": int(w.nbytes)}

        def build(graph: Graph) -> np.ndarray:
            stored = _build_gather(graph, lay, codes, book, o.bits, o.pack, None, self.name, pq_rows=rows.shape)
            entry["bytes_after"] = int(stored + book.nbytes)
            return dense

        return entry, build


# ============================================================================ selection
def select_weight_layers(pass_name: str, graph: Graph, ctx: PassContext, o: Any) -> list[_Layer]:
    """The layers whose weights a weight-coding pass rewrites: default-domain nodes of ``o.ops`` named by
    ``o.layers`` / not by ``o.exclude``, with a float initializer weight of at least ``o.min_elements``
    elements that no subgraph captures and that is not a graph output (shared weights once); what is
    left alone is noted. A ``layers`` entry that matches no node is a PassOptionError."""
    check_layer_patterns(pass_name, graph, o.layers)
    layers: list[_Layer] = []
    seen: set[str] = set()
    for node in list(graph.nodes):
        if node.op_type not in o.ops or not plain_candidate(node, tuple(o.ops)):
            continue
        why = selected(node, o)
        if why is not None:
            if why:
                ctx.note(f"left {node.op_type} {layer_name(node)} alone: {why}")
            continue
        idx = WEIGHT_INPUT[node.op_type]
        w = weight_array(node, idx)
        v = node.input(idx)
        if w is None or v is None or v.name in seen or has_implicit_uses(v) or is_graph_output(graph, v):
            continue
        if w.size < o.min_elements:
            ctx.note(f"left {node.op_type} {layer_name(node)} alone: {w.size} weights < min_elements={o.min_elements}")
            continue
        if node.op_type in ("Gemm", "MatMul") and w.ndim != 2:
            ctx.note(f"left {node.op_type} {layer_name(node)} alone: its weight is {w.ndim}-D, not 2-D")
            continue
        if node.op_type in ("Gemm", "MatMul") and node.input(0) is not None and node.input(0).is_const:
            continue
        out_axis, in_axis = _axes(node)
        seen.add(v.name)
        layers.append(_Layer(node, v, w, out_axis, in_axis))
    return layers


# ============================================================================ output refit
def layer_input_rows(graph: Graph, layers: list[_Layer], ctx: PassContext, max_rows: int,
                     batch_size: int) -> dict[str, np.ndarray]:
    """Per layer (node name), up to ``max_rows`` rows of what its weight multiplies on the calibration
    data (float64, ``(n, in_features)`` in the layout of :func:`_matrix`): im2col patches of a Conv with
    ``group=1``, the input vectors of Gemm / MatMul. Rows are sampled uniformly (seeded by ``ctx.seed``)."""
    import torch
    import torch.nn.functional as F

    from ..runtime.calibrate import iter_intermediates

    want = {}
    for lay in layers:
        n = lay.node
        if n.op_type == "Conv" and int(n.attrs.get("group", 1)) == 1 and lay.w.ndim == 4 \
                and n.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID"):
            want[n.name] = n.input(0).name
        elif n.op_type in ("MatMul", "Gemm") and not int(n.attrs.get("transA", 0)):
            want[n.name] = n.input(0).name
    if not want:
        return {}
    by_node = {lay.node.name: lay for lay in layers}
    chunks: dict[str, list[np.ndarray]] = {k: [] for k in want}
    for batch in iter_intermediates(graph, list(set(want.values())), ctx.calib_data, batch_size=batch_size,
                                    progress=False, desc="cluster refit"):
        for name, value in want.items():
            a = batch[value]
            node = by_node[name].node
            if node.op_type == "Conv":
                lay_k = by_node[name].w.shape[2:]
                pads = list(node.attrs.get("pads", [0, 0, 0, 0]))
                t = torch.as_tensor(np.ascontiguousarray(a, np.float32))
                t = F.pad(t, (pads[1], pads[3], pads[0], pads[2]))
                cols = F.unfold(t, tuple(lay_k), dilation=tuple(node.attrs.get("dilations", [1, 1])),
                                stride=tuple(node.attrs.get("strides", [1, 1])))
                r = cols.transpose(1, 2).reshape(-1, cols.shape[1]).numpy()
            else:
                r = np.asarray(a).reshape(-1, np.asarray(a).shape[-1])
            chunks[name].append(r.astype(np.float64))
    out = {}
    for name, parts in chunks.items():
        x = np.concatenate(parts)
        rng = np.random.default_rng([ctx.seed, zlib.crc32(name.encode())])  # the same rows on every call
        if x.shape[0] > max_rows:
            x = x[np.sort(rng.choice(x.shape[0], max_rows, replace=False))]
        out[name] = x
    return out


def _matrix(wm: np.ndarray) -> np.ndarray:
    """A weight moved to [O, ...] as the (in_features, O) matrix its layer multiplies rows by."""
    return np.moveaxis(wm, 0, -1).reshape(-1, wm.shape[0])


def refit_centroids(x: np.ndarray, wm: np.ndarray, codes: np.ndarray, books: np.ndarray,
                    groups: list[tuple[int, int]], pinned: bool,
                    target: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Centroid values that minimize the layer's output error ``||X W' - Y||^2`` on the sampled input
    rows ``x`` with the assignments (codes) fixed, ``Y = X W`` (or ``target``: the float model's outputs
    of this layer when ``X`` comes from a model whose earlier layers are clustered already): per
    codebook a k x k linear least-squares problem ``A c = b``, ``A = sum_o Z_o^T Z_o``,
    ``b = sum_o Z_o^T y_o`` with ``Z_o = X onehot(codes_o)`` over the output channels ``o`` of the
    codebook (a small ridge keeps unused centroids in place). A pinned zero centroid stays 0. Returns
    the new codebooks and the relative output errors on the rows before / after."""
    wmat = _matrix(wm)
    cmat = _matrix(codes)
    k = books.shape[1]
    new = books.copy()
    xw = x @ wmat if target is None else target
    err0 = err1 = 0.0
    for g, (a, b) in enumerate(groups):
        A = np.zeros((k, k))
        rhs = np.zeros(k)
        for o in range(a, b):
            onehot = np.zeros((wmat.shape[0], k))
            onehot[np.arange(wmat.shape[0]), cmat[:, o]] = 1.0
            z = x @ onehot
            A += z.T @ z
            rhs += z.T @ xw[:, o]
        free = np.ones(k, bool)
        if pinned:
            zeros = np.flatnonzero(books[g] == 0)
            free[zeros] = False
        ridge = 1e-9 * max(float(np.trace(A)) / k, 1e-30)
        Af = A[np.ix_(free, free)] + ridge * np.eye(int(free.sum()))
        c_old = books[g].astype(np.float64)
        # solve for the change (ridge pulls unused centroids towards their old values, not to 0)
        sol = np.linalg.solve(Af, rhs[free] - A[np.ix_(free, free)] @ c_old[free]) + c_old[free]
        new[g, free] = sol
        err0 += float(c_old @ A @ c_old - 2 * rhs @ c_old)
        err1 += float(new[g] @ A @ new[g] - 2 * rhs @ new[g])
    base = float((xw ** 2).sum())
    rel0 = np.sqrt(max(base + err0, 0) / base) if base > 0 else 0.0
    rel1 = np.sqrt(max(base + err1, 0) / base) if base > 0 else 0.0
    return new, {"refit": "output", "calib_output_rel_err_kmeans": rel0, "calib_output_rel_err": rel1}


# ============================================================================ k-means
def kmeans_1d(values: np.ndarray, weights: np.ndarray | None, k: int, *, solver: str = "optimal",
              init: str = "kmeans++", seed: int = 0, pin_zero: bool = True,
              max_iter: int = 300) -> tuple[np.ndarray, np.ndarray, bool]:
    """Weighted 1-D k-means: ``(codebook sorted ascending, code per value, zero pinned)``.

    Exact when there are at most ``k`` distinct values. More than 65536 points are reduced to the
    weighted means of a 65536-bin grid first. ``solver="optimal"``: the globally optimal weighted
    clustering by dynamic programming (Ckmeans.1d.dp through the ``ckwrap`` package; Wang & Song
    2011); ``solver="lloyd"``: scikit-learn's ``KMeans`` from ``init`` (a local optimum). Then every
    value is assigned to its nearest centroid and each centroid refitted to its members' weighted
    mean (a no-op for the optimal solver without the binning). With ``pin_zero`` and at least 5 %
    exact zeros (a pruned weight), zero is a centroid of its own that only the zeros map to."""

    v = np.asarray(values, np.float64).reshape(-1)
    wts = np.ones_like(v) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    wts = np.where(np.isfinite(wts) & (wts > 0), wts, 0.0)
    if wts.sum() <= 0:
        wts = np.ones_like(v)
    wts = wts + 1e-12 * wts.mean()                       # no point with weight 0 (KMeans needs > 0 in total)
    zero = v == 0
    # a pruned weight (>= 5 % exact zeros) keeps its zeros; a few stray zeros do not cost a centroid
    pin = bool(pin_zero and zero.mean() >= PIN_ZERO_MIN and k > 1 and not zero.all())
    sel = ~zero if pin else np.ones_like(zero)
    kk = k - 1 if pin else k
    x, xw = v[sel], wts[sel]
    uniq = np.unique(x)
    if uniq.size <= kk:
        centers = uniq
    else:
        if x.size > _MAX_POINTS:
            edges = np.linspace(x.min(), x.max(), _MAX_POINTS + 1)
            b = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, _MAX_POINTS - 1)
            sw = np.bincount(b, weights=xw, minlength=_MAX_POINTS)
            sx = np.bincount(b, weights=xw * x, minlength=_MAX_POINTS)
            keep = sw > 0
            pts, pw = sx[keep] / sw[keep], sw[keep]
        else:
            pts, pw = x, xw
        centers = _optimal_1d(pts, pw, kk) if solver == "optimal" else _lloyd_1d(pts, pw, kk, init, seed, max_iter)
        # assign all values, refit centroids to their members (a few Lloyd steps on the exact data)
        for _ in range(3):
            code = _nearest_sorted(x, centers)
            sw = np.bincount(code, weights=xw, minlength=centers.size)
            sx = np.bincount(code, weights=xw * x, minlength=centers.size)
            centers = np.where(sw > 0, sx / np.where(sw > 0, sw, 1), centers)
            centers = np.sort(centers)
        centers = np.unique(centers)
    if pin:
        centers = np.unique(np.concatenate([[0.0], centers]))
    code_all = _nearest_sorted(v, centers)
    if pin:
        z = int(np.flatnonzero(centers == 0.0)[0])
        code_all[zero] = z
        nz = ~zero
        code_all[nz & (code_all == z)] = np.where(v[nz & (code_all == z)] > 0, min(z + 1, centers.size - 1),
                                                  max(z - 1, 0))
    return centers, code_all, pin


def _optimal_1d(pts: np.ndarray, pw: np.ndarray, k: int) -> np.ndarray:
    import ckwrap

    return np.sort(np.asarray(ckwrap.ckmeans(pts, k, weights=pw).centers, np.float64))


def _lloyd_1d(pts: np.ndarray, pw: np.ndarray, k: int, init: str, seed: int, max_iter: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    start: Any = "k-means++"
    if init == "linear":
        start = np.linspace(pts.min(), pts.max(), k).reshape(-1, 1)
    elif init == "density":                              # quantiles of the weighted distribution
        order = np.argsort(pts, kind="stable")
        cdf = np.cumsum(pw[order]) / pw.sum()
        start = pts[order][np.minimum(np.searchsorted(cdf, (np.arange(k) + 0.5) / k), pts.size - 1)].reshape(-1, 1)
        if np.unique(start).size < k:                    # many equal quantiles: a grid instead
            start = np.linspace(pts.min(), pts.max(), k).reshape(-1, 1)
    km = KMeans(n_clusters=k, init=start, n_init=1, random_state=seed, max_iter=max_iter, tol=1e-10)
    km.fit(pts.reshape(-1, 1), sample_weight=pw)
    return np.sort(km.cluster_centers_.reshape(-1))


def _nearest_sorted(x: np.ndarray, centers: np.ndarray) -> np.ndarray:
    if centers.size == 1:
        return np.zeros(x.shape, np.int64)
    mids = (centers[1:] + centers[:-1]) / 2
    return np.searchsorted(mids, x, side="left").astype(np.int64)


def _nearest_rows(x: np.ndarray, centers: np.ndarray, chunk: int = 1 << 14) -> np.ndarray:
    out = np.empty(x.shape[0], np.int64)
    c2 = (centers ** 2).sum(axis=1)
    for s in range(0, x.shape[0], chunk):
        xs = x[s:s + chunk]
        out[s:s + chunk] = np.argmin(c2[None, :] - 2 * xs @ centers.T, axis=1)
    return out


def _uniform_step(books: np.ndarray, *, per_group: bool):
    """The step (one per group) when every centroid of a group is an integer multiple (|q| <= 127)
    of one step -- then DequantizeLinear of int8 codes represents the codebook exactly -- else None."""
    scales = []
    for book in books.astype(np.float64):
        c = np.unique(book)
        nz = np.abs(c[c != 0])
        if nz.size == 0:
            return None
        found = None
        base = nz.min()
        for m in (1, 2, 3, 4):
            s = base / m
            q = c / s
            if np.all(np.abs(q - np.rint(q)) <= 1e-5 * np.maximum(1.0, np.abs(q))) and np.abs(q).max() <= 127:
                found = s
                break
        if found is None:
            return None
        scales.append(found)
    s = np.asarray(scales)
    if not per_group and s.size != 1:
        return None
    return s


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    d = np.linalg.norm(a)
    return float(np.linalg.norm(a - np.asarray(b, np.float64)) / d) if d > 0 else 0.0


# ============================================================================ layouts
def _axes(node: Node) -> tuple[int, int]:
    """(output-channel axis, input-channel axis) of the node's weight."""
    if node.op_type == "Conv":
        return 0, 1
    if node.op_type == "ConvTranspose":
        return 1, 0
    if node.op_type == "Gemm":
        return (0, 1) if int(node.attrs.get("transB", 0)) else (1, 0)
    return 1, 0  # MatMul(x, W[in, out])


def _pq_rows(w: np.ndarray, lay: _Layer) -> np.ndarray:
    """The weight as (output channels, row) with each row in input-major order."""
    m = np.moveaxis(w, lay.out_axis, 0)
    return np.ascontiguousarray(m.reshape(m.shape[0], -1))


def _pq_unrows(rows: np.ndarray, w: np.ndarray, lay: _Layer) -> np.ndarray:
    return np.moveaxis(rows.reshape(_moved_shape(w.shape, lay.out_axis)), 0, lay.out_axis)


def _moved_shape(shape: tuple, axis: int) -> tuple[int, ...]:
    """``shape`` with ``axis`` moved to the front (the layout of ``np.moveaxis(w, axis, 0)``)."""
    return (int(shape[axis]),) + tuple(int(d) for i, d in enumerate(shape) if i != axis)


# ============================================================================ lowering
def _slot_bits(bits: int) -> int:
    return 1 if bits == 1 else 2 if bits == 2 else 4 if bits <= 4 else 8


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (< 2^bits) as a flat uint8 array, ``8 // slot`` codes per byte, little-endian."""
    slot = _slot_bits(bits)
    flat = np.asarray(codes, np.uint8).reshape(-1)
    per = 8 // slot
    if per == 1:
        return flat.copy()
    pad = (-flat.size) % per
    flat = np.concatenate([flat, np.zeros(pad, np.uint8)]).reshape(-1, per).astype(np.uint16)
    shifts = (np.arange(per) * slot).astype(np.uint16)
    return (flat << shifts).sum(axis=1).astype(np.uint8)


def _build_gather(g: Graph, lay: _Layer, codes: np.ndarray, book: np.ndarray, bits: int, pack: bool,
                  offsets: np.ndarray | None, pass_name: str, pq_rows: tuple[int, int] | None = None) -> int:
    """Replace ``lay.weight`` by ``codes -> [unpack] -> Cast -> [Add offsets] -> Gather(book) -> [Reshape,
    Transpose]``; returns the stored bytes of the codes."""
    node, w = lay.node, lay.w
    base = lay.weight.name
    src = f"{node.source}/codebook"
    first = _first_reader(g, lay.weight)
    nodes: list[Node] = []

    def add(op: str, inputs: list[Value], attrs: dict[str, Any] | None = None, *, dtype=np.int64, shape=None,
            out: Value | None = None) -> Value:
        v = out or Value(g.unique_name(f"{base}/{op.lower()}"), dtype, shape)
        n = g.add_node(op, inputs, [v], attrs or {}, name=f"{base}/{op.lower()}", meta={"source": src},
                       before=first)
        mark_changed(n, pass_name)
        nodes.append(n)
        return v

    code_shape = tuple(int(s) for s in codes.shape)
    n_codes = int(np.prod(code_shape))
    slot = _slot_bits(bits)
    per = 8 // slot if pack else 1
    if per > 1:
        packed = pack_codes(codes, bits)
        cv = g.add_initializer(f"{base}.codes", packed)
        x = add("Cast", [cv], {"to": 7}, shape=(packed.size,))
        x = add("Reshape", [x, g.add_initializer(f"{base}.codes_col", np.array([-1, 1], np.int64))],
                shape=(packed.size, 1))
        div = (1 << (np.arange(per) * slot)).astype(np.int64).reshape(1, per)
        x = add("Div", [x, g.add_initializer(f"{base}.shifts", div)], shape=(packed.size, per))
        x = add("Mod", [x, g.add_initializer(f"{base}.slot", np.array(1 << slot, np.int64))], {"fmod": 0},
                shape=(packed.size, per))
        x = add("Reshape", [x, g.add_initializer(f"{base}.flat", np.array([-1], np.int64))],
                shape=(packed.size * per,))
        if packed.size * per != n_codes:
            x = add("Slice", [x, g.add_initializer(f"{base}.start", np.array([0], np.int64)),
                              g.add_initializer(f"{base}.stop", np.array([n_codes], np.int64))], shape=(n_codes,))
        x = add("Reshape", [x, g.add_initializer(f"{base}.code_shape", np.array(code_shape, np.int64))],
                shape=code_shape)
        stored = packed.nbytes
    else:
        cv = g.add_initializer(f"{base}.codes", np.asarray(codes, np.uint8))
        x = add("Cast", [cv], {"to": 7}, shape=code_shape)
        stored = int(np.prod(code_shape))
    if offsets is not None:
        x = add("Add", [x, g.add_initializer(f"{base}.offsets", offsets)], shape=code_shape)
    bv = g.add_initializer(f"{base}.codebook", book)
    if pq_rows is None:
        y = add("Gather", [bv, x], {"axis": 0}, dtype=w.dtype, shape=code_shape)
    else:
        y = add("Gather", [bv, x], {"axis": 0}, dtype=w.dtype, shape=code_shape + (book.shape[1],))
        m_shape = _moved_shape(w.shape, lay.out_axis)
        y = add("Reshape", [y, g.add_initializer(f"{base}.w_shape", np.array(m_shape, np.int64))],
                dtype=w.dtype, shape=m_shape)
        if lay.out_axis != 0:
            perm = list(range(1, w.ndim))
            perm.insert(lay.out_axis, 0)
            y = add("Transpose", [y], {"perm": perm}, dtype=w.dtype, shape=tuple(w.shape))
    _swap_weight(g, lay, y)
    return int(stored)


def replace_with_dequantize(g: Graph, lay: _Layer, q: np.ndarray, scale: np.ndarray, pass_name: str) -> None:
    """Replace ``lay.weight`` by ``DequantizeLinear(q int8, scale, 0)`` (per output channel when ``scale`` has
    more than one element)."""
    base = lay.weight.name
    first = _first_reader(g, lay.weight)
    qv = g.add_initializer(f"{base}.q", q)
    sv = g.add_initializer(f"{base}.scale", scale.reshape(-1) if scale.size > 1 else scale.reshape(()))
    zv = g.add_initializer(f"{base}.zero_point", np.zeros(scale.size if scale.size > 1 else (), np.int8))
    attrs = {"axis": lay.out_axis} if scale.size > 1 else {}
    y = Value(g.unique_name(f"{base}/dequantized"), lay.w.dtype, tuple(lay.w.shape))
    n = g.add_node("DequantizeLinear", [qv, sv, zv], [y], attrs, name=f"{base}/dequantize",
                   meta={"source": f"{lay.node.source}/codebook"}, before=first)
    mark_changed(n, pass_name)
    _swap_weight(g, lay, y)


def _first_reader(g: Graph, v: Value) -> Node:
    readers = {id(n) for n, _ in v.uses}
    return next(n for n in g.nodes if id(n) in readers)


def _swap_weight(g: Graph, lay: _Layer, y: Value) -> None:
    """Point every reader of the stored weight at the rewritten one ``y``; drop the old weight."""
    old = lay.weight
    who = y.producer.meta.get("pass", "") if y.producer is not None else ""
    for n, i in list(old.uses):
        if i >= 0 and n.graph is g and y.producer is not n:
            n.set_input(i, y)
            mark_changed(n, who)
    drop_if_unused(g, old)
