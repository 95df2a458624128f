"""profile_routing: record every MoE layer's top-k choice into a ``RoutingProfiler``.

Contract: ``profile_routing(gm, example_inputs=None, *, profiler)`` inserts, after the expert
indices ``idx_TK`` of every ``moec::route`` (and of every ``moec::gate``, for graphs already
lowered), ``moec::record_routing(idx_TK, profiler.id, layer, E)``. The op has an ordered side
effect (``moec.runtime.profiler``), so AOT autograd and Inductor keep it in the graph; it returns
nothing and is read by no other node. ``layer`` is the MoE layer's module path: the innermost
module of the node's ``nn_module_stack`` that the profiler knows (``profiler.bind(model)``, which
``moec.compile(profile=...)`` calls), else the innermost module. ``E`` is the bound layer's expert
count, else the logits' (or router weight's) width. Returns the graph and the number of records
inserted. Running it twice inserts nothing the second time.

Numerics: preserved (the graph's outputs are untouched). Not in the default pipeline: the backend
runs it first when its ``profile`` option is set.

Pseudo-code::

    for r in nodes calling moec.route or moec.gate:
        idx = r[1] (made when the graph reads no r[1])
        if idx has no record_routing user:
            record_routing(idx, profiler.id, layer_of(r), E_of(r))
"""

from __future__ import annotations

import torch

from moec.ir.verify import moec_op_name, moec_op_namespace, node_value
from moec.passes.util import getitems, mark, output
from moec.runtime.profiler import RoutingProfiler, module_path

NAME = "profile_routing"


def _layer(node: torch.fx.Node, profiler: RoutingProfiler) -> str:
    paths = [module_path(v[0]) for v in (node.meta.get("nn_module_stack") or {}).values()]
    known = [p for p in paths if p in profiler.bound_layers]
    if known:
        return known[-1]
    return paths[-1] if paths else node.name


def _num_experts(node: torch.fx.Node, layer: str, profiler: RoutingProfiler) -> int:
    if layer in profiler.bound_layers:
        return profiler.bound_layers[layer]
    if moec_op_name(node) == "gate" and node.args[1] is not None:
        w = node_value(node.args[1])  # router weight [E, H]
        if w is not None:
            return int(w.shape[0])
    logits = node_value(node.args[0])  # route: logits [T, E]; gate without a GEMM: the same
    if logits is None:
        raise ValueError(f"moec: profile_routing cannot tell the expert count of {node.name} (layer {layer}): "
                         "bind the profiler to the model (profiler.bind(model)) before compiling")
    return int(logits.shape[-1])


def profile_routing(gm: torch.fx.GraphModule, example_inputs=None, *,
                    profiler: RoutingProfiler) -> tuple[torch.fx.GraphModule, int]:
    graph, changed = gm.graph, 0
    record = torch.ops.moec.record_routing.default
    for node in list(graph.nodes):
        if moec_op_name(node) not in ("route", "gate") or moec_op_namespace(node) is None:
            continue
        idx_nodes = getitems(node).get(1)
        if idx_nodes and any(u.target is record for i in idx_nodes for u in i.users):
            continue
        idx = idx_nodes[0] if idx_nodes else output(graph, node, 1)
        layer = _layer(node, profiler)
        with graph.inserting_after(idx):
            mark(graph.call_function(record, (idx, profiler.id, layer, _num_experts(node, layer, profiler))),
                 NAME, node)
        changed += 1
    if changed:
        gm.recompile()
    return gm, changed


__all__ = ["NAME", "profile_routing"]
