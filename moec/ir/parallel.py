"""Expert-parallel IR: the one moec op an expert-parallel layer adds to the graph.

Contract: ``moec::ep_route(idx_TK, num_experts, world, chunks)`` plans how this rank's routed
slots travel to the ranks that own their experts, under contiguous placement (rank ``w`` owns
experts ``[w*L, (w+1)*L)``, ``L = num_experts / world``), with the tokens split into ``chunks``
pieces as ``torch.tensor_split`` splits them (chunk c holds ``T_c`` tokens). It returns:

- ``order_TK`` (int64 [T, K]): rows ``tensor_split(order_TK, chunks)[c]`` hold the slots of chunk c,
  as slot ids local to the chunk (``t*K + k`` with ``t`` counted from the chunk's first token),
  sorted by owner rank, stably: the send order of that chunk's rows.
- ``local_TK`` (int64 [T, K]): for each entry of ``order_TK``, its expert's id on the owner rank
  (``idx - owner * L``).
- ``counts_WC`` (int64 [W, C]): slots of chunk c sent to rank w. Row w is what rank w receives
  from this rank, so one ``all_to_all_single`` of ``counts_WC`` gives every rank its receive counts.

The rest of an expert-parallel layer is made of existing ops: ``_c10d_functional`` all-to-alls
and waits, ``moec::dispatch`` / ``grouped_gemm_act`` / ``grouped_gemm_combine`` on the received
rows, ``moec::combine`` back in token order (see ``moec.passes.expert_parallel``).

Legend: T tokens of this rank, K top-k, E experts, W ranks, C chunks, L experts per rank.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moec.ir.ops import _check


def ep_route_reference(idx_TK: Tensor, num_experts: int, world: int, chunks: int) -> tuple[Tensor, Tensor, Tensor]:
    T, K = idx_TK.shape
    L = num_experts // world
    owner_TK = torch.div(idx_TK, L, rounding_mode="floor")
    order, local, counts = [], [], []
    for owner_tK, idx_tK in zip(torch.tensor_split(owner_TK, chunks), torch.tensor_split(idx_TK, chunks)):
        owner_n = owner_tK.reshape(-1)
        slot_n = torch.sort(owner_n, stable=True).indices
        order.append(slot_n)
        local.append(idx_tK.reshape(-1)[slot_n] - owner_n[slot_n] * L)
        counts.append(torch.bincount(owner_n, minlength=world))
    return (torch.cat(order).reshape(T, K), torch.cat(local).reshape(T, K),
            torch.stack(counts, dim=1) if counts else idx_TK.new_zeros(world, chunks))


@torch.library.custom_op("moec::ep_route", mutates_args=())
def ep_route(idx: Tensor, num_experts: int, world: int, chunks: int) -> tuple[Tensor, Tensor, Tensor]:
    """Send plan of this rank's slots over ``world`` ranks, per token chunk: (order, local, counts)."""
    _check(world >= 1 and num_experts % world == 0,
           f"{num_experts} experts do not split over {world} ranks")
    _check(chunks >= 1, f"chunks must be at least 1, got {chunks}")
    _check(idx.dtype == torch.int64 and idx.dim() == 2, "expert ids must be int64 [T, K]")
    _check(idx.numel() == 0 or (int(idx.min()) >= 0 and int(idx.max()) < num_experts),
           f"expert ids must lie in [0, {num_experts})")
    return ep_route_reference(idx, num_experts, world, chunks)


@ep_route.register_fake
def _(idx, num_experts, world, chunks):
    return torch.empty_like(idx), torch.empty_like(idx), idx.new_empty(world, chunks)
