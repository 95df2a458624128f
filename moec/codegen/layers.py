"""The kernel specification of every MoE layer of a lowered graph.

Contract: ``layer_specs(gm)`` reads a graph after the pass pipeline (any target) and returns one
``KernelSpec`` per ``grouped_gemm_act`` node, in graph order: the router attributes from the
``gate`` (or, for a layer with an expert capacity, the ``route``) that produced its counts, the
FFN attributes from it and from the ``grouped_gemm_combine`` that reads its output, the dtype
from the recorded fake tensors. ``layer_kernels(gm)`` adds split layers (``moec.capture.split``:
a ``gate`` whose counts feed plain ``grouped_gemm``s and no ``grouped_gemm_act``), each with the
kernel groups it runs (``SPLIT_GROUPS``), in graph order. ``graph_layer_specs(model, *args)``
captures and lowers a model first and returns ``layer_kernels``' list. This is what ``moec
codegen`` prints kernels for: the specs come from the IR, not from the model's classes.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch.fx import Node

from moec.codegen.spec import KERNEL_GROUPS, KernelSpec
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


# The kernels a split layer runs: routing, permutation, and its plain grouped GEMMs (forward and
# weight gradient); its combine is the reference op.
SPLIT_GROUPS = ("gate", "permute", "offsets", "grouped_gemm", "grouped_wgrad")


def _downstream(node: Node, op: str) -> list[Node]:
    """Nodes calling moec op ``op`` that read ``node`` or one of its ``getitem``s directly."""
    users = [u for u in node.users if u.op == "call_function" and u.target is operator.getitem] + [node]
    return [v for u in users for v in u.users if moec_op_name(v) == op]


def layer_kernels(gm: torch.fx.GraphModule, target: str | None = None) -> list[tuple[KernelSpec, tuple[str, ...]]]:
    fused = iter(layer_specs(gm, target))
    out = []
    for node in gm.graph.nodes:
        if moec_op_name(node) == "grouped_gemm_act":
            out.append((next(fused), KERNEL_GROUPS))
        elif moec_op_name(node) == "gate" and not _downstream(node, "grouped_gemm_act"):
            gemms = _downstream(node, "grouped_gemm")
            if not gemms:
                continue
            _, rw, rb, cb, kind, top_k, ng, tg, renorm, scaling = node.args
            w_val = node_value(gemms[0].args[3])
            E = w_val.shape[0]
            spec = KernelSpec.from_layer(
                num_experts=E, top_k=RouterKind.parse(kind).out_k(top_k, E), router_kind=kind, num_groups=ng,
                topk_groups=tg, renormalize=renorm, scaling=scaling, has_router_weight=rw is not None,
                has_router_bias=rb is not None, has_correction_bias=cb is not None,
                transposed=gemms[0].args[5], dtype=w_val.dtype, target=target)
            out.append((spec, SPLIT_GROUPS))
    return out


def graph_layer_specs(model: torch.nn.Module, *args: Any,
                      target: str | None = None) -> list[tuple[KernelSpec, tuple[str, ...]]]:
    """Capture ``model`` on ``args``, lower it with the pass pipeline, and read each layer's spec
    and kernel groups (``layer_kernels``)."""
    from moec.capture import capture_graphs
    from moec.passes.pipeline import run_pipeline

    torch.compiler.reset()
    found = []
    for gm in capture_graphs(model, *args):
        lowered, _ = run_pipeline(gm, target="reference")
        found.extend(layer_kernels(lowered, target))
    return found
