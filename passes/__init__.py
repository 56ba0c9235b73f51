"""Passes: the base class and registry, pipeline strings and recipes, the PassManager,
and every built-in pass (one file per pass).

    from nnsculpt.passes import parse_pipeline, PassManager
    passes = parse_pipeline("fold-bn,dce")
    report = PassManager(passes).run(graph)
"""

from __future__ import annotations

import importlib

from .base import PASSES, Pass, PassContext, get_pass, list_passes, register

#: modules holding the built-in passes (imported lazily on first registry lookup)
BUILTIN_PASS_MODULES = (
    "dce",
    "fold_constants",
    "fold_bn",
    "eliminate_identity",
    "canonicalize",
)

_loaded = False


def _load_builtin_passes() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in BUILTIN_PASS_MODULES:
        importlib.import_module(f"{__name__}.{mod}")


def __getattr__(name: str):
    if name in ("parse_pipeline", "load_recipe", "format_pipeline"):
        from . import pipeline

        return getattr(pipeline, name)
    if name in ("PassManager", "RunResult"):
        from . import manager

        return getattr(manager, name)
    raise AttributeError(name)


__all__ = ["Pass", "PassContext", "PASSES", "register", "get_pass", "list_passes",
           "parse_pipeline", "load_recipe", "format_pipeline", "PassManager", "RunResult"]
