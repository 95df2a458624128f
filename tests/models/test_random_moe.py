"""The random MoE layers themselves (``moec.models.random_moe``), the fuzzer's ground truth.

No moec code runs here, so these hold while the compiler is broken:
* ``draw`` reaches every value of every axis, and only sensible combinations;
* a seeded sample of drawn layers builds and runs eagerly (fp32, ``[T, H]`` or ``[B, S, H]`` as
  drawn), deterministically, with finite outputs, leaving the global RNG alone;
* every spelling and layout of one layer (``variants``) computes the same function: each spelling
  is evidence for the others;
* a few layers match an independent per-token float64 computation from ``canonical_weights``
  (routing decided token by token, capacity slots handed out one assignment at a time, Expert
  Choice by sorting each expert's column).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import random

import pytest
import torch

from moec.models import random_moe as rm
from moec.models.random_moe import LayerSpec, Names, build, canonical_weights, describe, draw, variants

NUM_DRAWS = 3000
SAMPLE = 40


@pytest.fixture(scope="module")
def drawn() -> list[LayerSpec]:
    return [draw(random.Random(f"coverage:{i}")) for i in range(NUM_DRAWS)]


# --- the space ----------------------------------------------------------------------------------


def test_draw_reaches_every_axis_value(drawn):
    for axis, values in rm.AXES.items():
        seen = {getattr(s, axis) for s in drawn}
        missing = set(values) - seen
        assert not missing, f"{axis}: never drawn {sorted(map(str, missing))}"
        assert seen <= set(values), f"{axis}: drew values outside the space {seen - set(values)}"


def test_draw_reaches_every_size(drawn):
    assert {s.num_experts for s in drawn} >= set(range(2, 17)) | set(rm.LARGE_EXPERT_COUNTS)
    assert max(s.num_experts for s in drawn) == 64
    assert {s.top_k for s in drawn} == set(range(1, 9))
    assert any(s.top_k == s.num_experts for s in drawn if s.router in rm.TOKEN_ROUTERS)
    assert {s.hidden for s in drawn} == set(rm.HIDDENS)
    assert {s.intermediate for s in drawn} == set(rm.INTERMEDIATES)
    grouped = [s for s in drawn if s.router == "grouped_topk"]
    assert {s.num_groups for s in grouped} == {2, 3, 4, 8}
    assert {s.topk_groups for s in grouped} >= {1, 2, 3}
    assert {s.top_k for s in drawn if s.router == "capacity"} == {1, 2}
    assert {(s.top_k, s.priority) for s in drawn if s.router == "capacity"} >= {(2, "token"), (2, "choice")}
    assert 0.05 < sum(s.dtype == "bfloat16" for s in drawn) / len(drawn) < 0.3


def test_draw_varies_names(drawn):
    pools = {"layer_class": rm.LAYER_CLASSES, "experts": rm.EXPERTS_ATTRS, "router": rm.ROUTER_ATTRS,
             "num_experts": rm.NUM_EXPERTS_ATTRS, "top_k": rm.TOP_K_ATTRS, "expert_key": rm.EXPERT_KEYS}
    for field, pool in pools.items():
        assert {getattr(s.names, field) for s in drawn} == set(pool), field
    assert {s.names.matrices for s in drawn} == set(rm.GATED_MATRICES) | set(rm.UNGATED_MATRICES)


def _sensible(s: LayerSpec) -> list[str]:
    """What draw() must never combine."""
    bad = []
    E, k = s.num_experts, s.top_k
    if not 1 <= k <= min(E, 8):
        bad.append("k out of range")
    if s.spelling not in rm.spellings_for(s.router, s.layout):
        bad.append(f"spelling {s.spelling} with {s.router}/{s.layout}")
    if s.holder not in rm.holders_for(s):
        bad.append(f"holder {s.holder}")
    if s.router == "grouped_topk":
        G, m = s.num_groups, s.topk_groups
        if E % G or not 1 <= m < G or k > m * (E // G):
            bad.append("groups")
        if s.group_score == "top2sum" and E // G < 2:
            bad.append("top-2 of a one-expert group")
        if s.correction_bias != "none" and s.group_fill == "zero":
            bad.append("0 fill beside biased (possibly negative) scores")
    if s.router == "capacity" and k not in (1, 2):
        bad.append("capacity router beyond top-2")
    if s.router in ("capacity", "expert_choice") and s.router_holder != "inline":
        bad.append("router module for a capacity router")
    if s.layout == "flat" and (s.ffn_bias or s.gate_up != "separate" or (s.first, s.second) != ("FH", "IH")):
        bad.append("flat layout is DBRX's: no bias, separate w1/v1, [E*I, H] each")
    if not s.gated and s.gate_up != "separate":
        bad.append("gate/up split of an ungated FFN")
    if s.activation not in (rm.GATED_ACTIVATIONS if s.gated else rm.UNGATED_ACTIVATIONS):
        bad.append("activation of the other FFN form")
    if s.router not in ("softmax_topk", "sigmoid_topk", "grouped_topk") and (
            s.routed_scaling != 1.0 or s.correction_bias != "none"):
        bad.append("scaling or correction bias on a router without them")
    return bad


def test_draw_only_sensible_combinations(drawn):
    problems = collections.Counter(p for s in drawn for p in _sensible(s))
    assert not problems, problems


def test_draw_is_deterministic():
    assert [draw(random.Random(f"d:{i}")) for i in range(50)] == [draw(random.Random(f"d:{i}")) for i in range(50)]


def test_spec_dict_round_trip(drawn):
    for s in drawn[:200]:
        assert rm.spec_from_dict(rm.spec_to_dict(s)) == s


# --- building and running -------------------------------------------------------------------------


def _fp32_sample() -> list[LayerSpec]:
    return [dataclasses.replace(draw(random.Random(f"sample:{i}")), dtype="float32") for i in range(SAMPLE)]


@pytest.mark.parametrize("spec", _fp32_sample(), ids=lambda s: f"{s.router}-{s.layout}-{s.spelling}")
def test_sample_builds_and_runs(spec):
    rng_state = torch.get_rng_state()
    layer, make_input = build(spec, seed=3)
    again, _ = build(spec, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_state), "build touched the global RNG"
    assert type(layer).__name__ == spec.names.layer_class
    assert layer.training

    for tokens in (1, 6, 37):
        x = make_input(tokens, seed=tokens)
        expected_shape = (tokens, spec.hidden) if spec.input_rank == 2 else (x.shape[0], x.shape[1], spec.hidden)
        assert x.shape == expected_shape and x.shape[:-1].numel() == tokens
        out = layer(x)
        assert out.shape == x.shape and out.dtype == torch.float32
        assert torch.isfinite(out).all(), describe(spec)
        assert torch.equal(out, again(x)), "same seed, different layer"
    # the MoE part is O(1), not vanishing (so wrong experts show at fp32 tolerances)
    moe_scale = (out - (x if spec.norm != "none" else 0)).abs().mean().item()
    assert moe_scale > 0.02, (moe_scale, describe(spec))
    assert torch.equal(torch.get_rng_state(), rng_state), "running touched the global RNG"


def test_sample_names_reach_the_module():
    spec = draw(random.Random("names"))
    spec = dataclasses.replace(spec, router="softmax_topk", layout="list", spelling="where_index_add", holder="self",
                               router_holder="inline", router_weight="linear")
    layer, _ = build(spec, seed=0)
    children = dict(layer.named_children())
    assert spec.names.experts in children and spec.names.router in children
    assert getattr(layer, spec.names.num_experts) == spec.num_experts
    assert getattr(layer, spec.names.top_k) == spec.top_k


def test_make_input_identical_tokens():
    spec = LayerSpec(input_rank=3)
    _, make_input = build(spec, seed=0)
    x = make_input(10, identical=True)
    assert x.shape == (2, 5, spec.hidden)
    assert torch.equal(x.reshape(10, -1), x.reshape(10, -1)[:1].expand(10, -1))


# --- every spelling of one layer agrees ------------------------------------------------------------

# One spec per router family (and the FFN forms that change the layouts' code paths).
SPELLING_SPECS = {
    "softmax-renorm-gated-bias": LayerSpec(num_experts=6, top_k=2, renorm="sum", ffn_bias=True, gate_up="interleaved"),
    "topk-softmax-ungated": LayerSpec(num_experts=5, top_k=3, router="topk_softmax", gated=False, activation="relu2"),
    "sigmoid-bias-scaled": LayerSpec(num_experts=8, top_k=2, router="sigmoid_topk", score_fn="sigmoid", renorm="l2",
                                     correction_bias="buffer", routed_scaling=2.5, activation="clamped_swiglu",
                                     clamp_limit=1.0),
    "grouped-sigmoid": LayerSpec(num_experts=16, top_k=4, router="grouped_topk", score_fn="sigmoid", num_groups=4,
                                 topk_groups=2, group_score="top2sum", correction_bias="parameter", renorm="sum"),
    "grouped-softmax-zero-fill": LayerSpec(num_experts=12, top_k=3, router="grouped_topk", score_fn="softmax",
                                           num_groups=3, topk_groups=2, group_fill="zero", activation="gelu_tanh"),
    "top-k-equals-E": LayerSpec(num_experts=4, top_k=4, renorm="none", activation="gelu"),
    "switch-top1-capacity": LayerSpec(num_experts=4, top_k=1, router="capacity", capacity_mode="fixed", capacity=3,
                                      spelling="onehot_einsum", gated=False, activation="relu", ffn_bias=True),
    "gshard-top2-capacity": LayerSpec(num_experts=6, top_k=2, router="capacity", capacity_mode="floor",
                                      capacity_factor=1.0, priority="choice", renorm="sum",
                                      spelling="capacity_loop"),
    "expert-choice": LayerSpec(num_experts=6, top_k=2, router="expert_choice", capacity_factor=1.0,
                               spelling="ec_loop", norm="rmsnorm", shared_expert="sigmoid_gated"),
}


@pytest.mark.parametrize("name", sorted(SPELLING_SPECS))
def test_variants_compute_the_same_function(name):
    spec = SPELLING_SPECS[name]
    vs = variants(spec)
    assert {v.spelling for v in vs} == set(rm.spellings_for(spec.router, "stacked"))
    assert {v.layout for v in vs} == ({"list", "stacked"} if spec.ffn_bias else set(rm.LAYOUTS))
    results = []
    for v in vs:
        layer, make_input = build(v, seed=7)
        x = make_input(23, seed=1).requires_grad_(True)
        out = layer(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((v, out.detach(), x.grad))
    _, out0, grad0 = results[0]
    for v, out, grad in results[1:]:
        msg = f"{v.layout}/{v.spelling}/{v.holder}/{v.container}/{v.expert_linear}/{v.gate_up}/{v.first}{v.second}"
        torch.testing.assert_close(out, out0, rtol=1e-5, atol=1e-5, msg=lambda m: f"{msg}: output {m}")
        torch.testing.assert_close(grad, grad0, rtol=1e-5, atol=1e-5, msg=lambda m: f"{msg}: input grad {m}")


# --- an independent computation ----------------------------------------------------------------


def _act(spec: LayerSpec, name: str, v: torch.Tensor) -> torch.Tensor:
    if name == "silu":
        return v / (1 + torch.exp(-v))
    if name == "relu":
        return torch.clamp(v, min=0)
    if name == "relu2":
        return torch.clamp(v, min=0) ** 2
    if name == "gelu":
        return 0.5 * v * (1 + torch.erf(v / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v**3)))
    raise AssertionError(name)


def _mlp(spec: LayerSpec, x: torch.Tensor, gate, up, down, b_gate, b_up, b_down) -> torch.Tensor:
    """One token through one MLP, float64, matrices [out, in]."""
    u = up @ x + (b_up if b_up is not None else 0)
    if not spec.gated:
        a = _act(spec, spec.activation, u)
    else:
        g = gate @ x + (b_gate if b_gate is not None else 0)
        if spec.activation == "clamped_swiglu":
            g = torch.clamp(g, max=spec.clamp_limit)
            u = torch.clamp(u, -spec.clamp_limit, spec.clamp_limit)
            a = (u + 1) * g / (1 + torch.exp(-spec.clamp_alpha * g))
        else:
            a = _act(spec, spec.activation, g) * u
    return down @ a + (b_down if b_down is not None else 0)


def _expert(spec, w, e, x):
    b = spec.ffn_bias
    return _mlp(spec, x, w["gate"][e], w["up"][e], w["down"][e], w["b_gate"][e] if b else None,
                w["b_up"][e] if b else None, w["b_down"][e] if b else None)


def _token_route(spec: LayerSpec, w, x) -> list[tuple[int, float]]:
    """(expert, weight) pairs of one token, decided by sorting plain lists."""
    E, k = spec.num_experts, spec.top_k
    logits = [float(w["router_w"][e] @ x) + (float(w["router_b"][e]) if spec.router_weight == "linear_bias" else 0)
              for e in range(E)]
    if spec.router == "topk_softmax":
        top = sorted(range(E), key=lambda e: -logits[e])[:k]
        z = sum(math.exp(logits[e]) for e in top)
        return [(e, math.exp(logits[e]) / z) for e in top]
    if spec.score_fn == "sigmoid":
        scores = [1 / (1 + math.exp(-v)) for v in logits]
    else:
        z = sum(math.exp(v) for v in logits)
        scores = [math.exp(v) / z for v in logits]
    bias = [float(b) for b in w["correction_bias"]] if spec.correction_bias != "none" else [0.0] * E
    choice = [s + b for s, b in zip(scores, bias)]
    allowed = list(range(E))
    if spec.router == "grouped_topk":
        size = E // spec.num_groups
        groups = [list(range(g * size, (g + 1) * size)) for g in range(spec.num_groups)]
        if spec.group_score == "max":
            gscore = [max(choice[e] for e in grp) for grp in groups]
        else:
            gscore = [sum(sorted((choice[e] for e in grp), reverse=True)[:2]) for grp in groups]
        kept = sorted(range(spec.num_groups), key=lambda g: -gscore[g])[: spec.topk_groups]
        allowed = [e for g in kept for e in groups[g]]
    top = sorted(allowed, key=lambda e: -choice[e])[:k]
    weights = [scores[e] for e in top]
    if spec.renorm in ("sum", "l1"):
        weights = [v / sum(weights) for v in weights]
    elif spec.renorm == "l2":
        weights = [v / math.sqrt(sum(u * u for u in weights)) for v in weights]
    return [(e, v * spec.routed_scaling) for e, v in zip(top, weights)]


def _reference(spec: LayerSpec, w, x_TH: torch.Tensor) -> torch.Tensor:
    """The layer's output, token by token, in float64."""
    w = {k: v.double() for k, v in w.items()}
    x_TH = x_TH.double()
    T, H = x_TH.shape
    E, k = spec.num_experts, spec.top_k
    if spec.norm == "layernorm":
        mu, var = x_TH.mean(-1, keepdim=True), x_TH.var(-1, unbiased=False, keepdim=True)
        h_TH = (x_TH - mu) / torch.sqrt(var + 1e-5) * w["norm_w"] + w["norm_b"]
    elif spec.norm in ("rmsnorm", "nn_rmsnorm"):
        h_TH = x_TH / torch.sqrt(x_TH.pow(2).mean(-1, keepdim=True) + 1e-6) * w["norm_w"]
    else:
        h_TH = x_TH
    out = torch.zeros(T, H, dtype=torch.float64)

    if spec.router in rm.TOKEN_ROUTERS:
        for t in range(T):
            for e, weight in _token_route(spec, w, h_TH[t]):
                out[t] += weight * _expert(spec, w, e, h_TH[t])
    elif spec.router == "capacity":
        probs = torch.softmax(h_TH @ w["router_w"].t(), dim=-1)
        picks = [sorted(range(E), key=lambda e: -float(probs[t, e]))[:k] for t in range(T)]
        if spec.capacity_mode == "fixed":
            cap = spec.capacity
        elif spec.capacity_mode == "ceil":
            cap = math.ceil(spec.capacity_factor * T * k / E)
        else:
            cap = max(int(spec.capacity_factor * T * k / E), 1)
        order = ([(t, j) for t in range(T) for j in range(k)] if spec.priority == "token"
                 else [(t, j) for j in range(k) for t in range(T)])
        used = [0] * E
        for t, j in order:  # slots handed out one assignment at a time
            e = picks[t][j]
            if used[e] < cap:
                used[e] += 1
                weight = float(probs[t, e])
                if spec.renorm == "sum":
                    weight /= sum(float(probs[t, f]) for f in picks[t])
                out[t] += weight * _expert(spec, w, e, h_TH[t])
    else:  # expert choice
        probs = torch.softmax(h_TH @ w["router_w"].t(), dim=-1)
        cap = min(math.ceil(spec.capacity_factor * T * k / E), T)
        for e in range(E):
            for t in sorted(range(T), key=lambda t: -float(probs[t, e]))[:cap]:
                out[t] += float(probs[t, e]) * _expert(spec, w, e, h_TH[t])

    for t in range(T):
        if spec.shared_expert != "none":
            b = spec.ffn_bias
            s = _mlp(spec, h_TH[t], w["s_gate"], w["s_up"], w["s_down"], w["s_b_gate"] if b else None,
                     w["s_b_up"] if b else None, w["s_b_down"] if b else None)
            if spec.shared_expert == "sigmoid_gated":
                s = s / (1 + torch.exp(-(w["s_gate_w"][0] @ h_TH[t])))
            out[t] += s
        if spec.dense_branch:
            dense = dataclasses.replace(spec, gated=False, activation="gelu")
            out[t] += _mlp(dense, h_TH[t], None, w["d_up"], w["d_down"], None, w["d_b_up"], w["d_b_down"])
    if spec.norm != "none":
        out = out + x_TH
    return out


