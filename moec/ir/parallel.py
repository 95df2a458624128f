"""Expert-parallel IR: the moec ops an expert-parallel layer adds to the graph.

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

Placed layers (a ``moec.runtime.plan`` placement: rank w holds the experts ``slots`` lists for
it, in local slot order; an expert on several ranks is replicated) use three more ops, whose
placement arguments are the plan's layer flattened: ``slots`` (every rank's experts, rank 0's
first), ``slot_counts`` (experts per rank) and ``shares`` (per entry of ``slots``, the fraction of
that expert's tokens its replica takes; empty: even split).

- ``moec::ep_route_placed(idx_TK, slots, slot_counts, shares, num_experts, rank, chunks)``: as
  ``ep_route``, with ``local_TK`` the local slot on the destination rank. A slot of expert e goes
  to one of e's replicas: this rank's slots of e in a chunk, in token order, are spread over the
  replicas by stratified sampling of the cumulative shares, offset by ``rank / world`` (the j-th of
  n goes to the replica whose share interval holds ``((j + 1/2)/n + rank/world) mod 1``), so each
  replica gets its share of every rank's slots to within one slot. Which replica computes a row
  does not change its value (replicas hold the same weights).
- ``moec::ep_route_adaptive(idx_TK, counts_E, slots, slot_counts, shares, num_experts, rank, chunks)``:
  ``ep_route_placed`` with the shares of this step instead of the plan's: ``counts_E`` (int64 [E])
  is every rank's slots per expert, summed over the group (an all-reduce the ``expert_parallel``
  pass emits before it), and ``balance_replicas`` splits each replicated expert's slots over its
  replicas so that the ranks' loads come close to as even as the placement allows. Every rank computes the
  same shares from the same counts (pure Python floats, fixed order), so the replicas' totals are
  the balanced amounts to within one slot per rank. Outputs as ``ep_route_placed``.
- ``moec::unshard(shard, group_name, slots, slot_counts, shares, num_experts)``: collective; every
  expert's weights ``[E, ...]`` from the ranks' shards ``[S_w, ...]`` (an expert's first replica),
  by an all-gather. ``shares`` is not used by it: it keeps the whole placement in the graph for
  the ``expert_parallel`` pass. Backward: the gradient summed over the group, this rank's slots' rows. This is what
  a placed layer's weights mean in the captured graph; the ``expert_parallel`` pass replaces it by
  the shard itself.
- ``moec::replica_sync(shard, group_name, rows, ids, num_replicated)``: identity forward (a copy);
  backward sums the gradients of replicated experts over their replicas (rows ``rows`` of this
  rank's shard hold replicated experts numbered ``ids`` among the layer's ``num_replicated``
  replicated experts; one all-reduce of ``[num_replicated, ...]``), so every replica gets the
  expert's whole gradient, as the unplaced model would, and replicas stay equal after an
  optimizer step.

The rest of an expert-parallel layer is made of existing ops: ``_c10d_functional`` all-to-alls
and waits, ``moec::dispatch`` / ``grouped_gemm_act`` / ``grouped_gemm_combine`` on the received
rows, ``moec::combine`` back in token order (see ``moec.passes.expert_parallel``).

Legend: T tokens of this rank, K top-k, E experts, W ranks, C chunks, L experts per rank, S_w
slots (experts held) of rank w, R most replicas of one expert.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.distributed as dist
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


# ----------------------------------------------------------------------------------------------
# Placed layers
# ----------------------------------------------------------------------------------------------


def flatten_placement(rank_experts, shares=None) -> tuple[list[int], list[int], list[float]]:
    """A plan layer's ``rank_experts`` (and ``shares``) as the ops' ``slots``, ``slot_counts``,
    ``shares`` arguments."""
    slots = [int(e) for experts in rank_experts for e in experts]
    counts = [len(experts) for experts in rank_experts]
    flat_shares = [] if shares is None else [float(s) for r in shares for s in r]
    return slots, counts, flat_shares


def _held(slots, slot_counts):
    """(position in ``slots``, rank, local slot, expert) of every slot, rank 0's first."""
    pos = 0
    for rank, n in enumerate(slot_counts):
        for local in range(n):
            yield pos, rank, local, slots[pos]
            pos += 1


