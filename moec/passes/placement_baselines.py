"""Baseline expert placements, scored beside moec's by ``moec.passes.placement_score``: contiguous
(Megatron-LM / DeepSpeed), round-robin, and DeepSeek's EPLB (hierarchical and global).

Contract
--------
Every function takes the planning window's ``load_LE`` (slots per expert per layer), the world
size N, ranks per node M and slots per rank S (N*S >= E), and returns a valid ``PlacementPlan``
(``validate(E, L, S)`` passes) with ``meta["method"]`` set. None reads a previous plan: each plans
from scratch, as these systems do.

* ``contiguous``: rank r holds experts ``r*E//N .. (r+1)*E//N - 1`` in every layer, whatever the
  load (Megatron-LM's and DeepSpeed's expert-parallel layout). The extra slots are left empty:
  neither system replicates experts. With E < N, rank r holds expert ``r*E//N`` (replicas, split
  evenly).
* ``round_robin``: expert e on rank ``e % N`` (E < N: rank r holds ``r % E``); extra slots empty.
* ``eplb``: DeepSeek's Expert Parallelism Load Balancer, reimplemented from the description in
  its README (github.com/deepseek-ai/EPLB, ``README.md``, "The Algorithm"; the interface described
  there is ``eplb.rebalance_experts``), no code taken. Every slot is used (N*S physical experts);
  replicas split their expert's tokens evenly.

  - Hierarchical policy (used when the number of nodes divides the number of expert groups):
    1. the experts form ``num_groups`` equal groups of consecutive ids; the groups are packed to
       the nodes with balanced packing (each node gets the same number of groups; heaviest group
       first, onto the lightest node that still has room);
    2. inside each node, its experts are replicated to fill the node's M*S slots: each new
       replica goes to the expert with the largest load per replica;
    3. the node's replicas (weight: load / replicas) are packed onto its M GPUs with balanced
       packing (S replicas per GPU; heaviest first onto the lightest GPU with room).
  - Global policy (the other case; also available on its own): one group, one node: replicate
    over all N*S slots, then pack onto the N GPUs.

  ``num_groups`` defaults to 8 (DeepSeek-V3's expert groups) when it divides E and the node
  count divides it, else to the node count when it divides E; otherwise the global policy runs.
  One deviation, forced by the plan format (an expert at most once per rank): packing puts a
  replica on the lightest GPU with room that does not already hold its expert; only when every
  GPU with room holds it does it go to one that does, and the two replicas merge into one slot
  with twice the share.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from moec.runtime.plan import LayerPlan, PlacementPlan, PlanError

__all__ = ["BASELINES", "contiguous", "eplb", "eplb_global", "eplb_hierarchical", "round_robin",
           "balanced_packing", "replicate", "default_num_groups"]


def _check(load_LE: np.ndarray, N: int, M: int, S: int) -> tuple[int, int]:
    load_LE = np.asarray(load_LE)
    if load_LE.ndim != 2:
        raise PlanError(f"planning needs load shaped [layers, experts], got shape {load_LE.shape}")
    L, E = load_LE.shape
    if N < 1 or M < 1 or S < 1:
        raise PlanError(f"world size, ranks per node and slots per rank must be >= 1; got {N}, {M}, {S}")
    if N * S < E:
        raise PlanError(f"slots fewer than experts: {N} rank(s) x {S} slot(s) = {N * S} < {E} experts; "
                        f"use at least {-(-E // N)} slots per rank")
    if N > M and N % M:
        raise PlanError(f"{N} ranks do not fill nodes of {M}: use a multiple of the ranks per node")
    return L, E


def contiguous(load_LE, world_size: int, ranks_per_node: int, slots_per_rank: int) -> PlacementPlan:
    L, E = _check(load_LE, world_size, ranks_per_node, slots_per_rank)
    plan = PlacementPlan.contiguous(E, world_size, L, ranks_per_node=ranks_per_node)
    return plan


def round_robin(load_LE, world_size: int, ranks_per_node: int, slots_per_rank: int) -> PlacementPlan:
    L, E = _check(load_LE, world_size, ranks_per_node, slots_per_rank)
    N = world_size
    ranks = [list(range(r, E, N)) for r in range(N)] if E >= N else [[r % E] for r in range(N)]
    return PlacementPlan(world_size=N, layers=[LayerPlan([list(x) for x in ranks]) for _ in range(L)],
                         num_experts=E, ranks_per_node=ranks_per_node, meta={"method": "round-robin"})


# ----------------------------------------------------------------------------------------------
# EPLB
# ----------------------------------------------------------------------------------------------


def replicate(load_E: np.ndarray, slots: int) -> np.ndarray:
    """Replica count per expert filling ``slots`` (>= len(load_E)): one each, then each extra
    replica to the expert with the largest load per replica (lowest id on ties)."""
    E = len(load_E)
    if slots < E:
        raise PlanError(f"{slots} slots cannot hold {E} experts")
    count_E = np.ones(E, dtype=np.int64)
    load_E = np.asarray(load_E, dtype=np.float64)
    for _ in range(slots - E):
        count_E[int(np.argmax(load_E / count_E))] += 1
    return count_E


def balanced_packing(weight_I: np.ndarray, bins: int, capacity: int,
                     key_I: Optional[np.ndarray] = None) -> np.ndarray:
    """Bin of each item: heaviest item first (lowest index on ties), onto the lightest bin with
    fewer than ``capacity`` items (lowest index on ties), avoiding bins that already hold an item
    with the same ``key`` while another bin with room does not."""
    n = len(weight_I)
    if n > bins * capacity:
        raise PlanError(f"{n} items do not fit {bins} bins of {capacity}")
    order = sorted(range(n), key=lambda i: (-float(weight_I[i]), i))
    load_B = np.zeros(bins)
    count_B = np.zeros(bins, dtype=np.int64)
    keys_B: list[set] = [set() for _ in range(bins)]
    bin_I = np.empty(n, dtype=np.int64)
    for i in order:
        room = count_B < capacity
        if key_I is not None:
            fresh = room & np.array([key_I[i] not in k for k in keys_B])
            if fresh.any():
                room = fresh
        cand = np.flatnonzero(room)
        b = int(cand[np.argmin(load_B[cand])])
        bin_I[i] = b
        load_B[b] += weight_I[i]
        count_B[b] += 1
        if key_I is not None:
            keys_B[b].add(key_I[i])
    return bin_I


def default_num_groups(num_experts: int, num_nodes: int) -> Optional[int]:
    """See the module docstring: 8 if it fits, else the node count, else None (global)."""
    if num_experts % 8 == 0 and 8 % num_nodes == 0:
        return 8
    if num_experts % num_nodes == 0:
        return num_nodes
    return None


def _eplb_layer(load_E: np.ndarray, N: int, M: int, S: int, num_groups: int, num_nodes: int) -> LayerPlan:
    E = len(load_E)
    per_group = E // num_groups
    group_load = load_E.reshape(num_groups, per_group).sum(1)
    node_of_group = balanced_packing(group_load, num_nodes, num_groups // num_nodes)
    ranks_per_node = N // num_nodes
    rank_experts: list[list[int]] = [[] for _ in range(N)]
    rank_count: list[dict[int, int]] = [dict() for _ in range(N)]
    total_count = np.zeros(E, dtype=np.int64)
    for node in range(num_nodes):
        experts = np.concatenate([np.arange(g * per_group, (g + 1) * per_group)
                                  for g in np.flatnonzero(node_of_group == node)]).astype(np.int64)
        count = replicate(load_E[experts], ranks_per_node * S)
        item_expert = np.repeat(experts, count)
        item_weight = np.repeat(load_E[experts] / count, count)
        gpu = balanced_packing(item_weight, ranks_per_node, S, key_I=item_expert)
        for e, g in zip(item_expert, gpu):
            r = node * ranks_per_node + int(g)
            if e not in rank_count[r]:
                rank_experts[r].append(int(e))
            rank_count[r][int(e)] = rank_count[r].get(int(e), 0) + 1
            total_count[e] += 1
    shares = [[rank_count[r][e] / total_count[e] for e in rank_experts[r]] for r in range(N)]
    return LayerPlan(rank_experts, shares)


def eplb(load_LE, world_size: int, ranks_per_node: int, slots_per_rank: int, *,
         num_groups: Optional[int] = None, hierarchical: Optional[bool] = None) -> PlacementPlan:
    """EPLB's policy choice (hierarchical when the node count divides the groups, else global),
    or the one ``hierarchical`` forces."""
    L, E = _check(load_LE, world_size, ranks_per_node, slots_per_rank)
    N, S = world_size, slots_per_rank
    M = min(ranks_per_node, N)
    num_nodes = N // M
    if num_groups is None:
        num_groups = default_num_groups(E, num_nodes)
    use_h = num_groups is not None and E % num_groups == 0 and num_groups % num_nodes == 0
    if hierarchical and not use_h:
        raise PlanError(f"hierarchical EPLB needs expert groups that divide {E} experts and are a multiple of "
                        f"the {num_nodes} node(s); got num_groups={num_groups}")
    if hierarchical is False:
        use_h = False
    load_LE = np.asarray(load_LE, dtype=np.float64)
    layers = [_eplb_layer(load_LE[l], N, M, S, num_groups, num_nodes) if use_h
              else _eplb_layer(load_LE[l], N, N, S, 1, 1) for l in range(L)]
    method = "eplb-hierarchical" if use_h else "eplb-global"
    meta = {"method": method}
    if use_h:
        meta["num_groups"] = num_groups
    return PlacementPlan(world_size=N, layers=layers, num_experts=E, ranks_per_node=ranks_per_node, meta=meta)


def eplb_hierarchical(load_LE, world_size: int, ranks_per_node: int, slots_per_rank: int,
                      num_groups: Optional[int] = None) -> PlacementPlan:
    return eplb(load_LE, world_size, ranks_per_node, slots_per_rank, num_groups=num_groups, hierarchical=True)


def eplb_global(load_LE, world_size: int, ranks_per_node: int, slots_per_rank: int) -> PlacementPlan:
    return eplb(load_LE, world_size, ranks_per_node, slots_per_rank, hierarchical=False)


# name -> planner(load_LE, N, M, S)
BASELINES = {
    "contiguous": contiguous,
    "round-robin": round_robin,
    "eplb-hierarchical": eplb_hierarchical,
    "eplb-global": eplb_global,
}
