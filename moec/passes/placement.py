"""Expert placement pass: from a routing trace window to a ``PlacementPlan`` that balances the
ranks' load, keeps consecutive layers' expert pairs on the same rank and node, and (given the
previous plan) moves few expert weights.

Contract
--------
``place(trace, world_size, ranks_per_node, slots_per_rank, window=i, previous=None)`` returns a
plan validated for the trace's experts and layers and S slots per rank. It reads window i only
(with ``history`` d > 0: the moving average of windows 0..i, ``planning_arrays``);
``evaluate_windows`` and ``compare`` score plans made on window i on window i+1 (never on the
window they were made from), beside the baselines of ``moec.passes.placement_baselines``, with
``moec.passes.placement_score`` (where traffic, step time and weights moved are defined). The
plan is a pure function of its inputs (no randomness). This pass plans; it changes no tensor.

Preconditions: N*S >= E (every expert needs a slot); N a multiple of M when N > M; the previous
plan, if any, for the same N, E and layers.

Each plan says how its replicas are split at run time (``PlacementPlan.replica_balance``):
"adaptive" re-balances the replicas' shares on every step's routing (``moec::ep_route_adaptive``;
an all-reduce and host time per layer), "static" keeps the plan's shares. With
``PlacementOptions.replica_balance="auto"`` (default) the plan gets the one of lower predicted
step time on the windows it was made from, each scored on its own (the moving average's windows,
with its weights), or, given a previous (deployed) plan, that plan scored on the newest window,
which it was not made from: adaptive when the load moves by more than its cost. The scorer scores
a plan as it runs (``placement_score.routed_shares``).

Objectives, in order: (1) the slowest rank's load: max/mean, driven to ~1.000 on the planning
window with replicas and per-replica ``shares`` (a flow, so replicas need not split evenly as in
EPLB); (2) the cost of the consecutive-layer pairs that
cross ranks (beta_intra per pair) or nodes (beta_inter per pair), from the window's affinity; (3)
with a previous plan, weights moved, traded against the simulated step time: the plan that keeps
the most weights in place and predicts at most ``keep_budget`` (2%) more step time than planning
from scratch (on the planning window) is returned.

Pseudo-code::

    for each layer: pieces per expert = ceil(load / mean rank load) (a hot expert must span ranks),
        then more pieces for the experts of largest load per piece until every slot is used
        (EPLB's replication rule: spreading hot experts makes the next window's balance less
        sensitive to their drift)
    sweep 0 (forward), sweeps 1.. (alternating backward / forward), per layer l:
        gain[e, r] = beta_intra * pairs(e, rank r) + (beta_inter - beta_intra) * pairs(e, node of r)
                     with pairs from the affinity to layer l-1's and l+1's current placement
                     (layer 0, first sweep: none, or the source ranks when the trace has them)
                     + keep bonus where the previous plan held e on r
        greedy: pieces by load, descending, onto the rank of largest gain among those with a free
                slot and load + piece <= (1 + slack) * mean (none fits: the lightest rank)
        local search: best single move or swap of pieces that raises the total gain without
                pushing a rank over the cap, until none (Kernighan-Lin style refinement)
        balance (the shares are a flow): while the heaviest rank r is over the mean,
                1. shift load along a shortest path of existing replicas (r -> an expert it serves
                   -> another rank holding it -> ... -> an under-loaded rank);
                2. else add a replica of an expert r's side serves in a free slot from which an
                   under-loaded rank is reachable (the previous plan's holders, same node first);
                3. else swap an expert of r with a lighter one of another rank (sum of squared
                   loads falls);
                4. else move a small expert off a full under-loaded rank to a rank with a free
                   slot and replicate one of r's experts into the freed slot
    keep the sweep with the lowest pair cost
    the sweeps run twice: from nothing (layer 0 by load alone), and from a seed: the Louvain
        communities of the affinity graph (networkx; nodes (layer, expert), edges the pairs in
        excess of independence) packed whole onto ranks, one node per community where balance
        allows (``affinity_communities``, ``_community_shares``); the plan of lower predicted step
        time on the planning input is kept (meta "seeded")
    optional balance guard (``balance_guard``): rebuild with the affinity gains scaled by 0.5,
        0.25, 0 until the predicted next-window max/mean (``noisy_max_mean``) is within
        ``guard_margin`` of the balance-only plan's
    with a previous plan: candidates are the plan with the strongest keep bonus of inf, 1, 0.3,
    0.1 that fits the budget (the sweeps starting from the previous plan's shares), the scratch
    plan, and the scratch plan with its ranks renamed to
    keep the most weights in place (``_relabel``: for every pair of nodes the best matching of
    their ranks by experts in common, then nodes matched by those values, networkx's max-weight
    matchings; renaming ranks inside the node structure changes no predicted time unless the
    trace has source ranks); return the one
    that moves the fewest weights among those whose predicted step time on the planning window
    is within keep_budget of the scratch plan's (the scratch plan if none is)

Legend: N ranks, M ranks per node, E experts, L layers, S slots per rank, I pieces (items).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from moec.passes.placement_baselines import BASELINES
from moec.passes.placement_score import PlanScore, ScoreConfig, score_arrays, score_plan, weights_moved
from moec.runtime.plan import LayerPlan, PlacementPlan, PlanError

__all__ = ["DEFAULT_HISTORY", "PlacementOptions", "affinity_communities", "compare", "evaluate_windows",
           "method_names", "place", "place_arrays", "plan_method", "planning_arrays", "scoring_window"]

INF = float("inf")
DEFAULT_HISTORY = 0.5  # the harness's moving-average decay over windows <= i (see compare)


@dataclass(frozen=True)
class PlacementOptions:
    """Knobs of the optimiser (defaults are what the tests and benchmark use)."""

    slack: float = 0.03                 # greedy's load cap over the mean, before balancing
    sweeps: int = 3
    search_passes: int = 2              # local-search passes per layer and sweep
    balance_tolerance: float = 1e-3     # stop balancing at max/mean <= 1 + this (planning window)
    keep_budget: float = 0.02           # step-time cost allowed for keeping weights in place
    keep_weights: tuple = (INF, 1.0, 0.3, 0.1)
    fill_slots: bool = True             # replicate hot experts into the free slots (see _piece_counts)
    spare_slots: int = 0                # slots per rank the filling leaves free for balancing replicas
    partition: bool = True              # also start from the affinity graph's communities (networkx)
    # Off by default: on the group presets it falls back to (nearly) the balance-only plan, losing the
    # traffic cut and 3-16% of step time for a max/mean change within noise (measured; see place_arrays).
    balance_guard: bool = False         # keep affinity only within noisy_max_mean's bound
    guard_margin: float = 0.0           # allowed rise of the predicted next-window max/mean
    # How the plan is meant to run (PlacementPlan.replica_balance): "adaptive" re-balances the
    # replicas' shares on every step's routing, so a shift of load between windows is absorbed
    # wherever the shifted experts, or others on the same ranks, have replicas, at the cost of an
    # all-reduce and host time per layer and step; "static" keeps the shares; "auto" picks the one
    # of lower predicted step time on the windows the plan is made from, scored one by one.
    replica_balance: str = "auto"


# ----------------------------------------------------------------------------------------------
# One layer
# ----------------------------------------------------------------------------------------------


def _piece_counts(load_E: np.ndarray, mean: float, N: int, S: int, fill: bool, spare: int) -> np.ndarray:
    """Pieces per expert: ceil(load / mean) (an expert heavier than a rank must span ranks), at
    most N, within the N*S slots; with ``fill``, more pieces for the experts of largest load per
    piece (EPLB's replication rule) while more than ``spare`` slots per rank are free. Spreading
    hot experts over more ranks makes the next window's balance less sensitive to their drift."""
    E = len(load_E)
    if mean <= 0:
        return np.ones(E, dtype=np.int64)
    count_E = np.clip(np.ceil(load_E / mean - 1e-9), 1, N).astype(np.int64)
    while count_E.sum() > N * S:
        # undo the piece whose removal raises the per-piece load least
        cand = np.flatnonzero(count_E > 1)
        e = cand[np.argmin(load_E[cand] / (count_E[cand] - 1))]
        count_E[e] -= 1
    budget = N * S - min(spare * N, N * S - int(count_E.sum()))
    if fill:
        for _ in range(budget - int(count_E.sum())):
            per_E = np.where(count_E < N, load_E / count_E, -1.0)
            e = int(np.argmax(per_E))
            if per_E[e] <= 0:
                break
            count_E[e] += 1
    return count_E


def _lexmin(*keys: np.ndarray) -> int:
    """Index of the lexicographically smallest (keys[0], keys[1], ...)."""
    return int(np.lexsort(tuple(reversed(keys)))[0])


@dataclass
class _Layer:
    """A layer's placement during planning (load units of the planning window)."""

    amount_NE: np.ndarray
    held_NE: np.ndarray


def _place_layer(load_E: np.ndarray, gain_EN: np.ndarray, bonus_EN: np.ndarray, prev_held_NE: Optional[np.ndarray],
                 node_N: np.ndarray, S: int, opts: PlacementOptions) -> _Layer:
    N = gain_EN.shape[1]
    E = len(load_E)
    total = float(load_E.sum())
    mean = total / N
    count_E = _piece_counts(load_E, mean, N, S, opts.fill_slots, opts.spare_slots)
    item_e = np.repeat(np.arange(E), count_E)
    item_w = np.repeat(load_E / count_E, count_E)
    n = len(item_e)
    slotcap = S - 1 if N * S - n >= N else S
    score_IN = gain_EN[item_e] / count_E[item_e][:, None] + bonus_EN[item_e]
    cap = mean * (1 + opts.slack)

    load_N = np.zeros(N)
    used_N = np.zeros(N, dtype=np.int64)
    cnt_NE = np.zeros((N, E), dtype=np.int64)
    item_r = np.empty(n, dtype=np.int64)
    for i in sorted(range(n), key=lambda i: (-item_w[i], i)):
        e, w = item_e[i], item_w[i]
        free = (used_N < slotcap) & (cnt_NE[:, e] == 0)
        if not free.any():
            free = (used_N < S) & (cnt_NE[:, e] == 0)
        if not free.any():
            # Every rank with a free slot already holds e (the greedy filled the others first): the
            # piece joins e's lightest holder, one slot with the two pieces' share.
            holders = np.flatnonzero(cnt_NE[:, e] > 0)
            r = int(holders[np.argmin(load_N[holders])])
            item_r[i] = r
            load_N[r] += w
            cnt_NE[r, e] += 1
            continue
        fit = free & (load_N + w <= cap)
        cand = np.flatnonzero(fit if fit.any() else free)
        if fit.any():
            second = used_N[cand] if w == 0 else load_N[cand]
            r = int(cand[_lexmin(-score_IN[i, cand], second)])
        else:
            r = int(cand[_lexmin(load_N[cand], -score_IN[i, cand])])
        item_r[i] = r
        load_N[r] += w
        used_N[r] += 1
        cnt_NE[r, e] += 1

    if np.ptp(score_IN) > 0:
        _local_search(item_e, item_w, item_r, score_IN, load_N, used_N, cnt_NE, cap, slotcap, opts.search_passes)

    amount_NE = np.zeros((N, E))
    np.add.at(amount_NE, (item_r, item_e), item_w)
    held_NE = cnt_NE > 0
    _balance(amount_NE, held_NE, load_E, S, opts.balance_tolerance, prev_held_NE, node_N, gain_EN)
    return _Layer(amount_NE, held_NE)


def _local_search(item_e, item_w, item_r, score_IN, load_N, used_N, cnt_NE, cap, slotcap, passes) -> None:
    """Best improving move or swap per piece, ``passes`` times over all pieces (in place)."""
    n, N = score_IN.shape
    idx = np.arange(n)
    eps = 1e-12 * float(np.abs(score_IN).max())
    for _ in range(passes):
        changed = 0
        for i in range(n):
            r, e, w = item_r[i], item_e[i], item_w[i]
            cur = score_IN[i, r]
            # move i to rank s
            ok = (cnt_NE[:, e] == 0) & (used_N < slotcap) & (load_N + w <= np.maximum(cap, load_N))
            ok[r] = False
            move = np.where(ok, score_IN[i] - cur, -INF)
            s = int(np.argmax(move))
            best_move = move[s]
            # swap i with piece j on rank rj
            rj = item_r
            new_r = load_N[r] - w + item_w
            new_j = load_N[rj] - item_w + w
            feas = ((rj != r) & (item_e != e) & (cnt_NE[rj, e] == 0) & (cnt_NE[r, item_e] == 0)
                    & (new_r <= max(cap, load_N[r])) & (new_j <= np.maximum(cap, load_N[rj])))
            swap = np.where(feas, score_IN[i, rj] + score_IN[idx, r] - cur - score_IN[idx, rj], -INF)
            j = int(np.argmax(swap))
            best_swap = swap[j]
            if max(best_move, best_swap) <= eps:
                continue
            changed += 1
            if best_move >= best_swap:
                _relocate(i, r, s, item_e, item_w, item_r, load_N, used_N, cnt_NE)
            else:
                s = int(rj[j])
                _relocate(i, r, s, item_e, item_w, item_r, load_N, used_N, cnt_NE)
                _relocate(j, s, r, item_e, item_w, item_r, load_N, used_N, cnt_NE)
        if not changed:
            return


def _relocate(i, r, s, item_e, item_w, item_r, load_N, used_N, cnt_NE) -> None:
    e, w = item_e[i], item_w[i]
    item_r[i] = s
    load_N[r] -= w
    load_N[s] += w
    cnt_NE[r, e] -= 1
    cnt_NE[s, e] += 1
    # A slot is a (rank, expert): it frees when its last piece leaves (pieces merged by the
    # greedy share one), and is taken when the first arrives.
    used_N[r] -= cnt_NE[r, e] == 0
    used_N[s] += cnt_NE[s, e] == 1


def _balance(amount_NE: np.ndarray, held_NE: np.ndarray, load_E: np.ndarray, S: int, tol: float,
             prev_held_NE: Optional[np.ndarray], node_N: np.ndarray, gain_EN: np.ndarray) -> None:
    """Move load off the heaviest rank r until max/mean <= 1 + tol (in place). The shares are a
    flow: first along a shortest path of existing replicas (r -> an expert it serves -> another
    rank holding it -> ... -> an under-loaded rank); without one, a new replica in a free slot from
    which an under-loaded rank is reachable; without one, a swap of whole experts between r and a
    lighter rank (``_swap_towards``); last, freeing a slot on a full under-loaded rank
    (``_evict_towards``). Bounded by a step count; stops when no step applies."""
    N, E = amount_NE.shape
    target = float(load_E.sum()) / N
    if target <= 0:
        return
    prefer_NE = np.zeros((N, E), dtype=bool) if prev_held_NE is None else prev_held_NE
    gscale = float(np.abs(gain_EN).max()) or 1.0
    tiny = tol * target * 1e-3
    for _ in range(8 * (N + E) + 16):
        load_N = amount_NE.sum(1)
        r = int(np.argmax(load_N))
        excess = load_N[r] - target
        if excess <= tol * target:
            return
        deficit_N = target - load_N
        under_N = deficit_N > tiny
        if not under_N.any():
            return
        serves_NE = amount_NE > 0
        adj_NN = (serves_NE.astype(np.float64) @ held_NE.T.astype(np.float64)) > 0
        np.fill_diagonal(adj_NN, False)
        # breadth-first from r to the nearest under-loaded rank
        parent = np.full(N, -1)
        parent[r] = r
        frontier, found = [r], -1
        while frontier and found < 0:
            nxt = []
            for q in frontier:
                for t in np.flatnonzero(adj_NN[q] & (parent < 0)):
                    parent[t] = q
                    if under_N[t]:
                        found = int(t)
                        break
                    nxt.append(int(t))
                if found >= 0:
                    break
            frontier = nxt
        if found >= 0:
            path = [found]
            while path[-1] != r:
                path.append(int(parent[path[-1]]))
            path.reverse()
            hops = []
            x = min(excess, deficit_N[found])
            for q, t in zip(path, path[1:]):
                shared = np.flatnonzero(serves_NE[q] & held_NE[t])
                e = int(shared[np.argmax(amount_NE[q, shared])])
                hops.append((q, t, e))
                x = min(x, amount_NE[q, e])
            for q, t, e in hops:
                _transfer(amount_NE, held_NE, q, t, e, x)
            continue
        # no path: a new replica of an expert served by a rank r reaches, in a free slot of a
        # rank that is under-loaded or reaches one
        reach_N = parent >= 0
        to_under_N = under_N.copy()
        for _ in range(N):  # ranks from which an under-loaded rank is reachable
            grown = to_under_N | (adj_NN & to_under_N[None, :]).any(1)
            if (grown == to_under_N).all():
                break
            to_under_N = grown
        free_N = to_under_N & (held_NE.sum(1) < S)
        cand_t = np.flatnonzero(free_N)
        best = None
        for q in np.flatnonzero(reach_N):
            for e in np.flatnonzero(serves_NE[q]):
                ok = ~held_NE[cand_t, e]
                if not ok.any():
                    continue
                ts = cand_t[ok]
                x_T = np.minimum(np.minimum(excess, np.where(under_N[ts], deficit_N[ts], excess)), amount_NE[q, e])
                big = np.round(x_T / excess, 3)
                key_T = np.stack([-big, -prefer_NE[ts, e].astype(np.float64), float(q != r) * np.ones(len(ts)),
                                  (node_N[ts] != node_N[q]).astype(np.float64),
                                  -gain_EN[e, ts] / gscale, -deficit_N[ts] / target])
                j = _lexmin(*key_T)
                key = tuple(float(k[j]) for k in key_T)
                if best is None or key < best[0]:
                    best = (key, int(ts[j]), int(e))
        if best is not None:
            _, t, e = best
            held_NE[t, e] = True
            continue
        # no free slot where it would help: swap whole experts (slots unchanged), else free a slot
        # on a full under-loaded rank
        if _swap_towards(amount_NE, held_NE, r, excess, deficit_N, under_N):
            continue
        if not _evict_towards(amount_NE, held_NE, r, excess, deficit_N, under_N, S, target * tol):
            return


def _evict_towards(amount_NE, held_NE, r, excess, deficit_N, under_N, S, slack) -> bool:
    """Free a slot on a full under-loaded rank u by moving one of its experts f whole to the
    lightest rank t with a free slot, then replicate an expert e of r into it: r -x, u +x -a_f,
    t +a_f. Taken only when the summed excess over the mean falls (the largest fall wins) and t
    stays below r; False when there is no such move."""
    N, E = amount_NE.shape
    load_N = amount_NE.sum(1)
    target = load_N.mean()
    free_N = held_NE.sum(1) < S
    on_r = np.flatnonzero(amount_NE[r] > 0)
    best = None
    for u in np.flatnonzero(under_N & ~free_N):
        mov_r = on_r[~held_NE[u, on_r]]
        if not mov_r.size:
            continue
        e = int(mov_r[np.argmax(amount_NE[r, mov_r])])
        for f in np.flatnonzero(amount_NE[u] > 0):
            a_f = amount_NE[u, f]
            ts = np.flatnonzero(free_N & ~held_NE[:, f])
            ts = ts[ts != r]
            if not ts.size:
                continue
            x = min(excess, deficit_N[u] + a_f, amount_NE[r, e])
            t = int(ts[np.argmin(load_N[ts])])
            over_t = max(0.0, load_N[t] + a_f - target)
            gain = x - over_t - max(0.0, -deficit_N[t])  # fall of the summed excess over the mean
            if gain <= slack or load_N[t] + a_f >= load_N[r]:
                continue
            if best is None or gain > best[0]:
                best = (gain, int(u), e, int(f), t, x)
    if best is None:
        return False
    _, u, e, f, t, x = best
    _transfer(amount_NE, held_NE, u, t, f, amount_NE[u, f])
    _transfer(amount_NE, held_NE, r, u, e, x)
    return True


def _swap_towards(amount_NE, held_NE, r, excess, deficit_N, under_N) -> bool:
    """Swap an expert of r with a lighter one of another rank u (slots unchanged): r gives
    d = a_e - a_f to u with 0 < d < load_r - load_u, the swap that leaves the lower of the two new
    maxima. The sum of squared rank loads falls with each swap, so repeating ends. False when
    there is none."""
    load_N = amount_NE.sum(1)
    on_r = np.flatnonzero(amount_NE[r] > 0)
    best = None
    for u in range(len(load_N)):
        gap = load_N[r] - load_N[u]
        if u == r or gap <= 0:
            continue
        on_u = np.flatnonzero((amount_NE[u] > 0) & ~held_NE[r])
        mov_r = on_r[~held_NE[u, on_r]]
        if not on_u.size or not mov_r.size:
            continue
        d_RU = amount_NE[r, mov_r][:, None] - amount_NE[u, on_u][None, :]
        ok = (d_RU > 0) & (d_RU < gap)
        if not ok.any():
            continue
        peak = np.where(ok, np.maximum(load_N[r] - d_RU, load_N[u] + d_RU), INF)
        i, j = np.unravel_index(int(np.argmin(peak)), peak.shape)
        if best is None or peak[i, j] < best[0]:
            best = (float(peak[i, j]), int(u), int(mov_r[i]), int(on_u[j]))
    if best is None or best[0] >= load_N[r]:
        return False
    _, u, e, f = best
    _transfer(amount_NE, held_NE, r, u, e, amount_NE[r, e])
    _transfer(amount_NE, held_NE, u, r, f, amount_NE[u, f])
    return True


def _transfer(amount_NE: np.ndarray, held_NE: np.ndarray, r: int, s: int, e: int, x: float) -> None:
    """Move ``x`` of expert e's load from rank r to rank s; r's slot frees when it empties."""
    x = min(x, amount_NE[r, e])
    amount_NE[r, e] -= x
    amount_NE[s, e] += x
    held_NE[s, e] = True
    if amount_NE[r, e] <= 1e-12 * max(1.0, x):
        amount_NE[r, e] = 0.0
        held_NE[r, e] = False


def _layer_plan(layer: _Layer, load_E: np.ndarray) -> LayerPlan:
    N, E = layer.amount_NE.shape
    keep_NE = layer.held_NE & ((layer.amount_NE > 0) | (load_E[None, :] <= 0))
    # an expert with load whose amount ended up nowhere (cannot happen) keeps its holdings
    lost = ~keep_NE.any(0)
    keep_NE[:, lost] = layer.held_NE[:, lost]
    share_NE = np.where(load_E[None, :] > 0, layer.amount_NE / np.where(load_E > 0, load_E, 1.0)[None, :], 0.0)
    share_NE = np.where(keep_NE, share_NE, 0.0)
    col = share_NE.sum(0)
    even = keep_NE / np.maximum(keep_NE.sum(0), 1)
    share_NE = np.where((col > 0)[None, :], share_NE / np.where(col > 0, col, 1.0)[None, :], even)
    rank_experts = [[int(e) for e in np.flatnonzero(keep_NE[r])] for r in range(N)]
    shares = [[float(share_NE[r, e]) for e in rank_experts[r]] for r in range(N)]
    return LayerPlan(rank_experts, shares)


# ----------------------------------------------------------------------------------------------
# All layers
# ----------------------------------------------------------------------------------------------


def _node_sum(P_EN: np.ndarray, node_N: np.ndarray) -> np.ndarray:
    nodes = int(node_N.max()) + 1
    per_node = np.zeros((P_EN.shape[0], nodes))
    np.add.at(per_node.T, node_N, P_EN.T)
    return per_node[:, node_N]


def _pair_cost(shares: list[np.ndarray], aff_LEE: Optional[np.ndarray], node_N: np.ndarray, beta_i: float,
               beta_e: float) -> float:
    if aff_LEE is None:
        return 0.0
    same_rank = np.eye(len(node_N), dtype=bool)
    same_node = node_N[:, None] == node_N[None, :]
    cost_NN = np.where(same_rank, 0.0, np.where(same_node, beta_i, beta_e))
    return float(sum(((shares[l] @ aff_LEE[l] @ shares[l + 1].T) * cost_NN).sum() for l in range(len(shares) - 1)))


def affinity_communities(load_LE: np.ndarray, aff_LEE: np.ndarray, seed: int = 0) -> list[list[tuple[int, int]]]:
    """Communities of the inter-layer affinity graph: nodes (layer, expert), an edge (l, a) --
    (l+1, b) weighted by the pairs in excess of independence, ``A[a, b] - rowsum_a * colsum_b /
    total``, kept where that excess is above twice its sampling noise (sqrt of the expectation);
    networkx's Louvain (fixed seed: deterministic). With group-limited routing each community is
    a chain of expert groups through the layers; with per-expert affinity, a chain of experts."""
    import networkx as nx

    L, E = load_LE.shape
    graph = nx.Graph()
    graph.add_nodes_from(range(L * E))
    for l in range(L - 1):
        a_EE = aff_LEE[l]
        total = float(a_EE.sum())
        if total <= 0:
            continue
        expect_EE = np.outer(a_EE.sum(1), a_EE.sum(0)) / total
        excess_EE = a_EE - expect_EE
        ia, ib = np.nonzero(excess_EE > 2 * np.sqrt(expect_EE + 1))
        graph.add_weighted_edges_from(zip((l * E + ia).tolist(), ((l + 1) * E + ib).tolist(),
                                          excess_EE[ia, ib].tolist()))
    if graph.number_of_edges() == 0:
        return [[(v // E, v % E)] for v in range(L * E)]
    found = nx.community.louvain_communities(graph, weight="weight", seed=seed)
    return sorted(([(v // E, v % E) for v in sorted(c)] for c in found), key=lambda c: c[0])


def _community_shares(load_LE: np.ndarray, communities, N: int, M: int) -> list[np.ndarray]:
    """Seed shares [N, E] per layer that put each community on as few ranks as its heaviest layer
    needs (ceil(load / mean rank load) equal pieces), the pieces of one community on one node when
    the balance allows: pieces by size, descending, each onto the rank (not holding a piece of its
    community) with the lowest resulting peak over layers of load / mean; among ranks within 2% of
    that peak, one on a node that already holds a piece of the community. Slots are not counted:
    the per-layer placement that follows enforces them and the exact balance."""
    L, E = load_LE.shape
    mean_L = np.maximum(load_LE.sum(1) / N, 1e-300)
    node_N = np.arange(N) // M
    items = []
    for c, members in enumerate(communities):
        v_L = np.zeros(L)
        for l, e in members:
            v_L[l] += load_LE[l, e]
        pieces = int(min(N, max(1, math.ceil(float((v_L / mean_L).max()) - 1e-9))))
        items += [(float((v_L / mean_L).max()) / pieces, c, v_L / pieces)] * pieces
    load_NL = np.zeros((N, L))
    ranks_of: dict[int, list[int]] = {}
    for _, c, v_L in sorted(items, key=lambda t: (-t[0], t[1])):
        taken = ranks_of.setdefault(c, [])
        peak_N = ((load_NL + v_L) / mean_L).max(1)
        peak_N[taken] = np.inf
        ok = peak_N <= peak_N.min() + 0.02
        near = ok & np.isin(node_N, node_N[taken]) if taken else ok
        cand = np.flatnonzero(near if near.any() else ok)
        r = int(cand[np.argmin(peak_N[cand])])
        taken.append(r)
        load_NL[r] += v_L
    shares = [np.zeros((N, E)) for _ in range(L)]
    for c, members in enumerate(communities):
        ranks = ranks_of[c]
        for l, e in members:
            shares[l][ranks, e] = 1.0 / len(ranks)
    return shares


def noisy_max_mean(plan: PlacementPlan, load_LE: np.ndarray, aff_LEE: Optional[np.ndarray], top_k: int) -> float:
    """The worst layer's predicted max/mean load on a fresh window of the same routing: rank r's
    load plus z = sqrt(2 ln N) standard deviations of its sampling noise (about the expected
    maximum of N normals), over the mean. Tokens are i.i.d.: Var(load_r) = T * Var(x_r), x_r a
    token's slots on r (T = slots / k tokens). E[x_r^2] is estimated from the same-rank pair
    flow of the layer's transitions, sum over tokens of x_r(l) * x_r(l+/-1) (equal to it when a
    token's experts stay together layer to layer), and is at least E[x_r] (x_r is an integer)."""
    L, E = load_LE.shape
    N = plan.world_size
    z = math.sqrt(2 * math.log(N)) if N > 1 else 0.0
    shares = [plan.share_matrix(l) for l in range(L)]
    worst = 0.0
    for l in range(L):
        load_N = shares[l] @ load_LE[l]
        total = float(load_N.sum())
        if total <= 0:
            continue
        T = total / max(top_k, 1)
        flows = []
        if aff_LEE is not None:
            if l > 0:
                flows.append(np.diag(shares[l - 1] @ aff_LEE[l - 1] @ shares[l].T))
            if l < L - 1:
                flows.append(np.diag(shares[l] @ aff_LEE[l] @ shares[l + 1].T))
        second_N = np.maximum(np.mean(flows, axis=0) if flows else 0.0, load_N) / T
        var_N = np.maximum(second_N - (load_N / T) ** 2, 0.0) * T
        worst = max(worst, float((load_N + z * np.sqrt(var_N)).max() / (total / N)))
    return worst


def _plan_layers(load_LE, aff_LEE, src_LRE, N, M, S, top_k, prev: Optional[PlacementPlan], keep: float,
                 opts: PlacementOptions, beta_i: float, beta_e: float,
                 seed_shares: Optional[list[np.ndarray]] = None, weight: float = 1.0) -> list[LayerPlan]:
    L, E = load_LE.shape
    node_N = np.arange(N) // M
    prev_held = None
    if prev is not None:
        prev_held = [prev.share_matrix(l) > 0 for l in range(L)]
        for l in range(L):  # a zero-share replica is still held: its weights are there
            for r, experts in enumerate(prev.layers[l].rank_experts):
                prev_held[l][r, experts] = True
    shares: list[Optional[np.ndarray]] = list(seed_shares) if seed_shares is not None else [None] * L
    best: tuple[float, list] = (INF, [])
    order = list(range(L))
    for sweep in range(max(1, opts.sweeps)):
        plans: list[Optional[LayerPlan]] = [None] * L if sweep == 0 else list(best_plans)
        for l in order:
            P_EN = np.zeros((E, N))
            if aff_LEE is not None and l > 0 and shares[l - 1] is not None:
                P_EN += aff_LEE[l - 1].T @ shares[l - 1].T
            if aff_LEE is not None and l < L - 1 and shares[l + 1] is not None:
                P_EN += aff_LEE[l] @ shares[l + 1].T
            if l == 0 and src_LRE is not None and src_LRE.shape[1] == N:
                P_EN += top_k * src_LRE[0].T
            gain_EN = weight * (beta_i * P_EN + (beta_e - beta_i) * _node_sum(P_EN, node_N))
            bonus_EN = np.zeros((E, N))
            held = None
            if prev_held is not None:
                held = prev_held[l]
                base_E = beta_e * P_EN.sum(1)
                floor = 1e-9 * max(float(base_E.max()), 1e-300)
                per_E = (1e3 * float(base_E.max()) + floor) * np.ones(E) if keep == INF else keep * base_E + floor
                bonus_EN = held.T * per_E[:, None]
            layer = _place_layer(load_LE[l], gain_EN, bonus_EN, held, node_N, S, opts)
            plans[l] = _layer_plan(layer, load_LE[l])
            shares[l] = plans[l].share_matrix(E)
        cost = _pair_cost(shares, aff_LEE, node_N, beta_i, beta_e)
        if cost < best[0] or not best[1]:
            best = (cost, [p for p in plans])
        best_plans = best[1]
        if aff_LEE is None:
            break  # without affinity the layers are independent: one sweep is the answer
        order = order[::-1]
    return best[1]


def place_arrays(load_LE: np.ndarray, world_size: int, ranks_per_node: int, slots_per_rank: int, *,
                 affinity_LEE: Optional[np.ndarray] = None, source_LRE: Optional[np.ndarray] = None,
                 top_k: int = 1, previous: Optional[PlacementPlan] = None,
                 options: Optional[PlacementOptions] = None, config: Optional[ScoreConfig] = None,
                 history: Optional[list] = None) -> PlacementPlan:
    """``place`` on one window's arrays (``load_LE`` [L, E], ``affinity_LEE`` [L-1, E, E]).
    ``history``: the windows the planning input averages, ``[(weight, load_LE, affinity_LEE or
    None), ...]``, which ``replica_balance="auto"`` scores the plan on (default: the input alone)."""
    opts = options or PlacementOptions()
    if opts.replica_balance not in ("auto", "static", "adaptive"):
        raise PlanError(f"replica_balance must be 'auto', 'static' or 'adaptive', got {opts.replica_balance!r}")
    config = config or ScoreConfig()
    load_LE = np.asarray(load_LE, dtype=np.float64)
    if load_LE.ndim != 2:
        raise PlanError(f"planning needs load shaped [layers, experts], got shape {load_LE.shape}")
    L, E = load_LE.shape
    N, S = world_size, slots_per_rank
    if N < 1 or ranks_per_node < 1 or S < 1:
        raise PlanError(f"world size, ranks per node and slots per rank must be >= 1; got {N}, {ranks_per_node}, {S}")
    M = min(ranks_per_node, N)
    if N > M and N % M:
        raise PlanError(f"{N} ranks do not fill nodes of {M}: use a multiple of the ranks per node")
    if N * S < E:
        raise PlanError(f"slots fewer than experts: {N} rank(s) x {S} slot(s) = {N * S} < {E} experts; "
                        f"use at least {math.ceil(E / N)} slots per rank")
    if previous is not None:
        if previous.world_size != N:
            raise PlanError(f"previous plan is for {previous.world_size} ranks, not {N}: plan without it")
        previous.validate(num_experts=E, num_layers=L)
    aff = None if affinity_LEE is None or L < 2 else np.asarray(affinity_LEE, dtype=np.float64)
    src = None if source_LRE is None else np.asarray(source_LRE, dtype=np.float64)
    calib = config.calibration
    beta_i, beta_e = calib.beta_s_per_byte["intra"], calib.beta_s_per_byte["inter"]

    mode = "static" if opts.replica_balance == "auto" else opts.replica_balance  # decided below for "auto"

    def build(prev, keep, seed, weight=1.0) -> PlacementPlan:
        layers = _plan_layers(load_LE, aff, src, N, M, S, top_k, prev, keep, opts, beta_i, beta_e, seed, weight)
        plan = PlacementPlan(world_size=N, layers=layers, num_experts=E, ranks_per_node=ranks_per_node,
                             meta={"method": "moec"}, replica_balance=mode)
        return plan.validate(num_experts=E, num_layers=L, slots_per_rank=S)

    def time_of(plan):
        return score_arrays(plan, load_LE, aff, src, top_k=top_k, ranks_per_node=M, config=config).time_s

    # Two starts for the sweeps: the affinity graph's communities packed onto ranks (networkx), and
    # none (layer 0 by load alone); the one of lower predicted step time on the planning input wins.
    seeds: list[Optional[list[np.ndarray]]] = [None]
    if aff is not None and opts.partition:
        seeds.insert(0, _community_shares(load_LE, affinity_communities(load_LE, aff), N, M))
    built = [(build(None, 0.0, seed), seed) for seed in seeds]
    scratch, seed = min(built, key=lambda t: time_of(t[0]))
    scratch.meta["seeded"] = seed is not None
    weight = 1.0
    if aff is not None and opts.balance_guard:
        # Balance first: co-locating a token's experts makes a rank's load on the next window
        # noisier (its k slots arrive together). Keep the affinity weight only while the predicted
        # next-window max/mean stays within the balance-only plan's (weight 0); else halve it.
        plain = build(None, 0.0, None, 0.0)
        bound = noisy_max_mean(plain, load_LE, aff, top_k) + opts.guard_margin
        for weight in (1.0, 0.5, 0.25, 0.0):
            if weight < 1.0:
                scratch = build(None, 0.0, seed, weight) if weight > 0 else plain
                scratch.meta["seeded"] = seed is not None and weight > 0
            if weight == 0.0 or noisy_max_mean(scratch, load_LE, aff, top_k) <= bound:
                break
        scratch.meta["affinity_weight"] = weight
    if opts.replica_balance == "auto":
        # Adaptive balancing pays an all-reduce and host time every step, and gains where the load
        # moved since the plan was made. Out-of-sample evidence when there is a deployed plan: that
        # plan (made before the newest window) scored on the newest window both ways; else the
        # windows the new plan was made from, scored one by one (in sample: it rarely pays there).
        if previous is not None and history:
            judged, windows = previous, [history[-1]]
        else:
            judged, windows = scratch, history or [(1.0, load_LE, aff)]
        times = {}
        for candidate in ("static", "adaptive"):
            trial = dataclasses.replace(judged, replica_balance=candidate)
            times[candidate] = sum(w * score_arrays(trial, l_LE, a_LEE, None, top_k=top_k, ranks_per_node=M,
                                                    config=config).time_s for w, l_LE, a_LEE in windows)
        mode = "adaptive" if times["adaptive"] < times["static"] else "static"
        scratch.replica_balance = mode
        scratch.meta["replica_balance_scores"] = {k: v / sum(w for w, _, _ in windows) for k, v in times.items()}
        scratch.meta["replica_balance_judged_on"] = "previous plan, newest window" if judged is previous else "planning windows"
    if previous is None:
        return scratch

    scratch_s = time_of(scratch)
    limit = scratch_s * (1 + opts.keep_budget)
    # Sweeps that keep weights start from the deployed plan (its chains already co-located), not
    # from a fresh packing of the communities, which may put the same chains on other ranks.
    start = [previous.share_matrix(l) for l in range(L)] if aff is not None and weight > 0 else None
    candidates = [(scratch, 0, scratch_s)]  # (plan, keep, predicted time)
    for keep in opts.keep_weights:
        plan = build(previous, keep, start, weight)
        plan_s = time_of(plan)
        if plan_s <= limit:
            candidates.append((plan, "inf" if keep == INF else keep, plan_s))
            break  # the strongest keep bonus within the budget: weaker ones keep fewer weights
    renamed = _relabel(scratch, previous, M)
    renamed_s = time_of(renamed)
    if renamed_s <= limit:
        candidates.append((renamed, "renamed", renamed_s))
    best, keep, _ = min(candidates, key=lambda c: (sum(weights_moved(c[0], previous)), c[2]))
    best.meta.update({k: v for k, v in scratch.meta.items() if k.startswith("replica_balance")})
    best.meta.update(keep=keep, previous=True)
    return best


def _relabel(plan: PlacementPlan, previous: PlacementPlan, M: int) -> PlacementPlan:
    """``plan`` with its ranks renamed to keep the most of ``previous``'s weights in place among the
    renamings that keep node mates together: for every pair of nodes, the best matching of their
    ranks by experts in common (summed over the layers); then nodes matched to nodes by those
    values (max-weight full matchings, networkx)."""
    import networkx as nx

    N = plan.world_size
    common = np.zeros((N, N))  # [previous rank, plan rank]
    for old, new in zip(previous.layers, plan.layers):
        for a, experts_a in enumerate(old.rank_experts):
            held = set(experts_a)
            for b, experts_b in enumerate(new.rank_experts):
                common[a, b] += len(held.intersection(experts_b))

    def match(weight: np.ndarray) -> dict[int, int]:
        """Column -> row of a max-weight full matching of the square ``weight``."""
        n = weight.shape[0]
        graph = nx.Graph()
        graph.add_weighted_edges_from((("row", i), ("col", j), float(weight[i, j]) + 1.0)
                                      for i in range(n) for j in range(n))
        pairs = nx.max_weight_matching(graph, maxcardinality=True)
        return {b[1]: a[1] for a, b in (sorted(p, key=lambda v: v[0] != "row") for p in pairs)}

    M = min(M, N)
    nodes = N // M if N % M == 0 else 1
    size = N // nodes
    inner, node_value = {}, np.zeros((nodes, nodes))
    for old_node in range(nodes):
        for new_node in range(nodes):
            block = common[old_node * size:(old_node + 1) * size, new_node * size:(new_node + 1) * size]
            inner[old_node, new_node] = pairs = match(block)
            node_value[old_node, new_node] = sum(block[a, b] for b, a in pairs.items())
    to_old = {}
    for new_node, old_node in match(node_value).items():
        for b, a in inner[old_node, new_node].items():
            to_old[new_node * size + b] = old_node * size + a
    layers = []
    for lp in plan.layers:
        experts, shares = [None] * N, [None] * N
        for b in range(N):
            experts[to_old[b]] = list(lp.rank_experts[b])
            shares[to_old[b]] = None if lp.shares is None else list(lp.shares[b])
        layers.append(LayerPlan(experts, None if lp.shares is None else shares))
    return dataclasses.replace(plan, layers=layers, meta=dict(plan.meta))


def _window_weights(w: int, history: float) -> np.ndarray:
    """Weights of windows 0..w in the planning input: d^(w - j) normalised (d = ``history``; 0: window w only)."""
    weight_J = np.array([history ** (w - j) for j in range(w + 1)]) if history > 0 else np.eye(w + 1)[w]
    return weight_J / weight_J.sum()


def planning_arrays(trace, window: int, history: float = 0.0):
    """``(load_LE, affinity_LEE or None, source_LRE or None)`` to plan window ``window`` on: with
    ``history`` d in (0, 1), the exponential moving average of windows 0..window, window j
    weighted d^(window - j) (normalised: counts stay per window); 0 reads window ``window`` only.
    Never a later window."""
    W = trace.num_windows
    if not -W <= window < W:
        raise PlanError(f"window {window} out of range: the trace has {W} window(s)")
    if not 0.0 <= history < 1.0:
        raise PlanError(f"history is a decay in [0, 1), got {history}")
    w = window % W
    weight_J = _window_weights(w, history)

    def avg(a):
        return None if a is None else np.tensordot(weight_J, np.asarray(a[:w + 1], dtype=np.float64), axes=1)

    return avg(trace.load_WLE), avg(trace.affinity_WLEE), avg(getattr(trace, "source_WLRE", None))


def place(trace, world_size: int, ranks_per_node: int, slots_per_rank: int, *, window: int = 0,
          previous: Optional[PlacementPlan] = None, options: Optional[PlacementOptions] = None,
          config: Optional[ScoreConfig] = None, history: float = 0.0) -> PlacementPlan:
    """The moec plan for window ``window`` of ``trace`` (a ``RoutingTrace``); with ``history``,
    planned on the moving average of windows <= ``window`` (``planning_arrays``)."""
    load_LE, aff_LEE, src_LRE = planning_arrays(trace, window, history)
    w = window % trace.num_windows
    aff = trace.affinity_WLEE
    windows = [(float(weight), trace.load_WLE[j].astype(np.float64), None if aff is None else aff[j].astype(np.float64))
               for j, weight in enumerate(_window_weights(w, history))]
    plan = place_arrays(load_LE, world_size, ranks_per_node, slots_per_rank, affinity_LEE=aff_LEE,
                        source_LRE=src_LRE, top_k=(trace.meta or {}).get("top_k") or 1, previous=previous,
                        options=options, config=config or ScoreConfig.from_trace(trace),
                        history=[x for x in windows if x[0] > 0])
    # The trace's layer names travel with the plan: moec.compile refuses it for another model's layers.
    trace_meta = trace.meta or {}
    plan.meta.update(window=w, trace=trace_meta.get("source"), layer_names=trace_meta.get("layer_names"))
    if history:
        plan.meta["history"] = history
    return plan


# ----------------------------------------------------------------------------------------------
# Harness: moec and the baselines, planned on window i, scored on window i+1
# ----------------------------------------------------------------------------------------------


def method_names() -> list[str]:
    return ["moec", *BASELINES]


def plan_method(name: str, trace, window: int, world_size: int, ranks_per_node: int, slots_per_rank: int, *,
                previous: Optional[PlacementPlan] = None, options: Optional[PlacementOptions] = None,
                config: Optional[ScoreConfig] = None, history: float = 0.0) -> PlacementPlan:
    """Plan with ``name`` (``moec`` or a baseline) on window ``window``; every method reads the
    same input, ``planning_arrays(trace, window, history)`` (the baselines its load only)."""
    if name == "moec":
        return place(trace, world_size, ranks_per_node, slots_per_rank, window=window, previous=previous,
                     options=options, config=config, history=history)
    if name not in BASELINES:
        raise PlanError(f"unknown placement method {name!r}; known: {', '.join(method_names())}")
    plan = BASELINES[name](planning_arrays(trace, window, history)[0], world_size, ranks_per_node, slots_per_rank)
    if history:
        plan.meta["history"] = history
    return plan


def scoring_window(trace, window: int) -> int:
    """The window a plan made on ``window`` is scored on: the next one (the same only when the
    trace has a single window)."""
    W = trace.num_windows
    if not -W <= window < W:
        raise PlanError(f"window {window} out of range: the trace has {W} window(s)")
    return min(window % W + 1, W - 1)


def compare(trace, world_size: int, ranks_per_node: int, slots_per_rank: int, *, window: int = 0,
            previous: Optional[PlacementPlan] = None, methods: Optional[list[str]] = None,
            options: Optional[PlacementOptions] = None, config: Optional[ScoreConfig] = None,
            history: float = DEFAULT_HISTORY) -> dict[str, tuple[PlacementPlan, PlanScore]]:
    """Plan with every method on ``window`` and score on ``scoring_window(window)``. Every method,
    moec and each baseline alike, plans on the same input: the moving average of windows
    0..``window`` with decay ``history`` (``planning_arrays``; default 0.5: window i weighs 1,
    i-1 0.5, ...; 0 reads window i alone), as EPLB plans on a load history; never on the window
    scored. With ``previous``, ``moec`` plans from it and ``moec-scratch`` is added (same
    optimiser, no previous plan); weights moved are counted from ``previous`` for every method."""
    config = config or ScoreConfig.from_trace(trace)
    target = scoring_window(trace, window)
    names = list(methods or method_names())
    if previous is not None and "moec" in names:
        names.insert(names.index("moec") + 1, "moec-scratch")
    out = {}
    for name in names:
        if name == "moec-scratch":
            plan = place(trace, world_size, ranks_per_node, slots_per_rank, window=window, options=options,
                         config=config, history=history)
        else:
            plan = plan_method(name, trace, window, world_size, ranks_per_node, slots_per_rank,
                               previous=previous if name == "moec" else None, options=options, config=config,
                               history=history)
        out[name] = (plan, score_plan(plan, trace, target, ranks_per_node=ranks_per_node, config=config,
                                      previous=previous))
    return out


def evaluate_windows(trace, world_size: int, ranks_per_node: int, slots_per_rank: int, *,
                     methods: Optional[list[str]] = None, options: Optional[PlacementOptions] = None,
                     config: Optional[ScoreConfig] = None, history: float = DEFAULT_HISTORY) -> list[dict[str, Any]]:
    """For every window i but the last: every method planned on i (with ``history``: on the
    moving average of windows <= i, as ``compare``), scored on i+1. ``moec`` from
    window 1 on plans from its own plan of window i-1 (the deployed chain; window 0 from scratch)
    and ``moec-scratch`` is the same optimiser without it; weights moved are counted from the
    deployed moec plan of window i-1. Rows: ``{"window", "scored_on", "scores": {name: PlanScore},
    "plans": {name: PlacementPlan}}``."""
    config = config or ScoreConfig.from_trace(trace)
    rows = []
    deployed: Optional[PlacementPlan] = None
    for i in range(max(1, trace.num_windows - 1)):
        result = compare(trace, world_size, ranks_per_node, slots_per_rank, window=i, previous=deployed,
                         methods=methods, options=options, config=config, history=history)
        rows.append(dict(window=i, scored_on=scoring_window(trace, i),
                         scores={k: s for k, (_, s) in result.items()}, plans={k: p for k, (p, _) in result.items()}))
        if "moec" in result:
            deployed = result["moec"][0]
    return rows
