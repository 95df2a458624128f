"""lower_grouped: ``expert_ffn`` -> ``grouped_gemm`` -> ``activation`` -> ``grouped_gemm``.

Contract: every ``moec::expert_ffn`` becomes the grouped-GEMM form of the same FFN: a first
grouped GEMM that gathers each expert's rows from the tokens by ``token_N`` (no gathered or
padded copy is part of the IR; an implementation may gather inside its kernel), the activation,
and a second grouped GEMM over the rows in expert order. Returns the graph and the number of
FFNs lowered. Numerics: preserved bitwise by the reference implementations (the same per-expert
products in the same order); other implementations are checked against them.

Preconditions: none beyond a verified graph. Running it twice changes nothing (no
``expert_ffn`` is left).

Pseudo-code::

    for ffn in expert_ffn nodes:
        h = grouped_gemm(x, token_N, counts, w_in, b_in, transposed)
        a = activation(h, activation, interleaved, alpha, limit)
        y = grouped_gemm(a, None, counts, w_out, b_out, transposed)
        ffn -> y
"""

from __future__ import annotations

import torch

from moec.passes.util import mark, op, op_nodes

NAME = "lower_grouped"


def lower_grouped(gm: torch.fx.GraphModule, example_inputs=None) -> tuple[torch.fx.GraphModule, int]:
    graph, changed = gm.graph, 0
    for ffn in op_nodes(gm, "expert_ffn"):
        x, token_N, counts, w_in, w_out, b_in, b_out, activation, transposed, interleaved, alpha, limit = ffn.args
        with graph.inserting_before(ffn):
            h = mark(graph.call_function(op("grouped_gemm"), (x, token_N, counts, w_in, b_in, transposed)), NAME, ffn)
            a = mark(graph.call_function(op("activation"), (h, activation, interleaved, alpha, limit)), NAME, ffn)
            y = mark(graph.call_function(op("grouped_gemm"), (a, None, counts, w_out, b_out, transposed)), NAME, ffn)
        ffn.replace_all_uses_with(y)
        graph.erase_node(ffn)
        changed += 1
    gm.recompile()
    return gm, changed
