"""lower_small: a CPU layer with a handful of tiny expert products -> plain tensor ops the compiler fuses.

Contract: ``lower_small(gm, example_inputs)`` replaces each private chain ``moec_cpu::gate ->
permute -> grouped_gemm_act -> grouped_gemm_combine`` (the chain ``fuse_inference`` matches) with
a call to ``moec.codegen.cpu.slots_dense`` when the graph's shapes are static and the slots'
gathered expert weights are small: ``T * K * (one expert's w_in + w_out bytes) <=
SMALL_BYTES``. ``slots_dense`` is ordinary PyTorch (the routing reference, a weight gather per
slot, two batched products, the weighted sum), so the inner compiler traces it and fuses it
with the rest of the graph; autograd goes through it. Returns the graph and the number of
layers lowered. Numerics: the reference ops, summed in another order (fp32 rounding; tested
against eager).

Why: at a few tokens with small experts the grouped path's cost is its fixed per-layer work
(sort, per-expert loop, host sync, op dispatch); gathering a few small matrices per slot is
cheaper, and it is what Inductor compiles well. Large experts keep the grouped path, which reads
each active expert's weights once instead of once per slot.

Numerics caveat: the batched products sum in another order than a per-expert loop, so a token
whose top-k is tied within fp32 rounding in a later layer may pick another expert than eager does,
as it may under Inductor; bf16 and fp16 layers are left alone.

Preconditions: after ``select_impl`` (cpu target). Left alone: symbolic shapes, chains with
other readers, slots whose gathered weights exceed ``SMALL_BYTES``, dtypes other than fp32/fp64.

Pseudo-code::

    for comb in moec_cpu.grouped_gemm_combine nodes:
        gate, perm, act = the chain ending at comb (or skip)
        if T static and T*K*expert_bytes <= SMALL_BYTES:
            comb -> slots_dense(gate.args, act.x, act.w_in, act.b_in, comb.w_out, comb.b_out, act attrs)
"""

from __future__ import annotations

import math

import torch

from moec.ir.verify import node_value
from moec.passes.fuse_inference import chain, replace_chain

NAME = "lower_small"
# Gathered expert weights of all slots, at most: 4 MiB (32 slots of a 64-wide SwiGLU expert).
SMALL_BYTES = 4 << 20
# bf16/fp16 keep the grouped path, whose roundings follow the per-expert loops models are written
# as (a batched product rounds its sums differently, beyond the fuzzer's bf16 tolerance).
_DTYPES = (torch.float32, torch.float64)


def _static_numel(value) -> int | None:
    if not isinstance(value, torch.Tensor) or not all(isinstance(d, int) for d in value.shape):
        return None
    return math.prod(value.shape)


def _small(gate, act, comb) -> bool:
    x, w_in, w_out = node_value(gate.args[0]), node_value(act.args[3]), node_value(comb.args[3])
    top_k = gate.args[5]
    n_x, n_in, n_out = _static_numel(x), _static_numel(w_in), _static_numel(w_out)
    if None in (n_x, n_in, n_out) or not isinstance(top_k, int) or x.shape[-1] == 0:
        return False
    if not all(t.dtype in _DTYPES for t in (x, w_in, w_out)):
        return False
    E = w_in.shape[0]
    slots = n_x // x.shape[-1] * top_k
    expert_bytes = (n_in * w_in.element_size() + n_out * w_out.element_size()) // max(E, 1)
    return slots * expert_bytes <= SMALL_BYTES


def lower_small(gm: torch.fx.GraphModule, example_inputs=None) -> tuple[torch.fx.GraphModule, int]:
    from moec.codegen.cpu import slots_dense

    graph, changed = gm.graph, 0
    for comb in [n for n in graph.nodes if n.op == "call_function" and "moec_cpu.grouped_gemm_combine" in str(n.target)]:
        found = chain(comb)
        if found is None or not _small(found[0], found[2], comb):
            continue
        replace_chain(graph, comb, found, slots_dense, NAME)
        changed += 1
    if changed:
        graph.lint()
        gm.recompile()
    return gm, changed
