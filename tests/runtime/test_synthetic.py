"""The synthetic trace generator: determinism, distinct top-k, counts consistent with the pair
definition, the knobs doing what they say (skew, affinity, drift), the presets, bad arguments."""

from __future__ import annotations


import numpy as np
import pytest

from moec.runtime.synthetic import PRESETS, preset_trace, synthetic_trace
from moec.runtime.trace import RoutingTrace, TraceError


def max_over_mean(t: RoutingTrace) -> float:
    return float((t.load_WLE.max(-1) / t.load_WLE.mean(-1)).mean())


def test_deterministic_and_seed_dependent():
    kw = dict(num_experts=16, num_layers=3, num_windows=2, tokens_per_window=500, top_k=2, affinity=0.5, drift=0.3)
    assert synthetic_trace(**kw, seed=1) == synthetic_trace(**kw, seed=1)
    assert not np.array_equal(synthetic_trace(**kw, seed=1).load_WLE, synthetic_trace(**kw, seed=2).load_WLE)


@pytest.mark.parametrize("E, K, s, affinity, group, Q", [
    (16, 4, 1.0, 0.0, 1, 0), (16, 4, 2.0, 0.9, 1, 0), (16, 4, 1.0, 0.7, 4, 0), (8, 8, 1.5, 0.5, 1, 0),
    (5, 1, 0.0, 1.0, 1, 0), (4, 3, 3.0, 1.0, 2, 0), (16, 4, 1.0, 0.8, 4, 1), (16, 6, 1.0, 0.5, 4, 2),
    (8, 8, 1.0, 1.0, 4, 2),
])
def test_counts_follow_from_distinct_topk_per_token(E, K, s, affinity, group, Q):
    """k distinct experts per token per layer: every layer's load sums to T*k and no expert gets
    more than T; each token's k*k pairs make affinity's margins k times the loads."""
    T, L, W = 300, 4, 2
    t = synthetic_trace(E, L, W, T, K, zipf_s=s, affinity=affinity, drift=0.2, seed=3, affinity_group=group,
                        topk_groups=Q)
    assert t.load_WLE.shape == (W, L, E) and t.affinity_WLEE.shape == (W, L - 1, E, E)
    assert (t.load_WLE.sum(-1) == T * K).all()
    assert t.load_WLE.max() <= T  # distinct: one slot per token per expert at most
    np.testing.assert_array_equal(t.affinity_WLEE.sum(-1), K * t.load_WLE[:, :-1])
    np.testing.assert_array_equal(t.affinity_WLEE.sum(-2), K * t.load_WLE[:, 1:])
    assert t.top_k == K and t.meta["generator"]["affinity_group"] == group
    assert t.meta["generator"]["topk_groups"] == Q
    if K == E:  # every token picks every expert
        assert (t.load_WLE == T).all()


def test_one_token_one_expert():
    t = synthetic_trace(1, 2, 1, 1, 1)
    assert t.load_WLE.tolist() == [[[1], [1]]] and t.affinity_WLEE.tolist() == [[[[1]]]]


def test_higher_zipf_gives_higher_max_over_mean():
    ratios = [max_over_mean(synthetic_trace(64, 2, 2, 4000, 4, zipf_s=s, seed=0)) for s in (0.0, 0.5, 1.0, 1.5)]
    assert ratios == sorted(ratios) and ratios[0] < 1.3 and ratios[-1] > 4, ratios


def test_affinity_concentrates_pairs():
    """With affinity 1 and G = 1 each layer-l expert sends all its tokens' slots to one layer-l+1
    expert; with 0 its pairs spread over (nearly) all experts."""
    def top_pair_share(t):  # share of each row's pairs on its most common partner, weighted by the row's pairs
        aff = t.affinity_WLEE.astype(float)
        return aff.max(-1).sum() / aff.sum()

    kw = dict(num_experts=32, num_layers=3, num_windows=1, tokens_per_window=3000, top_k=1, zipf_s=0.5, seed=0)
    none, half, full = (synthetic_trace(**kw, affinity=a) for a in (0.0, 0.5, 1.0))
    assert top_pair_share(full) == 1.0
    assert top_pair_share(none) < 0.2 < top_pair_share(half) < 1.0
    # Top-k = 2, affinity 1: every token that chose a at layer l chose its image m(a) at l+1, so
    # the pair (a, m(a)) counts exactly load[a]: half of a's 2*load[a] pairs.
    t = synthetic_trace(16, 2, 1, 2000, 2, zipf_s=0.0, affinity=1.0, seed=1)
    pairs_EE, load_E = t.affinity_WLEE[0, 0], t.load_WLE[0, 0]
    np.testing.assert_array_equal(pairs_EE.max(-1), load_E)


def test_affinity_groups_stay_within_groups():
    """G = 4: every pair (a, b) with affinity 1 lands in the image group of a's group: each row of
    the pair matrix touches at most G columns."""
    t = synthetic_trace(16, 2, 1, 2000, 1, zipf_s=0.0, affinity=1.0, seed=0, affinity_group=4)
    partners = (t.affinity_WLEE[0, 0] > 0).sum(-1)
    assert partners.max() == 4 and partners.min() >= 1


