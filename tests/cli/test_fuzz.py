"""The differential fuzzer (``moec.cli.fuzz``): its mechanics, and a seeded sample of 50 random
MoE layers that moec must all recognise and compute as eager does.

* Mechanics (fast): a case is reproducible alone; the comparison tolerances (fp32 assert_close
  defaults, bf16 relative to the output's scale, None == zeros); ``differential`` catches a wrong
  layer in the output and in the gradients; a crash is recorded, not raised; the command line
  writes the JSON with its totals and exit status.
* The sample (50 compiles, a few minutes, in the default run): 0 unrecognised, 0 mismatches,
  0 errors.
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from moec.cli import fuzz
from moec.models import random_moe
from moec.models.random_moe import LayerSpec

SAMPLE_SEED = 20261
SAMPLE_CASES = 50


def test_case_is_reproducible_alone():
    assert fuzz.case_spec(3, 17) == fuzz.case_spec(3, 17) == random_moe.draw(random.Random("3:17"))
    assert fuzz.case_spec(3, 17) != fuzz.case_spec(4, 17)
    calls = fuzz.case_calls(3, 17)
    assert calls == fuzz.case_calls(3, 17)
    tokens = [t for t, _ in calls]
    assert 1 in tokens and len(set(tokens)) == 3 and max(tokens) <= fuzz.MAX_TOKENS
    assert [identical for _, identical in calls].count(True) == 1
    ec = next(i for i in range(200) if fuzz.case_spec(3, i).router == "expert_choice")
    assert not any(identical for _, identical in fuzz.case_calls(3, ec))


def test_compare_tolerances():
    a = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    assert fuzz.compare(a, a.clone(), "x") is None
    assert fuzz.compare(a + 1e-3, a, "x").startswith("x: ")
    assert fuzz.compare(None, torch.zeros(3), "g") is None  # an expert no token reached
    assert fuzz.compare(None, torch.ones(3), "g") is not None
    assert "shape" in fuzz.compare(a[:4], a, "x")
    b = a.bfloat16()
    assert fuzz.compare(b, (a * (1 + 2**-8)).bfloat16(), "x") is None  # rounding, relative to the scale
    assert fuzz.compare(b, (a * 1.2).bfloat16(), "x") is not None
    tiny = (a * 1e-4).bfloat16()  # a wrong output smaller than any absolute tolerance still fails
    assert fuzz.compare(tiny * 2, tiny, "x") is not None


def test_differential_catches_a_wrong_layer():
    spec = LayerSpec(num_experts=4, top_k=2, hidden=16, intermediate=8, layout="stacked", spelling="gathered_bmm")
    layer, make_input = random_moe.build(spec, seed=0)
    ref = copy.deepcopy(layer)
    calls = [(5, False), (1, False)]
    assert fuzz.differential(layer, ref, make_input, calls, layer) == []
    with torch.no_grad():
        dict(layer.named_parameters())["w2"][1] *= 1.01  # one expert's down projection, slightly off
    found = fuzz.differential(layer, ref, make_input, [(32, False)], layer)
    whats = {m["what"] for m in found}
    assert {"output", "grad of input"} <= whats and any(w.startswith("grad of w") for w in whats), whats


def test_crash_is_recorded_not_raised(monkeypatch):
    def broken(spec, *, seed):
        raise RuntimeError("boom")

    monkeypatch.setattr(random_moe, "build", broken)
    record = fuzz.run_case(0, 5)
    assert record["error"]["stage"] == "build" and "boom" in record["error"]["message"]
    assert fuzz.status(record) == "ERROR" and record["recognised"] is False
    result = fuzz.run(case_ids=[5, 6], seed=0)
    assert result["totals"] == {"cases": 2, "recognised": 0, "unrecognised": 2, "mismatches": 0, "errors": 2,
                                "graph_breaks": 0}
    json.dumps(result)


def test_main_writes_json_and_exit_status(tmp_path, monkeypatch, capsys):
    def fake_case(seed, case, *, inner):
        spec = fuzz.case_spec(seed, case)
        return {"case": case, "seed": seed, "recognised": case != 1, "layers": [], "fallbacks": ["<root>: why"],
                "graph_breaks": 0, "break_reasons": [], "graphs": 1, "error": None, "seconds": 0.1,
                "describe": random_moe.describe(spec),
                "mismatches": [{"call": 0, "tokens": 3, "identical": False, "what": "output", "error": "output: x"}]
                if case == 2 else []}

    monkeypatch.setattr(fuzz, "run_case", fake_case)
    out = tmp_path / "r.json"
    assert fuzz.main(["--cases", "3", "--seed", "7", "--out", str(out)]) == 1  # case 2 mismatches
    result = json.loads(out.read_text())
    assert result["seed"] == 7 and [r["case"] for r in result["cases"]] == [0, 1, 2]
    assert result["totals"] == {"cases": 3, "recognised": 2, "unrecognised": 1, "mismatches": 1, "errors": 0,
                                "graph_breaks": 0}
    text = capsys.readouterr().out
    assert text.count("\n[") + text.startswith("[") == 3 and "1 mismatching" in text
    assert fuzz.main(["--case", "0", "--seed", "7"]) == 0
    assert fuzz.main(["--cases", "0"]) == 2


def test_bad_option_through_moec_is_one_line(capsys):
    from moec.cli import main as cli

    assert cli.main(["fuzz", "--jobs", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "moec: --jobs must be at least 1, got 0\n", err


def test_one_real_case_end_to_end():
    """One compiled case through the whole runner (its outcome is whatever moec does today): the
    first case of the sample seed with at most 4 experts, to keep it quick."""
    case = next(i for i in range(100) if fuzz.case_spec(SAMPLE_SEED, i).num_experts <= 4)
    result = fuzz.run(case_ids=[case], seed=SAMPLE_SEED)
    (record,) = result["cases"]
    assert record["error"] is None, record["error"]
    assert record["graphs"] >= 1 and record["seconds"] > 0
    assert record["num_experts"] == fuzz.case_spec(SAMPLE_SEED, case).num_experts
    json.dumps(result)


def test_a_two_layer_case_reports_each_layer():
    """A case built as a stack of two layers of its spec is recognised only with both found."""
    case = next(i for i in range(100) if fuzz.case_depth(SAMPLE_SEED, i) == 2
                and fuzz.case_spec(SAMPLE_SEED, i).num_experts <= 4)
    record = fuzz.run_case(SAMPLE_SEED, case)
    assert record["depth"] == 2 and fuzz.status(record) == "ok", (record["describe"], record["fallbacks"])
    assert [layer["name"] for layer in record["layers"]] == ["0", "1"]
    spec = fuzz.case_spec(SAMPLE_SEED, case)
    from types import SimpleNamespace as NS

    one = NS(num_experts=spec.num_experts, top_k=spec.top_k, router="softmax_topk")
    assert not fuzz._recognised([one], spec, 2) and fuzz._recognised([one, one], spec, 2)


def test_fuzz_sample():
    result = fuzz.run(cases=SAMPLE_CASES, seed=SAMPLE_SEED)
    bad = [fuzz.progress_line(r) for r in result["cases"] if fuzz.status(r) != "ok"]
    t = result["totals"]
    assert (t["mismatches"], t["unrecognised"], t["errors"]) == (0, 0, 0), fuzz.summary(result) + "\n" + "\n".join(bad)


def test_differential_catches_a_wrong_bf16_layer():
    """The bf16 rule (no less accurate than eager against a float64 twin) still sees a 10% error
    in one expert, while eager's own bf16 rounding passes."""
    spec = LayerSpec(num_experts=4, top_k=2, hidden=32, intermediate=16, dtype="bfloat16", norm="layernorm")
    layer, make_input = random_moe.build(spec, seed=0)
    ref = copy.deepcopy(layer)
    assert fuzz.differential(layer, ref, make_input, [(200, False), (200, True)], layer) == []
    with torch.no_grad():
        layer.experts[2].w2.weight.mul_(1.1)
    found = {m["what"] for m in fuzz.differential(layer, ref, make_input, [(200, False)], layer)}
    assert {"output", "grad of input", "grad of experts.2.w1.weight"} <= found, found  # w2 scales w1's gradient


