"""The expert-parallel cost model (``moec.runtime.cost_model``), its calibration fits and storage
(``moec.runtime.calibrate``) and the simulator (``moec.runtime.simulate``).

No timing is asserted: the model is checked on its own algebra (r=1 is the sequential layer, more
bytes never cost less, the chosen schedule never predicts worse than sequential), on the choices
its documented regime implies (hierarchical all-to-all with many nodes and small messages, never
within one node), on the fits recovering known alpha/beta from synthetic timings, and, once, on a
real 2-rank gloo calibration producing a usable result.

Legend: T tokens per rank, H hidden, I expert hidden, E experts, K top-k, W ranks, P ranks per node.
"""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import sympy as sp

from moec.runtime.calibrate import calibrate_spawned, fit_alpha_beta, fit_line
from moec.runtime.cost_model import (
    SYMBOLS,
    TERMS,
    Calibration,
    LayerShape,
    calibration_path,
    choose_schedule,
    layer_time,
    predict,
    structural,
    term_definitions,
)
from moec.runtime.simulate import NODE_SIZES, WORLD_SIZES, format_table, simulate

TOY = LayerShape(tokens=128, hidden=64, expert_hidden=128, num_experts=8, top_k=2, name="toy")
MIXTRAL = LayerShape(tokens=4096, hidden=4096, expert_hidden=14336, num_experts=8, top_k=2, dtype_bytes=2,
                     name="mixtral")
DEEPSEEK = LayerShape(tokens=4096, hidden=7168, expert_hidden=2048, num_experts=256, top_k=8, dtype_bytes=2,
                      shared_hidden=2048, name="deepseek")
SHAPES = [TOY, MIXTRAL, DEEPSEEK, dataclasses.replace(TOY, gated=False, shared_hidden=64, name="toy-shared")]


def cpu_like() -> Calibration:
    """Numbers of the order a gloo calibration on a small CPU machine gives."""
    return Calibration(device="test cpu", flops_per_s=40e9, op_overhead_s=4e-6, mem_bytes_per_s=15e9,
                       alpha_s={"intra": 150e-6, "inter": 150e-6},
                       beta_s_per_byte={"intra": 1 / 2e9, "inter": 1 / 2e9}, wake_s=500e-6, overlap=0.5,
                       measured=["flops_per_s", "op_overhead_s", "mem_bytes_per_s", "intra", "wake_s", "overlap"],
                       world_size=2,
                       threads=1)


CALIBS = [Calibration.default(), cpu_like()]


# ----------------------------------------------------------------------------------------------
# Expressions
# ----------------------------------------------------------------------------------------------


def test_one_chunk_is_the_sequential_layer():
    seq = layer_time(sequential=True)
    assert sp.simplify(layer_time().subs(SYMBOLS["r"], 1) - seq) == 0
    assert SYMBOLS["r"] not in seq.free_symbols


def test_overlapping_the_shared_expert_hides_eta_of_the_shorter_of_it_and_the_dispatch():
    r, d, s, eta = SYMBOLS["r"], TERMS["d_1"], TERMS["s"], SYMBOLS["eta"]
    gain = structural(overlap_shared=False) - structural(overlap_shared=True)
    assert sp.simplify((gain - eta * sp.Min(d, s)).rewrite(sp.Piecewise)) == 0
    assert sp.simplify(structural(False).subs(r, 1) - structural(False, sequential=True)) == 0


