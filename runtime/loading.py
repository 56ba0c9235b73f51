"""Resolve a MODEL argument (an ``.onnx`` path or ``zoo:NAME``) into an IR graph."""

from __future__ import annotations

import logging
from pathlib import Path

from ..ir.errors import ModelLoadError
from ..ir.graph import Graph

log = logging.getLogger("nnsculpt.runtime")

ZOO_PREFIX = "zoo:"


def load_graph(spec: str, *, pretrained: bool | None = None) -> Graph:
    """``zoo:NAME`` builds the zoo model (trained weights when a checkpoint is bundled)
    and traces it with :func:`nnsculpt.ir.from_torch`; anything else is an ONNX path."""
    if spec.startswith(ZOO_PREFIX):
        return load_zoo(spec[len(ZOO_PREFIX):], pretrained=pretrained)
    from ..ir.onnx_io import from_onnx

    p = Path(spec)
    if p.suffix.lower() not in (".onnx", ".ort", ".pb", "") and not p.exists():
        raise ModelLoadError(f"{spec}: expected an .onnx file or zoo:NAME")
    g = from_onnx(p)
    g.meta.setdefault("frontend", "onnx")
    return g


def load_zoo(name: str, *, pretrained: bool | None = None) -> Graph:
    from .. import models
    from ..ir import from_torch

    try:
        use_pretrained = (models.checkpoint_path(name) is not None) if pretrained is None else pretrained
        module = models.get_model(name, pretrained=use_pretrained)
    except KeyError as e:  # UnknownModelError
        raise ModelLoadError(f"zoo:{name}: {e}") from None
    g = from_torch(module, models.example_inputs(name, batch=1), input_names=list(models.input_names(name)),
                   output_names=list(models.output_names(name)), name=name)
    g.meta["zoo"] = name
    g.meta["pretrained"] = bool(use_pretrained)
    return g
