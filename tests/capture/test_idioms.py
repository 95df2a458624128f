"""moec captures every hand-written MoE idiom whole and computes what eager computes.

The idioms (``moec.models.builtin``) are written the way people write MoE layers: a Python loop
with ``torch.where``/``nonzero`` + ``index_add_``, gathered stacked weights through ``bmm``, a sort
+ ``split(bincount().tolist())`` permute, a shared expert. Plain ``aot_eager`` breaks 6-9 times on
the loop and sort-split idioms; with moec each must be one graph with no break, equal to eager
(outputs and every gradient), and ``moec.inspect`` must find its two MoE blocks.
"""

from __future__ import annotations

import pytest

import moec
from moec.models.builtin import BUILTIN_MODELS, HIDDEN, INTERMEDIATE, expected_moe_layers

IDIOMS = sorted(BUILTIN_MODELS)
MODES = [pytest.param(False, id="eval"), pytest.param(True, id="train")]


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("name", IDIOMS)
def test_compiled_matches_eager(checks, name, train):
    model, args = BUILTIN_MODELS[name]()
    checks.compiled_matches_eager(model, args, train=train)


@pytest.mark.parametrize("name", IDIOMS)
def test_inspect_finds_both_moe_blocks(checks, name):
    model, args = BUILTIN_MODELS[name]()
    expected = expected_moe_layers(model)
    assert expected == [("layers.0.moe", 8, 2), ("layers.1.moe", 8, 2)]  # the oracle itself

    report = moec.inspect(model, *args)

    checks.assert_reported_layers(report, expected)
    assert report.graph_breaks == 0
    for layer in report.moe_layers:
        assert (layer.hidden_size, layer.expert_hidden_size) == (HIDDEN, INTERMEDIATE), layer.name
        assert layer.num_shared_experts == (1 if name == "shared-expert" else 0), layer.name
