"""Graph helpers shared by the passes: finding moec op nodes and rewiring multi-output ops."""

from __future__ import annotations

import operator
from typing import Iterator

import torch
from torch.fx import Node

from moec import _torch
from moec.ir.verify import moec_op_name, moec_op_namespace


def op_nodes(gm: torch.fx.GraphModule, name: str, namespace: str = "moec") -> Iterator[Node]:
    """Nodes calling ``namespace::name`` (any overload), in graph order."""
    for node in list(gm.graph.nodes):
        if moec_op_name(node) == name and moec_op_namespace(node) == namespace:
            yield node


def op(name: str, namespace: str = "moec") -> _torch.OpOverload:
    return getattr(getattr(torch.ops, namespace), name).default


def getitems(node: Node) -> dict[int, list[Node]]:
    """The ``operator.getitem`` users of a multi-output node, by output index."""
    out: dict[int, list[Node]] = {}
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem:
            out.setdefault(user.args[1], []).append(user)
    return out


def only_getitem_users(node: Node) -> bool:
    return all(u.op == "call_function" and u.target is operator.getitem for u in node.users)


def output(graph: torch.fx.Graph, node: Node, index: int) -> Node:
    """``node[index]`` as a node, placed right after ``node``."""
    with graph.inserting_after(node):
        return graph.call_function(operator.getitem, (node, index))


def mark(node: Node, pass_name: str, like: Node | None = None) -> Node:
    """Record in ``node.meta["moec"]`` which pass made the node (and keep the source's stack trace)."""
    meta = dict(like.meta.get("moec", {})) if like is not None else {}
    meta["pass"] = pass_name
    node.meta["moec"] = meta
    if like is not None and "stack_trace" in like.meta:
        node.meta["stack_trace"] = like.meta["stack_trace"]
    return node
