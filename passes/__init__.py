"""Passes: the base class, PassResult and registry, declared requirements, pipeline strings
and recipes, the PassManager, and every built-in pass (one file per pass, or a subpackage for a
family: ``quantize/``, ``prune/``).

    from nnsculpt.passes import parse_pipeline, PassManager
    passes = parse_pipeline("fold-bn,dce")
    result = PassManager(passes).run(graph)    # result.report: what report.json holds
"""

from __future__ import annotations

import importlib

from .base import PASSES, Pass, PassContext, PassResult, get_pass, list_passes, register

#: infrastructure modules of this package; every other public module defines passes
_INFRA_MODULES = {"base", "pipeline", "manager", "requirements"}

_loaded = False


def builtin_pass_modules() -> list[str]:
    """Names of the modules in this package that define passes (one pass per file)."""
    import pkgutil

    return sorted(m.name for m in pkgutil.iter_modules(__path__)
                  if not m.name.startswith("_") and m.name not in _INFRA_MODULES)


def load_builtin_passes() -> None:
    """Import every pass module once, so their ``@register`` decorators run."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in builtin_pass_modules():
        importlib.import_module(f"{__name__}.{mod}")


def __getattr__(name: str):
    if name in ("parse_pipeline", "load_recipe", "format_pipeline"):
        from . import pipeline

        return getattr(pipeline, name)
    if name in ("PassManager", "RunResult"):
        from . import manager

        return getattr(manager, name)
    raise AttributeError(name)


__all__ = ["Pass", "PassContext", "PassResult", "PASSES", "register", "get_pass", "list_passes",
           "parse_pipeline", "load_recipe", "format_pipeline", "PassManager", "RunResult"]
