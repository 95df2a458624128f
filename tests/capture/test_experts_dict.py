"""An experts container that is itself an ``nn.ModuleDict`` (a subclass with a routing forward,
as transformers' NLLB-MoE writes its experts), called as ``experts(x, ids, weights)``:

* ``as_ids``: given proper top-2 expert ids: the whole layer is recognised (observed).
* ``as_mask``: given the router's [T, E] one-hot top-1 mask where ids belong (what transformers
  5.23-5.25's NLLB-MoE does): every slot's "id" is 0 or 1, so experts 0 and 1 run on every
  token. No router form chooses that, so the routing stays the layer's own code and only the
  experts module becomes moec ops (the experts tier): it then computes exactly what the layer
  computes, reported with the 2 experts a token really uses and the reason.

Both compiled with no graph break and equal to eager (fp32 assert_close defaults), output and
every parameter's gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moec.capture import convert_model

E, H, I = 6, 16, 12


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(H, I), nn.Linear(I, H)

    def forward(self, x):
        return self.down(F.relu(self.up(x)))


class ExpertDict(nn.ModuleDict):
    def __init__(self):
        super().__init__({f"e{i}": Expert() for i in range(E)})

    def forward(self, x, ids, weights):
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.values()):
            tok, slot = torch.where(ids == e)
            out.index_add_(0, tok, expert(x[tok]) * weights[tok, slot, None])
        return out


class Layer(nn.Module):
    def __init__(self, as_mask: bool):
        super().__init__()
        self.as_mask = as_mask
        self.router = nn.Linear(H, E, bias=False)
        self.experts = ExpertDict()

    def forward(self, x):
        x2 = x.reshape(-1, H)
        probs = self.router(x2).softmax(-1)
        if self.as_mask:
            mask = F.one_hot(probs.argmax(-1), E)
            return self.experts(x2, mask, probs).reshape(x.shape)
        w, ids = probs.topk(2, -1)
        return self.experts(x2, ids, w / w.sum(-1, keepdim=True)).reshape(x.shape)


@pytest.mark.parametrize("as_mask", [False, True], ids=["as_ids", "as_mask"])
def test_recognised_and_equal_to_eager(checks, as_mask):
    torch.manual_seed(0)
    model = nn.Sequential(Layer(as_mask), Layer(as_mask))
    result = convert_model(model, ((torch.randn(2, 7, H),), {}))
    assert [(l.name, l.num_experts, l.top_k) for l in result.layers] == [("0", E, 2), ("1", E, 2)]
    assert {l.recogniser for l in result.layers} == ({"experts"} if as_mask else {"observed"})
    if as_mask:
        assert all("routing kept as the model's own code" in f.reason and "experts [0, 1]" in f.reason
                   for f in result.fallbacks) and len(result.fallbacks) == 2
    g = torch.Generator().manual_seed(1)
    checks.matches_eager_over(model, [torch.randn(2, 7, H, generator=g), torch.randn(1, 1, H, generator=g)], "cpu")