@functools.lru_cache(maxsize=256)
def _replica_layout(slots: tuple, slot_counts: tuple, num_experts: int):
    """Per expert, its replicas' ranks, local slots and positions in ``slots``, [E, R] each
    (padding -1), and how many replicas it has [E]."""
    _check(sum(slot_counts) == len(slots), f"slot_counts {list(slot_counts)} do not add up to the "
                                           f"{len(slots)} slots")
    replicas: list[list[tuple[int, int, int]]] = [[] for _ in range(num_experts)]
    for pos, rank, local, e in _held(slots, slot_counts):
        _check(0 <= e < num_experts, f"placement lists expert {e} but the layer has {num_experts}")
        replicas[e].append((rank, local, pos))
    missing = [e for e, reps in enumerate(replicas) if not reps]
    _check(not missing, f"placement holds experts {missing[:8]} on no rank: their tokens would be dropped")
    R = max(len(reps) for reps in replicas)
    table = torch.tensor([[list(x) for x in reps] + [[-1, -1, -1]] * (R - len(reps)) for reps in replicas],
                         dtype=torch.int64).reshape(num_experts, R, 3)
    return table[..., 0], table[..., 1], table[..., 2], torch.tensor([len(r) for r in replicas])


@functools.lru_cache(maxsize=256)
def _replica_tables(slots: tuple, slot_counts: tuple, shares: tuple, num_experts: int):
    """Per expert, its replicas' ranks and local slots and their cumulative shares, [E, R] each
    (padding: rank -1 and cumulative share 2, above any sample in [0, 1); the last replica's
    cumulative share is 2 as well: it takes what rounding leaves)."""
    _check(not shares or len(shares) == len(slots), "shares must give one fraction per slot, or none")
    rank_ER, local_ER, pos_ER, n_E = _replica_layout(slots, slot_counts, num_experts)
    R = rank_ER.shape[1]
    if shares:
        share_ER = torch.tensor([*shares, 0.0], dtype=torch.float64)[pos_ER]  # padding reads the 0 at -1
    else:
        share_ER = (pos_ER >= 0) / n_E.unsqueeze(1).double()
    cum_ER = share_ER.cumsum(1)
    cum_ER[torch.arange(R).unsqueeze(0) >= n_E.unsqueeze(1) - 1] = 2.0
    return rank_ER, local_ER, cum_ER


