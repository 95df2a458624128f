"""fuse_gating: router GEMM + ``route`` + ``dispatch`` -> ``gate`` + ``permute``.

Contract: for every ``moec::route`` without an expert capacity, the routing becomes one
``moec::gate`` (scores, correction bias, group-limited top-k, renormalisation by sum or p-norm,
scaling and the per-expert counts in one op), and every ``moec::dispatch`` of its choice becomes
``moec::permute`` taking the gate's counts. When the logits are ``linear(x, w, b)`` used by the
route alone, the GEMM moves into the gate too. Returns the graph and the number of routes fused.
Numerics: preserved; ``gate`` computes exactly the linear and route it replaces.

Preconditions: route nodes are only read through ``getitem`` (as dynamo and AOT graphs do).
Unused pure computations on the logits are erased first (a router module's own top-k, left by
capture when it calls the module for its logits).
Left alone: routes with a capacity (``moec.ir.routing.has_capacity``: a fixed ``capacity``, a
``cf=F`` kind, or ``expert_choice``; the drops need the dispatch order, so they keep
``route``/``dispatch``), and dispatches whose expert count differs from the logits' width.

Pseudo-code::

    for route in routes if not has_capacity(route.kind, route.capacity):
        x, w, b = linear_args(route.logits) if the logits feed only this route else (logits, None, None)
        gate = moec.gate(x, w, b, route.correction_bias, *route.attrs)
        route[0], route[1] -> gate[0], gate[1]
        for dispatch of gate[1]: token, slot = moec.permute(gate[1], gate[2]); dispatch[2] -> gate[2]
"""

from __future__ import annotations

import torch
from torch.fx import Node

from moec.ir.routing import has_capacity
from moec.ir.verify import moec_op_name, node_value
from moec.passes.util import getitems, mark, only_getitem_users, op, op_nodes, output

NAME = "fuse_gating"
_LINEARS = {torch._C._nn.linear, torch.nn.functional.linear, torch.ops.aten.linear.default}


def _linear_args(logits: Node) -> tuple | None:
    if logits.op != "call_function" or logits.target not in _LINEARS or len(logits.users) != 1:
        return None
    args = list(logits.args) + [None] * (3 - len(logits.args))
    x, w, b = args[0], logits.kwargs.get("weight", args[1]), logits.kwargs.get("bias", args[2])
    if not all(isinstance(t, Node) or t is None for t in (x, w, b)) or w is None:
        return None
    return x, w, b


def fuse_gating(gm: torch.fx.GraphModule, example_inputs=None) -> tuple[torch.fx.GraphModule, int]:
    graph, changed = gm.graph, 0
    for route in op_nodes(gm, "route"):
        logits, correction_bias, kind, top_k, num_groups, topk_groups, renormalize, scaling, capacity = route.args
        if has_capacity(kind, capacity) or not only_getitem_users(route):
            continue
        _drop_dead_uses(graph, logits)
        fused = _linear_args(logits)
        x, w, b = fused if fused is not None else (logits, None, None)
        with graph.inserting_before(route):
            gate = mark(graph.call_function(op("gate"), (x, w, b, correction_bias, kind, top_k, num_groups,
                                                          topk_groups, renormalize, scaling)), NAME, route)
        weights, idx, counts = (output(graph, gate, i) for i in range(3))
        outs = getitems(route)
        for g in outs.get(0, []):
            g.replace_all_uses_with(weights)
        for g in outs.get(1, []):
            g.replace_all_uses_with(idx)
        known = node_value(logits if fused is None else w)  # [..., E] logits or the [E, H] router weight
        E = None if known is None else (known.shape[-1] if fused is None else known.shape[0])
        for dispatch in [u for u in idx.users if moec_op_name(u) == "dispatch" and u.args[0] is idx]:
            if E is not None and E != dispatch.args[1]:
                continue
            with graph.inserting_before(dispatch):
                permute = mark(graph.call_function(op("permute"), (idx, counts)), NAME, dispatch)
            douts = getitems(dispatch)
            for i in (0, 1):
                if douts.get(i):
                    new = output(graph, permute, i)
                    for g in douts[i]:
                        g.replace_all_uses_with(new)
            for g in douts.get(2, []):
                g.replace_all_uses_with(counts)
        for n in [*route.users, route] + ([logits] if fused is not None else []) + [weights, idx, counts]:
            if not n.users:
                graph.erase_node(n)
        changed += 1
    _erase_dead(gm, "dispatch")
    gm.recompile()
    return gm, changed


def _pure(node: Node) -> bool:
    name = getattr(node.target, "__name__", str(node.target))
    return node.op in ("call_function", "call_method") and not name.endswith("_") and not node.is_impure()


def _drop_dead_uses(graph: torch.fx.Graph, logits: Node) -> None:
    """Erase the unused pure computations on ``logits`` (a router module's own softmax and top-k,
    left when capture calls the module for its logits), so that the route is their only user.
    Nothing that writes in place is touched: dynamo graphs hold ``copy_`` calls without users."""
    seen, stack = {logits}, [logits]
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen.add(user)
                stack.append(user)
    seen.discard(logits)
    for node in reversed(list(graph.nodes)):
        if node in seen and not node.users and _pure(node):
            graph.erase_node(node)


def _erase_dead(gm: torch.fx.GraphModule, name: str) -> None:
    for node in op_nodes(gm, name):
        if all(not u.users for u in node.users):
            for u in list(node.users):
                gm.graph.erase_node(u)
            gm.graph.erase_node(node)
