"""``prune-channels``: structured pruning -- remove whole channels, attention heads and groups.

The pass runs the channel-dependency analysis (:mod:`nnsculpt.ir.channel_deps`), scores every
unit of every prunable dependency group (:mod:`nnsculpt.passes.prune.importance`), picks the
units to remove for the requested target, and removes them physically
(:mod:`nnsculpt.passes.prune.rewrite`): weights are sliced,
``group`` / ``Split`` sizes / ``Slice`` bounds / ``Reshape`` targets / ``Resize`` sizes are
rewritten and value shapes updated -- the result is a smaller graph (smaller ONNX file,
smaller torch module from :func:`nnsculpt.runtime.to_torch`) with the same inputs and outputs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np

from ...ir.analysis import graph_stats, node_costs
from ...ir.channel_deps import ChannelDeps, DepGroup, channel_dependencies
from ...ir.errors import MissingCalibrationDataError, NNSculptError, PassOptionError
from ...ir.graph import Graph
from ..base import Pass, PassContext, PassResult, register
from .importance import DATA_DRIVEN, group_importance, unit_index
from .rewrite import apply_channel_removal, zero_channels

log = logging.getLogger("nnsculpt.passes")


# ============================================================================ cost model
_PAIR_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


class CostModel:
    """FLOPs / params of the graph as a function of how many units each group loses.

    Each node's cost (from :func:`nnsculpt.ir.node_costs`) is scaled by the kept fraction of
    the channel spaces it depends on: input and output channels for dense Conv / Gemm /
    MatMul, the output (or input) channels for everything else."""

    def __init__(self, graph: Graph, deps: ChannelDeps, groups: list[DepGroup]):
        self.deps = deps
        costs = {c.name: c for c in node_costs(graph)}
        self.base_flops = float(sum(abs(c.flops) for c in costs.values()))
        self.base_params = float(graph.param_count())
        self.size = np.array([s.size for s in deps.spaces], dtype=np.float64)
        self.terms: list[tuple[float, float, list[int]]] = []
        covered_params = 0.0
        for node in graph.nodes:
            c = costs.get(node.name)
            if c is None:
                continue
            ports = deps.ports.get(node.name, {})
            inp, out = ports.get(("in", 0)), ports.get(("out", 0))
            sp: list[int] = []
            batched = deps.info.get(node.name, {}).get("batched")
            grouped = deps.info.get(node.name, {}).get("grouped")
            if node.op_type in _PAIR_OPS and not batched and not grouped:
                sp = [s.index for s in (inp, out) if s is not None]
            elif node.op_type == "Gather" and out is not None:
                sp = [out.index]
            else:
                s = out or inp
                sp = [s.index] if s is not None else []
            self.terms.append((abs(float(c.flops)), float(c.params), sp))
            covered_params += c.params
        self.other_params = max(0.0, self.base_params - covered_params)
        self.elems: dict[int, list[tuple[int, int]]] = {}
        for g in groups:
            self.elems[g.index] = [(si, unit_index(deps, g, si).shape[1]) for si in g.spaces]

    def kept(self, n_rm: dict[int, int]) -> np.ndarray:
        lost = np.zeros_like(self.size)
        for gi, n in n_rm.items():
            for si, e in self.elems.get(gi, ()):
                lost[si] += n * e
        return np.clip(1.0 - lost / np.maximum(self.size, 1), 0.0, 1.0)

    def cost(self, n_rm: dict[int, int]) -> tuple[float, float]:
        k = self.kept(n_rm)
        fl = pa = 0.0
        for f, p, sp in self.terms:
            m = float(np.prod(k[sp])) if sp else 1.0
            fl += f * m
            pa += p * m
        return fl, pa + self.other_params


def recalibrate_batchnorm(graph: Graph, calib: dict[str, np.ndarray], *, max_samples: int = 256,
                          batch_size: int = 64) -> int:
    """Re-estimate BatchNorm running mean / variance of ``graph`` on ``calib`` (cumulative
    average over the batches, no weight update): pruning changes what the BNs after a pruned
    layer see. Runs the torch lowering in train mode for the BNs only. Returns how many BNs
    were updated."""
    import torch
    from torch import nn

    from ...runtime.torch_lowering import to_torch, write_back

    module = to_torch(graph)
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    module.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    from ...runtime.ort import batches, take_samples

    names = [v.name for v in graph.inputs]
    data = take_samples({k: calib[k] for k in names}, max_samples)   # dense arrays or ragged lists
    with torch.no_grad():
        for chunk in batches(data, batch_size):
            xs = [torch.as_tensor(np.ascontiguousarray(chunk[k])) for k in names]
            if xs[0].shape[0] < 2:
                continue
            module(*xs)
    module.eval()
    write_back(graph, module)
    return len(bns)


# ============================================================================== selection
@dataclass
class _Plan:
    n_rm: dict[int, int]
    order: dict[int, np.ndarray]     # per group: unit indices by ascending score

    def removal(self) -> dict[int, np.ndarray]:
        return {gi: np.sort(self.order[gi][:n]) for gi, n in self.n_rm.items() if n > 0}


def _unit_channels(deps: ChannelDeps, g: DepGroup) -> int:
    """Channels one unit of ``g`` occupies in its narrowest producer space (1 for plain
    channels, head_dim for attention heads)."""
    prod_spaces = {p.space.index for p in deps.params if p.kind == "out"} & set(g.spaces)
    counts = [unit_index(deps, g, si).shape[1] for si in (prod_spaces or g.spaces)]
    return max(1, min(counts)) if counts else 1


def _caps(deps, groups, max_ratio: float, min_units: int, round_to: int) -> dict[int, int]:
    caps = {}
    for g in groups:
        n = g.n_units
        cap = min(int(math.floor(max_ratio * n + 1e-9)), n - max(1, min_units))
        caps[g.index] = max(0, cap)
    return caps


def _round(deps, g: DepGroup, n_rm: int, round_to: int, cap: int) -> int:
    if round_to <= 1 or n_rm <= 0:
        return n_rm
    n = g.n_units
    cu = _unit_channels(deps, g)
    step = round_to // math.gcd(round_to, cu)
    kept = n - n_rm
    kept = min(n, int(math.ceil(kept / step) * step))
    return max(0, min(cap, n - kept))


# ================================================================================= the pass
@register
class PruneChannels(Pass):
    """Structured channel pruning: remove whole channels / heads / groups, physically.

    Rewrite rules: the channel-dependency analysis groups channels that must be removed
    together (conv filters with the next layers' input channels and the BatchNorm entries;
    residual adds and SE multiplies couple their operands; Concat / Split / Slice map channel
    ranges; Flatten couples a conv channel with its H*W features; attention heads are whole
    units; depthwise / grouped convs remove whole groups). Every prunable group loses ``ratio``
    of its units (or ``global=true``: units ranked across groups; ``target=flops:F`` /
    ``params:F``: until the model has that fraction of the original FLOPs / parameters), the
    lowest ``importance`` first (``l2`` filter norm by default; ``l1``, ``bn_gamma``, ``random``;
    with calibration data ``taylor``, ``activation``, ``apoz``). Weights, ``group``, Split sizes,
    Slice bounds, Reshape targets and Resize sizes are rewritten; value shapes shrink.

    Options: ``max_ratio`` caps the fraction removed from any group, ``protect=[names]`` keeps
    the output channels of the named nodes (node names, torch module paths or globs, e.g. the
    classifier), ``round_to=N`` keeps channel counts multiples of N, ``steps=k`` prunes in k
    increments (with a fine-tune callback between them via the Python API), ``soft=true``
    zeroes the selected channels each step (soft filter pruning) and removes them at the end.

    Preconditions: channels reaching graph inputs / outputs, unknown ops, subgraph ops,
    shared or non-constant weights and dynamic shape computations on channel axes stay
    untouched (reported in the notes). Removing channels whose producing weights are all
    zero is exact when the channel then computes 0 (ReLU-family / SiLU / hardswish nets);
    channels normalized by a LayerNorm change its statistics (lossy).
    """

    name = "prune-channels"
    drift_hint = "a smaller ratio (or target=flops:X), importance=taylor with --calib-data, or recover with `nnsculpt distill --teacher INPUT`"
    exact = False

    @dataclass
    class Options:
        ratio: float = 0.5
        importance: Literal["l2", "l1", "bn_gamma", "taylor", "activation", "apoz", "random"] = "l2"
        target: str = ""
        global_: bool = False
        max_ratio: float = 1.0
        protect: list[str] = field(default_factory=list)
        round_to: int = 1
        steps: int = 1
        soft: bool = False
        reduction: Literal["mean", "sum"] = "mean"
        consumers: bool = False
        min_units: int = 1
        max_samples: int = 256
        recalibrate_bn: bool = True

    # ``global`` is a Python keyword: accept it as an option name, store it as ``global_``
    def __init__(self, **options: Any):
        if "global" in options:
            if "global_" in options:
                raise PassOptionError("pass 'prune-channels': option 'global' given twice")
            options["global_"] = options.pop("global")
        super().__init__(**options)
        self._validate()

    def options_dict(self) -> dict[str, Any]:
        return {("global" if k == "global_" else k): v for k, v in dataclasses.asdict(self.options).items()}

    def describe(self) -> str:
        from ..base import format_option_value

        return f"{self.name}{{" + ",".join(f"{k}={format_option_value(v)}" for k, v in self.options_dict().items()) + "}"

    @classmethod
    def option_specs(cls):
        return [("global" if n == "global_" else n, t, d) for n, t, d in super().option_specs()]

    def _validate(self) -> None:
        o = self.options

        def bad(key, why):
            return PassOptionError(f"pass 'prune-channels': option '{key}' {why}")

        if not 0.0 <= o.ratio < 1.0:
            raise bad("ratio", f"must be in [0, 1), got {o.ratio}")
        if not 0.0 < o.max_ratio <= 1.0:
            raise bad("max_ratio", f"must be in (0, 1], got {o.max_ratio}")
        if o.round_to < 1:
            raise bad("round_to", f"must be >= 1, got {o.round_to}")
        if o.steps < 1:
            raise bad("steps", f"must be >= 1, got {o.steps}")
        if o.min_units < 1:
            raise bad("min_units", f"must be >= 1, got {o.min_units}")
        self._target = None
        if o.target:
            kind, _, val = o.target.partition(":")
            kind = kind.strip().lower()
            try:
                frac = float(val)
            except ValueError:
                frac = float("nan")
            if kind not in ("flops", "params") or not (0.0 < frac <= 1.0):
                raise bad("target", f"must be flops:F or params:F with 0 < F <= 1, got '{o.target}'")
            self._target = (kind, frac)

    # ------------------------------------------------------------------------------ run
    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        if o.importance in DATA_DRIVEN and ctx.calib_data is None:
            raise MissingCalibrationDataError(
                f"pass 'prune-channels': importance={o.importance} needs calibration data "
                f"(--calib-data X.npz, or PassContext(calib_data=...)); data-free criteria: l2, l1, bn_gamma, random")
        if o.ratio == 0.0 and self._target is None:
            ctx.note("ratio=0: nothing to prune")
            return PassResult(changed=False)
        self._check_protect(graph)
        finetune: Callable[[Graph, int], Any] | None = ctx.finetune
        st0 = graph_stats(graph)
        # abs(): FLOPs of graphs whose unknown dims were exported as -1 come out negative
        base = {"flops": abs(float(st0.flops)), "params": float(st0.params)}
        result: dict[str, Any] = {"steps": [], "before": {"flops": st0.flops, "params": st0.params}}
        changed = (self._soft if o.soft else self._hard)(graph, ctx, base, finetune, result)
        if changed and o.recalibrate_bn and ctx.calib_data is not None and finetune is None:
            try:
                n = recalibrate_batchnorm(graph, ctx.calib_data, max_samples=o.max_samples)
            except NNSculptError as e:  # e.g. an op without a torch lowering
                ctx.note(f"BatchNorm statistics not re-estimated: {str(e).splitlines()[0]}")
                n = 0
            if n:
                ctx.note(f"re-estimated the running statistics of {n} BatchNormalization nodes on the calibration data")
        st1 = graph_stats(graph)
        result["after"] = {"flops": st1.flops, "params": st1.params}
        ctx.note(f"flops {st0.flops:,} -> {st1.flops:,} ({st1.flops / st0.flops if st0.flops else 1.0:.3f}), "
                 f"params {st0.params:,} -> {st1.params:,} ({st1.params / max(1, st0.params):.3f})")
        return PassResult(changed=changed, artifacts=result,
                          metrics={"flops_ratio": st1.flops / st0.flops if st0.flops else 1.0,
                                   "params_ratio": st1.params / max(1, st0.params)})

    def _check_protect(self, graph: Graph) -> None:
        import fnmatch

        for p in self.options.protect:
            if not any(n.name == p or n.source == p or fnmatch.fnmatchcase(n.name, p)
                       or fnmatch.fnmatchcase(n.source, p) for n in graph.nodes):
                raise PassOptionError(f"pass 'prune-channels': option 'protect' names '{p}', "
                                      f"which matches no node name or module path of graph '{graph.name}'")

    def _analyze(self, graph: Graph, ctx: PassContext, first: bool) -> tuple[ChannelDeps, list[DepGroup], dict]:
        o = self.options
        deps = channel_dependencies(graph, protect=o.protect)
        groups = deps.prunable_groups()
        if first:
            self._note_groups(ctx, deps)
        notes: list[str] = []
        scores = group_importance(deps, o.importance, graph=graph, groups=groups, calib=ctx.calib_data,
                                  labels=ctx.labels, reduction=o.reduction,
                                  consumers=o.consumers, seed=ctx.seed, max_samples=o.max_samples,
                                  notes=notes)
        for n in notes if first else []:
            ctx.note(n)
        return deps, groups, scores

    def _note_groups(self, ctx: PassContext, deps: ChannelDeps) -> None:
        s = deps.summary()
        ctx.note(f"{s['groups']} dependency groups over {s['spaces']} channel spaces; "
                 f"{s['prunable_groups']} prunable ({s['prunable_units']} units)")
        reasons: dict[str, int] = {}
        for g in deps.groups:
            if not g.prunable:
                r = g.reason.split(" (at ")[0]
                reasons[r] = reasons.get(r, 0) + 1
        for r, k in sorted(reasons.items(), key=lambda kv: -kv[1])[:8]:
            ctx.note(f"kept whole ({k} group{'s' if k > 1 else ''}): {r}")

    # ------------------------------------------------------------------------- selection
    def _select(self, graph: Graph, deps: ChannelDeps, groups: list[DepGroup], scores: dict,
                ratio: float | None, target_abs: tuple[str, float] | None,
                orig: dict[tuple, int] | None = None) -> _Plan:
        """Units to remove. ``ratio`` is cumulative w.r.t. ``orig`` (units per group, by the
        group's layers, when the pass started); ``target_abs`` an absolute FLOPs / params goal."""
        o = self.options
        orig = orig or {}
        order = {g.index: np.argsort(scores[g.index], kind="stable") for g in groups}
        caps = _caps(deps, groups, o.max_ratio, o.min_units, o.round_to)
        model = CostModel(graph, deps, groups) if target_abs is not None else None

        def finish(n_rm: dict[int, int]) -> dict[int, int]:
            gmap = {g.index: g for g in groups}
            return {gi: _round(deps, gmap[gi], min(n, caps[gi]), o.round_to, caps[gi]) for gi, n in n_rm.items()}

        def uniform(r: float) -> dict[int, int]:
            return {g.index: min(caps[g.index], int(math.floor(r * g.n_units + 1e-9))) for g in groups}

        def uniform_cum(r: float) -> dict[int, int]:
            out = {}
            for g in groups:
                n0 = orig.get(g.layers, g.n_units)
                keep = n0 - int(math.floor(r * n0 + 1e-9))
                out[g.index] = min(caps[g.index], max(0, g.n_units - keep))
            return out

        def global_thr(t: float) -> dict[int, int]:
            return {g.index: min(caps[g.index], int(np.sum(scores[g.index] < t))) for g in groups}

        def metric(n_rm):
            fl, pa = model.cost(n_rm)
            return fl if target_abs[0] == "flops" else pa

        if target_abs is None:
            if not o.global_:
                return _Plan(finish(uniform_cum(ratio)), order)
            total = sum(g.n_units for g in groups)
            total0 = sum(orig.get(g.layers, g.n_units) for g in groups)
            want = max(0, total - (total0 - int(math.floor(ratio * total0 + 1e-9))))
            allv = sorted(((float(scores[g.index][u]), g.index) for g in groups for u in range(g.n_units)))
            n_rm = {g.index: 0 for g in groups}
            removed = 0
            for sc, gi in allv:
                if removed >= want:
                    break
                if n_rm[gi] < caps[gi]:
                    n_rm[gi] += 1
                    removed += 1
            return _Plan(finish(n_rm), order)
        goal = target_abs[1]
        if metric({g.index: 0 for g in groups}) <= goal:
            return _Plan({g.index: 0 for g in groups}, order)
        if not o.global_:
            lo, hi = 0.0, 1.0
            best = uniform(1.0)
            for _ in range(40):
                mid = (lo + hi) / 2
                n_rm = finish(uniform(mid))
                if metric(n_rm) <= goal:
                    hi, best = mid, n_rm
                else:
                    lo = mid
            return _Plan(best, order)
        vals = np.unique(np.concatenate([scores[g.index] for g in groups]))
        lo, hi = 0, len(vals)  # threshold = vals[i] removes scores < vals[i]; i == len -> all
        best = None
        while lo < hi:
            mid = (lo + hi) // 2
            t = vals[mid] if mid < len(vals) else np.inf
            n_rm = finish(global_thr(t))
            if metric(n_rm) <= goal:
                hi, best = mid, n_rm
            else:
                lo = mid + 1
        if best is None:
            best = finish(global_thr(np.inf))
        return _Plan(best, order)

    # ---------------------------------------------------------------------------- schedules
    def _step_targets(self, base: dict, k: int, i: int):
        """(cumulative ratio w.r.t. the start, absolute target) for step i of k."""
        o = self.options
        if self._target is not None:
            kind, frac = self._target
            f_i = 1.0 - (1.0 - frac) * i / k
            return None, (kind, f_i * base[kind])
        return o.ratio * i / k, None

    def _hard(self, graph, ctx, base, finetune, result) -> bool:
        k = self.options.steps
        changed = False
        orig: dict[tuple, int] = {}
        for i in range(1, k + 1):
            deps, groups, scores = self._analyze(graph, ctx, first=(i == 1))
            if i == 1:
                orig = {g.layers: g.n_units for g in groups}
            ratio, target_abs = self._step_targets(base, k, i)
            plan = self._select(graph, deps, groups, scores, ratio, target_abs, orig)
            removal = plan.removal()
            n = int(sum(len(v) for v in removal.values()))
            if removal:
                apply_channel_removal(graph, deps, removal)
                changed = True
            st = graph_stats(graph)
            result["steps"].append({"step": i, "removed_units": n, "flops": st.flops, "params": st.params})
            if k > 1:
                ctx.note(f"step {i}/{k}: removed {n} units; flops {st.flops:,}, params {st.params:,}")
            else:
                tot = sum(g.n_units for g in groups)
                ctx.note(f"removed {n} of {tot} units in {len(removal)} of {len(groups)} prunable groups")
            if finetune is not None:
                finetune(graph, i)
        return changed

    def _soft(self, graph, ctx, base, finetune, result) -> bool:
        """Soft filter pruning (He et al. 2018): every step selects the full target, zeroes
        it and lets training (the fine-tune callback) update everything, zeroed channels
        included; after the last step the final selection is zeroed and removed."""
        k = self.options.steps
        o = self.options
        ratio = o.ratio if self._target is None else None
        target_abs = None if self._target is None else (self._target[0], self._target[1] * base[self._target[0]])
        for i in range(1, k + 1):
            deps, groups, scores = self._analyze(graph, ctx, first=(i == 1))
            plan = self._select(graph, deps, groups, scores, ratio, target_abs)
            z = zero_channels(graph, deps, plan.removal())
            result["steps"].append({"step": i, "zeroed_params": z,
                                    "selected_units": int(sum(plan.n_rm.values()))})
            if finetune is not None:
                finetune(graph, i)
        if finetune is None and k == 1:
            removal = plan.removal()
        else:
            deps, groups, scores = self._analyze(graph, ctx, first=False)
            plan = self._select(graph, deps, groups, scores, ratio, target_abs)
            zero_channels(graph, deps, plan.removal())
            removal = plan.removal()
        n = int(sum(len(v) for v in removal.values()))
        if removal:
            apply_channel_removal(graph, deps, removal)
        ctx.note(f"soft pruning: {k} step(s); removed {n} zeroed units at the end")
        return bool(removal)
