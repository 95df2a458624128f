"""fuse_combine: ``grouped_gemm`` -> ``combine`` -> ``grouped_gemm_combine``.

Contract: a combine whose expert rows come from a grouped GEMM (without a gather) read by
nothing else becomes one ``moec::grouped_gemm_combine``: the routing weight and the return to
token order happen in the second GEMM's epilogue, and the [rows, H] expert outputs are never
written. Returns the graph and the number of fusions. Numerics: preserved bitwise by the
references (the fused op is defined as the composition).

Left alone: a GEMM with other readers, or one that gathers its rows (the combine's slot order
would not be its row order).

Pseudo-code::

    for comb in combine nodes:
        if comb.y is grouped_gemm(a, None, counts, w, b, tr) and comb is y's only user:
            comb -> grouped_gemm_combine(a, comb.slot, counts, w, b, comb.weights, tr)
"""

from __future__ import annotations

import torch

from moec.ir.verify import moec_op_name, moec_op_namespace
from moec.passes.util import mark, op, op_nodes

NAME = "fuse_combine"


def fuse_combine(gm: torch.fx.GraphModule, example_inputs=None) -> tuple[torch.fx.GraphModule, int]:
    graph, changed = gm.graph, 0
    for comb in op_nodes(gm, "combine"):
        y, slot_N, weights = comb.args
        if moec_op_name(y) != "grouped_gemm" or moec_op_namespace(y) != "moec" or len(y.users) != 1:
            continue
        a, token_N, counts, w, b, transposed = y.args
        if token_N is not None:
            continue
        with graph.inserting_before(comb):
            fused = mark(graph.call_function(op("grouped_gemm_combine"), (a, slot_N, counts, w, b, weights,
                                                                          transposed)), NAME, comb)
        comb.replace_all_uses_with(fused)
        graph.erase_node(comb)
        graph.erase_node(y)
        changed += 1
    gm.recompile()
    return gm, changed
