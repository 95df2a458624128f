"""Copies of a converted model are copies of the model as it was: ``copy.deepcopy`` used to keep
the installed forwards, which close over the original modules, so the copy's eager run computed
with the original's parameters (and its gradients went there); ``torch.save`` refused the local
functions. Checked on a layer of each install path: the whole layer (observed), its experts
module (experts tier), two methods (split)."""

from __future__ import annotations

import copy
import io
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import moec
from moec.capture import convert_model
from moec.models.builtin import BUILTIN_MODELS

sys.path.insert(0, str(Path(__file__).parent))
from test_experts_dict import Layer as DictLayer  # noqa: E402
from test_split import _model as split_model  # noqa: E402


def _models():
    model, args = BUILTIN_MODELS["moe-mlp"]()
    x = args[0] if isinstance(args, tuple) else args
    torch.manual_seed(0)
    yield "observed", model, x
    yield "experts", nn.Sequential(DictLayer(as_mask=True)), torch.randn(2, 7, 16)
    yield "split", split_model("sorted"), torch.randn(2, 9, 16)


@pytest.mark.parametrize("case", ["observed", "experts", "split"])
def test_deepcopy_computes_with_its_own_parameters(checks, case):
    name, model, x = next(m for m in _models() if m[0] == case)
    result = convert_model(model, ((x,), {}))
    assert {l.recogniser for l in result.layers} == {case}
    twin = copy.deepcopy(model)
    assert not [k for m in twin.modules() for k in m.__dict__ if k.startswith("_moec") or k == "forward"]
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)
    out = twin(x)
    with torch.no_grad():
        for p in twin.parameters():
            p.div_(1.5)
    assert not torch.allclose(out, model(x))  # the copy's own (changed) parameters, not the original's
    checks.matches_eager_over(twin, [x], "cpu")  # compiled afresh: recognised again, equal to eager


@pytest.mark.parametrize("case", ["observed", "split"])
def test_save_and_load(case):
    name, model, x = next(m for m in _models() if m[0] == case)
    convert_model(model, ((x,), {}))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    torch._dynamo.reset()
    assert [l.recogniser for l in moec.inspect(loaded, x).moe_layers] == [l.recogniser for l in
                                                                          convert_model(model).layers]
