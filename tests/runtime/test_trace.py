"""``RoutingTrace``: the .npz format round-trips, presets load by name, one-window views, and every
validation rule rejects with a message naming the problem."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moec.runtime.synthetic import PRESETS
from moec.runtime.trace import RoutingTrace, TraceError


def small_trace(W=3, L=3, E=4, K=2, T=5, seed=0, ranks=None) -> RoutingTrace:
    """Every token picks K distinct experts per layer; affinity counts its K*K pairs."""
    rng = np.random.default_rng(seed)
    load = np.zeros((W, L, E), np.int64)
    aff = np.zeros((W, L - 1, E, E), np.int64)
    src = np.zeros((W, L, ranks, E), np.int64) if ranks else None
    for w in range(W):
        for t in range(T):
            picks = [rng.permutation(E)[:K] for _ in range(L)]
            for l in range(L):
                load[w, l, picks[l]] += 1
                if src is not None:
                    src[w, l, t % ranks, picks[l]] += 1
                if l:
                    for a in picks[l - 1]:
                        aff[w, l - 1, a, picks[l]] += 1
    meta = dict(top_k=K, layer_names=[f"layers.{l}.moe" for l in range(L)], source="test")
    return RoutingTrace(load, aff, src, meta)


def test_shape_properties_and_window():
    t = small_trace(W=3, L=2, E=5, ranks=2)
    assert (t.num_windows, t.num_layers, t.num_experts, t.num_ranks, t.top_k) == (3, 2, 5, 2, 2)
    assert t.load_WLE.dtype == np.int64
    last = t.window(-1)
    assert last.num_windows == 1 and last.meta["window"] == 2
    np.testing.assert_array_equal(last.load_WLE[0], t.load_WLE[2])
    np.testing.assert_array_equal(last.affinity_WLEE[0], t.affinity_WLEE[2])
    np.testing.assert_array_equal(t.window(1).source_WLRE[0], t.source_WLRE[1])
    with pytest.raises(TraceError, match="window 3 out of range: the trace has 3 windows"):
        t.window(3)


@pytest.mark.parametrize("with_optional", [True, False])
def test_save_load_round_trip(tmp_path, with_optional):
    t = small_trace(ranks=3)
    if not with_optional:
        t = RoutingTrace(t.load_WLE, meta=dict(top_k=None))
    path = t.save(tmp_path / "sub" / "trace")  # .npz appended, folder made
    assert path.endswith("trace.npz")
    back = RoutingTrace.load(path)
    assert back == t
    assert (back.affinity_WLEE is None) == (not with_optional)
    with np.load(path) as npz:
        meta = json.loads(str(npz["meta"][()]))
    assert meta["format_version"] == 1 and meta["top_k"] == t.top_k


def test_minimal_npz_written_by_hand(tmp_path):
    """What the issue promises other tools: only ``load`` (floats holding integers are fine)."""
    path = tmp_path / "hand.npz"
    np.savez(path, load=np.array([[[1.0, 2.0, 0.0]]]))
    t = RoutingTrace.load(str(path))
    assert t.load_WLE.dtype == np.int64 and t.load_WLE.tolist() == [[[1, 2, 0]]]
    assert t.affinity_WLEE is None and t.source_WLRE is None
    assert t.meta == {"top_k": None, "layer_names": None, "source": None}


def test_load_synthetic_preset_is_deterministic():
    a, b = RoutingTrace.load("synthetic:mixtral-like"), RoutingTrace.load("synthetic:mixtral-like")
    assert a == b and a.meta["source"] == "synthetic:mixtral-like"
    assert a.load(a) is a  # a trace passes through


def test_one_of_everything_is_fine():
    """Degenerate but valid: one window, one layer (affinity then has no layer pairs), one expert."""
    t = RoutingTrace(np.array([[[7]]]), np.zeros((1, 0, 1, 1)), np.array([[[[3], [4]]]]), dict(top_k=1))
    assert (t.num_windows, t.num_layers, t.num_experts, t.num_ranks) == (1, 1, 1, 2)


def test_affinity_is_not_required_to_cover_the_load():
    """Tokens may skip layer l+1 (dropped, dense layer): fewer pairs than k * load is valid."""
    t = small_trace()
    RoutingTrace(t.load_WLE, t.affinity_WLEE // 2, None, t.meta)
    RoutingTrace(t.load_WLE, np.zeros_like(t.affinity_WLEE), None, t.meta)


load_3d = np.ones((2, 3, 4), np.int64)


@pytest.mark.parametrize("kwargs, needles", [
    (dict(load_WLE=np.ones((2, 3))), ["load has 2 dimensions (shape (2, 3))", "[windows, layers, experts]"]),
    (dict(load_WLE=np.ones((0, 3, 4))), ["load has shape (0, 3, 4)", "at least one window, one layer and one expert"]),
    (dict(load_WLE=np.ones((2, 0, 4))), ["at least one window"]),
    (dict(load_WLE=np.ones((2, 3, 0))), ["at least one window"]),
    (dict(load_WLE=-load_3d), ["load contains negative counts (e.g. -1 at index (0, 0, 0))"]),
    (dict(load_WLE=load_3d * 0.5), ["load contains non-integer counts (e.g. 0.5)"]),
    (dict(load_WLE=np.full((2, 3, 4), np.nan)), ["load contains NaN"]),
    (dict(load_WLE=np.full((2, 3, 4), np.inf)), ["load contains inf"]),
    (dict(load_WLE=np.array([[["a"]]])), ["dtype <U1", "integers"]),
    (dict(load_WLE=load_3d, affinity_WLEE=np.zeros((2, 3, 4, 4))),
     ["affinity has shape (2, 3, 4, 4) but load (2, 3, 4) needs [windows, layers-1, experts, experts] = (2, 2, 4, 4)"]),
    (dict(load_WLE=load_3d, affinity_WLEE=np.zeros((2, 2, 4))), ["affinity has 3 dimensions"]),
    (dict(load_WLE=load_3d, affinity_WLEE=np.full((2, 2, 4, 4), -1)), ["affinity contains negative counts"]),
    (dict(load_WLE=load_3d, source_WLRE=np.ones((2, 3, 2, 5))),
     ["source has shape (2, 3, 2, 5) but load (2, 3, 4) needs [windows, layers, ranks, experts] = (2, 3, ranks, 4)"]),
    (dict(load_WLE=load_3d, source_WLRE=np.zeros((2, 3, 0, 4))), ["with ranks >= 1"]),
    (dict(load_WLE=load_3d, source_WLRE=np.ones((2, 3, 2, 4))), ["source summed over ranks differs from load"]),
    (dict(load_WLE=load_3d, meta=dict(top_k=5)), ["meta top_k is 5", "[1, experts=4]"]),
    (dict(load_WLE=load_3d, meta=dict(top_k=True)), ["meta top_k is True"]),
    (dict(load_WLE=load_3d, meta=dict(layer_names=["a"])), ["layer_names has 1 names but load has 3 layers"]),
    (dict(load_WLE=load_3d, meta=dict(layer_names=[1, 2, 3])), ["list of strings"]),
    (dict(load_WLE=load_3d, meta=dict(x=object())), ["JSON-serialisable"]),
    (dict(load_WLE=load_3d, meta=[1]), ["meta must be a dict"]),
])
def test_validation_errors(kwargs, needles):
    with pytest.raises(TraceError) as info:
        RoutingTrace(**kwargs)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_affinity_exceeding_the_tokens_is_rejected():
    t = small_trace(K=2)  # 5 tokens, k=2: at most 2*10 = 20 pairs per layer pair
    too_many = t.affinity_WLEE.copy()
    too_many[1, 0, 0, 0] += 100
    with pytest.raises(TraceError, match=r"affinity counts 120 pairs between layers 0 and 1 in window 1, more than "
                                         r"the 20 that top_k=2 allows"):
        RoutingTrace(t.load_WLE, too_many, None, t.meta)
    # The total fits, but expert 0 at layer 0 gets more pairs than k times its load.
    load = np.array([[[1, 9], [5, 5]]])
    aff = np.array([[[[3, 0], [0, 0]]]])
    with pytest.raises(TraceError, match="affinity pairs with expert 0 at layer 0 in window 0 number 3, more than "
                                         "top_k=2 times its load 1"):
        RoutingTrace(load, aff, None, dict(top_k=2))
    aff = np.array([[[[0, 0], [0, 18]]]])  # b side: expert 1 at layer 1 has load 5, at most 10 pairs
    with pytest.raises(TraceError, match="expert 1 at layer 1 in window 0 number 18"):
        RoutingTrace(load, aff, None, dict(top_k=2))
    # Without top_k the bound is E (= 2 here): the same pairs pass for expert 0 with load 2.
    RoutingTrace(np.array([[[2, 8], [5, 5]]]), np.array([[[[3, 0], [0, 0]]]]))


def test_file_errors(tmp_path):
    with pytest.raises(TraceError, match="trace 'nope.npz' not found: give a .npz file or synthetic:NAME with NAME one of"):
        RoutingTrace.load("nope.npz")
    with pytest.raises(TraceError, match="did you mean synthetic:zipf64"):
        RoutingTrace.load("zipf64")
    with pytest.raises(TraceError) as info:
        RoutingTrace.load("synthetic:zipf65")
    assert "unknown synthetic trace 'zipf65'" in str(info.value)
    assert all(name in str(info.value) for name in PRESETS)

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(TraceError, match="cannot read trace .*garbage.npz.* as a .npz file"):
        RoutingTrace.load(str(garbage))

    no_load = tmp_path / "no_load.npz"
    np.savez(no_load, affinity=np.zeros((1, 1, 2, 2)))
    with pytest.raises(TraceError, match=r"has no 'load' array \(it has \['affinity'\]\)"):
        RoutingTrace.load(str(no_load))

    bad_meta = tmp_path / "bad_meta.npz"
    np.savez(bad_meta, load=load_3d, meta=np.array("{not json"))
    with pytest.raises(TraceError, match="meta is not valid JSON"):
        RoutingTrace.load(str(bad_meta))
    np.savez(bad_meta, load=load_3d, meta=np.array("[1, 2]"))
    with pytest.raises(TraceError, match="meta must hold a JSON object"):
        RoutingTrace.load(str(bad_meta))
    np.savez(bad_meta, load=load_3d, meta=np.zeros(2))
    with pytest.raises(TraceError, match="meta must be a 0-d string array holding JSON"):
        RoutingTrace.load(str(bad_meta))

    mismatch = tmp_path / "mismatch.npz"
    np.savez(mismatch, load=load_3d, affinity=np.zeros((2, 3, 4, 4)))
    with pytest.raises(TraceError, match=r"trace .*mismatch.npz.*: affinity has shape \(2, 3, 4, 4\)"):
        RoutingTrace.load(str(mismatch))
