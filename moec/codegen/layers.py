"""The kernel specification of every MoE layer of a lowered graph.

Contract: ``layer_specs(gm)`` reads a graph after the pass pipeline (any target) and returns one
``KernelSpec`` per ``grouped_gemm_act`` node, in graph order: the router attributes from the
``gate`` (or, for a layer with an expert capacity, the ``route``) that produced its counts, the
FFN attributes from it and from the ``grouped_gemm_combine`` that reads its output, the dtype
from the recorded fake tensors. ``graph_layer_specs(model, *args)`` captures and lowers a model
first. This is what ``moec codegen`` prints kernels for: the specs come from the IR, not from
the model's classes.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Node

from moec.codegen.spec import KernelSpec
from moec.ir.routing import RouterKind
from moec.ir.verify import moec_op_name, node_value


def _producer(node: Node) -> Node:
    if node.op == "call_function" and node.target is operator.getitem:
        return node.args[0]
    return node


def _nearest(node: Node, op: str) -> Node:
    """The closest ancestor of ``node`` (itself included) calling moec op ``op``."""
    frontier, seen = [node], set()
    while frontier:
        n = frontier.pop(0)
        if moec_op_name(n) == op:
            return n
        seen.add(n)
        frontier += [a for a in n.all_input_nodes if a not in seen]
    raise ValueError(f"moec: no {op} feeds {node.name}; the graph is not a lowered moec graph")


def layer_specs(gm: torch.fx.GraphModule, target: str | None = None) -> list[KernelSpec]:
    specs = []
    for node in gm.graph.nodes:
        if moec_op_name(node) != "grouped_gemm_act":
            continue
        x, token_N, counts, w_in, b_in, activation, transposed, interleaved, alpha, limit = node.args
        router = _producer(counts)
        combine = next((u for u in node.users if moec_op_name(u) == "grouped_gemm_combine"), None)
        w_val = node_value(w_in)
        kw: dict[str, Any] = dict(
            num_experts=w_val.shape[0] if w_val is not None else node_value(counts).shape[0],
            activation=activation, interleaved=interleaved, alpha=alpha, limit=limit, transposed=transposed,
            has_bias_in=b_in is not None, has_bias_out=combine is not None and combine.args[4] is not None,
            dtype=(w_val.dtype if w_val is not None else torch.float32), target=target,
        )
        if moec_op_name(router) == "gate":
            _, rw, rb, cb, kind, top_k, ng, tg, renorm, scaling = router.args
            kw.update(has_router_weight=rw is not None, has_router_bias=rb is not None)
        else:  # dispatch of a route with capacity
            route = _nearest(router.args[0], "route")
            _, cb, kind, top_k, ng, tg, renorm, scaling, _capacity = route.args
            kw.update(has_router_weight=False)
        # The slots per token (E for expert choice) are what the permute and combine kernels see.
        kw.update(router_kind=kind, top_k=RouterKind.parse(kind).out_k(top_k, kw["num_experts"]), num_groups=ng,
                  topk_groups=tg, renormalize=renorm, scaling=scaling, has_correction_bias=cb is not None)
        specs.append(KernelSpec.from_layer(**kw))
    return specs


def graph_layer_specs(model: torch.nn.Module, *args: Any, target: str | None = None) -> list[KernelSpec]:
    """Capture ``model`` on ``args``, lower it with the pass pipeline, and read the layer specs."""
    from moec.capture import capture_graphs
    from moec.passes.pipeline import run_pipeline

    torch.compiler.reset()
    specs: list[KernelSpec] = []
    for gm in capture_graphs(model, *args):
        lowered, _ = run_pipeline(gm, target="reference")
        specs.extend(layer_specs(lowered, target))
    return specs