def test_group_limited_routing():
    """Q = 1, G = 4: a token's k experts lie in one group of 4 consecutive ids. With affinity 1
    each layer-l group sends all its pairs to one layer-(l+1) group (a permutation of the groups),
    and every token adds its k*k pairs to one group pair; with affinity 0, pairs reach many groups."""
    def group_pairs(t):
        E = t.num_experts
        g = t.affinity_WLEE[0, 0].reshape(E // 4, 4, E // 4, 4).sum((1, 3))
        return g

    kw = dict(num_experts=16, num_layers=2, num_windows=1, tokens_per_window=2000, top_k=3, zipf_s=1.0, seed=0,
              affinity_group=4, topk_groups=1)
    full = group_pairs(synthetic_trace(**kw, affinity=1.0))
    assert ((full > 0).sum(1) == 1).all() and ((full > 0).sum(0) == 1).all()  # a permutation of the groups
    none = group_pairs(synthetic_trace(**kw, affinity=0.0))
    assert ((none > 0).sum(1) > 1).all()
    # within a layer a token's experts share its group: the pairs of a layer-0 group reach only the
    # image group, each token contributing k*k = 9 pairs there
    t = synthetic_trace(**kw, affinity=1.0)
    assert (full.sum(1) % 9 == 0).all()
    two = synthetic_trace(16, 2, 1, 500, 6, affinity=0.0, seed=1, affinity_group=4, topk_groups=2)
    assert (two.load_WLE.sum(-1) == 500 * 6).all()
    assert t.meta["generator"]["topk_groups"] == 1


def test_drift_changes_popularity_between_windows():
    def tv(t):  # mean total-variation distance between consecutive windows' load distributions
        p = t.load_WLE / t.load_WLE.sum(-1, keepdims=True)
        return float(0.5 * np.abs(p[1:] - p[:-1]).sum(-1).mean())

    kw = dict(num_experts=32, num_layers=2, num_windows=4, tokens_per_window=20000, top_k=2, seed=0)
    still, some, full = (tv(synthetic_trace(**kw, drift=d)) for d in (0.0, 0.2, 1.0))
    assert still < 0.03 < some < full, (still, some, full)  # drift 0: sampling noise only


def test_presets_shapes_speed_and_claims():
    for name, params in PRESETS.items():
        t = preset_trace(name)  # generation time: benchmarks/placement.py records it
        assert t.meta["source"] == f"synthetic:{name}" and t.meta["generator"] == {
            "affinity_group": 1, "topk_groups": 0, **params, "zipf_s": float(params["zipf_s"]),
            "affinity": float(params["affinity"]), "drift": float(params["drift"])}
        assert t.num_windows >= 4 and t.affinity_WLEE is not None
    for name, E, K in (("zipf64", 64, None), ("zipf256", 256, None), ("mixtral-like", 8, 2),
                       ("qwen3-moe-like", 128, 8), ("deepseek-v3-like", 256, 8)):
        assert PRESETS[name]["num_experts"] == E and (K is None or PRESETS[name]["top_k"] == K)
    for base in ("zipf64", "zipf256"):
        assert PRESETS[base]["affinity"] == 0 < PRESETS[f"{base}-affinity"]["affinity"]
        assert PRESETS[base]["drift"] > 0 and PRESETS[base]["zipf_s"] >= 1
        group = PRESETS[f"{base}-group-affinity"]
        assert group["topk_groups"] == 1 and group["affinity"] > 0 and group["zipf_s"] == PRESETS[base]["zipf_s"]


@pytest.mark.parametrize("kwargs, needle", [
    (dict(num_experts=0), "num_experts must be a positive int, got 0"),
    (dict(num_layers=1.5), "num_layers must be a positive int, got 1.5"),
    (dict(tokens_per_window=True), "tokens_per_window must be a positive int"),
    (dict(top_k=9), "top_k=9 exceeds num_experts=8"),
    (dict(zipf_s=-1.0), "zipf_s must be >= 0"),
    (dict(affinity=1.5), "affinity is a probability in [0, 1], got 1.5"),
    (dict(drift=-0.1), "drift is a probability in [0, 1]"),
    (dict(affinity_group=3), "affinity_group=3 does not divide num_experts=8"),
    (dict(affinity_group=4, topk_groups=3), "topk_groups=3 exceeds the 2 groups"),
    (dict(affinity_group=2, topk_groups=-1), "topk_groups must be an int >= 0"),
    (dict(top_k=3, affinity_group=2, topk_groups=1), "top_k=3 exceeds the topk_groups*affinity_group=2"),
])
def test_bad_arguments(kwargs, needle):
    args = dict(num_experts=8, num_layers=2, num_windows=1, tokens_per_window=10, top_k=2) | kwargs
    with pytest.raises(TraceError) as info:
        synthetic_trace(**args)
    assert needle in str(info.value)
