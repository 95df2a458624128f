"""fuse_inference: a CPU layer's four ops -> one ``moec_cpu::moe_inference``, when no gradient is computed.

Contract: ``fuse_inference(gm, example_inputs)`` replaces each chain
``moec_cpu::gate -> permute -> grouped_gemm_act -> grouped_gemm_combine`` whose intermediates
(routing weights, expert ids, counts, token and slot orders, activations) are read by nothing
else with one ``moec_cpu::moe_inference`` call, and returns the graph and the number of chains
fused. It runs only on graphs that will compute no gradient (grad mode off at compile time, or
no example input requiring grad; without example inputs, only with grad mode off): the fused op
has no autograd formula. Numerics: preserved bitwise
(the fused op runs the four ops' bodies in the same order).

Why: at a few tokens a layer's arithmetic takes microseconds, and each custom op's dispatch
(Python autograd wrapper, argument checks, the kernel's own set-up) costs tens; one dispatch per
layer instead of four is most of moec's overhead per layer at decode sizes.

Preconditions: ``select_impl`` ran with the ``cpu`` target (the chain is ``moec_cpu`` ops).
Left alone: reference or Triton ops, chains with other readers of an intermediate (expert
parallelism, profiling), combine and activation with different layouts.

Pseudo-code::

    if gradients are needed: return
    for comb in moec_cpu.grouped_gemm_combine nodes:
        act = comb.a; perm, gate = the producers of its slot order and weights
        if act, perm, gate form one chain read only by each other:
            comb -> moe_inference(gate.args, act.x, act.w_in, act.b_in, comb.w_out, comb.b_out, act attrs)
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
from torch.fx import Node

from moec.ir.verify import moec_op_name, moec_op_namespace
from moec.passes.util import mark

NAME = "fuse_inference"
NAMESPACE = "moec_cpu"


def _needs_grad(example_inputs) -> bool:
    """Whether the graph's compiled form will compute gradients (as AOT autograd decides): grad
    mode on and an input requiring grad. Without example inputs, grad mode on counts as yes."""
    if not torch.is_grad_enabled():
        return False
    if example_inputs is None:
        return True
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)


def _is(node, name: str) -> bool:
    return isinstance(node, Node) and moec_op_name(node) == name and moec_op_namespace(node) == NAMESPACE


def _item(node, of: Node, index: int) -> bool:
    return (isinstance(node, Node) and node.op == "call_function" and node.target is operator.getitem
            and node.args[0] is of and node.args[1] == index)


def chain(comb: Node) -> Optional[tuple[Node, Node, Node, list[Node]]]:
    """(gate, permute, activation GEMM, getitem nodes) when ``comb`` ends a private chain."""
    if comb.kwargs or len(comb.args) != 7:
        return None
    act, slot, counts, _, _, weights, transposed = comb.args
    if not _is(act, "grouped_gemm_act") or act.kwargs or len(act.users) != 1:
        return None
    x_ffn, token, counts_a, _, _, _, transposed_a, _, _, _ = act.args
    if transposed_a != transposed or not isinstance(slot, Node) or not isinstance(token, Node):
        return None
    perm = slot.args[0] if slot.op == "call_function" and slot.target is operator.getitem else None
    if not _is(perm, "permute") or perm.kwargs or not (_item(slot, perm, 1) and _item(token, perm, 0)):
        return None
    idx, counts_p = perm.args
    gate = counts.args[0] if isinstance(counts, Node) and counts.target is operator.getitem else None
    if not _is(gate, "gate") or gate.kwargs:
        return None
    if not (_item(counts, gate, 2) and counts_a is counts and counts_p is counts and _item(idx, gate, 1)
            and _item(weights, gate, 0)):
        return None
    readers = {weights: {comb}, idx: {perm}, counts: {perm, act, comb}, token: {act}, slot: {comb}}
    if any(set(n.users) != want for n, want in readers.items()):
        return None
    if set(gate.users) != {weights, idx, counts} or set(perm.users) != {token, slot}:
        return None
    return gate, perm, act, [weights, idx, counts, token, slot]


def replace_chain(graph: torch.fx.Graph, comb: Node, found: tuple, target, pass_name: str) -> Node:
    """Replace the chain ``found`` (``chain(comb)``) with one call of ``target`` taking the gate's
    arguments, then the activation GEMM's input, ``w_in``, ``b_in``, the combine's ``w_out``,
    ``b_out`` and the activation attributes (``moe_inference``'s signature); erase the chain."""
    gate, perm, act, items = found
    x_ffn, _, _, w_in, b_in, activation, transposed, interleaved, alpha, limit = act.args
    _, _, _, w_out, b_out, _, _ = comb.args
    with graph.inserting_before(comb):
        new = mark(graph.call_function(target, (*gate.args, x_ffn, w_in, b_in, w_out, b_out, activation, transposed,
                                                interleaved, alpha, limit)), pass_name, comb)
    new.meta.update({k: v for k, v in comb.meta.items() if k in ("val", "tensor_meta")})
    comb.replace_all_uses_with(new)
    for node in (comb, act, *[i for i in items if i.target is operator.getitem and i.args[0] is perm],
                 perm, *[i for i in items if i.args[0] is gate], gate):
        graph.erase_node(node)
    return new


def fuse_inference(gm: torch.fx.GraphModule, example_inputs=None) -> tuple[torch.fx.GraphModule, int]:
    if _needs_grad(example_inputs):
        return gm, 0
    graph, changed = gm.graph, 0
    for comb in [n for n in graph.nodes if _is(n, "grouped_gemm_combine")]:
        found = chain(comb)
        if found is None:
            continue
        replace_chain(graph, comb, found, torch.ops.moec_cpu.moe_inference.default, NAME)
        changed += 1
    if changed:
        graph.lint()
        gm.recompile()
    return gm, changed
