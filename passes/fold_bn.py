"""Fold inference BatchNormalization into the preceding Conv / ConvTranspose / Gemm / MatMul."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..ir.analysis import infer_shapes
from ..ir.graph import Graph, Node, Value
from .base import Pass, PassContext, PassResult, register
from ._util import (const_of, has_implicit_uses, is_default_domain, is_graph_output, is_used,
                    rebuild_node, remove_if_unused_initializer)

_FOLDABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@register
class FoldBatchNorm(Pass):
    """Fold inference-mode BatchNormalization into the Conv/ConvTranspose/Gemm/MatMul before it.

    With ``s = scale / sqrt(var + epsilon)`` (per output channel, computed in float64):

    * ``Conv(x, W, b) -> BN``: ``W'[c] = W[c] * s[c]`` along axis 0 (output channels;
      correct for any ``group``), ``b' = (b - mean) * s + B`` (``b = 0`` when absent);
    * ``ConvTranspose(x, W, b) -> BN``: ``W`` is ``(Cin, Cout/group, k...)``; output
      channel ``c = g * Cout/group + j`` scales ``W[g*Cin/group:(g+1)*Cin/group, j]``;
      bias as for Conv;
    * ``Gemm(A, B, C) -> BN`` on a 2-D output ``(M, N)``: the columns of ``B`` (axis 1 when
      ``transB=0``, axis 0 when ``transB=1``) are scaled by ``s``;
      ``C' = (beta*C - mean) * s + B`` and ``beta`` becomes 1 (``alpha`` is kept);
    * ``MatMul(A, W) -> BN`` with rank-2 ``A`` and constant 2-D ``W`` becomes
      ``Gemm(A, W*s, (0 - mean)*s + B)``.

    New weights are cast back to the weight dtype. The folded node keeps its name and
    provenance (stamped by this pass) and writes the BatchNormalization's output value, so
    every consumer -- graph outputs and subgraph captures included -- sees the same name.
    A weight shared with other nodes is copied, not modified in place.

    Preconditions (otherwise the BN is left alone and the reason noted): BN in the default
    domain, in inference form (``training_mode=0``, only output 0 used) with constant
    scale/B/mean/var (seen through ``Identity`` chains); the producer is one of the ops
    above in the default domain, has a constant float weight (and bias), and the BN is
    the ONLY user of its output, which is not a graph output nor captured by a subgraph.
    A BN directly after a graph input or after another op (e.g. ``If``) is not touched.
    """

    name = "fold-bn"
    exact = True
    guarantees = frozenset({"bn-folded"})

    @dataclass
    class Options:
        fold_gemm: bool = True
        fold_matmul: bool = True

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        changed = False
        folded = left = 0
        for bn in list(graph.nodes):
            if bn.graph is not graph or bn.op_type != "BatchNormalization" or not is_default_domain(bn):
                continue
            why = self._fold(graph, bn)
            if why is None:
                changed = True
                folded += 1
            else:
                left += 1
                if why:
                    ctx.note(f"left BatchNormalization '{bn.name}' alone: {why}")
        if folded:
            ctx.note(f"folded {folded} BatchNormalization node(s) into the layers before them")
        return PassResult(changed=changed, metrics={"folded": folded, "left": left})

    # ------------------------------------------------------------------------------
    def _fold(self, g: Graph, bn: Node) -> str | None:
        """Fold ``bn``; returns None on success, else the reason ('' = not worth a note)."""
        if int(bn.attrs.get("training_mode", 0)) != 0:
            return "training_mode=1"
        if any(is_used(g, o) for o in bn.outputs[1:]):
            return "running statistics outputs are used (training form)"
        ins = list(bn.inputs) + [None] * (5 - len(bn.inputs))
        x, params = ins[0], [const_of(v) for v in ins[1:5]]
        if x is None:
            return ""
        if any(p is None for p in params):
            return "scale/B/mean/var are not all constant"
        scale, beta, mean, var = (np.asarray(p, dtype=np.float64).reshape(-1) for p in params)
        if not (scale.shape == beta.shape == mean.shape == var.shape):
            return "scale/B/mean/var shapes differ"
        eps = float(bn.attrs.get("epsilon", 1e-5))
        p = x.producer
        if p is None:
            return ""  # BN on a graph input / initializer: nothing to fold into
        if not is_default_domain(p) or p.op_type not in _FOLDABLE:
            if p.has_subgraphs:
                return f"producer '{p.name}' is a subgraph op ({p.op_type})"
            return ""
        if p.op_type == "Gemm" and not self.options.fold_gemm:
            return ""
        if p.op_type == "MatMul" and not self.options.fold_matmul:
            return ""
        if is_graph_output(g, x) or has_implicit_uses(x) or len(x.uses) != 1:
            return f"output of '{p.name}' has other users"
        s = scale / np.sqrt(var + eps)
        shift = beta - mean * s
        if p.op_type in ("Conv", "ConvTranspose"):
            plan = self._plan_conv(p, s, mean, beta)
        elif p.op_type == "Gemm":
            plan = self._plan_gemm(p, x, s, mean, beta)
        else:
            plan = self._plan_matmul(g, p, x, s, shift)
        if isinstance(plan, str):
            return f"cannot fold into {p.op_type} '{p.name}': {plan}"
        op_type, w_new, b_new, attrs = plan
        self._apply(g, bn, p, op_type, w_new, b_new, attrs)
        return None

    # ---------------------------------------------------------------- weight planning
    @staticmethod
    def _weights(p: Node):
        w = p.inputs[1] if len(p.inputs) > 1 else None
        wc = w.const if w is not None and w.is_const else None
        if wc is None:
            return "weight is not an initializer"
        if wc.dtype.kind != "f":
            return f"weight dtype {wc.dtype} is not floating point"
        b = p.inputs[2] if len(p.inputs) > 2 else None
        bc = None
        if b is not None:
            if not b.is_const:
                return "bias is not an initializer"
            bc = b.const
        return wc, bc

    def _plan_conv(self, p: Node, s, mean, beta):
        got = self._weights(p)
        if isinstance(got, str):
            return got
        w, b = got
        if w.ndim < 3:
            return f"unexpected weight rank {w.ndim}"
        group = int(p.attrs.get("group", 1))
        if p.op_type == "Conv":
            cout = w.shape[0]
            if s.size != cout:
                return f"{s.size} BN channels for {cout} output channels"
            w_new = w.astype(np.float64) * s.reshape((-1,) + (1,) * (w.ndim - 1))
        else:
            cin, cpg = w.shape[0], w.shape[1]
            cout = cpg * group
            if s.size != cout or cin % group:
                return f"{s.size} BN channels for {cout} output channels (group={group})"
            wg = w.astype(np.float64).reshape((group, cin // group, cpg) + w.shape[2:])
            wg = wg * s.reshape((group, 1, cpg) + (1,) * (w.ndim - 2))
            w_new = wg.reshape(w.shape)
        b64 = np.zeros(cout) if b is None else np.asarray(b, dtype=np.float64).reshape(-1)
        if b64.size != cout:
            return f"bias has {b64.size} elements for {cout} channels"
        b_new = (b64 - mean) * s + beta
        return p.op_type, w_new.astype(w.dtype), b_new.astype(w.dtype), dict(p.attrs)

    def _plan_gemm(self, p: Node, y: Value, s, mean, beta):
        got = self._weights(p)
        if isinstance(got, str):
            return got
        w, c = got
        if w.ndim != 2:
            return "B is not 2-D"
        trans_b = int(p.attrs.get("transB", 0))
        n = w.shape[0] if trans_b else w.shape[1]
        if s.size != n:
            return f"{s.size} BN channels for N={n}"
        beta_ = float(p.attrs.get("beta", 1.0))
        w_new = w.astype(np.float64) * (s.reshape(-1, 1) if trans_b else s.reshape(1, -1))
        if c is None:
            c_new = beta - mean * s
        else:
            c64 = np.asarray(c, dtype=np.float64)
            if c64.ndim > 2:
                return "C has rank > 2"
            # C is unidirectionally broadcastable to (M, N), so C' is too
            c_new = (beta_ * c64 - mean) * s + beta
        attrs = dict(p.attrs)
        attrs["beta"] = 1.0
        return "Gemm", w_new.astype(w.dtype), c_new.astype(w.dtype), attrs

    def _plan_matmul(self, g: Graph, p: Node, y: Value, s, shift):
        a = p.inputs[0]
        got = self._weights(p)
        if isinstance(got, str):
            return got
        w, _ = got
        if w.ndim != 2:
            return "weight is not 2-D"
        if a is not None and a.rank is None:
            infer_shapes(g)  # only when needed: it lowers the whole graph
        if a is None or a.rank != 2 or (y.rank is not None and y.rank != 2):
            return "input is not known to be 2-D (BN normalizes axis 1)"
        if s.size != w.shape[1]:
            return f"{s.size} BN channels for N={w.shape[1]}"
        w_new = w.astype(np.float64) * s.reshape(1, -1)
        return "Gemm", w_new.astype(w.dtype), shift.astype(w.dtype), {}

    # ----------------------------------------------------------------------- rewrite
    def _apply(self, g: Graph, bn: Node, p: Node, op_type: str, w_new, b_new, attrs) -> None:
        y = bn.outputs[0]
        a = p.inputs[0]
        bn_inputs = [v for v in bn.inputs if v is not None]
        old_w = p.inputs[1]
        old_b = p.inputs[2] if len(p.inputs) > 2 else None
        w_val = self._new_weight(g, p, old_w, w_new, "_bnfold")
        b_val = self._new_weight(g, p, old_b, b_new, "_bnfold") if old_b is not None else \
            g.add_initializer(f"{old_w.name}_bias_bnfold" if p.op_type != "MatMul" else f"{p.name}_bias", b_new)
        # drop the BN; its output value is then written by the folded node
        g.remove_node(bn, force=True)
        inputs = [a, w_val, b_val]
        attr_types = {k: t for k, t in p.attr_types.items() if k in attrs}
        new = rebuild_node(g, p, op_type=op_type, inputs=inputs, outputs=[y], attrs=attrs,
                           attr_types=attr_types)
        new.meta.setdefault("folded", []).append(f"BatchNormalization:{bn.source}")
        self.changed(new)
        for v in [old_w, old_b] + bn_inputs:
            if v is not None and v is not a:
                remove_if_unused_initializer(g, v)

    def _new_weight(self, g: Graph, p: Node, old: Value, arr: np.ndarray, suffix: str) -> Value:
        """Reuse ``old``'s name when it is an initializer read only by ``p``, else copy."""
        users = old.uses
        if g.initializers.get(old.name) is old and len(users) == 1 and users[0][0] is p \
                and not is_graph_output(g, old):
            old.set_const(arr)
            old.meta["pass"] = self.name
            return old
        v = g.add_initializer(old.name + suffix, arr)
        v.meta["pass"] = self.name
        return v
