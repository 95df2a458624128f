"""fuse_activation: ``grouped_gemm`` -> ``activation`` -> ``grouped_gemm_act``.

Contract: an activation whose input is a grouped GEMM read by nothing else becomes one
``moec::grouped_gemm_act``, so an implementation applies the activation in the GEMM's epilogue
and never writes the [rows, F] pre-activation. Returns the graph and the number of fusions.
Numerics: preserved bitwise by the references (``grouped_gemm_act`` is defined as the
composition).

Left alone: a GEMM whose output has other readers (the pre-activation is needed anyway).

Pseudo-code::

    for act in activation nodes:
        if act.h is grouped_gemm(x, tok, counts, w, b, tr) and act is h's only user:
            act -> grouped_gemm_act(x, tok, counts, w, b, act.activation, tr, act.interleaved, act.alpha, act.limit)
"""

from __future__ import annotations

import torch

from moec.ir.verify import moec_op_name, moec_op_namespace
from moec.passes.util import mark, op, op_nodes

NAME = "fuse_activation"


def fuse_activation(gm: torch.fx.GraphModule, example_inputs=None) -> tuple[torch.fx.GraphModule, int]:
    graph, changed = gm.graph, 0
    for act in op_nodes(gm, "activation"):
        h, activation, interleaved, alpha, limit = act.args
        if moec_op_name(h) != "grouped_gemm" or moec_op_namespace(h) != "moec" or len(h.users) != 1:
            continue
        x, token_N, counts, w, b, transposed = h.args
        with graph.inserting_before(act):
            fused = mark(graph.call_function(op("grouped_gemm_act"), (x, token_N, counts, w, b, activation, transposed,
                                                                      interleaved, alpha, limit)), NAME, act)
        act.replace_all_uses_with(fused)
        graph.erase_node(act)
        graph.erase_node(h)
        changed += 1
    gm.recompile()
    return gm, changed
