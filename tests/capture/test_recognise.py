"""The observed recogniser: what it refuses and why, how close it came, identical layers sharing
one recognition, and calls it did not verify running the layer's own code."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moec
from moec.capture import convert_model, recognise as recognise_mod

H, I, E, K = 16, 8, 4, 2


class Layer(nn.Module):
    """softmax -> top-k -> renormalise, stacked SwiGLU experts; ``variant`` breaks one step."""

    def __init__(self, variant: str = "plain", seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.variant = variant
        self.gate = nn.Linear(H, E, bias=False)
        self.w_in = nn.Parameter(torch.randn(E, 2 * I, H, generator=g) / H**0.5)
        self.w_out = nn.Parameter(torch.randn(E, H, I, generator=g) / I**0.5)
        with torch.no_grad():
            self.gate.weight.copy_(torch.randn(E, H, generator=g) / H**0.5)
        self.norm = nn.LayerNorm(H)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, H)
        logits = self.gate(x)
        if self.variant == "odd_router":  # a router no canonical form has: squared logits
            logits = logits * logits
        w, idx = logits.softmax(-1).topk(K, dim=-1)
        if self.variant == "unrouted":  # the weights of the top-k, always on experts 0 .. K-1
            idx = torch.arange(K).expand(idx.shape)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(E):
            tok, slot = torch.where(idx == e)
            h = F.linear(x[tok], self.w_in[e])
            a = F.silu(h[:, :I]) * h[:, I:]
            if self.variant == "dropout":
                a = self.drop(a)
            out.index_add_(0, tok, F.linear(a, self.w_out[e]) * w[tok, slot, None])
        if self.variant == "post_norm":  # a norm after the experts' sum
            out = self.norm(out)
        return out.reshape(shape)


def _fallbacks(model, x):
    return [f.reason for f in moec.inspect(model, x).fallbacks]


@pytest.mark.parametrize("variant,step,closeness", [
    ("post_norm", "combine", "of the routed output"),
    ("odd_router", "router", "of tokens' expert sets reproduced"),
])
def test_a_layer_left_alone_says_which_step_failed_and_how_close(variant, step, closeness):
    model = Layer(variant).eval()
    report = moec.inspect(model, torch.randn(2, 8, H))
    assert not report.moe_layers
    (reason,) = [f.reason for f in report.fallbacks if f.location == "<root>"]
    assert "looks like an MoE layer (4 experts, stacked) but was left alone" in reason
    assert f": {step}: " in reason and closeness in reason, reason


def test_a_layer_that_does_not_route_by_its_router_says_so():
    model = Layer("unrouted").eval()
    report = moec.inspect(model, torch.randn(2, 8, H))
    assert not report.moe_layers
    (reason,) = [f.reason for f in report.fallbacks if f.location == "<root>"]
    assert ": router: every token used the same experts [0, 1] though their router scores rank" in reason, reason


def test_the_plain_layer_is_recognised():
    model = Layer().eval()
    report = moec.inspect(model, torch.randn(2, 8, H))
    (layer,) = report.moe_layers
    assert (layer.num_experts, layer.top_k, layer.router, layer.renormalize, layer.activation) == (
        E, K, "softmax_topk", True, "swiglu")
    assert report.graph_breaks == 0 and not report.fallbacks


def test_experts_too_big_to_copy_are_matched_one_at_a_time(monkeypatch):
    """Past ``STREAM_BYTES`` of float64 expert weights the FFN match builds one expert's weights at
    a time (a DeepSeek-V3-wide layer holds gigabytes); it finds the same layer, and the compiled
    layer computes as eager does."""
    from moec.capture import match

    built = []
    one_expert = match._one_expert
    monkeypatch.setattr(match, "STREAM_BYTES", 0)
    monkeypatch.setattr(match, "_one_expert", lambda *a: built.append(a[-1]) or one_expert(*a))
    model = Layer().eval()
    x = torch.randn(2, 8, H)
    report = moec.inspect(model, x)
    (layer,) = report.moe_layers
    assert (layer.num_experts, layer.top_k, layer.router, layer.activation) == (E, K, "softmax_topk", "swiglu")
    assert set(built) == set(range(E))
    ref = Layer().eval()
    torch.testing.assert_close(moec.compile(model)(x), ref(x))


def test_random_in_training_mode_runs_its_own_code_there():
    model = Layer("dropout").eval()
    x = torch.randn(2, 8, H)
    report = moec.inspect(model, x)
    assert [layer.name for layer in report.moe_layers] == [""]
    assert any("training mode runs the model's own code" in f.reason for f in report.fallbacks)
    compiled = torch.compile(model, backend="moec", options={"inner": "aot_eager"})
    torch.testing.assert_close(compiled(x), model(x))  # eval: the canonical forward


class Stack(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.layers = nn.ModuleList(Layer(seed=i) for i in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_identical_layers_share_one_recognition(monkeypatch):
    calls = []
    real = recognise_mod.recognise

    def counting(cand, probes):
        calls.append(cand.name)
        return real(cand, probes)

    monkeypatch.setattr("moec.capture.convert.recognise", counting)
    model = Stack(6).eval()
    x = torch.randn(2, 8, H)
    result = convert_model(model, ((x,), {}))
    assert [layer.name for layer in result.layers] == [f"layers.{i}" for i in range(6)]
    assert calls == ["layers.0"]  # the other five were bound to its plan and re-verified
    # Grouped ops, whose sums match the layer's per-expert loop: six unnormalised layers in a row
    # turn lower_small's reordered sums into near-tie routing flips (its own tests cover it).
    compiled = torch.compile(model, backend="moec", options={"inner": "aot_eager", "disable": ["lower_small"]})
    torch.testing.assert_close(compiled(x), model(x))


def test_a_call_unlike_the_verified_ones_runs_the_layer_own_code():
    from torch._dynamo.utils import counters

    model = Layer().eval()
    convert_model(model, ((torch.randn(2, 8, H),), {}))  # verified for [B, S, H] float32 input
    x = torch.randn(5, H, dtype=torch.float64)  # another rank and dtype: not verified
    model.double()
    compiled = torch.compile(model, backend="moec", options={"inner": "aot_eager"})
    torch.testing.assert_close(compiled(x), model(x))
    assert counters["graph_break"]  # the layer's own loop ran, with its breaks: no silent rewrite


class TopOneL2(Layer):
    """Top-1 with the chosen weight divided by its L2 norm: every weight is exactly 1, so the
    router's gradient is mathematically zero and eager's is rounding noise."""

    def forward(self, x):
        p = self.gate(x).softmax(-1)
        w, idx = p.topk(1, dim=-1)
        w = w / w.norm(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(E):
            tok, slot = torch.where(idx == e)
            h = F.linear(x[tok], self.w_in[e])
            out.index_add_(0, tok, F.linear(F.silu(h[:, :I]) * h[:, I:], self.w_out[e]) * w[tok, slot, None])
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_gradient_that_is_rounding_noise_is_judged_against_float64(dtype):
    """Verification compares gradients; one that is zero in exact arithmetic is judged by a
    float64 twin (moec no less accurate than eager), not by a tolerance relative to noise."""
    layer = TopOneL2().to(dtype)
    report = moec.inspect(layer, torch.randn(24, H).to(dtype))
    assert [(m.num_experts, m.top_k) for m in report.moe_layers] == [(E, 1)], report.fallbacks


class Cached(nn.Module):
    """A block that appends to a cache it is given (a KV cache's shape): replaying a recorded call
    must not see the appends of earlier replays."""

    def __init__(self):
        super().__init__()
        self.moe = Layer()

    def forward(self, x, cache):
        cache.append(x.shape[-2])
        assert len(cache) == 1, "a replay saw an earlier replay's append"
        return x + self.moe(x)


def test_recorded_objects_are_copied_for_each_replay():
    from moec.capture.probes import call_module, record_calls

    block, cache = Cached(), []
    x = torch.randn(2, 5, H)
    calls = record_calls(block, {"": (block, H)}, lambda: block(x, cache))
    assert cache == [5] and calls[""].args[1] == []  # the snapshot is from before the call
    for _ in range(3):
        assert not isinstance(call_module(block, calls[""]), str)
    assert calls[""].args[1] == []
    report = convert_model(block, ((x, []), {}))
    assert [layer.name for layer in report.layers] == ["moe"]


class DeadRelu(nn.Module):
    """Ungated ReLU experts whose input bias turns every unit off for many tokens: such a token's
    chosen expert outputs exactly zero, so zeroing the expert cannot show that it was chosen."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.router = nn.Linear(H, E, bias=False)
        self.w1 = nn.Parameter(torch.randn(E, 4, H, generator=g) / H**0.5)
        self.b1 = nn.Parameter(torch.full((E, 4), -1.0))
        self.w2 = nn.Parameter(torch.randn(E, H, 4, generator=g) / 2)

    def forward(self, x):
        w, idx = self.router(x).softmax(-1).topk(K, dim=-1)
        out = torch.zeros_like(x)
        for e in range(E):
            tok, slot = torch.where(idx == e)
            h = torch.relu(F.linear(x[tok], self.w1[e], self.b1[e]))
            out.index_add_(0, tok, F.linear(h, self.w2[e]) * w[tok, slot, None])
        return out


def test_an_expert_that_outputs_zero_for_a_token_is_still_seen_as_chosen():
    layer = DeadRelu()
    x = torch.randn(64, H)
    with torch.no_grad():
        dead = (torch.relu(torch.einsum("eih,th->tei", layer.w1, x) + layer.b1) == 0).all(-1).any()
    assert dead  # the premise: some token has an expert with every unit off
    report = moec.inspect(layer, x)
    assert [(m.num_experts, m.top_k, m.router) for m in report.moe_layers] == [(E, K, "softmax_topk")], \
        report.fallbacks


class SecondChoicesAlwaysDropped(nn.Module):
    """GShard top-2 with a capacity of one token per expert and every first choice placed before
    any second choice: with more tokens than experts, no token keeps its second expert, so one
    probe looks like top-1; another probe (a single token) shows the second choice."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.gate = nn.Linear(H, E, bias=False)
        self.w_in = nn.Parameter(torch.randn(E, I, H, generator=g) / H**0.5)
        self.w_out = nn.Parameter(torch.randn(E, H, I, generator=g) / I**0.5)

    def forward(self, x):
        T = x.shape[0]
        w, idx = self.gate(x).softmax(-1).topk(2, dim=-1)
        mask = F.one_hot(idx, E)  # [T, 2, E]
        pos = (torch.cumsum(mask.transpose(0, 1).reshape(-1, E), 0).reshape(2, T, E) - 1).transpose(0, 1)
        keep = (mask * (pos < 1)).sum(-1).bool()  # [T, 2]
        out = torch.zeros_like(x)
        for e in range(E):
            tok, slot = torch.where((idx == e) & keep)
            h = F.gelu(F.linear(x[tok], self.w_in[e]))
            out.index_add_(0, tok, F.linear(h, self.w_out[e]) * w[tok, slot, None])
        return out


def test_a_capacity_that_drops_every_second_choice_on_one_probe_is_still_top_2():
    report = moec.inspect(SecondChoicesAlwaysDropped(), torch.randn(40, H))
    (layer,) = report.moe_layers
    assert (layer.num_experts, layer.top_k, layer.capacity) == (E, 2, 1), (layer, report.fallbacks)
    assert "choice_first" in layer.router


@pytest.mark.parametrize("error", [RuntimeError("boom"), torch.OutOfMemoryError("CUDA out of memory. Tried to "
                                                                                 "allocate 28.00 GiB")])
def test_capture_failing_leaves_the_layer_alone_with_the_reason(monkeypatch, error):
    """An exception inside capture (a GPU out of memory on a full-size layer, say) is that layer's
    fallback reason, not the end of compiling the model; the layer runs its own code."""
    from moec.capture import convert as convert_mod

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(convert_mod, "recognise", fail)
    model, ref = Layer().eval(), Layer().eval()
    x = torch.randn(2, 8, H)
    result = convert_model(model, ((x,), {}))
    assert result.layers == []
    (note,) = result.fallbacks
    assert "left alone: capture failed" in note.reason and type(error).__name__ in note.reason
    if isinstance(error, torch.OutOfMemoryError):
        assert "GiB" in note.reason and "float32 copy" in note.reason
    assert convert_model(model, ((x,), {})) is result  # asked again: the same answer, never None
    torch.testing.assert_close(moec.compile(model)(x), ref(x), rtol=0, atol=0)


def test_copies_in_another_dtype_share_nothing_with_the_layer():
    layer = Layer().to(torch.bfloat16)
    for dtype in (torch.float32, torch.bfloat16):
        twin = recognise_mod.copy_as(layer, dtype)
        for (name, p), (_, q) in zip(layer.named_parameters(), twin.named_parameters()):
            assert q.dtype == dtype and isinstance(q, nn.Parameter) and q.data_ptr() != p.data_ptr(), name
            torch.testing.assert_close(q.float(), p.float(), rtol=0, atol=0)
        with torch.no_grad():
            twin.w_in.zero_()
        assert layer.w_in.abs().sum() > 0


def test_run_to_run_noise_is_not_read_as_routing(monkeypatch):
    """A layer whose output wobbles in the last bits between identical calls (CUDA's atomic adds in
    ``index_add_`` do, on a GPU) is still recognised: memberships must move the output past the
    noise floor measured by calling it twice."""
    model, ref = Layer().eval(), Layer().eval()
    forward = Layer.forward
    calls = [0]

    def wobbly(self, x):
        calls[0] += 1
        out = forward(self, x)
        if torch.compiler.is_compiling():
            return out
        return out * (1 + 2e-7 * (calls[0] % 3 - 1))  # a few ulps, different on each call

    monkeypatch.setattr(Layer, "forward", wobbly)
    x = torch.randn(2, 8, H)
    report = moec.inspect(model, x)
    (layer,) = report.moe_layers
    assert (layer.num_experts, layer.top_k, layer.router) == (E, K, "softmax_topk")
    monkeypatch.setattr(Layer, "forward", forward)
    torch.testing.assert_close(moec.compile(model)(x), ref(x))


def test_zeroing_a_half_precision_layers_copy_restores_from_the_layer(monkeypatch):
    """Observing a bf16 layer zeroes its float32 copy's experts and restores them from the bf16
    tensors (exact), not from a clone: one float32 copy of the experts in memory, not two. A copy
    written since it was made is restored from a clone."""
    from moec.capture import observe

    layer = Layer().to(torch.bfloat16)
    twin = recognise_mod.copy_as(layer, torch.float32)
    clones = []
    clone = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **k: clones.append(t.shape) or clone(t, *a, **k))
    for _ in range(2):
        with observe.zeroed([twin.w_in, twin.w_out]):
            assert twin.w_in.abs().sum() == 0
        assert clones == []
        torch.testing.assert_close(twin.w_in, layer.w_in.float(), rtol=0, atol=0)
    with torch.no_grad():
        twin.w_in.mul_(2)
    with observe.zeroed([twin.w_in]):
        pass
    assert clones == [twin.w_in.shape]
    torch.testing.assert_close(twin.w_in, 2 * layer.w_in.float(), rtol=0, atol=0)
