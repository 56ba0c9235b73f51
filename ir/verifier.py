"""IR verifier: structural invariants every pass must keep.

Checked: SSA (one producer per value, unique names), use-def consistency, no dangling
values (every input is a graph input, an initializer or produced earlier: topological
order), graph outputs defined, dtypes known on inputs/outputs, and weight shapes agree
with attributes for Conv / ConvTranspose / Gemm / BatchNormalization / MatMul weights.
"""

from __future__ import annotations

from .errors import VerificationError
from .graph import Graph


def verify(g: Graph) -> None:
    """Raise :class:`VerificationError` listing every broken invariant of ``g``."""
    errors: list[str] = []
    seen_nodes: set[str] = set()
    defined: set[int] = {id(v) for v in g.inputs} | {id(v) for v in g.initializers.values()}
    produced: dict[str, str] = {}
    for v in g.inputs:
        if v.dtype is None:
            errors.append(f"graph input '{v.name}' has no dtype")
    for name, v in g.initializers.items():
        if v.const is None:
            errors.append(f"initializer '{name}' holds no array")
        if g.values.get(name) is not v:
            errors.append(f"initializer '{name}' not registered under its name")
    for n in g.nodes:
        if n.name in seen_nodes:
            errors.append(f"node name '{n.name}' is not unique")
        seen_nodes.add(n.name)
        if n.graph is not g:
            errors.append(f"node '{n.name}' does not point back to the graph")
        for i, v in enumerate(n.inputs):
            if v is None:
                continue
            if id(v) not in defined:
                where = "later" if v.producer is not None and v.producer.graph is g else "nowhere"
                errors.append(f"node '{n.name}' ({n.op_type}) input {i} '{v.name}' is defined {where}")
            if (n, i) not in v._uses:
                errors.append(f"use list of '{v.name}' misses node '{n.name}' input {i}")
        for v in n.implicit_inputs:
            if id(v) not in defined:
                errors.append(f"node '{n.name}' captures '{v.name}' which is not defined before it")
        for o in n.outputs:
            if o.producer is not n:
                errors.append(f"value '{o.name}' does not name node '{n.name}' as producer")
            if o.name in produced:
                errors.append(f"value '{o.name}' produced twice ('{produced[o.name]}' and '{n.name}')")
            if o.name in g.initializers:
                errors.append(f"value '{o.name}' is both an initializer and produced by '{n.name}'")
            produced[o.name] = n.name
            if g.values.get(o.name) is not o:
                errors.append(f"value '{o.name}' (output of '{n.name}') not registered under its name")
            defined.add(id(o))
        errors.extend(_check_weights(n))
    for v in g.iter_values():
        for user, idx in v._uses:
            if user.graph is not g:
                errors.append(f"value '{v.name}' lists removed node '{user.name}' as a user")
            elif idx >= 0 and (idx >= len(user.inputs) or user.inputs[idx] is not v):
                errors.append(f"value '{v.name}' use ({user.name}, {idx}) is stale")
    for v in g.outputs:
        if id(v) not in defined:
            errors.append(f"graph output '{v.name}' is not defined")
    if len({v.name for v in g.outputs}) != len(g.outputs):
        errors.append("graph outputs are not unique")
    if errors:
        raise VerificationError(f"graph '{g.name}' fails verification ({len(errors)} problems):\n  "
                                + "\n  ".join(errors[:50]))


def _check_weights(n) -> list[str]:
    errs: list[str] = []
    ins = n.inputs
    if n.domain not in ("", "ai.onnx"):
        return errs
    w = ins[1] if len(ins) > 1 else None
    if n.op_type in ("Conv", "ConvTranspose") and w is not None and w.shape is not None:
        group = int(n.attrs.get("group", 1))
        ks = n.attrs.get("kernel_shape")
        if ks is not None and list(w.shape[2:]) != list(ks):
            errs.append(f"{n.op_type} '{n.name}': weight spatial dims {list(w.shape[2:])} != kernel_shape {list(ks)}")
        x = ins[0]
        if x is not None and x.shape is not None and len(x.shape) >= 2 and isinstance(x.shape[1], int) \
                and isinstance(w.shape[0], int) and isinstance(w.shape[1], int):
            cin = x.shape[1]
            wc = w.shape[1] * group if n.op_type == "Conv" else w.shape[0]
            if wc != cin:
                errs.append(f"{n.op_type} '{n.name}': input has {cin} channels but weight expects {wc} (group={group})")
        if len(ins) > 2 and ins[2] is not None and ins[2].shape is not None:
            m = w.shape[0] if n.op_type == "Conv" else (w.shape[1] * group if isinstance(w.shape[1], int) else None)
            if m is not None and tuple(ins[2].shape) != (m,):
                errs.append(f"{n.op_type} '{n.name}': bias shape {ins[2].shape} != ({m},)")
    elif n.op_type == "Gemm" and w is not None and w.shape is not None and len(w.shape) == 2:
        a = ins[0]
        k_b = w.shape[1] if n.attrs.get("transB", 0) else w.shape[0]
        if a is not None and a.shape is not None and len(a.shape) == 2 and isinstance(a.shape[1 - n.attrs.get("transA", 0)], int):
            k_a = a.shape[0] if n.attrs.get("transA", 0) else a.shape[1]
            if isinstance(k_b, int) and k_a != k_b:
                errs.append(f"Gemm '{n.name}': A has K={k_a} but B has K={k_b}")
    elif n.op_type == "BatchNormalization" and len(ins) >= 5:
        # only concrete sizes can conflict: two symbolic dims (``unk__4``, ``unk__122``) may be equal
        sizes = {tuple(v.shape) for v in ins[1:5] if v is not None and v.shape is not None
                 and all(isinstance(d, int) and d >= 0 for d in v.shape)}
        if len(sizes) > 1:
            errs.append(f"BatchNormalization '{n.name}': scale/bias/mean/var shapes differ: {sorted(sizes)}")
        x = ins[0]
        if sizes and x is not None and x.shape is not None and len(x.shape) > 1 and isinstance(x.shape[1], int):
            (s,) = list(sizes)[:1]
            if s and s[0] != x.shape[1]:
                errs.append(f"BatchNormalization '{n.name}': {s[0]} params for {x.shape[1]} channels")
    elif n.op_type == "MatMul" and w is not None and w.is_const and w.shape is not None and len(w.shape) >= 2:
        a = ins[0]
        if a is not None and a.shape is not None and a.shape and isinstance(a.shape[-1], int) \
                and a.shape[-1] != w.shape[-2]:
            errs.append(f"MatMul '{n.name}': A has K={a.shape[-1]} but weight has K={w.shape[-2]}")
    return errs
