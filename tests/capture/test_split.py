"""Split MoE layers: routing and experts reached through two methods of a module that is never
called as a layer, with other code between them (JetMoE's mixture of attention heads does this;
written here from the idea, not from its code). Two spellings:

* ``SortedHeads``: ``route_in`` takes top-k of the logits then a softmax over the K, sorts the
  slots by expert, splits them by ``counts.tolist()``, runs one ``F.linear`` per non-empty expert
  ([E, D, H] tables), ``index_add``s the rows back to slot order and returns
  (rows [B, S, K, D], logits, a tuple of sort indices, gates and counts); ``route_out`` projects
  each row with its expert in the same grouped way, weights it, ``index_add``s per token and adds
  a bias.
* ``GatheredHeads``: ``enter`` takes a softmax, top-k, no renormalisation, and applies the K chosen
  experts' [H, D] tables gathered per token (``w[idx]``, ``einsum``); returns (rows, a dict with
  the choice and weights); ``leave`` gathers the [D, H] output tables the same way and sums the
  weighted rows with ``einsum``.

A caller runs its own code between the halves (a tanh and a learned scale on the rows) and adds
a residual. Each layer is recognised with its E and top-k, compiled with no graph break, and equal
to eager (fp32, assert_close defaults) in its output and every parameter's gradient on random
tokens, one token, top-k = E, and routing where every token picks expert 0 first (experts then
get no token); the CPU target and Triton (interpreted) give the same. A pair whose second half
does something else (a tanh after the sum) is left alone with the step that failed, and runs
its own code.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moec
from moec.capture import convert_model

H, D = 16, 8


class SortedHeads(nn.Module):
    def __init__(self, E: int, K: int):
        super().__init__()
        self.E, self.K = E, K
        self.gate = nn.Linear(H, E, bias=False)
        self.w_in = nn.Parameter(torch.randn(E, D, H) / H ** 0.5)
        self.w_out = nn.Parameter(torch.randn(E, H, D) / D ** 0.5)
        self.bias = nn.Parameter(torch.zeros(H))  # zero: the bias must be found by what it does

    def _grouped(self, rows, w, counts):
        parts = rows.split(counts, dim=0)
        return torch.cat([F.linear(p, w[e]) for e, p in enumerate(parts)], dim=0)

    def route_in(self, x):
        b, s, _ = x.shape
        flat = x.reshape(-1, H)
        logits = self.gate(flat).float()
        top, idx = logits.topk(self.K, dim=-1)
        gates = top.softmax(-1).type_as(x).flatten()
        counts = torch.bincount(idx.flatten(), minlength=self.E).tolist()
        order = idx.flatten().argsort(stable=True)
        rows = self._grouped(flat[order // self.K], self.w_in, counts)
        q = torch.zeros(b * s * self.K, D, dtype=x.dtype).index_add(0, order, rows)
        return q.view(b, s, self.K, D), logits, (order, gates[order], counts)

    def route_out(self, rows, state):
        order, gates, counts = state
        b, s, k, _ = rows.shape
        y = self._grouped(rows.reshape(-1, D)[order], self.w_out, counts) * gates[:, None]
        out = torch.zeros(b * s, H, dtype=rows.dtype).index_add(0, order // k, y)
        return out.view(b, s, H) + self.bias

    def forward(self, x):
        raise NotImplementedError("call route_in / route_out")


class GatheredHeads(nn.Module):
    def __init__(self, E: int, K: int):
        super().__init__()
        self.K = K
        self.scorer = nn.Parameter(torch.randn(E, H) / H ** 0.5)
        self.proj_in = nn.Parameter(torch.randn(E, H, D) / H ** 0.5)
        self.proj_out = nn.Parameter(torch.randn(E, D, H) / D ** 0.5)

    def enter(self, x):
        probs = torch.softmax(x @ self.scorer.t(), dim=-1)
        w, idx = probs.topk(self.K, dim=-1)
        q = torch.einsum("bsh,bskhd->bskd", x, self.proj_in[idx])
        return q, {"idx": idx, "w": w}

    def leave(self, rows, choice):
        y = torch.einsum("bskd,bskdh->bskh", rows, self.proj_out[choice["idx"]])
        return (y * choice["w"].unsqueeze(-1)).sum(-2)


class NotCombined(GatheredHeads):
    def leave(self, rows, choice):
        return torch.tanh(super().leave(rows, choice))


class Mixer(nn.Module):
    """Calls the two halves with its own code between them."""

    def __init__(self, heads: nn.Module):
        super().__init__()
        self.heads = heads
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, D))
        self.first, self.second = (("route_in", "route_out") if isinstance(heads, SortedHeads)
                                   else ("enter", "leave"))

    def forward(self, x):
        out = getattr(self.heads, self.first)(x)
        q, state = out[0], out[-1]
        return x + getattr(self.heads, self.second)(torch.tanh(q) * self.scale, state)


SPELLINGS = {"sorted": SortedHeads, "gathered": GatheredHeads}


def _model(name: str, E: int = 6, K: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(Mixer(SPELLINGS[name](E, K)), Mixer(SPELLINGS[name](E, K)))


def _router_weight(heads: nn.Module) -> torch.Tensor:
    return heads.gate.weight if isinstance(heads, SortedHeads) else heads.scorer


def _concentrate(model: nn.Module) -> None:
    """Every token's first choice becomes expert 0 for positive inputs."""
    for mixer in model:
        w = _router_weight(mixer.heads)
        w.mul_(1e-3)
        w[0] += 1.0


