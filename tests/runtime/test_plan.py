"""Placement plans (``moec.runtime.plan``): the JSON round trip, the contiguous layout, the per-layer
queries the runtime routes by, and every ``PlanError`` (message names the problem and the fix)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moec.runtime.plan import SHARE_TOLERANCE, LayerPlan, PlacementPlan, PlanError


def replicated_plan() -> PlacementPlan:
    # 4 ranks, 6 experts; expert 5 on ranks 0 and 2 (shares 0.25 / 0.75), expert 1 on ranks 0 and 1
    # (even split: no shares in layer 1).
    return PlacementPlan(
        world_size=4,
        layers=[LayerPlan([[0, 1, 5], [2, 3], [4, 5], [1]], [[1.0, 0.5, 0.25], [1.0, 1.0], [1.0, 0.75], [0.5]]),
                LayerPlan([[0, 1], [1, 2], [3, 4], [5]])],
        num_experts=6, ranks_per_node=2, meta={"method": "test", "note": "hand-made"})


# --- round trip ------------------------------------------------------------------------------

def test_json_round_trip(tmp_path):
    plan = replicated_plan().validate(num_experts=6, num_layers=2, slots_per_rank=3)
    path = plan.save(tmp_path / "sub" / "plan.json")
    loaded = PlacementPlan.load(path)
    assert loaded == plan
    assert PlacementPlan.from_dict(json.loads(path.read_text())) == plan
    doc = json.loads(path.read_text())
    assert doc["world_size"] == 4 and doc["num_experts"] == 6 and doc["ranks_per_node"] == 2
    assert doc["layers"][0]["rank_experts"] == [[0, 1, 5], [2, 3], [4, 5], [1]]
    assert "shares" in doc["layers"][0] and "shares" not in doc["layers"][1]
    assert "replica_balance" not in doc and loaded.replica_balance is None  # absent: static
    plan.replica_balance = "adaptive"
    path = plan.save(tmp_path / "adaptive.json")
    assert json.loads(path.read_text())["replica_balance"] == "adaptive"
    assert PlacementPlan.load(path) == plan


def test_minimal_json_is_accepted(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"world_size": 2, "layers": [{"rank_experts": [[0, 1], [2, 3]]}]}))
    plan = PlacementPlan.load(path)
    assert plan.num_experts is None and plan.experts() == 4 and plan.meta == {}
    assert plan.replicas(0) == [[(0, 0, 1.0)], [(0, 1, 1.0)], [(1, 0, 1.0)], [(1, 1, 1.0)]]


# --- layouts and queries ---------------------------------------------------------------------

def test_contiguous_layout():
    plan = PlacementPlan.contiguous(8, 4, 3)
    assert plan.num_layers == 3
    assert all(lp.rank_experts == [[0, 1], [2, 3], [4, 5], [6, 7]] for lp in plan.layers)
    assert plan.slots_per_rank(2) == [2, 2, 2, 2]
    uneven = PlacementPlan.contiguous(7, 3, 1)  # r*E//N boundaries: 0, 2, 4, 7
    assert uneven.layers[0].rank_experts == [[0, 1], [2, 3], [4, 5, 6]]


def test_contiguous_with_fewer_experts_than_ranks_replicates():
    plan = PlacementPlan.contiguous(2, 4, 1).validate(num_experts=2, slots_per_rank=1)
    assert plan.layers[0].rank_experts == [[0], [0], [1], [1]]
    assert plan.replicas(0) == [[(0, 0, 0.5), (1, 0, 0.5)], [(2, 0, 0.5), (3, 0, 0.5)]]


def test_replicas_and_share_matrix():
    plan = replicated_plan()
    reps = plan.replicas(0)
    assert reps[5] == [(0, 2, 0.25), (2, 1, 0.75)]  # (rank, local slot, share)
    assert reps[1] == [(0, 1, 0.5), (3, 0, 0.5)]
    assert reps[3] == [(1, 1, 1.0)]
    even = plan.replicas(1)
    assert even[1] == [(0, 1, 0.5), (1, 0, 0.5)]  # no shares: split evenly
    share_NE = plan.share_matrix(0)
    np.testing.assert_allclose(share_NE.sum(0), np.ones(6))
    assert share_NE[2, 5] == 0.75 and share_NE[3, 0] == 0.0
    assert plan.slots_per_rank(0) == [3, 2, 2, 1]
    assert plan.layers[0].copies(6) == [1, 2, 1, 1, 1, 2]
    with pytest.raises(PlanError, match="layer 2 is out of range"):
        plan.replicas(2)


def test_degenerate_plans_are_valid():
    # one rank holds everything; a replica with share 0; shares summing to 1 within the tolerance
    PlacementPlan(1, [LayerPlan([[0, 1, 2]])], num_experts=3).validate(num_experts=3, slots_per_rank=3)
    PlacementPlan(2, [LayerPlan([[0, 1], [1]], [[1.0, 1.0], [0.0]])]).validate()
    eps = SHARE_TOLERANCE / 2
    PlacementPlan(2, [LayerPlan([[0], [0]], [[0.5], [0.5 - eps]])]).validate()
    # a rank with no expert is allowed (it only sends)
    PlacementPlan(3, [LayerPlan([[0, 1], [], [2]])]).validate(num_experts=3)


# --- errors ----------------------------------------------------------------------------------

def bad(layer: LayerPlan, world: int = 2, **kw) -> PlacementPlan:
    return PlacementPlan(world_size=world, layers=[layer], **kw)


@pytest.mark.parametrize("plan, args, needles", [
    (bad(LayerPlan([[0, 1], [2, 4]]), num_experts=4), {}, ["unknown expert 4", "[0, 4)"]),
    (bad(LayerPlan([[0, 1], [2, 3]])), dict(num_experts=3), ["unknown expert 3"]),
    (bad(LayerPlan([[0, -1], [2, 3]])), {}, ["unknown expert -1"]),
    (bad(LayerPlan([[0, 1.5], [2, 3]])), {}, ["not an integer expert id"]),
    (bad(LayerPlan([[0], [1], [2]])), {}, ["rank out of range", "3 rank(s)", "world_size is 2"]),
    (bad(LayerPlan([[0, 1, 2, 3]])), {}, ["rank out of range", "1 rank(s)"]),
    (bad(LayerPlan([[0, 1], [3]]), num_experts=4), {}, ["expert(s) 2 on no rank", "dropped"]),
    (bad(LayerPlan([[0, 0], [1]])), {}, ["expert 0 appears twice on rank 0"]),
    (bad(LayerPlan([[0, 1], [2, 3]])), dict(slots_per_rank=1), ["rank 0 holds 2 experts but has only 1 slot"]),
    (bad(LayerPlan([[0], [1]]), world=2, num_experts=4), dict(slots_per_rank=1),
     ["slots fewer than experts", "2 rank(s) x 1 slot(s) = 2 < 4 experts", "at least 2 slots"]),
    (bad(LayerPlan([[0, 1], [2]], [[1.0], [1.0]])), {}, ["shares must have the shape of rank_experts"]),
    (bad(LayerPlan([[0, 1], [2]], [[1.0, 1.0]])), {}, ["shares must have the shape"]),
    (bad(LayerPlan([[0, 1], [1]], [[1.0, 1.5], [-0.5]])), {}, ["share -0.5 of expert 1 on rank 1 is negative"]),
    (bad(LayerPlan([[0, 1], [1]], [[1.0, 0.5], [0.4]])), {}, ["expert 1's shares sum to 0.9, not 1"]),
    (bad(LayerPlan([[0], [1]], [[1.0], [float("nan")]])), {}, ["is not a number"]),
    (bad(LayerPlan([[0], [1]])), dict(num_layers=3), ["plan has 1 layer(s) but the model/trace has 3"]),
    (bad(LayerPlan([[0], [1]]), num_experts=2), dict(num_experts=4), ["plan is for 2 experts", "has 4"]),
    (PlacementPlan(0, []), {}, ["world_size must be a positive integer"]),
])
def test_plan_errors(plan, args, needles):
    with pytest.raises(PlanError) as info:
        plan.validate(**args)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize("text, needles", [
    ("{not json", ["cannot read plan", "expected JSON"]),
    ("[1, 2]", ["is not a placement plan", "got list"]),
    ('{"layers": []}', ['no "world_size" key']),
    ('{"world_size": 2}', ['no "layers" key']),
    ('{"world_size": 2, "layers": [{"shares": []}]}', ['layer 0 has no "rank_experts" key']),
    ('{"world_size": 2, "layers": [{"rank_experts": [[0], [7]]}], "num_experts": 4}', ["unknown expert 7"]),
    ('{"world_size": 2, "layers": {}}', ['"layers" must be a list']),
    ('{"world_size": 2, "layers": [], "meta": 3}', ['"meta" must be a JSON object']),
    ('{"world_size": 2, "layers": [], "replica_balance": "dynamic"}',
     ["replica_balance must be one of 'static', 'adaptive'", "got 'dynamic'"]),
])
def test_plan_file_errors(tmp_path, text, needles):
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(PlanError) as info:
        PlacementPlan.load(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_missing_plan_file(tmp_path):
    with pytest.raises(PlanError, match="no plan file"):
        PlacementPlan.load(tmp_path / "absent.json")


def test_plan_error_is_a_value_error():
    assert issubclass(PlanError, ValueError)
