"""Export of quantization-aware training as QDQ (a driver: it runs the ``quantize`` pass).

    from nnsculpt.runtime import to_torch
    from nnsculpt.runtime.qat import prepare_qat, finetune_qat
    from nnsculpt.qat import export_qat

    module = to_torch(g)                          # g: IR graph, BatchNormalization folded
    prepare_qat(module, weight_bits=4, calib_data={"input": x_calib})
    finetune_qat(module, teacher=g, data=(x_train, y_train), epochs=5)
    export_qat(g, module, calib_data={"input": x_calib})   # QDQ with the learned scales
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import numpy as np
from torch import nn

from .runtime.qat import qat_modules, strip_qat

__all__ = ["export_qat"]


def _node_for_weight(graph, initializer: str):
    from .passes.quantize.table import spec_for

    for n in graph.nodes:
        spec = spec_for(n)
        if spec is not None and spec.weight is not None and len(n.inputs) > spec.weight \
                and n.inputs[spec.weight] is not None and n.inputs[spec.weight].name == initializer:
            return n
    return None


def export_qat(graph, module: nn.Module, *, calib_data: Mapping[str, np.ndarray] | None = None,
               pipeline_options: Mapping[str, Any] | None = None, ctx=None, example_inputs=None):
    """Write the QAT result into ``graph`` as QDQ with the learned scales; returns the graph.

    ``module`` made by :func:`nnsculpt.runtime.to_torch` from ``graph``: the trained float
    weights flow back with ``write_back`` and each QAT module maps to the node that owns its
    weight. Any other ``nn.Module``: pass ``graph=None`` and ``example_inputs``; a plain copy
    is traced with ``from_torch`` and modules map to nodes by provenance (module path).

    Then ``quantize`` runs with ``weight_scales`` (per-channel step sizes) and
    ``act_overrides`` (input step size / zero point of every QAT layer); tensors no QAT
    quantizer covers (residual adds, pooling) are calibrated on ``calib_data``.
    """
    from .passes.base import PassContext
    from .passes.quantize import Quantize

    mods = qat_modules(module)
    if not mods:
        raise ValueError("export_qat: the module has no QAT layers (call prepare_qat first)")
    pmap = getattr(module, "_nnsculpt_param_map", None)
    if graph is not None and pmap is not None:
        from .runtime.torch_lowering import write_back

        write_back(graph, module)
        targets = {}
        for name, m in mods.items():
            bind = pmap.get(f"{name}.weight")
            node = _node_for_weight(graph, bind.initializer) if bind is not None else None
            factor = 1.0
            if bind is not None:
                for step in bind.transforms:
                    if step[0] == "scale":
                        factor *= float(step[1])
            targets[name] = (node, factor)
    else:
        if example_inputs is None:
            raise ValueError("export_qat: a module not made by to_torch needs example_inputs (and graph=None)")
        from .ir import from_torch

        plain = strip_qat(copy.deepcopy(module))
        graph = from_torch(plain.eval(), example_inputs, input_names=["input"], output_names=["logits"])
        by_source = {n.source: n for n in graph.nodes}
        targets = {name: (by_source.get(name), 1.0) for name in mods}
    act_overrides: dict[str, tuple[float, int]] = {}
    weight_scales: dict[str, np.ndarray] = {}
    bits = {m.weight_fake_quant.bits for m in mods.values()}
    if not bits <= {8, 4}:
        raise ValueError(f"export_qat: weight bits {sorted(bits)} not supported (8 or 4)")
    missing = []
    for name, m in mods.items():
        node, factor = targets[name]
        if node is None:
            missing.append(name)
            continue
        s, _ = m.weight_fake_quant.export()
        weight_scales[node.name] = (s / factor).astype(np.float32)
        aq = m.input_fake_quant
        if aq.enabled and bool(aq.initialized) and aq.bits == 8:
            a_s, a_z = aq.export()
            act_overrides[node.inputs[0].name] = (float(a_s.reshape(-1)[0]), int(a_z.reshape(-1)[0]))
    if missing:
        raise ValueError(f"export_qat: no graph node for QAT layer(s) {missing}")
    opts = {"weights": "int4" if bits == {4} else "int8", "per_channel": True}
    opts.update(pipeline_options or {})
    q = Quantize(act_overrides=act_overrides, weight_scales=weight_scales, **opts)
    ctx = ctx or PassContext(calib_data=dict(calib_data) if calib_data is not None else None)
    if calib_data is not None and ctx.calib_data is None:
        ctx.calib_data = dict(calib_data)
    q(graph, ctx)
    graph.meta["qat_export"] = {"layers": len(weight_scales), "activation_overrides": len(act_overrides),
                                "weight_bits": sorted(bits)}
    return graph