def test_expert_choice_judgement():
    """Expert Choice is judged by cf * k (its capacity formula's only free product); where every
    expert takes every token (cf * k >= E) token choice over all E experts is the same layer."""
    from types import SimpleNamespace as NS

    spec = LayerSpec(num_experts=8, top_k=2, router="expert_choice", capacity_factor=2.0)
    assert fuzz._recognised([NS(num_experts=8, top_k=4, router="expert_choice+cf=1.0")], spec)
    assert not fuzz._recognised([NS(num_experts=8, top_k=2, router="expert_choice+cf=1.0")], spec)
    assert not fuzz._recognised([NS(num_experts=8, top_k=8, router="softmax_topk")], spec)
    saturated = LayerSpec(num_experts=8, top_k=8, router="expert_choice", capacity_factor=2.0)
    assert fuzz._recognised([NS(num_experts=8, top_k=8, router="softmax_topk")], saturated)
    assert not fuzz._recognised([NS(num_experts=8, top_k=4, router="softmax_topk")], saturated)


def test_fp32_rounding_beyond_assert_close_is_judged_against_float64():
    """An fp32 output of magnitude ~50 whose near-zero elements differ by rounding (2e-5, over
    assert_close's atol) passes when moec is as close to the float64 value as eager; a real error
    of the same size everywhere does not."""
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(64, 16, generator=g, dtype=torch.float64) * 50
    exact[0, 0] = 1e-6
    want = exact.float()
    got = want.clone()
    got[0, 0] += 2e-5
    assert fuzz.compare(got, want, "output") is not None  # assert_close alone fails it
    assert fuzz.compare(got, want, "output", exact) is None
    wrong = want + 1e-3 * want.abs().max()
    assert fuzz.compare(wrong, want, "output", exact) is not None


