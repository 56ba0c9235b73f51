"""Pass base class, typed options, the result object, requirements, the registry and the context.

A pass is one class in one file, or a subpackage for a family of several files (``passes/quantize/``);
``passes/dce.py`` is the smallest real one::

    @register
    class DeadCodeElimination(Pass):
        '''Remove nodes whose outputs nobody uses, and initializers nobody reads. (first line = summary)

        Rewrite rules: ...
        Preconditions: ...
        '''
        name = "dce"
        exact = True            # outputs unchanged (the PassManager checks it)
        requires = frozenset()  # e.g. {"bn-folded", "shapes", "calib-data", "opset>=13"}

        @dataclass
        class Options:
            remove_unused_initializers: bool = True
            keep_custom_domains: bool = False

        def run(self, graph, ctx) -> PassResult:
            ...
            return PassResult(changed=True, metrics={"removed_nodes": 3})

Options are a dataclass; pipeline strings (``dce{keep_custom_domains=true}``) are parsed
against its field types (int, float, bool, str, Literal[...] choices, lists) and a bad
name or value raises :class:`PassOptionError` naming the pass and option.

``run`` returns a :class:`PassResult`; a pass object keeps no state between runs (everything a
run found goes into its result). Requirements (:mod:`nnsculpt.passes.requirements`) are met
before ``run`` is called: by the PassManager (which reports the enabling passes it inserted)
or, when a pass is called directly, by :meth:`Pass.__call__`.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, Mapping

import numpy as np

from ..ir.errors import PassOptionError, UnknownPassError
from ..ir.graph import Graph, Node, mark_changed

log = logging.getLogger("nnsculpt.passes")


@dataclass
class PassResult:
    """What one run of a pass returns.

    ``changed``: whether the graph changed; ``notes``: human-readable messages (left alone X
    because Y; what was done), collected from :meth:`PassContext.note` during the run plus any
    the pass adds; ``artifacts``: structured, JSON-serialisable findings (a pruning plan, chosen
    ranks, a sensitivity ranking); ``metrics``: numbers (layers rewritten, error reached).
    ``inserted`` lists the results of enabling passes run to meet this pass's requirements.
    The PassManager writes all of it into ``report.json``.
    """

    changed: bool = False
    notes: list[str] = field(default_factory=list)
    artifacts: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    inserted: list["InsertedPass"] = field(default_factory=list)
    pass_name: str = ""

    @property
    def graph_changed(self) -> bool:
        """Whether the graph changed at all: this pass, or an enabling pass inserted for it."""
        return self.changed or any(i.result.graph_changed for i in self.inserted)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (numpy scalars / arrays become Python numbers / lists)."""
        return {"changed": self.changed, "notes": list(self.notes), "artifacts": jsonable(self.artifacts),
                "metrics": jsonable(self.metrics)}


@dataclass
class InsertedPass:
    """An enabling pass run because ``for_pass`` requires ``requirement``."""

    requirement: str
    for_pass: str
    pass_: "Pass"
    result: PassResult


def jsonable(x: Any) -> Any:
    """``x`` with numpy values, tuples, sets and dataclasses turned into JSON types."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (set, frozenset)):
        return sorted(jsonable(v) for v in x)
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return jsonable(dataclasses.asdict(x))
    if hasattr(x, "as_dict"):
        return jsonable(x.as_dict())
    if isinstance(x, float) and not np.isfinite(x):
        return str(x)
    return x


@dataclass
class PassContext:
    """What a pass may need beyond the graph: inputs to the run, never outputs of it.

    ``calib_data``: named sample inputs for data-driven passes: arrays with a batch dim, or
    (inputs of varying size) lists of such arrays, element i of every input one batch
    (``nnsculpt.runtime.ort``: ``take_samples``, ``batches``, ``is_ragged``);
    ``labels``: integer labels aligned with ``calib_data`` (Taylor importance); ``seed``: for
    anything random; ``finetune(graph, step)``: called between the steps of iterative passes
    (it may train through ``to_torch`` / ``write_back``); ``allow_opset_raise``: whether
    a requirement such as ``opset>=13`` may be met by raising the model's opset.
    """

    calib_data: dict[str, np.ndarray] | None = None
    seed: int = 0
    labels: np.ndarray | None = None
    finetune: Callable[[Graph, int], Any] | None = None
    allow_opset_raise: bool = True
    current_pass: str = ""
    sink: list[str] | None = field(default=None, repr=False)

    def note(self, message: str) -> None:
        """Record a message for the running pass (it lands in its :class:`PassResult` and in
        report.json)."""
        if self.sink is not None:
            self.sink.append(message)
        log.info("[%s] %s", self.current_pass, message)


class Pass:
    """Base class of every pass. Subclasses set ``name``, ``Options`` and ``run``; passes whose
    needs depend on their options override :meth:`requirements`."""

    name: ClassVar[str] = ""
    #: exact passes must not change outputs (≤1e-5 relative); lossy ones report drift
    exact: ClassVar[bool] = True
    #: properties the graph / context must have before ``run`` (see ``passes.requirements``)
    requires: ClassVar[frozenset[str]] = frozenset()
    #: properties the graph has after ``run`` (an enabling pass guarantees what it enables)
    guarantees: ClassVar[frozenset[str]] = frozenset()
    #: advice appended to the error when a requirement cannot be met (by requirement kind)
    requirement_hints: ClassVar[dict[str, str]] = {}
    #: what to try when this (lossy) pass's output drifts past the thresholds (shown with the warning)
    drift_hint: ClassVar[str] = ""

    @dataclass
    class Options:
        pass

    def __init__(self, **options: Any):
        self.options = self.Options(**_coerce_options(self, options))

    def requirements(self) -> frozenset[str]:
        """What this pass, with its options, needs; default: the class's ``requires``."""
        return frozenset(self.requires)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, graph: Graph, ctx: PassContext | None = None) -> PassResult:
        """Meet the requirements (running enabling passes), then run the pass."""
        from .requirements import satisfy

        ctx = ctx or PassContext()
        inserted = satisfy(self, graph, ctx)
        result = self.run_only(graph, ctx)
        result.inserted = inserted + result.inserted
        return result

    def run_only(self, graph: Graph, ctx: PassContext) -> PassResult:
        """Run the pass without meeting its requirements (the PassManager meets them first)."""
        sink: list[str] = []
        prev_pass, prev_sink = ctx.current_pass, ctx.sink
        ctx.current_pass, ctx.sink = self.name, sink
        try:
            result = self.run(graph, ctx)
        finally:
            ctx.current_pass, ctx.sink = prev_pass, prev_sink
        if not isinstance(result, PassResult):
            raise TypeError(f"pass '{self.name}' ({type(self).__name__}.run) returned {type(result).__name__}, "
                            f"not a PassResult")
        result.notes = sink + [n for n in result.notes if n not in sink]
        result.pass_name = self.name
        return result

    # helpers for subclasses
    def changed(self, node: Node) -> Node:
        """Stamp provenance: this pass created/changed ``node``."""
        mark_changed(node, self.name)
        return node

    @classmethod
    def summary(cls) -> str:
        doc = inspect.getdoc(cls) or ""
        return doc.splitlines()[0] if doc else ""

    @classmethod
    def option_specs(cls) -> list[tuple[str, str, Any]]:
        """``(name, type-string, default)`` for every option."""
        hints = typing.get_type_hints(cls.Options)
        out = []
        for f in dataclasses.fields(cls.Options):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            out.append((f.name, _type_name(hints.get(f.name, str)), default))
        return out

    def describe(self) -> str:
        opts = ",".join(f"{k}={format_option_value(v)}" for k, v in dataclasses.asdict(self.options).items())
        return f"{self.name}{{{opts}}}" if opts else self.name

    def options_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.options)


