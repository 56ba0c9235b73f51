"""Python API of structured channel pruning.

    from nnsculpt.prune import prune_module, prune_graph, dependency_groups

    small = prune_module(model, example_inputs, ratio=0.5)                 # data-free L2
    small = prune_module(model, x, target="flops:0.5", global_pruning=True,
                         importance="taylor", calib_data=X, labels=y)
    small = prune_module(model, x, ratio=0.5, steps=4, finetune=train_one_epoch)   # iterative
    small = prune_module(model, x, ratio=0.5, soft=True, steps=10, finetune=train_one_epoch)  # SFP

Both functions go through the ``prune-channels`` pass on the IR: ``from_torch`` -> pass ->
``to_torch``. ``finetune(module, step)`` receives a trainable torch module of the current
(pruned, or zeroed for ``soft``) graph; whatever it trains flows back into the graph
(``write_back``), so the next step scores the fine-tuned weights. It may return a module to use
instead of the one it was given.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .ir.graph import Graph

__all__ = ["prune_module", "prune_graph", "dependency_groups"]


def _as_numpy(x) -> np.ndarray:
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.detach().cpu().numpy()
    except ImportError:  # pragma: no cover
        pass
    return np.asarray(x)


def _calib_dict(graph: Graph, calib) -> dict[str, np.ndarray] | None:
    if calib is None:
        return None
    names = [v.name for v in graph.inputs]
    if isinstance(calib, Mapping):
        missing = [n for n in names if n not in calib]
        if missing:
            from .ir.errors import InputDataError

            raise InputDataError(f"calib_data: missing input(s) {missing} (the model needs {names})")
        return {n: _as_numpy(calib[n]) for n in names}
    if isinstance(calib, (tuple, list)):
        return {n: _as_numpy(a) for n, a in zip(names, calib)}
    return {names[0]: _as_numpy(calib)}


def prune_graph(graph: Graph, *, ratio: float = 0.5, importance: str = "l2", calib_data=None, labels=None,
                finetune: Callable[[Graph, int], Any] | None = None, seed: int = 0,
                global_pruning: bool = False, **options: Any) -> dict[str, Any]:
    """Run ``prune-channels`` on ``graph`` in place. ``finetune(graph, step)`` is called after
    every step (it may train through ``to_torch`` / ``write_back``). Returns the pass summary
    (``before`` / ``after`` FLOPs and params, per-step records, ``notes``)."""
    from .ir.verifier import verify
    from .passes.base import PassContext
    from .passes.prune import PruneChannels

    opts = dict(options)
    if global_pruning:
        opts["global_"] = True
    p = PruneChannels(ratio=ratio, importance=importance, **opts)
    ctx = PassContext(calib_data=_calib_dict(graph, calib_data), seed=seed, finetune=finetune,
                      labels=None if labels is None else _as_numpy(labels))
    result = p(graph, ctx)
    verify(graph)
    res = dict(result.artifacts)
    res["notes"] = list(result.notes)
    return res


def prune_module(module, example_inputs, *, ratio: float = 0.5, importance: str = "l2", calib_data=None,
                 labels=None, finetune: Callable[[Any, int], Any] | None = None, seed: int = 0,
                 global_pruning: bool = False, input_names: Sequence[str] | None = None,
                 output_names: Sequence[str] | None = None, return_graph: bool = False, **options: Any):
    """Prune a torch module: ``from_torch`` -> ``prune-channels`` -> ``to_torch``.

    Returns the smaller trainable module (an ``fx.GraphModule`` with real ``nn.Conv2d`` /
    ``nn.Linear`` / ``nn.BatchNorm2d`` submodules named after the original module paths), in
    the original module's train/eval mode; ``module.prune_report`` holds the pass summary. With
    ``return_graph`` the IR graph is returned too: ``(module, graph)``.

    Options are those of the pass: ``ratio``, ``importance`` (l2, l1, bn_gamma, random; with
    ``calib_data`` taylor, activation, apoz), ``target="flops:0.5"``, ``global_pruning``,
    ``max_ratio``, ``protect=[...]``, ``round_to``, ``steps``, ``soft``, ``reduction``,
    ``consumers``. ``calib_data``: an array / tensor (single input), a tuple, or a dict by input
    name; ``labels`` feed the Taylor loss.
    """
    from .ir import from_torch
    from .runtime.torch_lowering import to_torch, write_back

    training = bool(getattr(module, "training", False))
    g = from_torch(module, example_inputs, input_names=list(input_names) if input_names else None,
                   output_names=list(output_names) if output_names else None)
    ft = None
    if finetune is not None:
        def ft(graph: Graph, step: int) -> None:
            m = to_torch(graph)
            got = finetune(m, step)
            write_back(graph, got if got is not None else m)

    report = prune_graph(g, ratio=ratio, importance=importance, calib_data=calib_data, labels=labels,
                         finetune=ft, seed=seed, global_pruning=global_pruning, **options)
    out = to_torch(g)
    out.train(training)
    out.prune_report = report
    return (out, g) if return_graph else out


def dependency_groups(model, example_inputs=None, *, protect: Sequence[str] | None = None, **kwargs):
    """The channel-dependency analysis of a graph, an ``.onnx`` path or a torch module
    (:class:`nnsculpt.ir.channel_deps.ChannelDeps`)."""
    from .ir.channel_deps import channel_dependencies

    if isinstance(model, Graph):
        g = model
    elif isinstance(model, str):
        from .ir import from_onnx

        g = from_onnx(model)
    else:
        from .ir import from_torch

        g = from_torch(model, example_inputs, **kwargs)
    return channel_dependencies(g, protect=list(protect or []))