REFERENCE_SPECS = {
    "mixtral": LayerSpec(num_experts=8, top_k=2, renorm="sum"),
    "qwen-no-renorm-bias-gelu": LayerSpec(num_experts=6, top_k=3, renorm="none", gated=True, activation="gelu",
                                          ffn_bias=True, layout="stacked", spelling="gathered_einsum",
                                          gate_up="up_first", first="HF"),
    "dbrx-l1": LayerSpec(num_experts=4, top_k=2, renorm="l1", layout="flat", first="FH", second="IH",
                         spelling="sort_split", router_weight="param_matmul_t"),
    "gpt-oss": LayerSpec(num_experts=4, top_k=2, router="topk_softmax", router_weight="linear_bias",
                         activation="clamped_swiglu", clamp_limit=1.0, gate_up="interleaved", ffn_bias=True,
                         layout="stacked", first="HF", second="IH", spelling="dense_mask"),
    "deepseek-v3": LayerSpec(num_experts=16, top_k=4, router="grouped_topk", score_fn="sigmoid", num_groups=4,
                             topk_groups=2, group_score="top2sum", correction_bias="buffer", renorm="sum",
                             routed_scaling=2.5, shared_expert="plain", norm="rmsnorm", router_weight="param_flinear"),
    "deepseek-v2-softmax-groups": LayerSpec(num_experts=8, top_k=2, router="grouped_topk", score_fn="softmax",
                                            num_groups=4, topk_groups=1, group_fill="zero", routed_scaling=16.0),
    "sigmoid-l2-ungated": LayerSpec(num_experts=5, top_k=2, router="sigmoid_topk", score_fn="sigmoid", renorm="l2",
                                    gated=False, activation="gelu_tanh", correction_bias="parameter",
                                    spelling="expert_hit", router_holder="module"),
    "qwen2-shared-gated-dense": LayerSpec(num_experts=4, top_k=1, renorm="none", shared_expert="sigmoid_gated",
                                          dense_branch=True, norm="layernorm", gated=False, activation="silu"),
    "switch-drops": LayerSpec(num_experts=4, top_k=1, router="capacity", capacity_mode="fixed", capacity=2,
                              spelling="onehot_einsum", gated=False, activation="relu", ffn_bias=True),
    "gshard-choice-priority": LayerSpec(num_experts=4, top_k=2, router="capacity", capacity_mode="ceil",
                                        capacity_factor=0.5, priority="choice", renorm="sum",
                                        spelling="capacity_loop"),
    "gshard-token-priority": LayerSpec(num_experts=4, top_k=2, router="capacity", capacity_mode="floor",
                                       capacity_factor=1.0, priority="token", spelling="onehot_einsum"),
    "expert-choice": LayerSpec(num_experts=4, top_k=2, router="expert_choice", capacity_factor=0.5,
                               spelling="ec_onehot", gated=False, activation="relu"),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_SPECS))