def _inputs(g: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(2, 9, H, generator=g), torch.randn(1, 1, H, generator=g)]


@pytest.mark.parametrize("name", list(SPELLINGS))
@pytest.mark.parametrize("E,K", [(6, 2), (4, 4)], ids=["E6-k2", "top-k=E"])
def test_recognised_with_its_experts(name, E, K):
    model = _model(name, E, K)
    result = convert_model(model, ((torch.randn(2, 9, H),), {}))
    assert [(l.name, l.num_experts, l.top_k, l.expert_hidden_size, l.recogniser) for l in result.layers] == [
        ("0.heads", E, K, D, "split"), ("1.heads", E, K, D, "split")], result
    assert result.fallbacks == []
    kind = "softmax_topk" if name == "gathered" else None  # top-k then softmax reads as renormalised softmax
    assert K == E or all(l.renormalize == (name == "sorted") for l in result.layers)
    assert kind is None or all(l.router == kind for l in result.layers)


def test_layers_of_one_kind_share_the_recognition(monkeypatch):
    from moec.capture import convert

    seen = []
    real = convert.recognise_split
    monkeypatch.setattr(convert, "recognise_split", lambda cand, calls: seen.append(cand.name) or real(cand, calls))
    model = nn.Sequential(*[Mixer(SortedHeads(6, 2)) for _ in range(4)])
    result = convert_model(model, ((torch.randn(2, 9, H),), {}))
    assert [l.recogniser for l in result.layers] == ["split"] * 4 and seen == ["0.heads"]


def test_graph_holds_moec_ops():
    model = _model("sorted")
    gms = moec.capture.capture_graphs(model, torch.randn(2, 9, H))
    code = "\n".join(gm.code for gm in gms)
    for name in ("moec.route", "moec.dispatch", "moec.grouped_gemm", "moec.combine"):
        assert code.count(name) >= 2, name
    assert "tolist" not in code and "bincount" not in code


# (seed, E, K, target, extra call, routing concentrated before the last call)
CASES = {
    "cpu": (3, 6, 2, "cpu", True, True),
    "top-k=E": (4, 4, 4, "cpu", False, False),
    "reference": (6, 6, 2, "reference", False, False),
    "triton": (5, 6, 2, "triton", False, False),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", list(SPELLINGS))
def test_compiled_matches_eager(request, checks, name, case):
    seed, E, K, target, extra, concentrate = CASES[case]
    if target == "triton":
        request.getfixturevalue("triton_here")
    g = torch.Generator().manual_seed(seed)
    xs = _inputs(g) + ([torch.randn(3, 5, H, generator=g)] if extra else [])
    checks.matches_eager_over(_model(name, E, K), xs, target, last=_concentrate if concentrate else None)


def test_concentrated_routing_is_what_eager_routes():
    model = _model("gathered")
    with torch.no_grad():
        _concentrate(model)
        x = torch.randn(3, 5, H).abs() + 1.0
        idx = (x @ model[0].heads.scorer.t()).topk(2, dim=-1).indices
    assert bool((idx[..., 0] == 0).all()) and len(set(idx.flatten().tolist())) < 6


def test_other_second_half_is_left_alone_with_the_step():
    torch.manual_seed(0)
    model = nn.Sequential(Mixer(NotCombined(6, 2)))
    ref = copy.deepcopy(model)
    x = torch.randn(2, 9, H)
    result = convert_model(model, ((x,), {}))
    assert result.layers == []
    [fallback] = result.fallbacks
    assert fallback.location == "0.heads" and "combine" in fallback.reason and "leave()" in fallback.reason
    torch._dynamo.reset()
    torch.testing.assert_close(moec.compile(model, inner="aot_eager", target="cpu")(x), ref(x))
