"""Experts modules that pass a token through for expert ids past the real experts ("zero" or
identity experts, LongCat-Flash), called as ``experts(x, ids, weights)`` by a router over E + Z
scores; written two ways:

* ``Padded``: ``w_gu [E + Z, 2I, H]`` beside ``w_d [E, H, I]`` (transformers 5.23's LongCat
  allocates the first projection for the zero experts too; no expert reads those rows), a loop
  over the experts hit with ``index_add_``; ids >= E add the token times its weight.
* ``Masked``: equal stacks, the identity slots added by one masked sum over all tokens.

Neither has a router weight with E rows, so the experts module alone is recognised (the routing
stays the layer's code): reported with E experts, compiled to one graph equal to eager, forward
and every gradient (fp32 assert_close defaults), on random tokens, one token, and tokens whose
every slot is an identity expert.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

import moec

E, Z, H, I, K = 4, 2, 16, 8, 2


class PaddedBank(nn.Module):
    def __init__(self):
        super().__init__()
        self.w_gu = nn.Parameter(torch.randn(E + Z, 2 * I, H) / H**0.5)
        self.w_d = nn.Parameter(torch.randn(E, H, I) / I**0.5)

    def forward(self, x, ids, w):
        out = torch.zeros_like(x)
        hit = torch.unique(ids)
        for e in hit.tolist():
            tok, slot = torch.where(ids == e)
            if e >= E:
                y = x[tok]
            else:
                g, u = F.linear(x[tok], self.w_gu[e]).chunk(2, -1)
                y = F.linear(F.silu(g) * u, self.w_d[e])
            out.index_add_(0, tok, y * w[tok, slot, None])
        return out


class MaskedBank(nn.Module):
    def __init__(self):
        super().__init__()
        self.w_gu = nn.Parameter(torch.randn(E, 2 * I, H) / H**0.5)
        self.w_d = nn.Parameter(torch.randn(E, H, I) / I**0.5)

    def forward(self, x, ids, w):
        out = ((ids >= E) * w).sum(-1, keepdim=True) * x
        for e in range(E):
            tok, slot = torch.where(ids == e)
            g, u = F.linear(x[tok], self.w_gu[e]).chunk(2, -1)
            out = out.index_add(0, tok, F.linear(F.silu(g) * u, self.w_d[e]) * w[tok, slot, None])
        return out


class Layer(nn.Module):
    def __init__(self, bank: type):
        super().__init__()
        self.scores = nn.Linear(H, E + Z, bias=False)
        self.bank = bank()

    def forward(self, x):
        x2 = x.reshape(-1, H)
        w, ids = self.scores(x2).softmax(-1).topk(K, -1)
        return self.bank(x2, ids, w).reshape(x.shape)


BANKS = {"padded": PaddedBank, "masked": MaskedBank}


def _layer(name: str) -> Layer:
    torch.manual_seed(0)
    return Layer(BANKS[name])


@pytest.mark.parametrize("name", list(BANKS))
def test_reported_with_the_real_experts(name):
    report = moec.inspect(_layer(name), torch.randn(2, 12, H))
    assert [(l.num_experts, l.recogniser) for l in report.moe_layers] == [(E, "experts")], report.table()
    assert report.graph_breaks == 0
    assert "left alone" not in report.table()


_DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("name", list(BANKS))
def test_compiled_matches_eager(name, device):
    """On a GPU too: capture asks what ids past E do on a CPU copy of the bank (an id out of a
    module's range on the GPU is a device-side assert that ends the process)."""
    torch._dynamo.reset()
    counters.clear()
    model = _layer(name).train().to(device)
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    one = torch.randn(1, H, generator=g)
    # Tokens whose both choices are identity experts: the router prefers them.
    with torch.no_grad():
        pref = torch.zeros(E + Z, H)
        pref[E:] = one[0] * 4
    xs = [x.to(device) for x in (torch.randn(2, 12, H, generator=g), one, one.expand(5, H).clone())]
    pref = pref.to(device)
    compiled = moec.compile(model, inner="aot_eager")
    for i, x in enumerate(xs):
        if i == 2:  # all slots on identity experts from here on
            with torch.no_grad():
                for m in (model, ref):
                    m.scores.weight.copy_(pref)
            assert bool((ref.scores(x).topk(K, -1).indices >= E).all())
        out, out_ref = compiled(x), ref(x)
        torch.testing.assert_close(out, out_ref)
        out.pow(2).mean().backward()
        out_ref.pow(2).mean().backward()
    assert dict(counters["graph_break"]) == {}
    refs = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        gp = p.grad if p.grad is not None else torch.zeros_like(p)
        gr = refs[n].grad if refs[n].grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(gp, gr, msg=lambda m, n=n: f"grad of {n}: {m}")
