"""The IR verifier: a table of rules every ``moec::`` op node in an FX graph must satisfy.

Contract: ``verify(gm)`` runs ``graph.lint()`` and, for each moec op node, the rules of its
op in ``RULES`` over the node's arguments and the fake-tensor values in ``node.meta["val"]``
(when tracing recorded them). It raises ``IRError`` naming the node and the broken rule, and
returns the number of moec op nodes checked.
"""

from __future__ import annotations

from typing import Callable

import torch

from moec import _torch
from moec.ir import ops
from moec.ir.routing import RouterKind, has_capacity


class IRError(ValueError):
    pass


def node_value(x):
    """The fake tensor (or SymInt) tracing recorded for a node, None if it recorded none; a
    non-node argument is returned as is."""
    return x.meta.get("val", x.meta.get("example_value")) if isinstance(x, torch.fx.Node) else x


def _router_kind(kind):
    """(RouterKind or None, why not)."""
    try:
        return RouterKind.parse(kind), ""
    except ValueError as err:
        return None, str(err)


def _router_args(rk, num_experts, top_k, num_groups, topk_groups, renormalize, correction_bias, capacity):
    """The kind's own rule on the other router arguments (``RouterKind.check``)."""
    if rk is None or not isinstance(num_experts, int):
        return True, ""
    try:
        rk.check(num_experts=num_experts, top_k=top_k, num_groups=num_groups, topk_groups=topk_groups,
                 renormalize=renormalize, has_correction_bias=correction_bias is not None,
                 capacity=capacity if isinstance(capacity, int) else None)
    except ValueError as err:
        return False, str(err)
    return True, ""


def _route_rules(a):
    logits, bias, kind, top_k = node_value(a[0]), a[1], a[2], a[3]
    rk, why = _router_kind(kind)
    yield rk is not None, why
    if logits is not None:
        yield logits.is_floating_point(), "logits must be floating point"
        yield 1 <= top_k <= logits.shape[-1], f"top_k {top_k} outside 1..{logits.shape[-1]} experts"
        yield _router_args(rk, logits.shape[-1], top_k, a[4], a[5], a[6], bias, a[8])


def _dispatch_rules(a):
    idx = node_value(a[0])
    if isinstance(a[1], int):
        yield a[1] >= 1, "num_experts must be positive"
    if idx is not None:
        yield idx.dtype == torch.int64, "idx must be int64"


def _ffn_rules(a, stacked=True):
    x, w_in, w_out = node_value(a[0]), node_value(a[3 if stacked else 1]), node_value(a[4 if stacked else 2])
    act = a[7 if stacked else 5]
    yield act in ops.ACTIVATIONS, f"activation {act!r} is not one of {ops.ACTIVATIONS}"
    if x is not None and w_in is not None and w_out is not None:
        yield w_in.dim() == w_out.dim() == (3 if stacked else 2), "expert weights have the wrong rank"
        yield x.dtype == w_in.dtype == w_out.dtype, "tokens and expert weights differ in dtype"
        if stacked:
            yield w_in.shape[0] == w_out.shape[0], "w_in and w_out disagree on the number of experts"


def _combine_rules(a):
    y, slot, w = node_value(a[0]), node_value(a[1]), node_value(a[2])
    if y is not None and slot is not None and w is not None:
        yield y.shape[0] == slot.shape[0], "one expert output row per routed slot"


def _gate_rules(a):
    x, router_w, kind, top_k = node_value(a[0]), node_value(a[1]), a[4], a[5]
    rk, why = _router_kind(kind)
    yield rk is not None, why
    yield rk is None or not has_capacity(rk, 0), f"router kind {kind!r} has an expert capacity: it must stay a route"
    if x is not None:
        E = x.shape[-1] if router_w is None else router_w.shape[0]
        yield x.is_floating_point(), "gate input must be floating point"
        yield 1 <= top_k <= E, f"top_k {top_k} outside 1..{E} experts"
        yield _router_args(rk, E, top_k, a[6], a[7], a[8], a[3], 0)
        if router_w is not None:
            yield router_w.dim() == 2 and router_w.shape[1] == x.shape[-1], "router weight must be [E, H]"


