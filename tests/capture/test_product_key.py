"""Product-key MoE layers (Doge's CDMoE, PEER-style): a projection H -> 2n gives two sets of n key
scores, expert i * n + j (of E = n^2) scores key i plus key j, and each expert is one row in and
one row out (an ungated FFN with I = 1). Written two ways, from the idea, not from Doge's code:

* ``ViewKeys``: the [T, 2n] projection read as [2, T, n] (a token's two key sets come from rows
  of other tokens, as Doge's ``view(2, T, n)`` does), two-stage top-k (the n best keys of each
  set, then the K best sums), softmax over the K, experts as two ``nn.Embedding`` tables applied
  with ``matmul``, and an always-on gated MLP made of three sibling Linears (no module of its
  own) added to the routed output; returns (output, key scores viewed [2, T, n]).
* ``TokenKeys``: each token's scores split in halves, the second half the major index, the sums
  formed in full and top-k'd once, softmax over the K; the tables are bare ``[E, H]`` parameters
  gathered per token and applied with ``einsum``, GELU, a residual added; returns the output.

Each is recognised with the configured E and top-k, compiled with no graph break, and equal to
eager (fp32, assert_close defaults) in its output and every parameter's gradient on random
tokens, one token, top-k = E, and routing where every token picks the same experts (the other
experts get no token). The CPU target and Triton (interpreted) give the same.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moec

H, I = 16, 24


class ViewKeys(nn.Module):
    def __init__(self, E: int, K: int):
        super().__init__()
        self.n, self.k = math.isqrt(E), K
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)
        self.keys = nn.Linear(H, 2 * self.n, bias=False)
        self.rows_in = nn.Embedding(E, H)
        self.rows_out = nn.Embedding(E, H)

    def forward(self, h):
        b, s, _ = h.shape
        scores = self.keys(h).view(2, b * s, -1)
        (sa, sb), (ia, ib) = scores.topk(self.n, dim=-1)
        total = (sa.unsqueeze(-1) + sb.unsqueeze(-2)).view(b * s, -1)
        which = (ia.unsqueeze(-1) * self.n + ib.unsqueeze(-2)).view(b * s, -1)
        best, pos = total.topk(self.k, dim=-1)
        idx = which.gather(-1, pos)
        w = F.softmax(best, dim=-1)
        act = F.silu(torch.matmul(self.rows_in(idx), h.view(b * s, -1, 1)).view(b * s, -1)) * w
        routed = torch.matmul(act.view(b * s, 1, -1), self.rows_out(idx)).view(b, s, -1)
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h)) + routed, scores


class TokenKeys(nn.Module):
    def __init__(self, E: int, K: int):
        super().__init__()
        self.n, self.k = math.isqrt(E), K
        self.to_keys = nn.Parameter(torch.randn(H, 2 * self.n) / H**0.5)  # used as x @ w
        self.w_in = nn.Parameter(torch.randn(E, H) / H**0.5)
        self.w_out = nn.Parameter(torch.randn(E, H) / 2)

    def forward(self, x):
        flat = x.reshape(-1, H)
        q = flat @ self.to_keys
        first, second = q[:, : self.n], q[:, self.n :]
        total = (second[:, :, None] + first[:, None, :]).flatten(1)  # expert = j * n + i
        best, idx = total.topk(self.k, dim=-1)
        w = best.softmax(-1)
        z = F.gelu(torch.einsum("tkh,th->tk", self.w_in[idx], flat)) * w
        return x + torch.einsum("tk,tkh->th", z, self.w_out[idx]).reshape(x.shape)


SPELLINGS = {"view": ViewKeys, "tokens": TokenKeys}


def _model(name: str, E: int = 16, K: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return SPELLINGS[name](E, K)


def _key_weight(model: nn.Module) -> torch.Tensor:
    return model.keys.weight if isinstance(model, ViewKeys) else model.to_keys


def _concentrate(model: nn.Module) -> None:
    """Key 0 of both key sets far above the others for inputs > 0: expert 0 first for every token."""
    w, n = _key_weight(model), model.n
    w.mul_(1e-3)
    if isinstance(model, ViewKeys):
        w[0] += 1.0
        w[n] += 1.0
    else:
        w[:, 0] += 1.0
        w[:, n] += 1.0


def _inputs(g: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(2, 9, H, generator=g), torch.randn(1, 1, H, generator=g)]


@pytest.mark.parametrize("name", list(SPELLINGS))
@pytest.mark.parametrize("E,K", [(16, 2), (9, 9)], ids=["E16-k2", "top-k=E"])
def test_recognised_with_its_experts(name, E, K):
    report = moec.inspect(_model(name, E, K), torch.randn(2, 9, H))
    assert [(l.num_experts, l.top_k, l.expert_hidden_size) for l in report.moe_layers] == [(E, K, 1)], report.table()
    assert report.graph_breaks == 0 and "left alone" not in report.table()


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_compiled_matches_eager(checks, name):
    g = torch.Generator().manual_seed(3)
    xs = _inputs(g) + [torch.randn(3, 5, H, generator=g)]
    checks.matches_eager_over(_model(name), xs, "cpu", last=_concentrate)


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_top_k_equal_to_experts(checks, name):
    g = torch.Generator().manual_seed(4)
    checks.matches_eager_over(_model(name, 9, 9), _inputs(g), "cpu")


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_triton_lowering_matches_eager(triton_here, checks, name):
    g = torch.Generator().manual_seed(5)
    checks.matches_eager_over(_model(name), _inputs(g), "triton")


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_concentrated_routing_is_what_eager_routes(name):
    """The concentrated routing above really sends every token to expert 0 first (and most
    experts then get no token)."""
    model = _model(name)
    with torch.no_grad():
        _concentrate(model)
        x = torch.randn(3, 5, H).abs() + 1.0
        if isinstance(model, ViewKeys):
            total = model.keys(x).view(2, 15, -1)
            total = (total[0][:, :, None] + total[1][:, None, :]).flatten(1)
        else:
            q = x.reshape(-1, H) @ model.to_keys
            total = (q[:, 4:, None] + q[:, None, :4]).flatten(1)
    idx = total.topk(2, dim=-1).indices
    assert bool((idx[:, 0] == 0).all()) and len(set(idx.flatten().tolist())) < 16