def test_matches_independent_reference(name):
    spec = REFERENCE_SPECS[name]
    layer, make_input = build(spec, seed=11)
    x = make_input(13, seed=2)
    want = _reference(spec, canonical_weights(spec, 11), x)
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)


def test_capacity_really_drops():
    spec = REFERENCE_SPECS["switch-drops"]
    layer, make_input = build(spec, seed=11)
    out = layer(make_input(16, seed=2))
    dropped = (out.abs().sum(-1) == 0).sum().item()
    assert 16 - 4 * spec.capacity <= dropped < 16  # 4 experts x 2 slots


def test_correction_bias_changes_the_choice():
    spec = REFERENCE_SPECS["deepseek-v3"]
    w = canonical_weights(spec, 11)
    assert (w["correction_bias"] != 0).all()
    layer, make_input = build(spec, seed=11)
    unbiased, _ = build(dataclasses.replace(spec, correction_bias="none"), seed=11)
    x = make_input(32, seed=2)
    assert not torch.allclose(layer(x), unbiased(x))


def test_routing_spreads_over_experts():
    spec = LayerSpec(num_experts=16, top_k=2, hidden=64)
    w = canonical_weights(spec, 0)
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(0))
    load = torch.bincount((x @ w["router_w"].t()).topk(2, dim=-1).indices.flatten(), minlength=16)
    assert (load > 0).all() and load.max() < 4 * load.float().mean()


def test_build_rejects_colliding_names():
    spec = LayerSpec(names=Names(router="experts"))
    with pytest.raises(ValueError, match="collide"):
        build(spec, seed=0)
