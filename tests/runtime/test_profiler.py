"""The routing profiler against a hand computation (the model's own router run by the test, pairs
counted with loops), windows, the pair definition's edge cases, the compiled path equal to the
eager one, and per-rank source counts on 2 gloo ranks (eager, and compiled expert parallel)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import moec
from moec.models.builtin import BUILTIN_MODELS
from moec.passes.profile_routing import profile_routing
from moec.runtime.launch import spawn_gloo
from moec.runtime.profiler import RoutingProfiler, module_path
from moec.runtime.trace import TraceError


def router_choices(model, inputs: list[torch.Tensor]) -> list[list[np.ndarray]]:
    """Per forward, per MoE block (``layers.{i}.moe``), the top-k experts its own ``route``
    picks: the block inputs are caught by hooks on the model's unmodified eager forward."""
    blocks = [m for name, m in model.named_modules() if name.endswith(".moe")]
    choices: list[list[np.ndarray]] = []
    seen: list[np.ndarray] = []
    hooks = [b.register_forward_pre_hook(lambda m, a: seen.append(m.route(a[0].reshape(-1, a[0].shape[-1]))[1].numpy()))
             for b in blocks]
    try:
        with torch.no_grad():
            for x in inputs:
                seen.clear()
                model(x)
                choices.append(list(seen))
    finally:
        for h in hooks:
            h.remove()
    return choices


def hand_counts(choices_per_forward: list[list[np.ndarray]], E: int) -> tuple[np.ndarray, np.ndarray]:
    """load [L, E] and affinity [L-1, E, E] with plain loops: token t adds (a, b) for every a it
    chose at layer l and every b at l+1."""
    L = len(choices_per_forward[0])
    load, aff = np.zeros((L, E), np.int64), np.zeros((L - 1, E, E), np.int64)
    for layers in choices_per_forward:
        for l, idx in enumerate(layers):
            for t in range(idx.shape[0]):
                for a in idx[t]:
                    load[l, a] += 1
                    if l + 1 < L:
                        for b in layers[l + 1][t]:
                            aff[l, a, b] += 1
    return load, aff