@pytest.mark.parametrize("calib", CALIBS, ids=["default", "cpu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("world", [2, 8, 64])
def test_predicted_time_at_one_chunk_equals_sequential(calib, shape, world):
    p = predict(shape, world, 8, calib, chunks=1)
    assert p["time"] == pytest.approx(p["sequential"], rel=1e-12)
    assert p["exposed_comm"] == pytest.approx(p["t_cnt"] + p["d_1"] + p["m_1"], rel=1e-9)


@pytest.mark.parametrize("hierarchical", [False, True])
def test_communication_terms_grow_with_bytes(hierarchical):
    defs = term_definitions(hierarchical)
    point = {SYMBOLS[n]: v for n, v in dict(T=512, H=256, I=512, E=64, K=4, g=2, b=2, S=0, W=64, P=8, r=2, sigma=1.2,
                                             Phi=1e14, o=5e-6, B=2e12, alpha_intra=3e-6, beta_intra=5e-12,
                                             alpha_inter=5e-6, beta_inter=2e-11).items()}
    for term in ("d_1", "m_1", "t_cnt"):
        for var in ("b", "H", "T", "beta_intra", "beta_inter", "alpha_inter"):
            derivative = sp.diff(defs[TERMS[term]], SYMBOLS[var]).subs(point)
            assert float(derivative) >= 0, (term, var)
    for var in ("b", "H", "T", "K"):
        assert float(sp.diff(defs[TERMS["d_1"]], SYMBOLS[var]).subs(point)) > 0, var


@pytest.mark.parametrize("calib", CALIBS, ids=["default", "cpu"])
def test_more_bytes_never_predict_less(calib):
    for world in (2, 16, 256):
        times = [predict(dataclasses.replace(TOY, hidden=h), world, 8, calib, chunks=2)["time"]
                 for h in (32, 64, 128, 256, 512)]
        assert times == sorted(times)
        dtype = [predict(dataclasses.replace(TOY, dtype_bytes=b), world, 8, calib)["time"] for b in (1, 2, 4)]
        assert dtype == sorted(dtype)


@pytest.mark.parametrize("calib", CALIBS, ids=["default", "cpu"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("nodes", NODE_SIZES)
def test_chosen_schedule_never_worse_than_sequential(calib, shape, nodes):
    for world in (1, 2, 4, 8, 16, 128, 2048):
        s = choose_schedule(shape, world, nodes, calib)
        assert s.predicted["moec"] <= s.predicted["sequential"] * (1 + 1e-12)
        best = min(c[3] for c in s.candidates)
        assert s.predicted["moec"] <= best * 1.01 + 1e-15
        assert 1 <= s.chunks <= 8
        assert s.predicted["exposed_comm"] >= 0
        if world <= nodes:
            assert not s.hierarchical


def test_single_rank_has_no_communication():
    s = choose_schedule(DEEPSEEK, 1, 8, Calibration.default())
    assert (s.chunks, s.hierarchical, s.overlap_shared) == (1, False, False)
    assert s.predicted["exposed_comm"] == 0 and s.predicted["moec"] == s.predicted["sequential"]
    assert s.terms["d_1"] == s.terms["m_1"] == s.terms["t_cnt"] == 0
    assert "one rank" in s.explain()


def test_hierarchical_chosen_at_scale_with_small_messages_not_at_two_ranks():
    calib = Calibration.default()
    assert choose_schedule(TOY, 1024, 8, calib).hierarchical
    assert choose_schedule(TOY, 256, 4, calib).hierarchical
    assert not choose_schedule(TOY, 2, 8, calib).hierarchical
    assert not choose_schedule(MIXTRAL, 2, 8, calib).hierarchical
    # Big messages over two nodes: the extra intra-node bytes cost more than 8 latencies saved.
    assert not choose_schedule(MIXTRAL, 16, 8, calib).hierarchical


def test_chunking_chosen_when_compute_and_comm_are_comparable():
    s = choose_schedule(DEEPSEEK, 64, 8, Calibration.default())
    assert s.chunks > 1 and s.overlap_shared
    assert s.predicted["exposed_comm"] < s.predicted["exposed_comm_sequential"]


def test_nothing_overlaps_without_overlap_efficiency():
    """eta = 0 (ranks whose exchanges take the cores the experts need): chunks and overlap only add
    latency, so the sequential schedule is chosen; eta = 1 hides all of the shorter stream."""
    blind = dataclasses.replace(Calibration.default(), overlap=0.0)
    s = choose_schedule(DEEPSEEK, 64, 8, blind)
    assert (s.chunks, s.overlap_shared) == (1, False)
    assert "eta=0.00" in s.explain()
    full = predict(DEEPSEEK, 64, 8, Calibration.default(), chunks=4)
    none = predict(DEEPSEEK, 64, 8, blind, chunks=4)
    hidden = 3 * min(full["c_1"], full["d_1"] + full["m_1"])
    assert none["time"] - full["time"] == pytest.approx(hidden, rel=1e-9)
    with pytest.raises(ValueError, match="overlap"):
        dataclasses.replace(Calibration.default(), overlap=1.5)


def test_explanation_names_the_symbols_and_the_choice():
    s = choose_schedule(DEEPSEEK, 64, 8, Calibration.default())
    text = s.explain()
    for needle in ("t(r) =", "Max(c_1, d_1 + m_1)", "alpha_inter", "beta_intra", "Phi", "T*", "sigma",
                   f"r={s.chunks}", "why:", "sequential", "exposed comm"):
        assert needle in text, needle
    d = s.to_dict()
    json.dumps(d)
    assert d["chunks"] == s.chunks and d["predicted_s"]["moec"] == s.predicted["moec"]


def test_skew_slows_the_layer():
    calib = Calibration.default()
    assert predict(TOY, 16, 8, calib, skew=1.5)["time"] > predict(TOY, 16, 8, calib)["time"]
    with pytest.raises(ValueError, match="skew"):
        predict(TOY, 16, 8, calib, skew=0.5)


def test_bad_worlds_raise():
    calib = Calibration.default()
    with pytest.raises(ValueError, match="world size must be at least 1"):
        choose_schedule(TOY, 0, 8, calib)
    with pytest.raises(ValueError, match="12 ranks do not fill nodes of 8"):
        choose_schedule(TOY, 12, 8, calib)
    with pytest.raises(ValueError, match="more than one node"):
        predict(TOY, 8, 8, calib, hierarchical=True)


# ----------------------------------------------------------------------------------------------
# Layer shapes
# ----------------------------------------------------------------------------------------------


def test_shape_from_kernel_spec_and_report_layer():
    from moec.codegen.spec import KernelSpec
    from moec.report import MoELayer

    spec = KernelSpec.from_layer(num_experts=16, top_k=4, activation="gelu", dtype="bfloat16", target="interpret")
    s = LayerShape.from_kernel_spec(spec, tokens=10, hidden=32, expert_hidden=48)
    assert (s.num_experts, s.top_k, s.gated, s.dtype_bytes, s.hidden, s.expert_hidden) == (16, 4, False, 2, 32, 48)
    layer = MoELayer(name="l", num_experts=8, top_k=2, hidden_size=64, expert_hidden_size=128, router="softmax_topk",
                     num_shared_experts=2, activation="swiglu")
    s = LayerShape.from_moe_layer(layer, tokens=5)
    assert (s.gated, s.shared_hidden, s.name) == (True, 256, "l")


def test_shapes_from_builtin_model():
    from moec.models.builtin import BUILTIN_MODELS, HIDDEN, INTERMEDIATE

    model, _ = BUILTIN_MODELS["shared-expert"]()
    shapes = LayerShape.from_model(model, tokens=64)
    assert [s.name for s in shapes] == ["layers.0.moe", "layers.1.moe"]
    s = shapes[0]
    assert (s.tokens, s.hidden, s.expert_hidden, s.num_experts, s.top_k, s.gated, s.dtype_bytes) == \
        (64, HIDDEN, INTERMEDIATE, 8, 2, True, 4)
    assert s.shared_hidden > 0


# ----------------------------------------------------------------------------------------------
# Calibration: storage and fits
# ----------------------------------------------------------------------------------------------


def test_calibration_save_load_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEC_CACHE_DIR", str(tmp_path))
    calib = dataclasses.replace(cpu_like(), samples={"a2a": {"bytes_per_rank": [1, 2], "seconds": [0.1, 0.2]}})
    path = calib.save()
    assert path == calibration_path() and path.parent == tmp_path / "calibration"
    assert Calibration.load(path) == calib
    got, source = Calibration.for_this_machine()
    assert got == calib and str(path) in source
    other = calib.save(tmp_path / "x.json")
    assert Calibration.load(other) == calib
    assert json.loads(other.read_text())["assumed"] == ["inter"]


def test_without_stored_calibration_the_defaults_are_assumed(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEC_CACHE_DIR", str(tmp_path))
    calib, source = Calibration.for_this_machine()
    assert calib == Calibration.default() and "assumed defaults" in source
    assert set(calib.assumed) == {"flops_per_s", "op_overhead_s", "mem_bytes_per_s", "intra", "inter", "wake_s", "overlap"}


def test_bad_calibration_files(tmp_path):
    with pytest.raises(ValueError, match="no calibration file"):
        Calibration.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read calibration"):
        Calibration.load(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text(json.dumps({"version": 0}))
    with pytest.raises(ValueError, match="recalibrate"):
        Calibration.load(tmp_path / "old.json")


def test_assumed_inter_link_is_never_faster_than_measured_intra():
    slow = cpu_like().with_assumed_inter()
    assert slow.alpha_s["inter"] == slow.alpha_s["intra"]
    assert slow.beta_s_per_byte["inter"] == slow.beta_s_per_byte["intra"]
    fast = dataclasses.replace(cpu_like(), alpha_s={"intra": 1e-7, "inter": 0},
                               beta_s_per_byte={"intra": 1e-13, "inter": 0})
    fast = fast.with_assumed_inter()
    default = Calibration.default()
    assert fast.alpha_s["inter"] == default.alpha_s["inter"] and "inter" in fast.assumed


def test_fit_line_is_least_squares():
    assert fit_line([0, 1, 2, 3], [1, 3, 5, 7]) == pytest.approx((1, 2))
    a, b = fit_line([0, 1, 2], [0, 1, 5], weights=[1, 1, 1e-12])
    assert (a, b) == pytest.approx((0, 1), abs=1e-6)
    with pytest.raises(ValueError):
        fit_line([1, 1], [2, 3])


@pytest.mark.parametrize("world", [2, 4, 8])
def test_fit_recovers_alpha_beta_from_synthetic_timings(world):
    alpha, beta = 120e-6, 1 / 3e9
    sizes = [256, 4096, 32768, 131072, 524288, 2097152]
    exact = [(world - 1) * alpha + n * (world - 1) / world * beta for n in sizes]
    assert fit_alpha_beta(sizes, exact, world) == pytest.approx((alpha, beta), rel=1e-9)
    rng = random.Random(world)
    noisy = [t * (1 + rng.uniform(-0.03, 0.03)) for t in exact]
    a, b = fit_alpha_beta(sizes, noisy, world)
    assert a == pytest.approx(alpha, rel=0.1) and b == pytest.approx(beta, rel=0.1)


def test_fit_clamps_to_positive():
    # latency-only timings: beta would be ~0 or negative
    a, b = fit_alpha_beta([100, 1000, 10000], [1e-4, 0.99e-4, 1.01e-4], 2)
    assert a == pytest.approx(1e-4, rel=0.05) and b > 0
    # bandwidth-only timings: alpha would be negative
    a, b = fit_alpha_beta([1000, 2000, 4000], [0.9e-6, 2e-6, 4.1e-6], 2)
    assert a >= 0 and b > 0


def test_calibration_on_two_gloo_ranks():
    small = LayerShape(tokens=64, hidden=64, expert_hidden=64, num_experts=2, top_k=1)
    calib = calibrate_spawned(2, shape=small, threads=1, sizes_bytes=(256, 65536, 1048576))
    assert calib.world_size == 2 and calib.backend == "gloo" and calib.threads == 1
    assert set(calib.measured) == {"flops_per_s", "op_overhead_s", "mem_bytes_per_s", "intra", "wake_s", "overlap"}
    assert calib.assumed == ["inter"]
    assert calib.flops_per_s > 0 and calib.alpha_s["intra"] >= 0 and calib.beta_s_per_byte["intra"] > 0
    assert calib.wake_s >= 0 and 0 <= calib.overlap <= 1
    assert len(calib.samples["a2a"]["seconds"]) == len(calib.samples["a2a"]["bytes_per_rank"])
    choose_schedule(small, 2, 8, calib)  # usable as it is


# ----------------------------------------------------------------------------------------------
# Simulator
# ----------------------------------------------------------------------------------------------


def test_simulator_rows_cover_8_to_2048_ranks_and_sum_layers():
    shapes = [TOY, dataclasses.replace(TOY, name="toy2"), DEEPSEEK]
    rows = simulate(shapes, Calibration.default())
    assert WORLD_SIZES == (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
    for nodes in NODE_SIZES:
        for world in WORLD_SIZES:
            mine = [r for r in rows if r["world_size"] == world and r["ranks_per_node"] == nodes]
            assert [r["layer"] for r in mine] == ["toy (x2)", "deepseek", "model"]
            layers, model = mine[:-1], mine[-1]
            assert model["sequential_s"] == pytest.approx(sum(r["count"] * r["sequential_s"] for r in layers))
            assert model["moec_s"] == pytest.approx(sum(r["count"] * r["moec_s"] for r in layers))
            for r in mine:
                assert r["moec_s"] <= r["sequential_s"] * (1 + 1e-12)
                assert set(r["tutel_s"]) == {2, 4}
    table = format_table(rows)
    assert table.splitlines()[0].split()[:3] == ["ranks", "node", "layer"]
    assert len(table.splitlines()) == 1 + len(rows)
