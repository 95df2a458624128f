"""Expert parallelism: a dropless MoE layer whose experts are split over the ranks of a group.

Contract: ``ep_moe`` is called collectively by every rank of ``group`` (the default group when
``None``). Each rank passes its *own* tokens ``x_TH`` (T may differ per rank, and may be 0), the
global expert ids ``idx_TK`` the router chose for them (int64 in ``[0, E)``), their float32 routing
weights ``weights_TK``, and the weights of only the experts it owns under
``contiguous_placement`` (leading dim ``E_local = E / W``). It returns ``out_TH`` for its own
tokens, equal (to fp32 rounding) to running the whole layer in one process on all ranks' tokens
with the full weights::

    out[t] = sum_k weights_TK[t, k] * FFN_{idx_TK[t, k]}(x_TH[t])

No slot is dropped (no capacity limit). Forward and backward both work: the row exchanges use the
autograd-aware ``torch.distributed.nn.functional.all_to_all_single``, so gradients reach ``x_TH``,
``weights_TK`` and the local expert weights (and biases). Backward is collective too: every rank
must run it, with the same tensors requiring grad on every rank, or the reverse exchanges hang.

The exchange protocol, on every rank (``W`` ranks, owner of expert ``e`` is ``e // E_local``):

1. Order the ``N = T*K`` slots by owner rank, stably: ``order_N``. ``send_W[r]`` slots go to rank r.
2. ``all_to_all_single`` of ``send_W`` (int64, one per rank) gives ``recv_W[r]``, the number of
   slots rank r will send here. Splits are host lists, so this is the one host sync.
3. ``all_to_all_single`` (autograd) of the slot rows ``x_TH[order_N // K]`` with input splits
   ``send_W`` and output splits ``recv_W``: ``xr_RH``, rank 0's rows first, then rank 1's, ...
   The same exchange (plain, int64) carries each slot's local expert id ``idx - rank * E_local``.
4. Group the received rows by local expert, stably (``moec::permute`` on the local ids), and run
   the experts: ``grouped_gemm_act`` gathering the rows by the permutation, then ``grouped_gemm``
   with ``token_idx=None``. Undo the grouping (scatter by the permutation) so row i of ``yr_RH``
   answers row i of ``xr_RH``.
5. ``all_to_all_single`` (autograd) back with the splits swapped: row j of ``ys_NH`` is the output
   for slot ``order_N[j]``. Scatter into slot order and combine
   ``out[t] = sum_k weights_TK[t, k] * y[t*K + k]`` (products in float32, then cast to
   the rows' dtype and summed, as ``moec::grouped_gemm_combine`` does).

Legend: T this rank's tokens, H hidden, K top-k, N = T*K this rank's slots, E experts,
L = E_local = E / W experts per rank, W ranks, R slots received by this rank, F first-GEMM width
(2I when gated), I expert hidden. Weight layouts are those of ``moec.ir.ops`` (``transposed=False``:
``w_in [E_local, F, H]``, ``w_out [E_local, H, I]``; ``True``: ``[E_local, H, F]``, ``[E_local, I, H]``).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd
from torch import Tensor

import moec.ir.lowered  # noqa: F401  (registers the moec:: ops)
from moec.runtime.group import collective_errors, group_timeout_s, require_distributed

__all__ = ["contiguous_placement", "ep_moe"]

_IMPLS = ("moec", "moec_cpu")


def contiguous_placement(num_experts: int, world_size: int) -> list[range]:
    """Experts owned by each rank: rank r owns ``range(r * E_local, (r + 1) * E_local)``."""
    if world_size < 1:
        raise ValueError(f"moec: world size must be at least 1, got {world_size}")
    if num_experts % world_size != 0:
        raise ValueError(
            f"moec: {num_experts} experts do not split over {world_size} ranks; expert parallelism "
            f"needs the number of experts to be a multiple of the world size"
        )
    per_rank = num_experts // world_size
    return [range(r * per_rank, (r + 1) * per_rank) for r in range(world_size)]


def _ops(impl: str):
    if impl not in _IMPLS:
        raise ValueError(f"moec: unknown expert-parallel impl {impl!r}; expected one of {_IMPLS}")
    if impl == "moec_cpu":
        import moec.codegen.cpu  # noqa: F401  (registers the moec_cpu:: ops)
    return getattr(torch.ops, impl)


def _check_args(x_TH, idx_TK, weights_TK, w_in_local, w_out_local, b_in_local, b_out_local, num_experts, world):
    if idx_TK.dtype != torch.int64:
        raise ValueError(f"moec: expert ids must be int64, got {idx_TK.dtype}")
    if idx_TK.dim() != 2 or weights_TK.shape != idx_TK.shape or idx_TK.shape[0] != x_TH.shape[0]:
        raise ValueError(
            f"moec: expected x [T, H], idx [T, K] and weights [T, K]; got x {tuple(x_TH.shape)}, "
            f"idx {tuple(idx_TK.shape)}, weights {tuple(weights_TK.shape)}"
        )
    e_local = contiguous_placement(num_experts, world)[0].stop
    for name, t in (("w_in", w_in_local), ("w_out", w_out_local), ("b_in", b_in_local), ("b_out", b_out_local)):
        if t is not None and t.shape[0] != e_local:
            raise ValueError(
                f"moec: {name} has {t.shape[0]} local experts (leading dim) but {num_experts} experts over "
                f"{world} ranks give {e_local} per rank; pass only this rank's slice of the expert weights"
            )
    return e_local


def _exchange_rows(rows_MD: Tensor, recv_splits: list[int], send_splits: list[int], group) -> Tensor:
    """Autograd-aware uneven all-to-all of rows: its backward is the reverse exchange."""
    out_RD = rows_MD.new_empty(sum(recv_splits), rows_MD.shape[-1])
    if not rows_MD.requires_grad:
        dist.all_to_all_single(out_RD, rows_MD.contiguous(), recv_splits, send_splits, group=group)
        return out_RD
    # torch 2.13 marks this deprecated in favour of ``_functional_collectives.all_to_all_single_autograd``,
    # but that one aborted a 4-rank gloo run here (uneven splits, empty sends); keep the stable API.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return dist_autograd.all_to_all_single(out_RD, rows_MD.contiguous(), recv_splits, send_splits,
                                               group=group)


def ep_moe(*args, group: Optional[dist.ProcessGroup] = None, **kwargs) -> Tensor:
    """Dropless expert-parallel MoE layer on this rank's tokens: ``out_TH`` (see the module
    docstring; arguments as ``_ep_moe``). ``impl`` names the namespace of the grouped-GEMM ops
    (``moec`` reference or ``moec_cpu``). A peer that dies or hangs raises
    ``moec.runtime.CollectiveError`` within ``group``'s timeout (use ``moec.runtime.ep_group`` for
    a group with moec's timeout; the default group's is torch's, 30 minutes on gloo)."""
    with collective_errors("the all-to-alls of ep_moe", group_timeout_s(group)):
        return _ep_moe(*args, group=group, **kwargs)