class _TwoLogits(torch.nn.Module):
    """Routes each token to the larger of its first two features: rows with x0 == x1 tie."""

    def forward(self, x):
        idx = x[..., :2].topk(1, dim=-1).indices
        return x * (idx.to(x.dtype) + 1)


def test_tied_tokens_are_marked_and_redrawn():
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    x[1, 1] = x[1, 0]
    x[4, 1] = x[4, 0] * (1 + 1e-9)  # within float32 rounding of a tie
    mode = fuzz._TopkTies(6, torch.finfo(torch.float32).eps)
    with mode:
        _TwoLogits()(x)
    assert mode.tied.tolist() == [False, True, False, False, True, False]

    untied, redrawn = fuzz.untied_input(_TwoLogits(), lambda tokens, seed, identical: x.clone(), 6, 0, False)
    assert redrawn >= 2
    assert torch.equal(untied[[0, 2, 3, 5]], x[[0, 2, 3, 5]])  # only the tied tokens move
    mode = fuzz._TopkTies(6, torch.finfo(torch.float32).eps)
    with mode:
        _TwoLogits()(untied)
    assert not mode.tied.any()


# Cases of seed 0 once left unrecognised: exact score ties (bf16 logits, scores saturated on the
# x8 verification probe), a router bias read as a correction bias, weights read off tiny expert
# outputs (squared ReLU) beyond their rounding.
# And two-layer cases whose second layer reused the first's plan but was recorded with the first
# reading of its experts (a shared MLP's projection as the router of flat experts: E wrong).
@pytest.mark.parametrize("case", [204, 241, 319, 377, 690, 786, 811, 850, 973, 652])
def test_once_unrecognised_cases(case):
    record = fuzz.run_case(0, case)
    assert fuzz.status(record) == "ok", (record["describe"], record["fallbacks"], record["mismatches"],
                                         record["error"])
