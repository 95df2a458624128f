"""Candidate discovery finds MoE-looking modules from their parameters, whatever they are called
and wherever they sit, and never takes a stack of identical layers for experts."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moec.capture.candidates import find_candidates

H, I, E = 16, 8, 4


class Lin(nn.Module):
    """A hand-written linear that is not nn.Linear, stored [in, out]."""

    def __init__(self, i, o):
        super().__init__()
        self.w = nn.Parameter(torch.randn(i, o))

    def forward(self, x):
        return x @ self.w


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = Lin(H, I), Lin(I, H)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Deep(nn.Module):
    """Router as a bare [H, E] parameter; experts two containers down."""

    def __init__(self):
        super().__init__()
        self.scores = nn.Parameter(torch.randn(H, E))
        self.inner = nn.Module()
        self.inner.bank = nn.ModuleDict({f"e{i}": Expert() for i in range(E)})


class Siblings(nn.Module):
    """Stacked experts split over two child modules (JetMoE's ParallelExperts)."""

    def __init__(self):
        super().__init__()
        self.route = nn.Linear(H, E)
        self.up, self.down = nn.Module(), nn.Module()
        self.up.weight = nn.Parameter(torch.randn(E, 2 * I, H))
        self.down.weight = nn.Parameter(torch.randn(E, H, I))


class Flat(nn.Module):
    """DBRX: per-expert matrices flattened [E*I, H], next to an attention with square weights."""

    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.q, self.attn.k = nn.Parameter(torch.randn(H, H)), nn.Parameter(torch.randn(H, H))
        self.ffn = nn.Module()
        self.ffn.router = nn.Linear(H, E, bias=False)
        self.ffn.mlp = nn.Module()
        for n in ("w1", "v1", "w2"):
            setattr(self.ffn.mlp, n, nn.Parameter(torch.randn(E * I, H)))


class AllInOne(nn.Module):
    """Every tensor a bare parameter of one module: router [E, H] beside b_out [E, H]."""

    def __init__(self):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(E, H, I))
        self.b_in = nn.Parameter(torch.randn(E, I))
        self.w_out = nn.Parameter(torch.randn(E, I, H))
        self.b_out = nn.Parameter(torch.randn(E, H))
        self.router = nn.Parameter(torch.randn(E, H))


def _one(model):
    cands, orphans = find_candidates(model)
    assert len(cands) == 1 and not orphans, (cands, orphans)
    return cands[0]


def test_router_parameter_and_experts_at_any_depth():
    c = _one(nn.Sequential(Deep()))
    assert (c.name, c.router, c.router_transposed, c.hidden) == ("0", "scores", True, H)
    assert (c.experts.owner, c.experts.layout, c.experts.num_experts) == ("inner.bank", "modules", E)


def test_stacked_experts_in_sibling_modules():
    c = _one(Siblings())
    assert c.experts.layout == "stacked" and sorted(c.experts.names) == ["down.weight", "up.weight"]
    assert c.router == "route.weight"


def test_flat_experts_pair_with_the_nearest_router_only():
    c = _one(Flat())
    assert (c.name, c.experts.layout, c.experts.num_experts, c.router) == ("ffn", "flat", E, "router.weight")


def test_router_parameter_beside_stacked_experts():
    c = _one(AllInOne())
    readings = [c, *c.__dict__["alternatives"]]
    assert {"router", "b_out"} <= {r.router for r in readings}  # either [E, H] could be the router
    assert readings[0].experts.layout == "stacked"


def test_identical_layers_with_bare_routers_each_pair_with_their_own():
    # Each layer's [E, H] router is a bare parameter beside its stacked experts; the other layer's
    # is one too, and must not pair with these experts at the module holding both (that reading
    # had folded both layers into one candidate, and the second was missed without a word).
    model = nn.Sequential(AllInOne(), AllInOne())
    cands, orphans = find_candidates(model)
    assert [(c.name, c.experts.owner) for c in cands] == [("0", ""), ("1", "")] and not orphans
    for c in cands:
        assert all(r.name == c.name for r in c.__dict__["alternatives"])


def test_a_stack_of_identical_layers_is_not_experts():
    # Two identical blocks, each small enough to look like an expert, each holding an MoE layer.
    model = nn.ModuleList([nn.Sequential(Deep()) for _ in range(2)])
    cands, orphans = find_candidates(model)
    assert [c.name for c in cands] == ["0.0", "1.0"] and not orphans


