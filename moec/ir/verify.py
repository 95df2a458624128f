"""The IR verifier: a table of rules every ``moec::`` op node in an FX graph must satisfy.

Contract: ``verify(gm)`` runs ``graph.lint()`` and, for each moec op node, the rules of its
op in ``RULES`` over the node's arguments and the fake-tensor values in ``node.meta["val"]``
(when tracing recorded them). It raises ``IRError`` naming the node and the broken rule, and
returns the number of moec op nodes checked.
"""

from __future__ import annotations

from typing import Callable

import torch

from moec.ir import ops


class IRError(ValueError):
    pass


def _val(x):
    return x.meta.get("val", x.meta.get("example_value")) if isinstance(x, torch.fx.Node) else x


def _route_rules(a):
    logits, _bias, kind, top_k = _val(a[0]), a[1], a[2], a[3]
    yield kind in ops.ROUTER_KINDS, f"router kind {kind!r} is not one of {ops.ROUTER_KINDS}"
    if logits is not None:
        yield logits.is_floating_point(), "logits must be floating point"
        yield 1 <= top_k <= logits.shape[-1], f"top_k {top_k} outside 1..{logits.shape[-1]} experts"


def _dispatch_rules(a):
    idx = _val(a[0])
    yield a[1] >= 1, "num_experts must be positive"
    if idx is not None:
        yield idx.dtype == torch.int64, "idx must be int64"


def _ffn_rules(a, stacked=True):
    x, w_in, w_out = _val(a[0]), _val(a[3 if stacked else 1]), _val(a[4 if stacked else 2])
    act = a[7 if stacked else 5]
    yield act in ops.ACTIVATIONS, f"activation {act!r} is not one of {ops.ACTIVATIONS}"
    if x is not None and w_in is not None and w_out is not None:
        yield w_in.dim() == w_out.dim() == (3 if stacked else 2), "expert weights have the wrong rank"
        yield x.dtype == w_in.dtype == w_out.dtype, "tokens and expert weights differ in dtype"
        if stacked:
            yield w_in.shape[0] == w_out.shape[0], "w_in and w_out disagree on the number of experts"


def _combine_rules(a):
    y, slot, w = _val(a[0]), _val(a[1]), _val(a[2])
    if y is not None and slot is not None and w is not None:
        yield y.shape[0] == slot.shape[0], "one expert output row per routed slot"


RULES: dict[str, Callable] = {
    "route": _route_rules,
    "dispatch": _dispatch_rules,
    "expert_ffn": _ffn_rules,
    "combine": _combine_rules,
    "shared_expert": lambda a: _ffn_rules(a, stacked=False),
}


def moec_op_name(node: torch.fx.Node) -> str | None:
    """The moec op a node calls ("route", ...), else None."""
    if node.op != "call_function":
        return None
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        name = target.name()
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = target._qualified_op_name
    else:
        return None
    if name.startswith("moec::"):
        return name.split("::", 1)[1].split(".", 1)[0]
    return None


def verify(gm: torch.fx.GraphModule) -> int:
    gm.graph.lint()
    checked = 0
    for node in gm.graph.nodes:
        op = moec_op_name(node)
        if op is None:
            continue
        checked += 1
        for ok, msg in RULES.get(op, lambda a: ())(node.args):
            if not ok:
                raise IRError(f"moec IR: node {node.name} ({op}): {msg}")
    return checked