def ep_route_placed_reference(idx_TK: Tensor, slots, slot_counts, shares, num_experts: int, rank: int,
                              chunks: int, cached: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    T, K = idx_TK.shape
    world = len(slot_counts)
    tables = _replica_tables if cached else _replica_tables.__wrapped__  # per-step shares: no cache
    rank_ER, local_ER, cum_ER = tables(tuple(slots), tuple(slot_counts), tuple(shares), num_experts)
    order, local, counts = [], [], []
    for idx_tK in torch.tensor_split(idx_TK, chunks):
        idx_n = idx_tK.reshape(-1)
        # j-th slot of its expert in this chunk, n of them: the stratified sample (j + 1/2)/n
        sorted_n, by_expert_n = torch.sort(idx_n, stable=True)
        first_n = torch.searchsorted(sorted_n, sorted_n, side="left")
        occ_n = torch.empty_like(idx_n)
        occ_n[by_expert_n] = torch.arange(idx_n.numel()) - first_n
        per_expert_n = torch.bincount(idx_n, minlength=num_experts)[idx_n]
        sample_n = torch.remainder((occ_n.double() + 0.5) / per_expert_n + rank / world, 1.0)
        replica_n = (cum_ER[idx_n] <= sample_n.unsqueeze(-1)).sum(-1, keepdim=True)
        dest_n = rank_ER[idx_n].gather(-1, replica_n).squeeze(-1)
        slot_local_n = local_ER[idx_n].gather(-1, replica_n).squeeze(-1)
        send_n = torch.sort(dest_n, stable=True).indices
        order.append(send_n)
        local.append(slot_local_n[send_n])
        counts.append(torch.bincount(dest_n, minlength=world))
    return (torch.cat(order).reshape(T, K), torch.cat(local).reshape(T, K),
            torch.stack(counts, dim=1) if counts else idx_TK.new_zeros(world, chunks))


@torch.library.custom_op("moec::ep_route_placed", mutates_args=())
def ep_route_placed(idx: Tensor, slots: list[int], slot_counts: list[int], shares: list[float], num_experts: int,
                    rank: int, chunks: int) -> tuple[Tensor, Tensor, Tensor]:
    """Send plan of this rank's slots under a placement, per token chunk: (order, local, counts)."""
    _check_placed_route(idx, slot_counts, num_experts, rank, chunks)
    return ep_route_placed_reference(idx, slots, slot_counts, shares, num_experts, rank, chunks)


def _check_placed_route(idx: Tensor, slot_counts, num_experts: int, rank: int, chunks: int) -> None:
    _check(chunks >= 1, f"chunks must be at least 1, got {chunks}")
    _check(0 <= rank < len(slot_counts), f"rank {rank} is not among the placement's {len(slot_counts)} ranks")
    _check(idx.dtype == torch.int64 and idx.dim() == 2, "expert ids must be int64 [T, K]")
    _check(idx.numel() == 0 or (int(idx.min()) >= 0 and int(idx.max()) < num_experts),
           f"expert ids must lie in [0, {num_experts})")


@ep_route_placed.register_fake
def _(idx, slots, slot_counts, shares, num_experts, rank, chunks):
    return torch.empty_like(idx), torch.empty_like(idx), idx.new_empty(len(slot_counts), chunks)


# Gauss-Seidel sweeps of balance_replicas at most; it stops once a sweep moves less than this
# fraction of the slots.
BALANCE_SWEEPS = 8
BALANCE_TOLERANCE = 1e-3


def _water_fill(amount: float, levels: list[float]) -> list[float]:
    """Split ``amount`` over bins at ``levels`` so that the bins that get some end level at one
    common height and no bin that gets none is below it (the split minimising the sum of squared
    levels)."""
    order = sorted(range(len(levels)), key=lambda i: (levels[i], i))
    height, filled = 0.0, 0.0
    for j, i in enumerate(order):
        filled += levels[i]
        height = (amount + filled) / (j + 1)
        if j + 1 == len(order) or height <= levels[order[j + 1]]:
            break
    return [max(0.0, height - lv) for lv in levels]


def balance_replicas(counts: list[float], slots, slot_counts, shares, num_experts: int,
                     stats: Optional[dict] = None) -> list[float]:
    """Per entry of ``slots``, the fraction of its expert's ``counts`` the replica takes so that the
    ranks' loads (``sum`` of their replicas' amounts) come close to as even as the placement
    allows. The target is the split minimising the sum of squared rank loads, which also minimises the largest
    (the loads a split can give form the base polytope of a submodular function, where one point
    minimises every separable convex function; Fujishige). Experts held once keep their whole count
    on their rank; each replicated expert in turn (largest count first, then id) is water-filled over
    its replicas' ranks given the others (exact block minimisation, which converges to it, slowly
    along long chains of replicas), for ``BALANCE_SWEEPS`` sweeps or until a sweep moves less than
    ``BALANCE_TOLERANCE`` of the slots: the heaviest rank ends within 1e-3 of the mean load above
    the exact min-max split's on the tests' random placements (up to 6 ranks), up to 0.7% on moec's
    plans at 32 ranks. An expert with no slots keeps the plan's ``shares`` (or the even split).
    Deterministic: the same counts give the same fractions on every rank. ``stats["water_fills"]``,
    if given, counts the water-fills. Host cost: about 2.2 us per water-fill, 0.3-0.8 ms per layer
    and step at 256 experts, 32 ranks and 39-50 replicated experts (2-core EPYC VM)."""
    world = len(slot_counts)
    held: list[list[tuple[int, int]]] = [[] for _ in range(num_experts)]
    for pos, rank, _, e in _held(slots, slot_counts):
        held[e].append((pos, rank))
    out = [0.0] * len(slots)
    load = [0.0] * world
    amounts: dict[int, list[float]] = {}
    for e, reps in enumerate(held):
        c = float(counts[e])
        if c <= 0 or len(reps) == 1:
            for pos, _ in reps:
                out[pos] = (float(shares[pos]) if shares else 1.0 / len(reps)) if c <= 0 else 1.0
            if c > 0:
                load[reps[0][1]] += c
            continue
        start = [float(shares[pos]) if shares else 1.0 / len(reps) for pos, _ in reps]
        amounts[e] = [c * f for f in start]
        for (_, rank), a in zip(reps, amounts[e]):
            load[rank] += a
    order = [(e, float(counts[e]), [rank for _, rank in held[e]])
             for e in sorted(amounts, key=lambda e: (-float(counts[e]), e))]
    total = sum(float(counts[e]) for e in range(num_experts) if counts[e] > 0)
    fills = 0
    for _ in range(BALANCE_SWEEPS):
        moved = 0.0
        for e, c, ranks in order:
            old = amounts[e]
            if len(ranks) == 2:  # most replicated experts: the closed form of the water-fill
                r0, r1 = ranks
                l0, l1 = load[r0] - old[0], load[r1] - old[1]
                x0 = min(max((c + l1 - l0) / 2, 0.0), c)
                new = [x0, c - x0]
                load[r0], load[r1] = l0 + x0, l1 + c - x0
            else:
                for rank, a in zip(ranks, old):
                    load[rank] -= a
                new = _water_fill(c, [load[rank] for rank in ranks])
                for rank, a in zip(ranks, new):
                    load[rank] += a
            moved += sum(abs(a - b) for a, b in zip(new, old))
            amounts[e] = new
        fills += len(order)
        if moved <= BALANCE_TOLERANCE * total:
            break
    if stats is not None:
        stats["water_fills"] = stats.get("water_fills", 0) + fills
    for e, a in amounts.items():
        c = float(counts[e])
        for (pos, _), x in zip(held[e], a):
            out[pos] = x / c
    return out


@torch.library.custom_op("moec::ep_route_adaptive", mutates_args=())
def ep_route_adaptive(idx: Tensor, counts: Tensor, slots: list[int], slot_counts: list[int], shares: list[float],
                      num_experts: int, rank: int, chunks: int) -> tuple[Tensor, Tensor, Tensor]:
    """``ep_route_placed`` with this step's balanced shares (``balance_replicas`` of the group's
    slots per expert, ``counts``)."""
    _check(counts.dim() == 1 and counts.numel() == num_experts,
           f"counts must hold one slot count per expert ({num_experts}), got shape {tuple(counts.shape)}")
    _check_placed_route(idx, slot_counts, num_experts, rank, chunks)
    step_shares = balance_replicas(counts.tolist(), slots, slot_counts, shares, num_experts)
    return ep_route_placed_reference(idx, slots, slot_counts, step_shares, num_experts, rank, chunks, cached=False)


@ep_route_adaptive.register_fake
def _(idx, counts, slots, slot_counts, shares, num_experts, rank, chunks):
    return torch.empty_like(idx), torch.empty_like(idx), idx.new_empty(len(slot_counts), chunks)


def _group(group_name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(group_name)


def _first_replica_rows(slots, slot_counts, num_experts: int) -> Tensor:
    """Row of each expert's first replica in the all-gathered ``[W * S_max, ...]`` shards."""
    s_max = max(slot_counts)
    first: dict[int, int] = {}
    for _, rank, local, e in _held(slots, slot_counts):
        first.setdefault(e, rank * s_max + local)
    _check(len(first) == num_experts, f"placement holds {len(first)} of the {num_experts} experts")
    return torch.tensor([first[e] for e in range(num_experts)])


@torch.library.custom_op("moec::unshard", mutates_args=())
def unshard(shard: Tensor, group_name: str, slots: list[int], slot_counts: list[int], shares: list[float],
            num_experts: int) -> Tensor:
    """Every expert's weights from the ranks' shards (collective); see the module docstring."""
    group = _group(group_name)
    rank = dist.get_rank(group)
    _check(len(slot_counts) == dist.get_world_size(group) and shard.shape[0] == slot_counts[rank],
           f"rank {rank}'s shard has {shard.shape[0]} experts, the placement gives it {slot_counts[rank]}")
    s_max = max(slot_counts)
    padded = torch.cat([shard, shard.new_zeros(s_max - shard.shape[0], *shard.shape[1:])]).contiguous()
    gathered = padded.new_empty(len(slot_counts) * s_max, *shard.shape[1:])
    dist.all_gather_into_tensor(gathered, padded, group=group)
    return gathered.index_select(0, _first_replica_rows(slots, slot_counts, num_experts).to(shard.device))


@unshard.register_fake
def _(shard, group_name, slots, slot_counts, shares, num_experts):
    return shard.new_empty(num_experts, *shard.shape[1:])


@torch.library.custom_op("moec::unshard_backward", mutates_args=())
def unshard_backward(grad: Tensor, group_name: str, slots: list[int], slot_counts: list[int]) -> Tensor:
    """This rank's slots' rows of the gradient summed over the group (collective)."""
    group = _group(group_name)
    rank = dist.get_rank(group)
    total = grad.clone().contiguous()
    dist.all_reduce(total, group=group)
    first = sum(slot_counts[:rank])
    mine = torch.tensor(slots[first:first + slot_counts[rank]], dtype=torch.int64, device=grad.device)
    return total.index_select(0, mine)


@unshard_backward.register_fake
def _(grad, group_name, slots, slot_counts):
    rank = dist.get_rank(_group(group_name))
    return grad.new_empty(slot_counts[rank], *grad.shape[1:])


def _unshard_setup(ctx, inputs, output):
    _, ctx.group_name, ctx.slots, ctx.slot_counts, _, _ = inputs


def _unshard_bwd(ctx, grad):
    return (torch.ops.moec.unshard_backward(grad, ctx.group_name, ctx.slots, ctx.slot_counts),
            None, None, None, None, None)


unshard.register_autograd(_unshard_bwd, setup_context=_unshard_setup)


@torch.library.custom_op("moec::replica_sync", mutates_args=())
def replica_sync(shard: Tensor, group_name: str, rows: list[int], ids: list[int], num_replicated: int) -> Tensor:
    """Identity (a copy) whose backward sums replicated experts' gradients over their replicas."""
    return shard.clone()


@replica_sync.register_fake
def _(shard, group_name, rows, ids, num_replicated):
    return torch.empty_like(shard)


def _sync_setup(ctx, inputs, output):
    _, ctx.group_name, ctx.rows, ctx.ids, ctx.num_replicated = inputs


def _sync_bwd(ctx, grad):
    # Functional collectives: the backward graph shows the all-reduce, and the scheduler moves it.
    rows = torch.tensor(ctx.rows, dtype=torch.int64, device=grad.device)
    ids = torch.tensor(ctx.ids, dtype=torch.int64, device=grad.device)
    mine = grad.new_zeros(ctx.num_replicated, *grad.shape[1:]).index_add(0, ids, grad.index_select(0, rows))
    total = torch.ops._c10d_functional.wait_tensor(
        torch.ops._c10d_functional.all_reduce(mine, "sum", ctx.group_name))
    return grad.index_copy(0, rows, total.index_select(0, ids)), None, None, None, None


replica_sync.register_autograd(_sync_bwd, setup_context=_sync_setup)


def replicated_rows(slots, slot_counts, rank: int) -> tuple[list[int], list[int], int]:
    """``replica_sync``'s (rows, ids, num_replicated) for ``rank``: which of its shard's rows hold an
    expert that other ranks hold too, that expert's number among the layer's replicated experts, and
    how many there are."""
    copies: dict[int, int] = {}
    for e in slots:
        copies[e] = copies.get(e, 0) + 1
    numbered = {e: i for i, e in enumerate(sorted(e for e, n in copies.items() if n > 1))}
    first = sum(slot_counts[:rank])
    mine = slots[first:first + slot_counts[rank]]
    rows = [i for i, e in enumerate(mine) if e in numbered]
    return rows, [numbered[mine[i]] for i in rows], len(numbered)
