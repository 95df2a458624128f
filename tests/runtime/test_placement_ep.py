"""``moec.compile(model, expert_parallel=True, placement=plan)`` on real gloo process groups: a plan
that permutes the experts, gives ranks different numbers of them and replicates some (evenly and
with shares) must leave outputs and gradients equal to the single-process model.

Each rank feeds its own batch rows; gradients are compared as in ``test_compile_ep``: replicated
(data-parallel) parameters after a sum all-reduce, each expert shard's rows against the
single-process gradient of the experts the plan put there (a replica gets the expert's whole
gradient, summed over its replicas by ``moec::replica_sync``). Tolerances as there.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import moec
from moec.models.hf import primary_output
from moec.runtime.launch import spawn_gloo
from moec.runtime.plan import LayerPlan, PlacementPlan, PlanError
from test_compile_ep import _build, _rank_grads, _reference, _rows, check_ranks


def _layer_plan(E: int, world: int, seed: int, shares: bool) -> LayerPlan:
    """A scrambled placement: experts permuted and dealt unevenly (rank 0 one more, the last one
    fewer), two experts replicated on one more rank each (expert 0, the hottest under a biased
    router, and another); with ``shares``, the other one split 1:3 between its replicas."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(E, generator=g).tolist()
    sizes = [E // world] * world
    if sizes[-1] > 1:
        sizes[0], sizes[-1] = sizes[0] + 1, sizes[-1] - 1
    ranks = [perm[sum(sizes[:r]):sum(sizes[:r + 1])] for r in range(world)]
    second = perm[0] if perm[0] != 0 else perm[1]
    for e in (0, second):
        ranks[next(r for r in range(world) if e not in ranks[r])].append(e)
    if not shares:
        return LayerPlan(ranks)
    first = min(r for r in range(world) if second in ranks[r])
    return LayerPlan(ranks, [[(0.25 if r == first else 0.75) if e == second else (0.5 if e == 0 else 1.0)
                              for e in experts] for r, experts in enumerate(ranks)])


def _plan(case: dict, world: int) -> PlacementPlan:
    from moec.capture import convert_model

    model, _, _ = _build(case, world)
    found = convert_model(model).layers
    seed = zlib.crc32(case["name"].encode()) + world
    layers = [_layer_plan(layer.num_experts, world, seed + i, shares=bool(i % 2 == case.get("shares_on", 0)))
              for i, layer in enumerate(found)]
    # as `moec place` writes it from a profiled trace: the layers it was planned for, by name
    names = [layer.name for layer in found]
    return PlacementPlan(world_size=world, layers=layers, meta={"layer_names": names}).validate()


def _cases(world: int, core: bool = False) -> list[dict]:
    """``core``: without the Inductor case (its compiles are most of the time; slow run)."""
    uneven = [2, 1, 3, 1][:world]
    cases = [
        dict(name="moe-mlp-placed", spec="builtin:moe-mlp", rows=uneven, chunks=1, inner="aot_eager"),
        dict(name="stacked-bmm-placed-all-to-rank0", spec="builtin:stacked-bmm", rows=[2, 0, 1, 2][:world],
             chunks=2, inner="aot_eager", to_rank0=True, balance="adaptive"),
        dict(name="mixtral-placed", spec="hf:mixtral", rows=[1] * world, chunks=2, inner="aot_eager", shares_on=1),
        # One token per rank, two chunks (one empty on every rank): most experts and replicas get none.
        dict(name="moe-mlp-placed-one-token", spec="builtin:moe-mlp", rows=[1] * world, seq=1, chunks=2,
             inner="aot_eager", balance="adaptive"),
    ]
    if world == 2 and not core:
        cases.append(dict(name="stacked-bmm-placed-inductor", spec="builtin:stacked-bmm", rows=uneven, chunks=3,
                          inner="inductor", balance="adaptive"))
    return cases


def _run_rank(case: dict, world: int, rank: int) -> dict:
    torch._dynamo.reset()
    model, full, cot = _build(case, world)
    plan = _plan(case, world)
    mine = tuple(a[_rows(case, rank)] for a in full)
    compiled = moec.compile(model, expert_parallel=True, chunks=case["chunks"], inner=case["inner"], placement=plan,
                            replica_balance=case.get("balance"))
    torch._dynamo.utils.counters["moec"].clear()
    out = primary_output(compiled(*mine))
    counters = torch._dynamo.utils.counters["moec"]
    assert counters["expert_parallel_layers"] == plan.num_layers
    assert counters["expert_parallel_placed_layers"] == plan.num_layers
    # every layer of these plans has replicas: all balanced per step, or none
    assert counters["expert_parallel_adaptive_layers"] == (plan.num_layers if case.get("balance") else 0)
    (out * cot[_rows(case, rank)]).sum().backward()
    return dict(out=out.detach(), grads=_rank_grads(model))


def _worker(rank: int, world: int, core: bool = False) -> dict:
    return {case["name"]: _run_rank(case, world, rank) for case in _cases(world, core)}


# 4 ranks on 2 cores: the same checks as 2 ranks, four times the compiles (slow run only); the
# Inductor case at 2 ranks in the slow run too.
@pytest.mark.parametrize("world, core", [(2, True), pytest.param(2, False, marks=pytest.mark.slow),
                                         pytest.param(4, False, marks=pytest.mark.slow)])
def test_placed_expert_parallel_matches_single_process(world, core):
    results = spawn_gloo(_worker, world, core)
    for case in _cases(world, core):
        ref = _reference(case, world)
        plan = _plan(case, world)
        assert all(max(lp.copies(plan.experts())) == 2 for lp in plan.layers)  # replicas are exercised
        check_ranks(results, case, world, ref, contiguous=False)


def _route(idx, lp: LayerPlan, E: int, rank: int, chunks: int = 1):
    from moec.ir.parallel import flatten_placement

    return torch.ops.moec.ep_route_placed(idx, *flatten_placement(lp.rank_experts, lp.shares), E, rank, chunks)


def test_placed_route_sends_every_slot_to_a_replica_in_its_share():
    E, world, T, K = 6, 3, 400, 2
    lp = LayerPlan([[0, 1, 5], [2, 3, 5, 1], [4, 5]], [[1.0, 0.5, 0.2], [1.0, 1.0, 0.3, 0.5], [1.0, 0.5]])
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    taken = torch.zeros(world, E)
    for rank in range(world):
        for chunks in (1, 3):
            order, local, counts = _route(idx, lp, E, rank, chunks)
            assert counts.shape == (world, chunks)
            for c, (idx_c, order_c, local_c) in enumerate(zip(idx.tensor_split(chunks), order.tensor_split(chunks),
                                                                   local.tensor_split(chunks))):
                order_n, local_n = order_c.reshape(-1), local_c.reshape(-1)
                assert sorted(order_n.tolist()) == list(range(idx_c.numel()))  # every slot sent once
                dest = torch.repeat_interleave(torch.arange(world), counts[:, c])
                for d, slot, loc in zip(dest.tolist(), order_n.tolist(), local_n.tolist()):
                    assert lp.rank_experts[d][loc] == idx_c.reshape(-1)[slot]  # a replica of its expert
                    if chunks == 1:
                        taken[d, idx_c.reshape(-1)[slot]] += 1
    want = torch.tensor(PlacementPlan(world, [lp], num_experts=E).share_matrix(0)) * torch.bincount(
        idx.reshape(-1), minlength=E) * world
    assert (taken - want).abs().max() <= world  # each rank's split within one slot per replica


def _held_loads(lp: LayerPlan, fractions: list[float], counts: list[float]) -> list[float]:
    loads, pos = [0.0] * len(lp.rank_experts), 0
    for r, experts in enumerate(lp.rank_experts):
        for e in experts:
            loads[r] += fractions[pos] * counts[e]
            pos += 1
    return loads


def test_balance_replicas_by_hand():
    from moec.ir.parallel import balance_replicas, flatten_placement

    lp = LayerPlan([[0, 1], [0, 2]])  # expert 0 on both ranks
    flat = flatten_placement(lp.rank_experts)
    assert balance_replicas([10, 6, 2], *flat, 3) == pytest.approx([0.3, 1.0, 0.7, 1.0])  # loads 9 and 9
    assert balance_replicas([10, 30, 2], *flat, 3) == pytest.approx([0.0, 1.0, 1.0, 1.0])  # rank 0 full already
    assert balance_replicas([0, 6, 2], *flat, 3) == [0.5, 1.0, 0.5, 1.0]  # no slots: the plan's (even) split
    shared = flatten_placement(lp.rank_experts, [[0.2, 1.0], [0.8, 1.0]])
    assert balance_replicas([0, 6, 2], *shared, 3) == [0.2, 1.0, 0.8, 1.0]  # ... or the plan's shares
    assert balance_replicas([8, 0, 0], *shared, 3) == pytest.approx([0.5, 1.0, 0.5, 1.0])
    # a chain of replicas: 1 is on ranks 0-1, 2 on ranks 1-2; all of rank 0's load must flow to rank 2
    chain = LayerPlan([[0, 1], [1, 2], [2, 3]])
    counts = [9.0, 3.0, 3.0, 0.0]
    fractions = balance_replicas(counts, *flatten_placement(chain.rank_experts), 4)
    assert _held_loads(chain, fractions, counts) == pytest.approx([9.0, 3.0, 3.0])  # 1 and 2 move off rank 0-1
    counts = [3.0, 6.0, 6.0, 0.0]
    fractions = balance_replicas(counts, *flatten_placement(chain.rank_experts), 4)
    # 8 Gauss-Seidel sweeps, stopped at 1e-3 of the slots moved: close to the even 5, 5, 5
    assert _held_loads(chain, fractions, counts) == pytest.approx([5.0, 5.0, 5.0], abs=0.02)


def test_balance_replicas_minimises_the_heaviest_rank():
    """Against the exact min-max split (bisection on the cap with a max-flow, networkx) on random
    placements with replicas and random, partly zero, counts."""
    import random

    import networkx as nx

    from moec.ir.parallel import balance_replicas, flatten_placement

    def min_max(lp, counts):
        total = sum(counts)
        lo, hi = total / len(lp.rank_experts), total
        for _ in range(40):
            cap = (lo + hi) / 2
            g = nx.DiGraph()
            for r, experts in enumerate(lp.rank_experts):
                g.add_edge(("r", r), "t", capacity=cap)
                for e in experts:
                    g.add_edge("s", ("e", e), capacity=float(counts[e]))
                    g.add_edge(("e", e), ("r", r))
            lo, hi = (lo, cap) if nx.maximum_flow_value(g, "s", "t") >= total * (1 - 1e-12) else (cap, hi)
        return hi

    rng = random.Random(0)
    for _ in range(40):
        N = rng.randint(2, 6)
        E = rng.randint(N, 3 * N)
        S = -(-E // N) + rng.randint(0, 2)
        ranks = [[] for _ in range(N)]
        for e in rng.sample(range(E), E):
            ranks[rng.choice([r for r in range(N) if len(ranks[r]) < S])].append(e)
        for r in range(N):
            ranks[r] += [e for e in rng.sample(range(E), E) if e not in ranks[r]][:S - len(ranks[r])]
        lp = LayerPlan(ranks)
        counts = [float(rng.choice([0, 1, 7, 50, 400])) for _ in range(E)]
        if not sum(counts):
            continue
        fractions = balance_replicas(counts, *flatten_placement(ranks), E)
        loads = _held_loads(lp, fractions, counts)
        assert sum(loads) == pytest.approx(sum(counts))
        assert max(loads) <= min_max(lp, counts) + 1e-3 * sum(counts) / N


def test_adaptive_route_splits_by_the_balanced_shares():
    from moec.ir.parallel import balance_replicas, flatten_placement

    E, world, T, K = 6, 3, 300, 2
    lp = LayerPlan([[0, 1, 5], [2, 3, 5, 1], [4, 5]])
    flat = flatten_placement(lp.rank_experts)
    g = torch.Generator().manual_seed(0)
    popular = torch.tensor([8.0, 4, 1, 1, 1, 6])  # experts 0 and 5 (rank 0's) are hot
    idx = [torch.stack([torch.multinomial(popular, K, generator=g) for _ in range(T)]) for _ in range(world)]
    counts = sum(torch.bincount(i.reshape(-1), minlength=E) for i in idx)
    fractions = balance_replicas(counts.tolist(), *flat, E)
    taken = torch.zeros(world, dtype=torch.float64)
    for rank in range(world):
        order, local, sent = torch.ops.moec.ep_route_adaptive(idx[rank], counts, *flat, E, rank, 1)
        same = torch.ops.moec.ep_route_placed(idx[rank], flat[0], flat[1], fractions, E, rank, 1)
        assert all(torch.equal(a, b) for a, b in zip((order, local, sent), same))  # the balanced shares' route
        taken += sent[:, 0]
    want = torch.tensor(_held_loads(lp, fractions, counts.tolist()), dtype=torch.float64)
    assert (taken - want).abs().max() <= 2 * world  # within a slot per replica and rank
    even = _held_loads(lp, [1 / lp.copies(E)[e] for e in flat[0]], counts.tolist())
    assert taken.max() < 0.9 * max(even)  # the plan's even split leaves rank 0 heavier
    with pytest.raises(ValueError, match="one slot count per expert"):
        torch.ops.moec.ep_route_adaptive(idx[0], counts[:-1], *flat, E, 0, 1)


def test_placed_route_degenerate_inputs():
    lp = LayerPlan([[0, 1], [1, 2], [3, 0]])
    order, local, counts = _route(torch.zeros(0, 2, dtype=torch.int64), lp, 4, 0, 2)
    assert order.shape == (0, 2) and counts.tolist() == [[0, 0]] * 3
    order, local, counts = _route(torch.tensor([[1]]), lp, 4, 1)  # one token, a replicated expert
    assert counts.sum() == 1 and lp.rank_experts[int(counts[:, 0].argmax())][int(local)] == 1
    with pytest.raises(ValueError, match="expert ids must lie"):
        _route(torch.tensor([[4]]), lp, 4, 0)
    with pytest.raises(ValueError, match="on no rank"):
        _route(torch.tensor([[0]]), LayerPlan([[0], [1]]), 3, 0)


def _bad_plan_worker(rank: int, world: int) -> list[str]:
    from moec.capture import convert_model

    case = dict(name="bad", spec="builtin:moe-mlp", rows=[1, 1])
    experts = [layer.num_experts for layer in convert_model(_build(case, world)[0]).layers]
    E, n = experts[0], len(experts)
    errors = []
    for plan in (PlacementPlan.contiguous(E, 3, n),  # wrong world size
                 PlacementPlan.contiguous(E, 2, n + 1),  # one layer too many
                 PlacementPlan(2, [LayerPlan([list(range(E // 2)), list(range(E // 2, E - 1))])] * n),  # E-1 lost
                 PlacementPlan(2, PlacementPlan.contiguous(E, 2, n).layers,  # planned for another model
                               meta={"layer_names": [f"other.{i}" for i in range(n)]})):
        model, _, _ = _build(case, world)
        try:
            moec.compile(model, expert_parallel=True, placement=plan)
        except PlanError as e:
            errors.append(str(e))
    return errors


def test_bad_plans_are_rejected_at_compile():
    errors = spawn_gloo(_bad_plan_worker, 2)[0]
    assert len(errors) == 4, errors
    assert "3 ranks" in errors[0] and "group has 2" in errors[0]
    assert "MoE layer(s)" in errors[1]
    assert "MoE layer 0" in errors[2] and "on no rank" in errors[2]
    assert "made for MoE layers ['other.0'" in errors[3] and "layers.0.moe" in errors[3]


def _profiled_plan_worker(rank: int, world: int) -> float:
    """Profile the model eagerly, plan with moec's optimiser, compile with the plan: the largest
    difference of this rank's output from the eager model's on its rows, relative to its size."""
    from moec.passes.placement import PlacementOptions, place
    from moec.runtime.profiler import RoutingProfiler

    case = dict(name="profiled", spec="builtin:moe-mlp", rows=[2, 1])
    model, full, _ = _build(case, world)
    with torch.no_grad():
        want = primary_output(model(*full))[_rows(case, rank)]
    profiler = RoutingProfiler()
    with profiler.recording(model), torch.no_grad():
        model(*full)
    trace = profiler.trace()
    # 25% replica slots; adaptive forced ("auto" decides on the planning windows: one here)
    plan = place(trace, world, world, -(-5 * trace.num_experts // (4 * world)),
                 options=PlacementOptions(replica_balance="adaptive"))
    assert plan.meta["layer_names"] == trace.meta["layer_names"]
    assert PlacementPlan.from_dict(plan.to_dict()).replica_balance == "adaptive"  # the file carries it
    compiled = moec.compile(model, expert_parallel=True, inner="aot_eager", placement=plan)
    torch._dynamo.utils.counters["moec"].clear()
    with torch.no_grad():
        got = primary_output(compiled(*tuple(a[_rows(case, rank)] for a in full)))
    replicated = sum(max(lp.copies(trace.num_experts)) > 1 for lp in plan.layers)
    assert replicated and torch._dynamo.utils.counters["moec"]["expert_parallel_adaptive_layers"] == replicated
    return float((got - want).abs().max() / want.abs().max())


def test_profile_place_compile_end_to_end():
    assert max(spawn_gloo(_profiled_plan_worker, 2)) < 1e-4
