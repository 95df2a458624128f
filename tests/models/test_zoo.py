"""The model zoo itself: every factory builds, runs eagerly, is deterministic, and its
``expected_moe_layers`` oracle describes the model it built. No moec code runs here: these tests
hold even while the compiler is broken, so a capture failure is never a zoo failure in disguise.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moec.models import builtin
from moec.models.builtin import BUILTIN_MODELS, DEFAULT_BUILTIN
from moec.models.hf import (
    EXPERTS_IMPLEMENTATION_CANDIDATES,
    HF_ARCHS,
    expected_moe_details,
    expected_moe_layers,
    make_hf_model,
    primary_output,
    supported_experts_implementations,
)

ARCHS = sorted(HF_ARCHS)
IDIOMS = sorted(BUILTIN_MODELS)


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _zero_moe_outputs(model: torch.nn.Module, names: set[str]) -> list:
    def zero(mod, inp, out):
        # GPT-OSS's block returns (hidden, router_scores); the rest return the hidden states.
        return (out[0] * 0, *out[1:]) if isinstance(out, tuple) else out * 0

    return [mod.register_forward_hook(zero) for name, mod in model.named_modules() if name in names]


# --- Hugging Face archs --------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_builds_and_runs(arch):
    model, args = make_hf_model(arch)
    assert not model.training
    input_ids_BS = args[0]
    assert input_ids_BS.shape == (2, 8) and input_ids_BS.dtype == torch.long
    with torch.no_grad():
        out = primary_output(model(*args))
    width = 64 if arch == "switch_transformers" else 128  # encoder hidden states vs LM logits
    assert out.shape == (2, 8, width)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_deterministic_and_leaves_global_rng_alone(arch):
    rng_before = torch.random.get_rng_state()
    (m1, a1), (m2, a2) = make_hf_model(arch), make_hf_model(arch)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert _same_state(m1, m2)
    assert all(torch.equal(x, y) for x, y in zip(a1, a2))
    # Dropout and router jitter are 0: train mode is as deterministic as eval.
    m1.train()
    out1, out2 = primary_output(m1(*a1)), primary_output(m1(*a1))
    assert torch.equal(out1, out2)


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_expected_moe_layers_match_the_model(arch):
    model, args = make_hf_model(arch)
    details = expected_moe_details(model)
    expected = expected_moe_layers(model)
    assert expected == [(d.name, d.num_experts, d.top_k) for d in details]
    assert expected, "every zoo model has at least one MoE layer"

    # Independently of the config: the MoE blocks are exactly the modules holding an `experts` child.
    modules = dict(model.named_modules())
    with_experts = {name for name, mod in modules.items() if hasattr(mod, "experts") and name}
    assert {d.name for d in details} == with_experts
    for d in details:
        experts = modules[d.name].experts
        num = len(experts) if isinstance(experts, torch.nn.ModuleDict) else experts.num_experts
        assert num == d.num_experts == 8
        assert d.hidden_size == 64 and d.expert_hidden_size == 32
        assert d.top_k == (1 if arch == "switch_transformers" else 2)

    if arch == "deepseek_v3":  # first_k_dense_replace=1: layer 0 dense, layer 1 MoE
        assert [d.name for d in details] == ["model.layers.1.mlp"]
    else:
        assert len(details) == 2


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_moe_layers_matter(arch):
    # fp32 tolerances (atol 1e-5) only catch a wrong MoE layer if the layer moves the output by far
    # more than that; the zoo's scale-preserving init is what guarantees it.
    model, args = make_hf_model(arch)
    with torch.no_grad():
        out = primary_output(model(*args))
        handles = _zero_moe_outputs(model, {d.name for d in expected_moe_details(model)})
        out_without_moe = primary_output(model(*args))
    for handle in handles:
        handle.remove()
    assert (out - out_without_moe).abs().max() > 0.1


def _one_hot_dispatch(out, num_experts: int) -> torch.Tensor:
    """Switch's router output that is the one-hot dispatch [B, S, E] (first in its tuple from
    transformers 5.23, second in 5.17)."""
    return next(t for t in out if t.shape[-1] == num_experts and bool(((t == 0) | (t == 1)).all()))


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_routing_spreads_over_experts(arch):
    # Random routers must really route: several experts in use, so "an expert got no tokens" and
    # "all tokens on one expert" are deliberate test cases, not accidents of the zoo.
    model, args = make_hf_model(arch)
    chosen: list[torch.Tensor] = []

    def record(mod, inp, out):
        if arch == "switch_transformers":
            chosen.append(_one_hot_dispatch(out, mod.num_experts).argmax(-1).flatten())
        else:
            chosen.append(out[2].flatten())  # (logits, weights, indices)

    routers = [m for n, m in model.named_modules() if n.endswith((".gate", ".router")) and "Router" in type(m).__name__]
    assert routers
    handles = [r.register_forward_hook(record) for r in routers]
    with torch.no_grad():
        model(*args)
    for handle in handles:
        handle.remove()
    assert chosen and all(idx.unique().numel() >= 3 for idx in chosen)


def test_supported_experts_implementations():
    for arch in ARCHS:
        supported = supported_experts_implementations(arch)
        assert supported[0] == "eager" and set(supported) <= set(EXPERTS_IMPLEMENTATION_CANDIDATES)
    assert supported_experts_implementations("switch_transformers") == ["eager"]
    for arch in ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "gpt_oss"):
        assert supported_experts_implementations(arch) == ["eager", "grouped_mm", "batched_mm"]


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "switch_transformers"])
def test_hf_experts_implementations_agree(arch):
    model, args = make_hf_model(arch)
    with torch.no_grad():
        ref = primary_output(model(*args))
    for impl in supported_experts_implementations(arch):
        other, _ = make_hf_model(arch, experts_implementation=impl)
        assert other.config._experts_implementation == impl
        assert _same_state(model, other)
        with torch.no_grad():
            torch.testing.assert_close(primary_output(other(*args)), ref)


def test_hf_overrides_apply():
    model, _ = make_hf_model("mixtral", {"num_experts_per_tok": 8, "num_hidden_layers": 3})
    assert expected_moe_layers(model) == [(f"model.layers.{i}.mlp", 8, 8) for i in range(3)]
    model, _ = make_hf_model("deepseek_v3", {"first_k_dense_replace": 0})
    assert [name for name, _, _ in expected_moe_layers(model)] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    model, _ = make_hf_model("qwen2_moe", {"mlp_only_layers": [0]})
    assert [name for name, _, _ in expected_moe_layers(model)] == ["model.layers.1.mlp"]
    model, _ = make_hf_model("switch_transformers", {"expert_capacity": 2})
    assert model.encoder.block[0].layer[1].mlp.router.expert_capacity == 2


def test_hf_errors():
    with pytest.raises(ValueError, match="unknown arch 'llama'.*mixtral"):
        make_hf_model("llama")
    with pytest.raises(ValueError, match="not_a_key.*valid keys"):
        make_hf_model("mixtral", {"not_a_key": 1})
    with pytest.raises(ValueError, match="only experts_implementation='eager'"):
        make_hf_model("switch_transformers", experts_implementation="grouped_mm")
    with pytest.raises(ValueError, match="unknown experts_implementation"):
        make_hf_model("mixtral", experts_implementation="fastest")
    with pytest.raises(TypeError):
        primary_output(object())


# --- builtin idioms --------------------------------------------------------------------------


def test_default_builtin_is_registered():
    assert DEFAULT_BUILTIN == "moe-mlp" and DEFAULT_BUILTIN in BUILTIN_MODELS


@pytest.mark.parametrize("name", IDIOMS)
def test_builtin_builds_runs_and_is_deterministic(name):
    rng_before = torch.random.get_rng_state()
    (m1, (x1,)), (m2, (x2,)) = BUILTIN_MODELS[name](), BUILTIN_MODELS[name]()
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert not m1.training
    assert x1.shape == (2, 8, 64) and x1.dtype == torch.float32 and torch.equal(x1, x2)
    assert _same_state(m1, m2)
    with torch.no_grad():
        out = m1(x1)
    assert out.shape == x1.shape and torch.isfinite(out).all()
    assert expected_moe_layers_ok(m1)


def expected_moe_layers_ok(model: torch.nn.Module) -> bool:
    return builtin.expected_moe_layers(model) == [("layers.0.moe", 8, 2), ("layers.1.moe", 8, 2)]


@pytest.mark.parametrize("name", IDIOMS)
def test_builtin_overrides(name):
    model, (x,) = BUILTIN_MODELS[name](top_k=8)
    assert builtin.expected_moe_layers(model) == [("layers.0.moe", 8, 8), ("layers.1.moe", 8, 8)]
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()
    other, (y,) = BUILTIN_MODELS[name](seed=1)
    assert not torch.equal(x, y)
    with pytest.raises(ValueError, match="top_k"):
        BUILTIN_MODELS[name](top_k=9)


def _dense_reference(moe: torch.nn.Module, x_TH: torch.Tensor) -> torch.Tensor:
    """What each idiom claims to compute, written per token and per expert with no dispatch tricks:
    out[t] = sum over the chosen experts e of weight[t, e] * expert_e(x[t]) (+ shared expert)."""
    E, K = moe.num_experts, moe.top_k
    if isinstance(moe, builtin.StackedBmmMoE):
        logits_TK, idx_TK = moe.gate(x_TH).topk(K, dim=-1)
        weights_TK = logits_TK.softmax(dim=-1)

        def expert(e: int, x_H: torch.Tensor) -> torch.Tensor:
            h_I = F.gelu(x_H @ moe.w_in_EHI[e] + moe.b_in_EI[e])
            return h_I @ moe.w_out_EIH[e] + moe.b_out_EH[e]
    else:
        weights_TK, idx_TK = moe.router(x_TH).softmax(dim=-1).topk(K, dim=-1)
        if isinstance(moe, builtin.LoopMoE):  # and SharedExpertMoE: renormalised top-k
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)

        def expert(e: int, x_H: torch.Tensor) -> torch.Tensor:
            return moe.experts[e](x_H)

    out_TH = torch.zeros_like(x_TH)
    for t in range(x_TH.shape[0]):
        for k in range(K):
            out_TH[t] += weights_TK[t, k] * expert(int(idx_TK[t, k]), x_TH[t])
    if isinstance(moe, builtin.SharedExpertMoE):
        out_TH += moe.shared_expert(x_TH)
    return out_TH


@pytest.mark.parametrize("top_k", [2, 8])
@pytest.mark.parametrize("name", IDIOMS)
def test_builtin_idiom_computes_a_plain_moe(name, top_k):
    model, (x_BSH,) = BUILTIN_MODELS[name](top_k=top_k)
    moe = model.layers[0].moe
    x_TH = model.layers[0].norm(x_BSH).reshape(-1, x_BSH.shape[-1])
    with torch.no_grad():
        got_TH = moe(x_TH.reshape(x_BSH.shape)).reshape(x_TH.shape)
        torch.testing.assert_close(got_TH, _dense_reference(moe, x_TH))


@pytest.mark.parametrize("name", IDIOMS)
def test_builtin_moe_layers_matter(name):
    model, (x,) = BUILTIN_MODELS[name]()
    with torch.no_grad():
        out = model(x)
        handles = _zero_moe_outputs(model, {n for n, _, _ in builtin.expected_moe_layers(model)})
        out_without_moe = model(x)
    for handle in handles:
        handle.remove()
    assert (out - out_without_moe).abs().max() > 0.1