def format_option_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(format_option_value(x) for x in v) + "]"
    return str(v)


def _type_name(t: Any) -> str:
    origin = typing.get_origin(t)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(t))
    if origin in (list, tuple):
        args = typing.get_args(t)
        return f"list[{_type_name(args[0]) if args else 'str'}]"
    if origin is typing.Union or origin is types.UnionType:
        return " | ".join(_type_name(a) for a in typing.get_args(t) if a is not type(None)) + " (optional)"
    return getattr(t, "__name__", str(t))


def _coerce_options(p: Pass, options: Mapping[str, Any]) -> dict[str, Any]:
    hints = typing.get_type_hints(p.Options)
    known = {f.name for f in dataclasses.fields(p.Options)}
    out = {}
    for k, v in options.items():
        key = k.replace("-", "_")
        if key not in known:
            raise PassOptionError(f"pass '{p.name}': unknown option '{k}' (options: {', '.join(sorted(known)) or 'none'})")
        out[key] = coerce_value(p.name, key, v, hints.get(key, str))
    return out


def coerce_value(pass_name: str, key: str, value: Any, t: Any) -> Any:
    """Convert ``value`` (often a string from a pipeline) to type ``t`` or raise PassOptionError."""
    def bad(why: str = ""):
        return PassOptionError(f"pass '{pass_name}': option '{key}' has bad value {value!r}: expected "
                               f"{_type_name(t)}{' (' + why + ')' if why else ''}")

    origin = typing.get_origin(t)
    args = typing.get_args(t)
    if origin is typing.Union or origin is types.UnionType:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
            return None
        errs = []
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce_value(pass_name, key, value, a)
            except PassOptionError as e:
                errs.append(e)
        raise bad()
    if origin is Literal:
        for a in args:
            if value == a or (isinstance(value, str) and str(a) == value):
                return a
        raise bad(f"one of {', '.join(map(str, args))}")
    if origin in (list, tuple):
        inner = args[0] if args else str
        if isinstance(value, str):
            s = value.strip()
            if s.startswith("[") and s.endswith("]"):
                s = s[1:-1]
            items = [x.strip() for x in s.replace(";", ",").split(",") if x.strip()] if s else []
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [value]
        return [coerce_value(pass_name, key, x, inner) for x in items]
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise bad("true or false")
    if t is int:
        if isinstance(value, bool):
            raise bad()
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise bad() from None
        if not np.isfinite(f) or f != int(f):
            raise bad("an integer")
        return int(f)
    if t is float:
        if isinstance(value, bool):
            raise bad()
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise bad() from None
        if not np.isfinite(f):
            raise bad("a finite number")
        return f
    if t is str:
        if isinstance(value, str):
            return value.strip().strip('"').strip("'")
        return str(value)
    return value


# ---------------------------------------------------------------------------- registry
PASSES: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: add a pass to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in PASSES and PASSES[cls.name] is not cls:
        raise ValueError(f"pass name '{cls.name}' registered twice")
    PASSES[cls.name] = cls
    return cls


def get_pass(name: str) -> type[Pass]:
    from . import load_builtin_passes

    load_builtin_passes()
    try:
        return PASSES[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, PASSES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UnknownPassError(f"unknown pass '{name}'{hint}; registered passes: {', '.join(sorted(PASSES))}") from None


def list_passes() -> list[type[Pass]]:
    from . import load_builtin_passes

    load_builtin_passes()
    return [PASSES[k] for k in sorted(PASSES)]
