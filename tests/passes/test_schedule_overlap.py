"""schedule_overlap on expert-parallel layers: node-order tests of the pipeline, and values
unchanged by the reordering (bitwise).

The graphs come from the builtin shared-expert model made expert parallel over a one-rank gloo
group (the collectives are real, the graph is what W ranks would run), in 3 chunks.
"""

from __future__ import annotations

import dataclasses
import datetime
import operator

import pytest
import torch
import torch.distributed as dist

import moec
from moec.capture import capture_graphs
from moec.ir.verify import moec_op_name
from moec.models.builtin import BUILTIN_MODELS
from moec.passes.pipeline import run_pipeline
from moec.passes.schedule_overlap import WAIT, is_issue, schedule_overlap

CHUNKS = 3


@pytest.fixture
def group_name(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        yield dist.group.WORLD.group_name
    finally:
        dist.destroy_process_group()


def _ep_graph(group_name, scheduled: bool):
    torch._dynamo.reset()
    model, args = BUILTIN_MODELS["shared-expert"]()
    (gm,) = capture_graphs(model, *args)
    disable = () if scheduled else ("schedule_overlap",)
    gm, records = run_pipeline(gm, None, target="reference", group_name=group_name, chunks=CHUNKS, disable=disable)
    return gm, {r.name: r.changes for r in records}


def _layer0(gm):
    """Positions of layer 0's nodes by role and chunk."""
    roles: dict = {}
    for pos, node in enumerate(gm.graph.nodes):
        ep = node.meta.get("moec", {}).get("ep")
        if moec_op_name(node) == "shared_expert" and "shared" not in roles:
            roles["shared"] = pos
        if ep is None or ep["layer"] != 0 or ep["chunk"] is None:
            continue
        c, role = ep["chunk"], None
        if is_issue(node):
            role = f"{ep['stage']}_issue"
        elif node.target is WAIT:
            role = ep["stage"]
        elif moec_op_name(node) in ("grouped_gemm_act", "grouped_gemm_combine"):
            role = moec_op_name(node)
        if role:
            roles.setdefault(role, {}).setdefault(c, []).append(pos)
    return roles


def test_expert_parallel_layers_and_chunks(group_name):
    gm, changes = _ep_graph(group_name, scheduled=False)
    assert changes["expert_parallel"] == 2  # both layers of the stack
    roles = _layer0(gm)
    assert sorted(roles["grouped_gemm_act"]) == list(range(CHUNKS))
    for c in range(CHUNKS):
        assert len(roles["dispatch_issue"][c]) == 2  # rows and local expert ids
        assert len(roles["combine_issue"][c]) == 1


def test_sequential_emission_waits_at_once(group_name):
    gm, _ = _ep_graph(group_name, scheduled=False)
    roles = _layer0(gm)
    for c in range(CHUNKS):
        for issue, wait in zip(roles["dispatch_issue"][c], roles["dispatch_wait"][c]):
            assert wait == issue + 1
        assert roles["combine_wait"][c] == [roles["combine_issue"][c][0] + 1]


def test_overlapped_schedule_is_a_pipeline(group_name):
    gm, changes = _ep_graph(group_name, scheduled=True)
    assert changes["schedule_overlap"] > 0
    r = _layer0(gm)
    first = lambda role, c: min(r[role][c])  # noqa: E731
    last = lambda role, c: max(r[role][c])  # noqa: E731
    # every chunk's rows are on their way before the first expert GEMM
    assert max(last("dispatch_issue", c) for c in range(CHUNKS)) < first("grouped_gemm_act", 0)
    # the shared expert runs under the dispatch: after the first issue, before the first wait
    assert first("dispatch_issue", 0) < r["shared"] < min(first("dispatch_wait", c) for c in range(CHUNKS))
    for c in range(CHUNKS):
        assert last("dispatch_wait", c) < first("grouped_gemm_act", c)
        # the combine of chunk c is issued as soon as its experts finish ...
        assert first("combine_issue", c) == last("grouped_gemm_combine", c) + 1
        if c > 0:
            # ... and chunk c's rows are waited for only after chunk c-1's experts ran
            assert first("dispatch_wait", c) > last("grouped_gemm_combine", c - 1)
    # combines are waited for after all expert work of the layer
    assert min(first("combine_wait", c) for c in range(CHUNKS)) > max(
        last("grouped_gemm_combine", c) for c in range(CHUNKS))


def test_schedule_is_idempotent_and_graph_valid(group_name):
    gm, _ = _ep_graph(group_name, scheduled=True)
    gm.graph.lint()
    before = [n.name for n in gm.graph.nodes]
    gm, moved = schedule_overlap(gm)
    assert moved == 0 and [n.name for n in gm.graph.nodes] == before


def test_graph_without_collectives_left_alone():
    model, args = BUILTIN_MODELS["shared-expert"]()
    torch._dynamo.reset()
    (gm,) = capture_graphs(model, *args)
    before = [n.name for n in gm.graph.nodes]
    gm, moved = schedule_overlap(gm)
    assert moved == 0 and [n.name for n in gm.graph.nodes] == before


def test_in_place_ops_are_barriers():
    def f(x, y):
        a = x * 2
        a.add_(1)  # a barrier: nothing moves across it
        return a + y

    gm = torch.fx.symbolic_trace(f)
    names = [n.name for n in gm.graph.nodes]
    from moec.passes.schedule_overlap import schedule

    assert [n.name for n in schedule(list(gm.graph.nodes))] == names


@pytest.mark.parametrize("chunks", [1, CHUNKS])
def test_schedule_preserves_values_bitwise(group_name, chunks):
    model, args = BUILTIN_MODELS["shared-expert"]()
    x = args[0].clone().requires_grad_(True)
    results = []
    for disable in ((), ("schedule_overlap",)):
        torch._dynamo.reset()
        for p in model.parameters():
            p.grad = None
        compiled = moec.compile(model, expert_parallel=True, chunks=chunks, inner="aot_eager", disable=disable)
        out = compiled(x)
        out.pow(2).sum().backward()
        # per-expert weights emptied by sharding get no gradient; their shards do
        results.append((out.detach(), x.grad.clone(), [p.grad for p in model.parameters() if p.numel()]))
        x.grad = None
    (out_a, gx_a, gp_a), (out_b, gx_b, gp_b) = results
    assert torch.equal(out_a, out_b) and torch.equal(gx_a, gx_b)
    assert len(gp_a) == len(gp_b) and all(torch.equal(a, b) for a, b in zip(gp_a, gp_b))
    eager, _ = BUILTIN_MODELS["shared-expert"]()  # the same weights (seeded factory), not sharded
    torch.testing.assert_close(out_a, eager(args[0]), rtol=1e-5, atol=1e-6)


def _scheduled_backward(monkeypatch):
    """A training step of the 3-chunk shared-expert layer compiled with aot_eager: AOT autograd's
    backward graph's nodes as AOT emitted them, the graph module the backend's schedule_overlap
    made of it, and how many nodes that moved."""
    import moec.backend

    seen = []

    def recording(gm):
        before = list(gm.graph.nodes)
        gm, moved = schedule_overlap(gm)
        seen.append((before, gm, moved))
        return gm, moved

    monkeypatch.setattr(moec.backend, "schedule_overlap", recording)
    model, args = BUILTIN_MODELS["shared-expert"]()
    compiled = moec.compile(model, expert_parallel=True, chunks=CHUNKS, inner="aot_eager")
    compiled(args[0].requires_grad_(True)).sum().backward()
    _, backward = seen  # forward, then backward
    return backward


def test_backward_graph_is_scheduled_too(group_name, monkeypatch):
    """AOT autograd's backward of a 3-chunk layer, scheduled by the backend: every chunk's first
    backward exchange (output gradients back to the experts) is issued before the first gradient
    GEMM of the layer."""
    _, bw, moved = _scheduled_backward(monkeypatch)
    assert moved > 0
    nodes = list(bw.graph.nodes)
    issues = [i for i, n in enumerate(nodes) if is_issue(n)]
    gemms = [i for i, n in enumerate(nodes) if (moec_op_name(n) or "").startswith("grouped_gemm")]
    # the last layer's backward runs first: its chunks' first exchanges precede its first gradient GEMM
    assert len(issues) >= 2 * CHUNKS and gemms
    assert sorted(issues)[CHUNKS - 1] < min(gemms)


def _users_until_issue(node):
    """The first collective issue reached from ``node`` along its users (breadth first)."""
    queue, seen = list(node.users), set()
    while queue:
        n = queue.pop(0)
        if n in seen:
            continue
        seen.add(n)
        if is_issue(n):
            return n
        queue.extend(n.users)
    return None


def _producer(arg):
    """The op node behind a getitem of a multi-output op."""
    return arg.args[0] if arg.target is operator.getitem else arg


def _weight_gradient_chunks(nodes):
    """Per chunk of every layer's backward: (the reverse exchange of the experts' input gradient,
    its wait, the chunk's two weight-gradient ops), found through the data edges."""
    chunks = []
    for n in nodes:
        if moec_op_name(n) != "grouped_gemm_act_backward_weight":
            continue
        act_input = _producer(n.args[0])  # d_h comes from the chunk's input-gradient op
        assert moec_op_name(act_input) == "grouped_gemm_act_backward_input"
        combine_input = _producer(act_input.args[0])  # whose output gradient is the combine's d_a
        assert moec_op_name(combine_input) == "grouped_gemm_combine_backward_input"
        (combine_weight,) = [u for g in combine_input.users for u in g.users
                             if moec_op_name(u) == "grouped_gemm_combine_backward_weight"]
        issue = _users_until_issue(act_input)
        (wait,) = [u for u in issue.users if u.target is WAIT]
        chunks.append((issue, wait, n, combine_weight))
    return chunks


def test_training_graphs_use_the_shards_without_gathering(group_name, monkeypatch):
    """The graphs a training step runs (AOT autograd's forward and backward) hold no all-gather of
    the expert weights and no reduce-scatter of their gradients: the layers read their shards.
    (Dynamo traces the gather differently with gradients on, and per torch release: torch 2.11
    wraps its wait in an autograd function; an unmatched form would gather every expert's weights
    on every step.)"""
    import moec.backend

    seen = []

    def recording(gm):
        seen.append(gm)
        return schedule_overlap(gm)

    monkeypatch.setattr(moec.backend, "schedule_overlap", recording)
    model, args = BUILTIN_MODELS["shared-expert"]()
    compiled = moec.compile(model, expert_parallel=True, chunks=CHUNKS, inner="aot_eager")
    compiled(args[0].requires_grad_(True)).sum().backward()
    assert len(seen) == 2  # forward, backward
    for gm in seen:
        names = [str(n.target) for n in gm.graph.nodes]
        assert not [t for t in names if "all_gather" in t or "reduce_scatter" in t], names


def test_backward_weight_gradients_run_under_their_own_exchange(group_name, monkeypatch):
    """Lancet's trick: the experts' backward is an input-gradient op and a weight-gradient op
    (moec.ir.lowered), so the scheduler issues each chunk's reverse exchange of the input
    gradient before that chunk's weight-gradient ops, which then run while it travels. AOT
    autograd emits them the other way round (input, weight, then the exchange); fused into one
    op, dW would sit before the exchange whatever the schedule."""
    from moec.ir.verify import verify

    unscheduled, bw, _ = _scheduled_backward(monkeypatch)
    assert verify(bw) > 0  # the op spec table holds on the split backward ops
    nodes = list(bw.graph.nodes)
    chunks = _weight_gradient_chunks(nodes)
    assert len(chunks) == 2 * CHUNKS  # both layers, every chunk
    pos = {n: i for i, n in enumerate(nodes)}
    old = {n: i for i, n in enumerate(unscheduled)}
    for issue, wait, act_weight, combine_weight in chunks:
        # scheduled: issue < dW(act), dW(combine) < wait -- the weight gradients under the exchange
        assert pos[issue] < min(pos[act_weight], pos[combine_weight]), issue.name
        assert max(pos[act_weight], pos[combine_weight]) < pos[wait], wait.name
        # AOT's own order had the exchange after the weight gradients: the scheduler moved it
        assert old[issue] > max(old[act_weight], old[combine_weight]), issue.name


def test_backend_schedules_aot_graphs(group_name):
    torch._dynamo.utils.counters["moec"].clear()
    model, args = BUILTIN_MODELS["shared-expert"]()
    compiled = moec.compile(model, expert_parallel=True, chunks=2, inner="aot_eager")
    compiled(args[0].requires_grad_(True)).sum().backward()
    assert torch._dynamo.utils.counters["moec"]["scheduled_aot_graphs"] == 2  # forward and backward


def test_auto_chunks_is_the_cost_models_choice(monkeypatch):
    from moec.backend import auto_schedule
    from moec.passes.expert_parallel import LayerInfo
    from moec.runtime.cost_model import Calibration, LayerShape, choose_schedule

    calib = Calibration.default()
    monkeypatch.setattr(Calibration, "for_this_machine", classmethod(lambda cls: (calib, "test")))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    info = LayerInfo(index=0, tokens=4096, hidden=4096, num_experts=64, top_k=8, world=8, gated=True,
                     expert_hidden=256, dtype=torch.bfloat16)
    shape = LayerShape(tokens=4096, hidden=4096, expert_hidden=256, num_experts=64, top_k=8, gated=True,
                       dtype_bytes=2)
    chosen = choose_schedule(shape, 8, 8, calib)
    auto_chunks = lambda i: auto_schedule(i, None)[0]  # noqa: E731  (one node)
    assert auto_chunks(info) == chosen.chunks > 1  # communication-heavy: pipelined
    assert auto_chunks(dataclasses.replace(info, world=1)) == 1
    assert auto_chunks(dataclasses.replace(info, tokens=None)) == 1  # dynamic token count


def test_auto_schedule_goes_hierarchical_when_the_model_says(monkeypatch):
    from moec.backend import auto_schedule, chunk_chooser
    from moec.passes.expert_parallel import LayerInfo
    from moec.runtime.cost_model import Calibration, LayerShape, choose_schedule

    calib = Calibration.default()
    monkeypatch.setattr(Calibration, "for_this_machine", classmethod(lambda cls: (calib, "test")))
    # many nodes, small messages: latency-bound, where the two-stage exchange wins
    info = LayerInfo(index=0, tokens=16, hidden=256, num_experts=512, top_k=2, world=512, gated=True,
                     expert_hidden=128, dtype=torch.bfloat16)
    shape = LayerShape(tokens=16, hidden=256, expert_hidden=128, num_experts=512, top_k=2, dtype_bytes=2)
    chosen = choose_schedule(shape, 512, 8, calib)
    assert chosen.hierarchical
    assert auto_schedule(info, 8) == (chosen.chunks, True)
    assert auto_schedule(info, None)[1] is False  # one node: flat only
    assert chunk_chooser("auto", "auto", 8)(info) == (chosen.chunks, True)
    assert chunk_chooser(2, False, 8)(info) == (2, False)
    assert chunk_chooser(2, True, None)(info) == (2, False)  # no node groups: nothing to be hierarchical with


def test_adaptive_route_counts_gate_the_exchange_not_the_compute():
    """The all-reduce of a step's expert counts feeds ``ep_route_adaptive``, which reads it on the
    host to plan the exchange: its wait is scheduled as a split-size wait (before computation that
    can overlap the exchange), not as a data wait (after it)."""
    import moec.ir.parallel  # noqa: F401  (registers moec::ep_route_adaptive)
    from moec.passes.schedule_overlap import schedule

    graph = torch.fx.Graph()
    x, idx, counts = (graph.placeholder(n) for n in ("x", "idx", "counts"))
    reduced = graph.call_function(torch.ops._c10d_functional.all_reduce.default, (counts, "sum", "g"))
    waited = graph.call_function(WAIT, (reduced,))
    dense = graph.call_function(torch.mm, (x, x))  # e.g. a shared expert, independent of the exchange
    route = graph.call_function(torch.ops.moec.ep_route_adaptive.default, (idx, waited, [0, 1, 0], [2, 1], [], 2, 0, 1))
    sent = graph.call_function(operator.getitem, (route, 2))
    issue = graph.call_function(torch.ops._c10d_functional.all_to_all_single.default, (sent, [1, 1], [1, 1], "g"))
    got = graph.call_function(WAIT, (issue,))
    graph.output((graph.call_function(torch.add, (dense, dense)), got))
    order = schedule(list(graph.nodes))
    assert order.index(waited) < order.index(route) < order.index(issue) < order.index(dense)


def test_replica_balance_needs_a_valid_value_and_a_placement(group_name):
    from moec.backend import check_options
    from moec.runtime.plan import PlacementPlan

    model, _ = BUILTIN_MODELS["moe-mlp"]()
    with pytest.raises(ValueError, match="replica_balance applies to a placement's replicated experts"):
        moec.compile(model, expert_parallel=True, replica_balance="adaptive")
    plan = PlacementPlan.contiguous(8, 1, 2)
    with pytest.raises(ValueError, match="replica_balance must be 'static' or 'adaptive', got 'dynamic'"):
        moec.compile(model, expert_parallel=True, placement=plan, replica_balance="dynamic")
    with pytest.raises(TypeError, match="apply to expert parallelism"):
        moec.compile(model, replica_balance="adaptive")
    with pytest.raises(ValueError, match="ep_replica_balance must be one of"):
        check_options({"ep_replica_balance": "sometimes"})


def test_hierarchical_on_one_node_is_refused(group_name):
    model, _ = BUILTIN_MODELS["moe-mlp"]()
    with pytest.raises(ValueError, match="hierarchical=True needs more than one node"):
        moec.compile(model, expert_parallel=True, hierarchical=True)


def test_sharded_stacked_weights_are_used_without_gathering(group_name):
    """moec.runtime.shard: the captured graph gathers the shards (all experts' meaning); the
    expert_parallel pass feeds the shard to the local experts and drops the gathers."""
    from moec.capture import convert_model
    from moec.runtime.shard import shard_experts

    torch._dynamo.reset()
    model, args = BUILTIN_MODELS["stacked-bmm"]()
    convert_model(model)
    assert shard_experts(model, group_name) == ["layers.0.moe", "layers.1.moe"]
    (gm,) = capture_graphs(model, *args)
    gathers = lambda g: [n for n in g.graph.nodes if "all_gather" in str(n.target)]  # noqa: E731
    assert len(gathers(gm)) == 8  # w_in, w_out, b_in, b_out of 2 layers
    gm, _ = run_pipeline(gm, None, target="reference", group_name=group_name, chunks=1)
    assert gathers(gm) == []
    for node in gm.graph.nodes:
        if moec_op_name(node) == "grouped_gemm_act":
            assert node.args[3].op == "placeholder"  # the shard parameter itself, no narrow
