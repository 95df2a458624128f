"""Capture's gradient check (``recognise._grad_mismatch``) in both of its modes: all gradients at
once, and, past ``_STREAM_GRAD_BYTES`` of parameters (a full-size DeepSeek-V3 layer on one GPU),
one parameter's gradient at a time with a float32 exact twin for a half-precision layer. Both
modes must give the same verdicts: equal forwards pass, a forward off by a factor of 1 + 1e-2
fails naming the gradient, and a whole layer captured with the streamed check still matches
eager (fp32, assert_close defaults, forward and every gradient)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moec.capture import convert_model, recognise
from moec.capture.probes import Call

H, I, E, K = 16, 12, 4, 2


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(H, E, bias=False)
        self.w1 = nn.Parameter(torch.randn(E, I, H) / H**0.5)
        self.w2 = nn.Parameter(torch.randn(E, H, I) / I**0.5)

    def forward(self, x):
        w, idx = self.router(x).softmax(-1).topk(K, -1)
        out = torch.zeros_like(x)
        for e in range(E):
            tok, slot = torch.where(idx == e)
            out = out.index_add(0, tok, F.linear(F.gelu(F.linear(x[tok], self.w1[e])), self.w2[e]) * w[tok, slot, None])
        return out


@pytest.fixture(params=["all", "streamed"])
def mode(request, monkeypatch):
    if request.param == "streamed":
        monkeypatch.setattr(recognise, "_STREAM_GRAD_BYTES", 0)
    return request.param


def _call(dtype=torch.float32) -> Call:
    return Call((torch.randn(10, H, generator=torch.Generator().manual_seed(1)).to(dtype),), {}, 0)


def test_equal_forwards_pass(mode):
    torch.manual_seed(0)
    layer = Layer()
    assert recognise._grad_mismatch(layer, lambda x: layer(x), _call(), 1e-4) is None


def test_a_scaled_forward_fails(mode):
    torch.manual_seed(0)
    layer = Layer()
    why = recognise._grad_mismatch(layer, lambda x: layer(x) * (1 + 1e-2), _call(), 1e-4)
    assert why is not None and "gradient of the input is off by" in why, why


def test_half_precision_twin_is_float32_when_streamed(mode, monkeypatch):
    """A bf16 layer whose gradients differ past tolerance is judged against an exact twin:
    float64 normally, float32 when streamed (half the memory of a float64 copy of bf16 experts)."""
    torch.manual_seed(0)
    layer = Layer().to(torch.bfloat16)
    made = []
    real = recognise.copy_as

    def spy(module, dtype, device=None):
        made.append(dtype)
        return real(module, dtype, device)

    monkeypatch.setattr(recognise, "copy_as", spy)
    other = copy.deepcopy(layer)
    with torch.no_grad():
        other.w2.mul_(1.5)  # the same routing, other expert outputs: gradients differ a lot
    why = recognise._grad_mismatch(layer, lambda x: layer(x) * 0 + other(x), _call(torch.bfloat16), 2e-2)
    assert why is not None
    assert made == [torch.float32 if mode == "streamed" else torch.float64]


def test_captured_layer_matches_eager(mode, checks):
    torch.manual_seed(0)
    model = Layer()
    checks.compiled_matches_eager(model, (torch.randn(8, H),), train=True)
    assert [(l.num_experts, l.top_k) for l in convert_model(model).layers] == [(E, K)]