def _ep_moe(
    x_TH: Tensor,
    idx_TK: Tensor,
    weights_TK: Tensor,
    w_in_local: Tensor,
    w_out_local: Tensor,
    b_in_local: Optional[Tensor],
    b_out_local: Optional[Tensor],
    *,
    num_experts: int,
    activation: str,
    transposed: bool = False,
    interleaved: bool = False,
    alpha: float = 1.0,
    limit: float = 0.0,
    group: Optional[dist.ProcessGroup] = None,
    impl: str = "moec",
) -> Tensor:
    require_distributed("expert parallelism")
    ops = _ops(impl)
    world = dist.get_world_size(group)
    e_local = _check_args(x_TH, idx_TK, weights_TK, w_in_local, w_out_local, b_in_local, b_out_local,
                          num_experts, world)
    T, K = idx_TK.shape
    idx_N = idx_TK.reshape(-1)

    # 1. slots by owner rank; stable so each destination sees its slots in slot order.
    owner_N = torch.div(idx_N, e_local, rounding_mode="floor")
    order_N = torch.sort(owner_N, stable=True).indices
    send_W = torch.bincount(owner_N, minlength=world)
    if send_W.numel() != world:  # a negative id already made bincount raise
        raise ValueError(f"moec: expert ids must lie in [0, {num_experts})")

    # 2. counts
    recv_W = torch.empty_like(send_W)
    dist.all_to_all_single(recv_W, send_W, group=group)
    send_splits, recv_splits = send_W.tolist(), recv_W.tolist()

    # 3. rows and their local expert ids
    xs_NH = x_TH.index_select(0, torch.div(order_N, K, rounding_mode="floor"))
    xr_RH = _exchange_rows(xs_NH, recv_splits, send_splits, group)
    local_N = (idx_N[order_N] - owner_N[order_N] * e_local).unsqueeze(-1)
    # [R, 1]: the received rows are a top-1 routing over the local experts, so ``permute`` groups them.
    local_R1 = local_N.new_empty(sum(recv_splits), 1)
    dist.all_to_all_single(local_R1, local_N.contiguous(), recv_splits, send_splits, group=group)

    # 4. the local experts, on rows grouped by expert
    counts_L = torch.bincount(local_R1.reshape(-1), minlength=e_local)
    row_R, _ = ops.permute(local_R1, counts_L)
    a_RI = ops.grouped_gemm_act(xr_RH, row_R, counts_L, w_in_local, b_in_local, activation, transposed,
                                interleaved, alpha, limit)
    yg_RH = ops.grouped_gemm(a_RI, None, counts_L, w_out_local, b_out_local, transposed)
    yr_RH = torch.empty_like(yg_RH).index_copy(0, row_R, yg_RH)

    # 5. back to the senders, into slot order, weighted sum over k
    ys_NH = _exchange_rows(yr_RH, send_splits, recv_splits, group)
    y_NH = torch.empty_like(ys_NH).index_copy(0, order_N, ys_NH)
    H = y_NH.shape[-1]
    contrib_TKH = (y_NH.reshape(T, K, H) * weights_TK.unsqueeze(-1)).to(y_NH.dtype)
    return contrib_TKH.sum(dim=1)
