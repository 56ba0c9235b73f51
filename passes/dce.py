"""Dead-code elimination."""

from __future__ import annotations

from dataclasses import dataclass

from ..ir.graph import Graph
from .base import Pass, PassContext, PassResult, register
from ._util import is_default_domain, is_used


@register
class DeadCodeElimination(Pass):
    """Remove nodes whose outputs nobody uses, and initializers nobody reads.

    Rewrite rules:

    * a node none of whose outputs is used -- no explicit user, no implicit use (a name
      read by an ``If``/``Loop``/``Scan`` body of another node) and not a graph output --
      is removed; this repeats until nothing changes, so whole dead chains and dead
      branches disappear (including dead subgraph ops: ONNX ops are pure);
    * an initializer with no user (explicit or implicit) that is not a graph output is
      removed (option ``remove_unused_initializers``).

    Graph inputs are never removed (the model interface does not change) and graph
    outputs are always kept. With ``keep_custom_domains`` nodes of non-default domains
    are kept even when unused (for custom ops with side effects).

    Preconditions: none. Exact: the outputs do not change.
    """

    name = "dce"
    exact = True

    @dataclass
    class Options:
        remove_unused_initializers: bool = True
        keep_custom_domains: bool = False

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        opts = self.options
        removed_nodes = 0
        kept_custom: list[str] = []
        while True:
            progress = False
            # reverse order: a dead consumer is removed before its producer is examined,
            # so a dead chain goes in a single sweep
            for node in reversed(list(graph.nodes)):
                if any(is_used(graph, o) for o in node.outputs):
                    continue
                if opts.keep_custom_domains and not is_default_domain(node):
                    if node.name not in kept_custom:
                        kept_custom.append(node.name)
                    continue
                graph.remove_node(node)
                removed_nodes += 1
                progress = True
            if not progress:
                break
        removed_inits = 0
        if opts.remove_unused_initializers:
            for v in list(graph.initializers.values()):
                if not is_used(graph, v):
                    graph.remove_initializer(v)
                    removed_inits += 1
        if kept_custom:
            ctx.note(f"kept {len(kept_custom)} unused custom-domain node(s): {', '.join(kept_custom[:10])}")
        if removed_nodes or removed_inits:
            ctx.note(f"removed {removed_nodes} dead node(s) and {removed_inits} unused initializer(s)")
        return PassResult(changed=bool(removed_nodes or removed_inits),
                          metrics={"removed_nodes": removed_nodes, "removed_initializers": removed_inits})