def test_experts_without_a_router_are_reported_as_orphans():
    m = nn.Module()
    m.experts = nn.ModuleList(Expert() for _ in range(E))
    cands, orphans = find_candidates(m)
    assert not cands and [(o.name, o.num_experts) for o in orphans] == [("experts", E)]


class ProductKeys(nn.Module):
    """Single-row experts behind product-key routing (as Doge's CDMoE and PEER write it): scores
    for n keys on each of two axes, E = n^2 experts (``tables`` of them: two are the experts'
    rows in and out; a third makes the reading ambiguous)."""

    def __init__(self, n=4, k=2, tables=2, act=F.gelu):
        super().__init__()
        self.n, self.k, self.act = n, k, act
        self.keys = nn.Linear(H, 2 * n, bias=False)
        self.down_rows = nn.Embedding(n * n, H)
        self.up_rows = nn.Embedding(n * n, H)
        if tables > 2:
            self.extra_rows = nn.Embedding(n * n, H)
        with torch.no_grad():  # rows of the scale a trained model's have (pre-activations O(1))
            for table in (self.down_rows, self.up_rows):
                table.weight.mul_(H**-0.5)

    def forward(self, x):
        sx, sy = self.keys(x).chunk(2, dim=-1)
        scores = (sx[:, :, None] + sy[:, None, :]).flatten(1)
        w, idx = scores.topk(self.k, dim=-1)
        h = self.act((self.down_rows(idx) * x[:, None]).sum(-1)) * w.softmax(-1)
        out = (h[..., None] * self.up_rows(idx)).sum(1)
        return out + self.extra_rows(idx).sum(1) if hasattr(self, "extra_rows") else out


def test_product_key_layer_is_a_candidate():
    model = nn.Sequential(nn.Linear(H, H), ProductKeys())
    cands, orphans = find_candidates(model)
    assert not orphans
    (c,) = cands
    assert (c.name, c.experts.num_experts, c.experts.layout, c.router, c.logit_map) == (
        "1", 16, "flat", "keys.weight", "product_key")
    assert sorted(c.experts.names) == ["down_rows.weight", "up_rows.weight"]


def test_product_key_layer_is_recognised():
    import moec

    report = moec.inspect(ProductKeys(), torch.randn(8, H))
    assert [(l.num_experts, l.top_k, l.expert_hidden_size, l.activation) for l in report.moe_layers] == [
        (16, 2, 1, "gelu")], report.table()


def test_a_relu_product_key_layer_is_left_alone_with_a_reason():
    """A rank-one ReLU expert whose one pre-activation is negative adds exactly nothing, so which
    experts a token chose cannot be observed (known limit): left alone, and the report says why."""
    import moec

    report = moec.inspect(ProductKeys(act=torch.relu), torch.randn(8, H))
    assert not report.moe_layers
    assert any("left alone" in f.reason and "router" in f.reason for f in report.fallbacks), report.fallbacks


def test_report_says_why_a_product_key_layer_is_left_alone():
    import moec

    report = moec.inspect(ProductKeys(tables=3), torch.randn(8, H))
    assert not report.moe_layers
    assert any("product-key" in f.reason and "more than two" in f.reason for f in report.fallbacks), report.fallbacks


class BareRouterLayer(nn.Module):
    """A bare [E, H] router parameter beside stacked experts, gathered per token."""

    def __init__(self):
        super().__init__()
        self.router = nn.Parameter(torch.randn(E, H))
        self.w1 = nn.Parameter(torch.randn(E, I, H) / H**0.5)
        self.w2 = nn.Parameter(torch.randn(E, H, I) / I**0.5)

    def forward(self, x):
        w, idx = (x @ self.router.t()).softmax(-1).topk(2, dim=-1)
        h = F.silu(torch.einsum("th,tkih->tki", x, self.w1[idx]))
        return (torch.einsum("tki,tkhi->tkh", h, self.w2[idx]) * w[..., None]).sum(1)


def test_identical_layers_with_bare_routers_are_each_recognised():
    from moec.capture import convert_model

    result = convert_model(nn.Sequential(BareRouterLayer(), BareRouterLayer()), ((torch.randn(10, H),), {}))
    assert [(l.name, l.num_experts, l.top_k) for l in result.layers] == [("0", E, 2), ("1", E, 2)]
    assert result.fallbacks == []