def _grouped_rules(x_pos, w_pos, act_pos=None, counts_pos=2):
    def rules(a):
        x, w, counts = node_value(a[x_pos]), node_value(a[w_pos]), node_value(a[counts_pos])
        if act_pos is not None:
            yield a[act_pos] in ops.ACTIVATIONS, f"activation {a[act_pos]!r} is not one of {ops.ACTIVATIONS}"
        if x is not None and w is not None:
            yield w.dim() == 3, "expert weights must be [E, ., .]"
            yield x.dtype == w.dtype, "rows and expert weights differ in dtype"
            if counts is not None:
                yield counts.shape[0] == w.shape[0], "one count per expert weight"

    return rules


def _grouped_combine_rules(a):
    yield from _grouped_rules(0, 3)(a)
    rows, slot = node_value(a[0]), node_value(a[1])
    if rows is not None and slot is not None:
        yield rows.shape[0] == slot.shape[0], "one row per routed slot"


def _weight_grad_rules(x_pos, counts_pos, w_pos, transposed_pos, token_pos=None):
    """A weight-gradient op: the grouped rules, and its first argument, the gradient at the
    GEMM's output, has one row per GEMM row and the weight's output width."""
    grouped = _grouped_rules(x_pos, w_pos, counts_pos=counts_pos)

    def rules(a):
        yield from grouped(a)
        d_out, x, w = node_value(a[0]), node_value(a[x_pos]), node_value(a[w_pos])
        token = node_value(a[token_pos]) if token_pos is not None else None
        if d_out is not None and w is not None:
            width = w.shape[-1] if a[transposed_pos] else w.shape[-2]
            yield d_out.dim() == 2 and d_out.shape[-1] == width, "the output gradient must be [rows, out width]"
            rows = token.shape[0] if token is not None else None if x is None else x.numel() // x.shape[-1]
            if rows is not None:
                yield d_out.shape[0] == rows, "one output-gradient row per GEMM row"

    return rules


RULES: dict[str, Callable] = {
    "route": _route_rules,
    "dispatch": _dispatch_rules,
    "expert_ffn": _ffn_rules,
    "combine": _combine_rules,
    "shared_expert": lambda a: _ffn_rules(a, stacked=False),
    "gate": _gate_rules,
    "permute": _dispatch_rules,
    "grouped_gemm": _grouped_rules(0, 3),
    "activation": lambda a: iter([(a[1] in ops.ACTIVATIONS, f"activation {a[1]!r} is not one of {ops.ACTIVATIONS}")]),
    "grouped_gemm_act": _grouped_rules(0, 3, act_pos=5),
    "grouped_gemm_combine": _grouped_combine_rules,
    # The backward of the two fused ops, split into input- and weight-gradient ops (moec.ir.lowered).
    "grouped_gemm_act_backward_input": _grouped_rules(1, 4, act_pos=6, counts_pos=3),
    "grouped_gemm_act_backward_weight": _weight_grad_rules(1, 3, 4, 6, token_pos=2),
    "grouped_gemm_combine_backward_input": _grouped_rules(1, 4, counts_pos=3),
    "grouped_gemm_combine_backward_weight": _weight_grad_rules(1, 2, 3, 5),
}


NAMESPACES = ("moec", "moec_cpu", "moec_triton")


def _qualified(node: torch.fx.Node) -> tuple[str, str] | None:
    if node.op != "call_function":
        return None
    target = node.target
    if isinstance(target, _torch.OpOverload):
        name = target.name()
    elif isinstance(target, _torch.OpOverloadPacket):
        name = target._qualified_op_name
    else:
        return None
    namespace, _, rest = name.partition("::")
    if namespace in NAMESPACES:
        return namespace, rest.split(".", 1)[0]
    return None


def moec_op_name(node: torch.fx.Node) -> str | None:
    """The moec op a node calls ("route", "grouped_gemm_act", ...) in any moec namespace, else None."""
    q = _qualified(node)
    return None if q is None else q[1]


def moec_op_namespace(node: torch.fx.Node) -> str | None:
    """"moec" (reference), "moec_cpu" or "moec_triton" for a moec op node, else None."""
    q = _qualified(node)
    return None if q is None else q[0]


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
