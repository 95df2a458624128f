"""The placement pass (``moec.passes.placement``), its scoring (``placement_score``) and baselines
(``placement_baselines``): scores computed by hand, the cost model's own prediction under uniform
routing, baselines' known answers (EPLB on tiny cases worked by hand), degenerate routings, the
plan-on-window-i / score-on-window-i+1 harness, and the issue-6 targets that are met on the
shipped presets (the ones that are not are measured by ``benchmarks/placement.py``)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from moec.passes.placement import (PlacementOptions, affinity_communities, compare, evaluate_windows,
                                   noisy_max_mean, place, place_arrays, planning_arrays, scoring_window)
from moec.passes.placement_baselines import (balanced_packing, contiguous, default_num_groups, eplb,
                                             eplb_global, eplb_hierarchical, replicate, round_robin)
from moec.passes.placement_score import (ScoreConfig, dispatch_matrix, pair_flow, routed_shares, score_arrays,
                                         score_plan, score_window_inputs, traffic_floor, weights_moved)
from moec.runtime.cost_model import Calibration, LayerShape, predict
from moec.runtime.plan import LayerPlan, PlacementPlan, PlanError
from moec.runtime.synthetic import synthetic_trace
from moec.runtime.trace import RoutingTrace

BASELINE_NAMES = ("contiguous", "round-robin", "eplb-hierarchical", "eplb-global")


@pytest.fixture(scope="module")
def presets():
    return {name: RoutingTrace.load(f"synthetic:{name}")
            for name in ("zipf64-affinity", "zipf256-affinity", "zipf64-group-affinity", "zipf256-group-affinity")}


def slots(E: int, N: int) -> int:
    return math.ceil(1.25 * E / N)


# --- scoring by hand -------------------------------------------------------------------------

# 2 ranks (one per node), 2 experts, 2 layers, top-1: 8 tokens.
LOAD_LE = np.array([[6.0, 2.0], [4.0, 4.0]])
AFF_LEE = np.array([[[3.0, 1.0], [1.0, 3.0]]])


def two_rank_plan(layer1: LayerPlan) -> PlacementPlan:
    return PlacementPlan(2, [LayerPlan([[0], [1]]), layer1], num_experts=2)


@pytest.mark.parametrize("layer1, cross", [
    (LayerPlan([[0], [1]]), 2 / 8),                            # pairs (0,0) and (1,1) stay
    (LayerPlan([[1], [0]]), 6 / 8),                            # swapped: only (0,1), (1,0) stay
    (LayerPlan([[0], [0, 1]], [[0.5], [0.5, 1.0]]), 3 / 8),   # F = [[1.5, 2.5], [0.5, 3.5]]
])
def test_cross_rank_and_node_fractions_by_hand(layer1, cross):
    score = score_arrays(two_rank_plan(layer1), LOAD_LE, AFF_LEE, None, ranks_per_node=1)
    assert score.layers[0].cross_rank is None  # layer 0 has no previous layer
    assert score.layers[1].cross_rank == pytest.approx(cross)
    assert score.layers[1].cross_node == pytest.approx(cross)  # one rank per node
    assert score.cross_rank == pytest.approx(cross)
    assert score.layers[0].max_mean_load == pytest.approx(6 / 4)
    one_node = score_arrays(two_rank_plan(layer1), LOAD_LE, AFF_LEE, None, ranks_per_node=2)
    assert one_node.layers[1].cross_node == 0.0 and one_node.layers[1].cross_rank == pytest.approx(cross)


def test_pair_flow_and_dispatch_matrix():
    share0 = np.eye(2)
    share1 = np.array([[0.5, 0.0], [0.5, 1.0]])
    F = pair_flow(share0, AFF_LEE[0], share1)
    np.testing.assert_allclose(F, [[1.5, 2.5], [0.5, 3.5]])
    D = dispatch_matrix(share0, AFF_LEE[0], share1, LOAD_LE[1])
    np.testing.assert_allclose(D.sum(0), share1 @ LOAD_LE[1])  # received = rank loads
    np.testing.assert_allclose(D.sum(), LOAD_LE[1].sum())
    # b=0's slots come 3:1 from ranks 0:1; b=1's 1:3
    np.testing.assert_allclose(D, [[3 * 0.5 + 1 * 0, 3 * 0.5 + 1 * 1], [1 * 0.5, 1 * 0.5 + 3 * 1]])
    uniform = dispatch_matrix(None, None, share1, LOAD_LE[1])
    np.testing.assert_allclose(uniform, np.outer([0.5, 0.5], share1 @ LOAD_LE[1]))
    source = dispatch_matrix(None, None, np.eye(2), LOAD_LE[0], np.array([[6.0, 0.0], [0.0, 2.0]]))
    np.testing.assert_allclose(source, np.diag([6.0, 2.0]))  # every token already on its expert's rank


def test_traffic_floor_by_hand():
    # top-1 chains: expert a at layer 0 always goes to expert (a + 1) % 4 at layer 1, 4 ranks of 1 slot
    chain_EE = np.roll(np.eye(4), 1, axis=1) * 10.0
    floor = traffic_floor(chain_EE[None], 4, 2, 1)
    assert floor == {"cross_rank": 0.0, "cross_node": 0.0}
    chained = PlacementPlan(4, [LayerPlan([[0], [1], [2], [3]]), LayerPlan([[1], [2], [3], [0]])], num_experts=4)
    assert score_arrays(chained, np.full((2, 4), 10.0), chain_EE[None], None, ranks_per_node=2).cross_rank == 0.0
    # independent choices (no excess over independence): only b/N of the pairs can share a rank,
    # and contiguous reaches it at b = 1
    flat_EE = np.full((4, 4), 2.5)
    assert traffic_floor(flat_EE[None], 4, 2, 1, max_mean=1.0)["cross_rank"] == pytest.approx(0.75)
    flat_load = np.full((2, 4), 5.0)  # top-2: 10 pairs reach each expert, 2 per slot
    assert score_arrays(PlacementPlan.contiguous(4, 4, 2), flat_load, flat_EE[None], None, top_k=2,
                        ranks_per_node=2).cross_rank == pytest.approx(0.75)  # contiguous reaches it
    # pairs not counted k per slot (half of expert 0's missing): the bound widens by rho = 1.0 / 0.875
    partial_EE = flat_EE.copy()
    partial_EE[:, 0] /= 2
    wide = traffic_floor(partial_EE[None], 4, 2, 1, max_mean=1.0, load_LE=flat_load, top_k=2)["cross_rank"]
    assert wide == pytest.approx(1 - (1 / 0.875) * 1.0 / 4 - np.maximum(partial_EE - np.outer(partial_EE.sum(1), partial_EE.sum(0)) / partial_EE.sum(), 0).max(1).sum() / partial_EE.sum())
    assert traffic_floor(partial_EE[None], 4, 2, 1, load_LE=np.array([[5.0] * 4, [0.0, 5, 5, 5]]), top_k=2) == {
        "cross_rank": 0.0, "cross_node": 0.0}  # pairs reach an expert without slots: no bound
    with pytest.raises(ValueError, match="do not fill nodes"):
        traffic_floor(flat_EE[None], 6, 4, 1)
    assert traffic_floor(flat_EE[None], 4, 2, 1)["cross_rank"] == pytest.approx(1 - 1.05 / 4)
    assert traffic_floor(flat_EE[None], 4, 4, 1)["cross_node"] == 0.0  # one node
    assert traffic_floor(flat_EE[None], 1, 1, 4) == {"cross_rank": 0.0, "cross_node": 0.0}
    assert traffic_floor(None, 4, 2, 1) == {"cross_rank": None, "cross_node": None}
    assert traffic_floor(np.zeros((1, 4, 4)), 4, 2, 1) == {"cross_rank": None, "cross_node": None}
    with pytest.raises(ValueError, match="max_mean"):
        traffic_floor(flat_EE[None], 4, 2, 1, max_mean=0.9)


def _random_plan(rng, L: int, E: int, N: int, S: int) -> PlacementPlan:
    """Every expert on a random rank with a free slot, the other slots random replicas (some left
    empty), replica shares from a Dirichlet."""
    layers = []
    for _ in range(L):
        held = [set() for _ in range(N)]
        for e in rng.permutation(E):
            free = [r for r in range(N) if len(held[r]) < S]
            held[int(rng.choice(free))].add(int(e))
        for r in range(N):
            for e in rng.permutation(E)[:int(rng.integers(0, S - len(held[r]) + 1))]:
                held[r].add(int(e))
        ranks_E = {e: [r for r in range(N) if e in held[r]] for e in range(E)}
        split = {e: rng.dirichlet(np.ones(len(rs))) for e, rs in ranks_E.items()}
        experts = [sorted(h) for h in held]
        shares = [[float(split[e][ranks_E[e].index(r)]) for e in experts[r]] for r in range(N)]
        layers.append(LayerPlan(experts, shares))
    return PlacementPlan(N, layers, num_experts=E)


@pytest.mark.parametrize("kind", ["expert", "group"])
def test_traffic_floor_bounds_every_plan(kind):
    """No plan crosses ranks (nodes) less than the floor at its own balance: random plans with
    replicas and uneven shares, the baselines and moec's plans, on small traces with affinity (the
    floor is reached exactly in test_traffic_floor_by_hand; here the closest plan is 0.17 above it
    with per-expert affinity and 0.25 with groups, where the bound is loose)."""
    group = dict(affinity_group=4, topk_groups=1) if kind == "group" else {}
    trace = synthetic_trace(16, 3, 2, 4096, 2, zipf_s=1.0, affinity=0.9, drift=0.0, seed=5, **group)
    load_LE, aff_LEE, _ = score_window_inputs(trace, 1)
    rng = np.random.default_rng(0)
    for N, M, S in ((4, 2, 5), (8, 4, 3), (8, 2, 2)):
        plans = [_random_plan(rng, 3, 16, N, S) for _ in range(30)]
        plans += [fn(load_LE, N, M, S) for fn in (contiguous, round_robin, eplb_global)]
        plans.append(place_arrays(load_LE, N, M, S, affinity_LEE=aff_LEE, top_k=2))
        for plan in plans:
            score = score_arrays(plan, load_LE, aff_LEE, None, top_k=2, ranks_per_node=M)
            # the plan's balance as the floor counts it (pairs reaching each rank over the mean), with
            # the shares it runs with (routed_shares: an adaptive plan's are balanced on the window)
            routed = routed_shares(plan, load_LE)
            b = max(float((routed[l + 1] @ aff_LEE[l].sum(0)).max() * N / aff_LEE[l].sum()) for l in range(2))
            floor = traffic_floor(aff_LEE, N, M, S, max_mean=b)
            assert score.cross_rank >= floor["cross_rank"] - 1e-12
            assert score.cross_node >= floor["cross_node"] - 1e-12


def test_adaptive_replica_balance_is_scored_on_the_window():
    """A plan with ``replica_balance="adaptive"`` is scored with the shares the runtime's per-step
    balancing gives on the window (``routed_shares``) and pays the counts' all-reduce per layer
    that has replicas."""
    import dataclasses

    from moec.passes.placement_score import HOST_S_FIXED, HOST_S_PER_FILL, routed_shares

    load_LE = np.array([[10.0, 6.0, 2.0]])
    static = PlacementPlan(2, [LayerPlan([[0, 1], [0, 2]])], num_experts=3)  # expert 0 on both ranks, even
    adaptive = dataclasses.replace(static, replica_balance="adaptive")
    np.testing.assert_allclose(routed_shares(adaptive, load_LE)[0], [[0.3, 1.0, 0.0], [0.7, 0.0, 1.0]])
    config = ScoreConfig(tokens_per_rank=None)
    s_static = score_arrays(static, load_LE, None, None, ranks_per_node=1, config=config)
    s_adaptive = score_arrays(adaptive, load_LE, None, None, ranks_per_node=1, config=config)
    assert s_static.max_mean_load == pytest.approx(11 / 9) and s_adaptive.max_mean_load == pytest.approx(1.0)
    # where the plan's split is already balanced, adaptive costs exactly the all-reduce of 3 counts
    # (a ring of 2 ranks: 2 latencies) and the host's balancing (one sweep of one water-fill)
    even = np.array([[4.0, 3.0, 3.0]])
    calib = config.calibration
    all_reduce = (2 * calib.alpha_s["inter"] + 2 * 8 * 3 * 0.5 * calib.beta_s_per_byte["inter"]
                  + HOST_S_FIXED + 1 * HOST_S_PER_FILL)
    assert (score_arrays(adaptive, even, None, None, ranks_per_node=1, config=config).time_s
            - score_arrays(static, even, None, None, ranks_per_node=1, config=config).time_s) == pytest.approx(all_reduce)
    # no replicas: nothing to balance, nothing to pay
    plain = PlacementPlan(2, [LayerPlan([[0, 1], [2]])], num_experts=3)
    assert (score_arrays(dataclasses.replace(plain, replica_balance="adaptive"), load_LE, None, None,
                         ranks_per_node=1, config=config).time_s
            == score_arrays(plain, load_LE, None, None, ranks_per_node=1, config=config).time_s)


def test_source_cross_rank_reported_with_source_ranks():
    src_LRE = np.array([[[6.0, 0.0], [0.0, 2.0]], [[2.0, 2.0], [2.0, 2.0]]])
    score = score_arrays(two_rank_plan(LayerPlan([[0], [1]])), LOAD_LE, AFF_LEE, src_LRE, ranks_per_node=1)
    assert score.source_cross_rank == 0.0


@pytest.mark.parametrize("N, M, E, K", [(8, 8, 64, 4), (16, 4, 64, 8), (4, 2, 8, 2), (32, 8, 256, 8)])
def test_uniform_routing_matches_the_cost_model(N, M, E, K):
    """Contiguous plan, uniform routing: each layer's time is the cost model's sequential layer."""
    load_LE = np.full((3, E), 1000.0)
    config = ScoreConfig()
    score = score_arrays(PlacementPlan.contiguous(E, N, 3), load_LE, None, None, top_k=K, ranks_per_node=M,
                         config=config)
    shape = LayerShape(tokens=config.tokens_per_rank, hidden=config.hidden, expert_hidden=config.expert_hidden,
                       num_experts=E, top_k=K, gated=True, dtype_bytes=2)
    want = predict(shape, N, M, Calibration.default())["sequential"]
    for layer in score.layers:
        assert layer.time_s == pytest.approx(want, rel=1e-12)
        assert layer.max_mean_load == 1.0


def test_weights_moved():
    old = PlacementPlan(2, [LayerPlan([[0, 1], [2, 3]])])
    new = PlacementPlan(2, [LayerPlan([[0, 2], [2, 3, 1]])])
    assert weights_moved(new, old) == [2]  # 2 onto rank 0, 1 onto rank 1; dropping 1 from rank 0 is free
    assert weights_moved(new, None) == [0]
    config = ScoreConfig()
    score = score_arrays(new, np.ones((1, 4)), None, None, config=config, previous=old)
    assert score.moved == 2 and score.moved_bytes == 2 * 3 * 2048 * 7168 * 2
    with pytest.raises(PlanError, match="previous plan is for 3 rank"):
        weights_moved(new, PlacementPlan(3, [LayerPlan([[0, 1], [2], [3]])]))


# --- baselines -------------------------------------------------------------------------------

def test_contiguous_and_round_robin_known_answers():
    load = np.array([[5.0, 1, 1, 1, 1, 1]])
    assert contiguous(load, 3, 3, 3).layers[0].rank_experts == [[0, 1], [2, 3], [4, 5]]
    assert round_robin(load, 3, 3, 3).layers[0].rank_experts == [[0, 3], [1, 4], [2, 5]]
    assert round_robin(np.ones((1, 2)), 4, 4, 1).layers[0].rank_experts == [[0], [1], [0], [1]]
    for plan in (contiguous(load, 3, 3, 3), round_robin(load, 3, 3, 3)):
        plan.validate(num_experts=6, num_layers=1, slots_per_rank=3)
        assert sum(plan.slots_per_rank(0)) == 6  # the extra slots stay empty


def test_replicate_and_balanced_packing():
    np.testing.assert_array_equal(replicate(np.array([10.0, 2, 3, 1]), 6), [3, 1, 1, 1])
    np.testing.assert_array_equal(replicate(np.zeros(3), 3), [1, 1, 1])
    # heaviest first onto the lightest bin with room: 5->0, 4->1, 3->1 (4 < 5), 2->0 (bin 1 is full)
    np.testing.assert_array_equal(balanced_packing(np.array([5.0, 4, 3, 2]), 2, 2), [0, 1, 1, 0])
    # a key already in a bin is avoided while another bin has room
    np.testing.assert_array_equal(balanced_packing(np.array([3.0, 3, 1, 1]), 2, 2, key_I=np.array([7, 8, 7, 9])),
                                  [0, 1, 1, 0])
    assert default_num_groups(256, 4) == 8 and default_num_groups(12, 3) == 3 and default_num_groups(7, 2) is None


def test_eplb_global_by_hand():
    """Loads [10, 2, 3, 1], 2 GPUs x 3 slots. Replicas: expert 0 gets 3 (10 -> 5 -> 3.33 beats 3).
    Packing (heaviest first onto the lightest GPU with room, not holding the expert when possible):
    e0 -> g0, e0 -> g1, e0 -> g0 (both hold e0; tie, lower index), e2 (3) -> g1, e1 (2) -> g1 (6.33 <
    6.67), e3 -> g0 (g1 full). g0: two replicas of e0 (merged, share 2/3) + e3; g1: e0, e1, e2 (a
    rank lists its experts by id)."""
    plan = eplb_global(np.array([[10.0, 2, 3, 1]]), 2, 2, 3)
    assert plan.layers[0].rank_experts == [[0, 3], [0, 1, 2]]
    np.testing.assert_allclose(plan.share_matrix(0), [[2 / 3, 0, 0, 1], [1 / 3, 1, 1, 0]])
    plan.validate(num_experts=4, num_layers=1, slots_per_rank=3)
    assert plan.meta["method"] == "eplb-global"


def test_eplb_hierarchical_by_hand():
    """4 GPUs in 2 nodes, 2 slots each, 2 groups ({0,1}: 12, {2,3}: 4), one per node. Node 0:
    replicas [3, 1] (e0: 10 -> 5 -> 3.33 vs 2), e0 -> g0, e0 -> g1, e0 -> g0, e1 -> g1. Node 1:
    [3, 1] (e2: 3 -> 1.5 -> 1 ties e3's 1; lower id), e2 -> g2, e2 -> g3, e2 -> g2, e3 -> g3."""
    plan = eplb_hierarchical(np.array([[10.0, 2, 3, 1]]), 4, 2, 2, num_groups=2)
    assert plan.layers[0].rank_experts == [[0], [0, 1], [2], [2, 3]]
    np.testing.assert_allclose(plan.share_matrix(0), [[2 / 3, 0, 0, 0], [1 / 3, 1, 0, 0], [0, 0, 2 / 3, 0],
                                                      [0, 0, 1 / 3, 1]])
    assert plan.meta == {"method": "eplb-hierarchical", "num_groups": 2}
    # groups that the node count does not divide: EPLB's own choice is the global policy
    assert eplb(np.ones((1, 6)), 4, 2, 2, num_groups=3).meta["method"] == "eplb-global"
    with pytest.raises(PlanError, match="hierarchical EPLB needs"):
        eplb_hierarchical(np.ones((1, 6)), 4, 2, 2, num_groups=3)


@pytest.mark.parametrize("fn", [contiguous, round_robin, eplb_global])
def test_baselines_reject_too_few_slots(fn):
    with pytest.raises(PlanError, match="slots fewer than experts"):
        fn(np.ones((1, 9)), 2, 2, 4)


# --- the optimiser -----------------------------------------------------------------------------

def test_plan_is_valid_balanced_and_deterministic(presets):
    trace = presets["zipf64-affinity"]
    for N in (8, 16):
        S = slots(64, N)
        plan = place(trace, N, 8, S, window=0)
        plan.validate(num_experts=64, num_layers=trace.num_layers, slots_per_rank=S)
        assert plan.world_size == N and plan.meta["method"] == "moec" and plan.meta["window"] == 0
        on_plan_window = score_plan(plan, trace, 0, ranks_per_node=8)
        assert on_plan_window.max_mean_load <= 1.005, on_plan_window.max_mean_load
    assert place(trace, 8, 8, 10, window=1) == place(trace, 8, 8, 10, window=1)


def test_degenerate_routings():
    # all tokens on one expert: it is replicated over every rank and the ranks are even
    load = np.zeros((2, 8))
    load[:, 3] = 1000.0
    plan = place_arrays(load, 4, 2, 3)
    assert all(3 in r for r in plan.layers[0].rank_experts)
    assert score_arrays(plan, load, None, None, ranks_per_node=2).max_mean_load == pytest.approx(1.0)
    # an expert with zero tokens, a layer with none at all
    load = np.array([[0.0, 5, 5, 5], [0.0, 0, 0, 0]])
    plan = place_arrays(load, 2, 2, 2).validate(num_experts=4, num_layers=2, slots_per_rank=2)
    assert score_arrays(plan, load, None, None).max_mean_load == pytest.approx(10 / 7.5)  # no slot for a replica
    plan = place_arrays(load, 2, 2, 3).validate(num_experts=4, num_layers=2, slots_per_rank=3)
    assert score_arrays(plan, load, None, None).max_mean_load == pytest.approx(1.0)
    # one token; top-k equal to the number of experts; one rank; fewer experts than ranks
    one = place_arrays(np.array([[1.0, 0, 0]]), 2, 2, 2).validate(num_experts=3, slots_per_rank=2)
    assert sum(one.slots_per_rank(0)) >= 3
    topk = synthetic_trace(4, 3, 2, 64, 4, affinity=0.5, seed=1)
    place(topk, 2, 2, 3).validate(num_experts=4, num_layers=3, slots_per_rank=3)
    assert place_arrays(np.array([[3.0, 1, 2]]), 1, 1, 3).layers[0].rank_experts == [[0, 1, 2]]
    small = place_arrays(np.array([[7.0, 1]]), 8, 4, 1).validate(num_experts=2, slots_per_rank=1)
    assert small.layers[0].copies(2) == [7, 1]  # 8 slots: the hot expert takes 7 of them


def test_optimiser_errors():
    with pytest.raises(PlanError, match="slots fewer than experts"):
        place_arrays(np.ones((1, 10)), 4, 4, 2)
    with pytest.raises(PlanError, match="do not fill nodes"):
        place_arrays(np.ones((1, 12)), 6, 4, 2)
    with pytest.raises(PlanError, match="previous plan is for 2 ranks"):
        place_arrays(np.ones((1, 8)), 4, 4, 2, previous=PlacementPlan.contiguous(8, 2, 1))
    with pytest.raises(PlanError, match="plan has 1 layer"):
        place_arrays(np.ones((2, 8)), 4, 4, 2, previous=PlacementPlan.contiguous(8, 4, 1))
    with pytest.raises(PlanError, match="window 5 out of range"):
        place(synthetic_trace(8, 2, 2, 32, 2, seed=0), 2, 2, 4, window=5)


# --- window i -> i+1 -----------------------------------------------------------------------------

def test_plans_read_window_i_and_are_scored_on_i_plus_1():
    trace = synthetic_trace(16, 3, 3, 512, 2, zipf_s=1.0, affinity=0.7, drift=0.1, seed=3)
    assert [scoring_window(trace, i) for i in range(3)] == [1, 2, 2]
    result = compare(trace, 4, 2, 5, window=0)
    for name, (plan, score) in result.items():
        assert score.to_dict() == score_plan(plan, trace, 1, ranks_per_node=2).to_dict(), name
    # the plan does not depend on the window it is scored on
    changed = RoutingTrace(trace.load_WLE.copy(), trace.affinity_WLEE.copy(), None, dict(trace.meta))
    changed.load_WLE[1] = changed.load_WLE[1][:, ::-1]
    changed.affinity_WLEE[1] = changed.affinity_WLEE[1][:, ::-1, ::-1]
    assert place(changed, 4, 2, 5, window=0) == place(trace, 4, 2, 5, window=0)
    rows = evaluate_windows(trace, 4, 2, 5)
    assert [(r["window"], r["scored_on"]) for r in rows] == [(0, 1), (1, 2)]
    assert "moec-scratch" not in rows[0]["scores"] and "moec-scratch" in rows[1]["scores"]
    assert rows[1]["scores"]["moec"].moved == sum(weights_moved(rows[1]["plans"]["moec"], rows[0]["plans"]["moec"]))
    one = RoutingTrace(trace.load_WLE[:1], trace.affinity_WLEE[:1], None, dict(trace.meta))
    assert scoring_window(one, 0) == 0  # a single window is scored on itself (the CLI says so)


def test_history_is_a_moving_average_of_windows_up_to_i_for_every_method():
    trace = synthetic_trace(16, 3, 4, 512, 2, zipf_s=1.0, affinity=0.7, drift=0.1, seed=4)
    load, aff, src = planning_arrays(trace, 2, 0.5)
    want = (0.25 * trace.load_WLE[0] + 0.5 * trace.load_WLE[1] + trace.load_WLE[2]) / 1.75
    np.testing.assert_allclose(load, want)
    np.testing.assert_allclose(aff, (0.25 * trace.affinity_WLEE[0] + 0.5 * trace.affinity_WLEE[1]
                                     + trace.affinity_WLEE[2]) / 1.75)
    assert src is None
    np.testing.assert_array_equal(planning_arrays(trace, 2, 0.0)[0], trace.load_WLE[2])
    result = compare(trace, 4, 2, 5, window=2, history=0.5)
    # the baselines plan on the same averaged load as moec
    assert result["eplb-global"][0].layers == eplb_global(load, 4, 2, 5).layers
    assert result["moec"][0] == place(trace, 4, 2, 5, window=2, history=0.5)
    # never on a later window: changing window 3 (the scored one) changes no plan
    changed = RoutingTrace(trace.load_WLE.copy(), trace.affinity_WLEE.copy(), None, dict(trace.meta))
    changed.load_WLE[3] = changed.load_WLE[3][:, ::-1]
    changed.affinity_WLEE[2] = changed.affinity_WLEE[2][:, ::-1, ::-1]  # layer pairs of window 2 kept
    changed.affinity_WLEE[3] = changed.affinity_WLEE[3][:, ::-1, ::-1]
    changed.affinity_WLEE[2] = trace.affinity_WLEE[2]
    other = compare(changed, 4, 2, 5, window=2, history=0.5)
    assert all(other[k][0].layers == result[k][0].layers for k in result)
    with pytest.raises(PlanError, match="history is a decay in"):
        planning_arrays(trace, 1, 1.0)


def test_communities_recover_group_chains():
    """Group-limited routing (one group of 4 per token, followed with probability 0.9): Louvain
    on the affinity graph finds the chains of groups, one community per layer-0 group."""
    trace = synthetic_trace(16, 3, 1, 4000, 2, zipf_s=0.5, affinity=0.9, seed=5, affinity_group=4, topk_groups=1)
    found = affinity_communities(trace.load_WLE[0].astype(float), trace.affinity_WLEE[0].astype(float))
    assert sorted(len(c) for c in found) == [12] * 4
    for c in found:
        for l in range(3):
            groups = {e // 4 for layer, e in c if layer == l}
            assert len(groups) == 1  # a community holds one whole group per layer


def test_noisy_max_mean_charges_co_location():
    """4 ranks of 2 experts, top-2, 1000 tokens (250 slots per expert, 500 per rank). Tokens that
    keep both experts on one rank at both layers (x_r in {0, 2}) make a rank's load noisier than
    tokens whose pairs spread evenly: Var = T (E[x^2] - E[x]^2) = 1000 (1 - 0.25) vs 1000 (0.5 -
    0.25), the latter the floor E[x^2] >= E[x]."""
    load = np.full((2, 8), 250.0)
    together = np.zeros((1, 8, 8))
    for r in range(4):
        together[0, 2 * r:2 * r + 2, 2 * r:2 * r + 2] = 250.0  # 250 tokens on {2r, 2r+1}: 4 pairs each
    spread = np.full((1, 8, 8), 500 / 8)
    plan = PlacementPlan(4, [LayerPlan([[0, 1], [2, 3], [4, 5], [6, 7]])] * 2, num_experts=8)
    z = math.sqrt(2 * math.log(4))
    assert noisy_max_mean(plan, load, together, 2) == pytest.approx(1 + z * math.sqrt(750) / 500)
    assert noisy_max_mean(plan, load, spread, 2) == pytest.approx(1 + z * math.sqrt(250) / 500)


# --- issue-6 targets on the shipped presets (plan on window 0, score on window 1) ----------------

@pytest.mark.parametrize("name", ["zipf64-affinity", "zipf256-affinity", "zipf64-group-affinity",
                                  "zipf256-group-affinity"])
@pytest.mark.parametrize("N", [8, 16, 32])
def test_targets_on_presets(presets, name, N):
    """Plan on window 0, score on window 1 (``benchmarks/placement.py`` runs every window, with
    the moving-average history; its JSON has the numbers). Asserted: what is met on these presets.
    moec's plan runs with the replica balancing "auto" picks (the one predicted faster) and is scored
    so; the same plan run with "adaptive" (the runtime re-balances replicas on each step's routing,
    at an all-reduce and host time per layer) meets the balance targets; EPLB's plans run with
    their even split, as published. NOT met, stated here and measured by the benchmark:
    * cross-rank >= 40% below contiguous: met at 8 ranks on both group presets (42%, 46%), 40% at
      16 ranks on zipf256-group-affinity only; zipf64-group-affinity at 16/32 ranks (13%, 6%) and
      zipf256-group-affinity at 32 (19%) fall short: a rank holds E/N < k experts there (see
      moec.runtime.synthetic, "Why the group presets"). Per-choice affinity (zipf*-affinity): 3-8%,
      where no plan as balanced as the target can reach 40% (traffic_floor, asserted below).
    """
    trace = presets[name]
    E = trace.num_experts
    result = compare(trace, N, 8, slots(E, N), window=0)
    moec = result["moec"][1]
    baselines = {k: result[k][1] for k in BASELINE_NAMES}
    # simulated step time better than every baseline (measured: 1-17% below the best)
    assert all(moec.time_s < s.time_s for s in baselines.values()), {k: s.time_s for k, s in baselines.items()}
    adaptive = score_plan(dataclasses.replace(result["moec"][0], replica_balance="adaptive"), trace, 1,
                          ranks_per_node=8, config=ScoreConfig.from_trace(trace))
    assert adaptive.max_mean_load <= 1.05, adaptive.max_mean_load  # measured 1.000-1.03
    best_eplb = min(baselines["eplb-hierarchical"].max_mean_load, baselines["eplb-global"].max_mean_load)
    assert adaptive.max_mean_load <= best_eplb
    contiguous_x = baselines["contiguous"]
    if "group" in name and (N == 8 or (N == 16 and E == 256)):
        assert moec.cross_rank <= 0.62 * contiguous_x.cross_rank  # measured 0.54-0.61 of contiguous
    else:
        assert moec.cross_rank <= 0.98 * contiguous_x.cross_rank
    if N > 8:  # several nodes: cross-node traffic (group presets: measured 32-65% below contiguous)
        assert moec.cross_node <= (0.7 if "group" in name else 0.97) * contiguous_x.cross_node
    aff = trace.affinity_WLEE[1]
    own = traffic_floor(aff, N, 8, slots(E, N), max_mean=max(1.0, moec.max_mean_load))["cross_rank"]
    assert moec.cross_rank >= own - 1e-12  # a bound: no plan at moec's balance crosses less
    if "group" not in name:  # the 40% target is out of reach of any plan with max/mean <= 1.05
        assert 1 - traffic_floor(aff, N, 8, slots(E, N))["cross_rank"] / contiguous_x.cross_rank < 0.40


def test_affinity_top1_cuts_traffic_by_40_percent():
    """With top-1 routing and strong inter-layer affinity the chains can be co-located: measured 56%
    below contiguous at 8 ranks, 43% at 16."""
    trace = synthetic_trace(64, 4, 2, 8192, 1, zipf_s=1.0, affinity=0.9, drift=0.02, seed=1)
    for N in (8, 16):
        result = compare(trace, N, 8, slots(64, N), window=0)
        assert result["moec"][1].cross_rank <= 0.6 * result["contiguous"][1].cross_rank


@pytest.mark.parametrize("name, N", [("zipf64-affinity", 16), ("zipf256-affinity", 32),
                                     ("zipf256-group-affinity", 16), ("zipf64-group-affinity", 8)])
def test_previous_plan_halves_weights_moved(presets, name, N):
    trace = presets[name]
    S = slots(trace.num_experts, N)
    deployed = place(trace, N, 8, S, window=0)
    result = compare(trace, N, 8, S, window=1, previous=deployed)
    kept, scratch = result["moec"][1], result["moec-scratch"][1]
    assert result["moec"][0].meta["previous"] is True
    # measured 0.04-0.19x on these; zipf64-group-affinity at 8 ranks: 0.44x, the scratch plan with
    # its ranks renamed (every plan keeping the deployed weights predicts > 2% more step time)
    assert kept.moved <= 0.5 * scratch.moved, (kept.moved, scratch.moved)
    assert kept.time_s <= 1.02 * scratch.time_s  # on window 2, never seen by either plan


def test_auto_replica_balance_judges_the_deployed_plan_out_of_sample():
    """"auto": static on a single window (in sample, adaptive only adds its cost); with a deployed
    plan, adaptive where that plan, scored on the newest window it was not made from, runs faster
    so (the load moved: a fresh ranking every window); either way forced values are kept."""
    one = synthetic_trace(64, 2, 1, 8192, 2, zipf_s=1.2, seed=7)
    plan = place(one, 16, 8, 5)
    assert plan.replica_balance == "static" and plan.meta["replica_balance_judged_on"] == "planning windows"
    assert place(one, 16, 8, 5, options=PlacementOptions(replica_balance="adaptive")).replica_balance == "adaptive"
    moving = synthetic_trace(64, 2, 3, 8192, 2, zipf_s=1.2, drift=1.0, seed=7)
    deployed = place(moving, 16, 8, 5, window=0)
    plan = place(moving, 16, 8, 5, window=1, previous=deployed)
    scores = plan.meta["replica_balance_scores"]
    assert plan.meta["replica_balance_judged_on"] == "previous plan, newest window"
    assert plan.replica_balance == "adaptive" and scores["adaptive"] < scores["static"], scores
    with pytest.raises(PlanError, match="replica_balance must be"):
        place(one, 16, 8, 5, options=PlacementOptions(replica_balance="dynamic"))


def test_renaming_ranks_keeps_weights_and_the_node_structure():
    from moec.passes.placement import _relabel

    rng = np.random.default_rng(3)
    trace = synthetic_trace(16, 3, 2, 2048, 2, affinity=0.8, seed=4)
    load_LE, aff_LEE, _ = score_window_inputs(trace, 0)
    plan = place_arrays(load_LE, 4, 2, 5, affinity_LEE=aff_LEE, top_k=2)
    perm = [1, 0, 3, 2]  # swap the two ranks of each node: same time, every weight moved
    swapped = dataclasses.replace(plan, layers=[LayerPlan([lp.rank_experts[p] for p in perm],
                                                          [lp.shares[p] for p in perm]) for lp in plan.layers])
    assert sum(weights_moved(swapped, plan)) > 0
    assert _relabel(swapped, plan, 2).layers == plan.layers  # renamed back: nothing moves
    other = dataclasses.replace(plan, layers=[LayerPlan([lp.rank_experts[p] for p in (2, 3, 0, 1)]) for lp in plan.layers])
    assert _relabel(other, plan, 2).layers == [LayerPlan(lp.rank_experts) for lp in plan.layers]  # whole nodes swap
    # matching nodes by their best rank matching, not by experts in common: never worse than no renaming
    prev = PlacementPlan(4, [LayerPlan([list(range(8)), [8, 9], [10, 11, 12], [13, 14, 15]])], num_experts=16)
    new = PlacementPlan(4, [LayerPlan([[0, 1], [8, 9], [2, 3, 4], [5, 6, 7]])], num_experts=16)
    assert sum(weights_moved(_relabel(new, prev, 2), prev)) <= sum(weights_moved(new, prev)) == 6
    # a random plan: renaming keeps node mates together and never keeps fewer weights
    random_plan = _random_plan(rng, 3, 16, 4, 5)
    renamed = _relabel(random_plan, plan, 2)
    assert sum(weights_moved(renamed, plan)) <= sum(weights_moved(random_plan, plan))
    node_of = {tuple(map(tuple, (lp.rank_experts[r] for lp in renamed.layers))): r // 2 for r in range(4)}
    for pair in ((0, 1), (2, 3)):
        assert len({node_of[tuple(map(tuple, (lp.rank_experts[r] for lp in random_plan.layers)))] for r in pair}) == 1
    config = ScoreConfig()
    assert (score_arrays(renamed, load_LE, aff_LEE, None, top_k=2, ranks_per_node=2, config=config).time_s
            == pytest.approx(score_arrays(random_plan, load_LE, aff_LEE, None, top_k=2, ranks_per_node=2,
                                          config=config).time_s, rel=1e-12))


def test_plans_256_experts_8_layers_32_ranks():
    """A full-size case plans to a valid plan (its time is benchmarks/placement.py's ``seconds``)."""
    trace = synthetic_trace(256, 8, 1, 4096, 8, zipf_s=1.0, affinity=0.8, seed=2)
    plan = place(trace, 32, 8, 10, options=PlacementOptions())
    plan.validate(num_experts=256, num_layers=8, slots_per_rank=10)


def test_small_profiled_trace_where_the_greedy_runs_out_of_free_ranks():
    """A 2-layer, 8-expert trace profiled from builtin:moe-mlp (48 tokens): at 2 ranks with 5
    slots the greedy once found every rank with a free slot already holding the piece's expert
    (an IndexError then); the piece now joins a holder, and slots stay within S."""
    load_WLE = np.array([[[8, 5, 5, 6, 6, 5, 3, 10], [7, 5, 1, 7, 7, 5, 7, 9]]])
    aff_WLEE = np.array([[[[3, 1, 1, 3, 4, 1, 1, 2], [0, 2, 1, 1, 1, 1, 2, 2], [2, 1, 0, 1, 0, 2, 1, 3],
                           [2, 1, 0, 0, 2, 1, 3, 3], [1, 0, 0, 2, 4, 3, 1, 1], [1, 2, 0, 3, 0, 1, 2, 1],
                           [2, 0, 0, 1, 2, 0, 0, 1], [3, 3, 0, 3, 1, 1, 4, 5]]]])
    trace = RoutingTrace(load_WLE, aff_WLEE, meta={"top_k": 2})
    for N, S in ((2, 5), (2, 4), (4, 3), (4, 2)):
        plan = place(trace, N, N, S)
        plan.validate(num_experts=8, num_layers=2, slots_per_rank=S)
        for layer in range(2):
            served = plan.share_matrix(layer).sum(axis=0)
            np.testing.assert_allclose(served, 1.0, atol=1e-9)  # every expert's tokens have a home
