"""Pipeline strings (MLIR style) and TOML recipes.

Grammar::

    pipeline := item ("," item)*
    item     := NAME [ "{" [ opt ("," opt)* ] "}" ]
    opt      := KEY "=" VALUE
    VALUE    := bare-word | "quoted string" | "[" a,b,c "]"

Example: ``fold-bn,dce,prune-channels{ratio=0.5,importance=l2,protect=[fc,conv1]}``.

A recipe is a TOML file with the same list, either ``pipeline = "fold-bn,dce"`` or::

    [[pass]]
    name = "prune-channels"
    ratio = 0.5
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..ir.errors import PipelineError
from .base import Pass, get_pass

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside of braces, brackets and quotes."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = ""
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"pipeline '{text}': unbalanced '{ch}'")
        if ch == sep and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0 or quote:
        raise PipelineError(f"pipeline '{text}': unbalanced braces, brackets or quotes")
    parts.append("".join(cur))
    return parts


def parse_pipeline(text: str) -> list[Pass]:
    """Parse a pipeline string into pass instances (options validated)."""
    if text is None or not text.strip():
        raise PipelineError("empty pipeline: give at least one pass, e.g. 'fold-bn,dce'")
    passes: list[Pass] = []
    for raw in _split_top(text.strip()):
        item = raw.strip()
        if not item:
            raise PipelineError(f"pipeline '{text}': empty pass name (stray comma?)")
        opts: dict[str, str] = {}
        if "{" in item:
            if not item.endswith("}"):
                raise PipelineError(f"pipeline item '{item}': options must end with '}}'")
            name, body = item[:item.index("{")].strip(), item[item.index("{") + 1:-1]
            for kv in _split_top(body):
                kv = kv.strip()
                if not kv:
                    continue
                if "=" not in kv:
                    raise PipelineError(f"pass '{name}': option '{kv}' must be key=value")
                k, v = kv.split("=", 1)
                k = k.strip()
                if k in opts:
                    raise PipelineError(f"pass '{name}': option '{k}' given twice")
                opts[k] = v.strip()
        else:
            name = item
        if not name.replace("-", "").replace("_", "").isalnum():
            raise PipelineError(f"pipeline '{text}': bad pass name '{name}'")
        passes.append(get_pass(name)(**opts))
    return passes


def load_recipe(path: str | os.PathLike) -> list[Pass]:
    """Load a TOML recipe (see module docstring)."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{p}: no such recipe file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise PipelineError(f"{p}: not a valid TOML recipe: {e}") from None
    if "pipeline" in data:
        if not isinstance(data["pipeline"], str):
            raise PipelineError(f"{p}: 'pipeline' must be a string like \"fold-bn,dce\"")
        return parse_pipeline(data["pipeline"])
    items = data.get("pass")
    if not isinstance(items, list) or not items:
        raise PipelineError(f"{p}: a recipe needs 'pipeline = \"...\"' or one or more [[pass]] tables")
    passes = []
    for i, t in enumerate(items):
        t = dict(t)
        name = t.pop("name", None)
        if not name:
            raise PipelineError(f"{p}: [[pass]] #{i + 1} has no 'name'")
        passes.append(get_pass(name)(**t))
    return passes


def resolve_pipeline(spec: str) -> list[Pass]:
    """A pipeline string, or a path to a ``.toml`` recipe."""
    if spec.strip().endswith(".toml"):
        return load_recipe(spec.strip())
    return parse_pipeline(spec)


def format_pipeline(passes: list[Pass]) -> str:
    """The canonical pipeline string of ``passes`` (all options spelled out)."""
    return ",".join(p.describe() for p in passes)