def inputs(n: int, tokens: int = 8, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, tokens // 2, 64, generator=g) for _ in range(n)]


def test_eager_recording_matches_hand_computation():
    model, _ = BUILTIN_MODELS["moe-mlp"](num_experts=6, top_k=3)
    xs = inputs(5)
    expected = router_choices(model, xs)
    profiler = RoutingProfiler(source="test")
    with torch.no_grad(), profiler.recording(model):
        for i, x in enumerate(xs):
            if i == 2:
                profiler.next_window()
            y = model(x)
    t = profiler.trace()
    assert t.meta["layer_names"] == ["layers.0.moe", "layers.1.moe"] and t.top_k == 3 and t.meta["source"] == "test"
    assert t.num_windows == 2 and t.source_WLRE is None
    for w, forwards in enumerate((expected[:2], expected[2:])):
        load, aff = hand_counts(forwards, 6)
        np.testing.assert_array_equal(t.load_WLE[w], load)
        np.testing.assert_array_equal(t.affinity_WLEE[w], aff)
    # Every token reaches both layers: the documented margins hold.
    np.testing.assert_array_equal(t.affinity_WLEE.sum(-1), 3 * t.load_WLE[:, :1])
    np.testing.assert_array_equal(t.affinity_WLEE.sum(-2), 3 * t.load_WLE[:, 1:])
    # Recording changes nothing the model computes, and outside the block nothing is recorded.
    torch.testing.assert_close(y, model(xs[-1]), rtol=1e-5, atol=1e-5)
    model(xs[0])
    assert profiler.trace() == t


def test_one_token_with_top_k_equal_to_experts():
    model, _ = BUILTIN_MODELS["moe-mlp"](num_experts=4, top_k=4)
    profiler = RoutingProfiler()
    with torch.no_grad(), profiler.recording(model):
        model(torch.randn(1, 1, 64))
    t = profiler.trace()
    assert t.load_WLE.tolist() == [[[1, 1, 1, 1]] * 2] and (t.affinity_WLEE == 1).all() and t.top_k == 4


def test_window_tokens_opens_windows_at_forward_starts():
    model, _ = BUILTIN_MODELS["moe-mlp"]()
    profiler = RoutingProfiler(window_tokens=12)
    with torch.no_grad(), profiler.recording(model):
        for x in inputs(5, tokens=8):  # windows of whole forwards: 16, 16, 8 tokens
            model(x)
    t = profiler.trace()
    assert t.num_windows == 3 and t.meta["window_tokens"] == 12
    assert t.load_WLE.sum(-1)[:, 0].tolist() == [32, 32, 16]  # slots = tokens * top_k (2)


def test_record_pairs_dropped_slots_and_mismatched_tokens():
    p = RoutingProfiler()
    p.record("a", torch.tensor([[0, 1], [2, -1]]), 3)  # token 1 lost a slot to capacity
    p.record("b", torch.tensor([[2, 0], [1, 2]]), 3)
    p.record("c", torch.tensor([[1, 1], [0, 0], [2, 2]]), 3)  # 3 tokens: not the same tokens as b
    t = p.trace()
    assert t.load_WLE[0].tolist() == [[1, 1, 1], [1, 1, 2], [2, 2, 2]]
    expected = np.zeros((2, 3, 3), np.int64)
    for a, b in [(0, 2), (0, 0), (1, 2), (1, 0), (2, 1), (2, 2)]:
        expected[0, a, b] += 1
    np.testing.assert_array_equal(t.affinity_WLEE[0], expected)  # no pairs between b and c
    # A new forward (layer "a" again) does not pair b's last record with c's.
    p.record("a", torch.tensor([[1, 2]]), 3)
    p.record("c", torch.tensor([[0, 1]]), 3)
    assert p.trace().affinity_WLEE[0, 1].sum() == 0


def test_record_errors():
    p = RoutingProfiler()
    with pytest.raises(TraceError, match="the profiler recorded nothing"):
        p.trace()
    with pytest.raises(ValueError, match="layer a routed to expert 4 but has 4 experts"):
        p.record("a", torch.tensor([[4]]), 4)
    p.record("a", torch.tensor([[1]]), 4)
    with pytest.raises(ValueError, match="layer a recorded with 5 experts, earlier with 4"):
        p.record("a", torch.tensor([[1]]), 5)
    p.record("b", torch.tensor([[1]]), 5)
    with pytest.raises(TraceError, match="different expert counts"):
        p.trace()
    with pytest.raises(ValueError, match="window_tokens must be a positive int"):
        RoutingProfiler(window_tokens=0)


def test_module_path():
    assert module_path("L['self'].layers.0.moe") == "layers.0.moe"
    assert module_path("L['self'].model.layers[1].mlp") == "model.layers.1.mlp"
    assert module_path("L['self']") == "<root>"
    assert module_path("L['mod'].blocks['x'].moe") == "blocks.x.moe"


@pytest.mark.parametrize("name, inner", [("moe-mlp", "aot_eager"), ("stacked-bmm", "inductor")])
def test_compiled_records_what_eager_records(name, inner):
    model, _ = BUILTIN_MODELS[name]()
    xs = inputs(3, tokens=8) + inputs(1, tokens=12, seed=2)  # the last forward changes the token count
    eager = RoutingProfiler(source="s")
    with torch.no_grad(), eager.recording(model):
        for i, x in enumerate(xs):
            eager.next_window() if i == 2 else None
            model(x)
    compiled_profiler = RoutingProfiler(source="s")
    compiled = moec.compile(model, profile=compiled_profiler, inner=inner, dynamic=False)
    with torch.no_grad():
        for i, x in enumerate(xs):
            compiled_profiler.next_window() if i == 2 else None
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
    assert compiled_profiler.trace() == eager.trace()
    assert not counters["graph_break"]


def test_compiled_training_step_records_the_forward_only():
    model, (x,) = BUILTIN_MODELS["moe-mlp"]()
    profiler = RoutingProfiler()
    compiled = moec.compile(model, profile=profiler, inner="aot_eager")
    compiled(x).sum().backward()
    assert profiler.trace().load_WLE.sum() == 2 * 16 * 2  # 2 layers x 16 tokens x top-2, once
    assert all(p.grad is not None for p in model.layers[0].moe.router.parameters())


def test_pass_inserts_one_record_per_route_and_is_idempotent():
    model, (x,) = BUILTIN_MODELS["moe-mlp"]()
    profiler = RoutingProfiler()
    profiler.bind(model)
    graphs = []

    def backend(gm, example_inputs):
        gm, first = profile_routing(gm, example_inputs, profiler=profiler)
        _, second = profile_routing(gm, example_inputs, profiler=profiler)
        graphs.append((gm, first, second))
        return gm.forward

    backend._moec_backend = True  # the capture hook converts the model for it
    torch.compile(model, backend=backend)(x)
    (gm, first, second), = graphs
    records = [n for n in gm.graph.nodes if n.target is torch.ops.moec.record_routing.default]
    assert (first, second, len(records)) == (2, 0, 2)
    assert [n.args[1:] for n in records] == [(profiler.id, "layers.0.moe", 8), (profiler.id, "layers.1.moe", 8)]


def test_backend_rejects_a_bad_profile_option():
    model, _ = BUILTIN_MODELS["moe-mlp"]()
    with pytest.raises(ValueError, match="profile must be a moec.runtime.profiler.RoutingProfiler"):
        moec.compile(model, profile="yes")


def _two_rank_worker(rank: int, world: int) -> dict:
    model, _ = BUILTIN_MODELS["moe-mlp"]()
    xs = inputs(2 + rank, seed=10 + rank)  # rank 1 runs one more window than rank 0
    profiler = RoutingProfiler()
    with torch.no_grad(), profiler.recording(model):
        for i, x in enumerate(xs):
            if i:
                profiler.next_window()
            model(x)
    result = dict(trace=profiler.trace(), choices=router_choices(model, xs))
    # The compiled expert-parallel model (its experts sharded in place, so it runs last) records
    # each rank's own tokens, as eager recording does.
    compiled_profiler = RoutingProfiler()
    compiled = moec.compile(model, profile=compiled_profiler, inner="aot_eager", expert_parallel=True)
    with torch.no_grad():
        compiled(xs[0])
    return dict(result, compiled=compiled_profiler.trace())


def test_two_ranks_gather_source_counts():
    results = spawn_gloo(_two_rank_worker, 2)
    t = results[0]["trace"]
    assert results[1]["trace"] == t  # every rank gets the same trace
    assert t.num_windows == 3 and t.num_ranks == 2
    for rank in range(2):
        for w, forward in enumerate(results[rank]["choices"]):
            load, _ = hand_counts([forward], 8)
            np.testing.assert_array_equal(t.source_WLRE[w, :, rank], load)
    assert t.source_WLRE[2, :, 0].sum() == 0  # rank 0 had no third window
    expected_aff = sum(np.pad(hand_counts([f], 8)[1][None], ((w, 2 - w), (0, 0), (0, 0), (0, 0)))
                       for r in range(2) for w, f in enumerate(results[r]["choices"]))
    np.testing.assert_array_equal(t.affinity_WLEE, expected_aff)
    first = t.window(0)
    for rank in range(2):
        compiled = results[rank]["compiled"]
        assert compiled.num_ranks == 2 and compiled.meta["layer_names"] == t.meta["layer_names"]
        for got, want in ((compiled.load_WLE, first.load_WLE), (compiled.affinity_WLEE, first.affinity_WLEE),
                          (compiled.source_WLRE, first.source_WLRE)):
            np.testing.assert_array_equal(got, want)
