"""moec captures real Hugging Face MoE models whole and computes what eager computes.

For every zoo arch × each experts implementation it supports × (eval, train):
* ``torch.compile(model, backend="moec", options={"inner": "aot_eager"})`` gives one graph and no
  graph break on the first call (plain ``aot_eager`` breaks 10-12 times on every ``eager``
  experts implementation, at ``nonzero``);
* the output equals an eager copy at fp32 tolerances and, in train mode, so does every gradient;
* ``moec.inspect`` finds exactly the MoE blocks the config describes.
Plus: the default inner compiler (Inductor) on Mixtral; dynamic token counts (automatic dynamic and
``mark_dynamic``) on Mixtral and the default builtin; degenerate routing (all tokens on one expert,
an expert with no tokens, one token, top-k = number of experts) on Mixtral and the default builtin.
"""

from __future__ import annotations

import copy

import pytest
import torch

import moec
from moec.models import builtin
from moec.models.builtin import BUILTIN_MODELS, DEFAULT_BUILTIN
from moec.models.hf import (
    HF_ARCHS,
    expected_moe_details,
    expected_moe_layers,
    make_hf_model,
    primary_output,
    supported_experts_implementations,
)

CASES = [
    pytest.param(arch, impl, id=f"{arch}-{impl}")
    for arch in HF_ARCHS
    for impl in supported_experts_implementations(arch)
]
MODES = [pytest.param(False, id="eval"), pytest.param(True, id="train")]


@pytest.mark.parametrize("train", MODES)
@pytest.mark.parametrize("arch,impl", CASES)
def test_compiled_matches_eager(checks, arch, impl, train):
    model, args = make_hf_model(arch, experts_implementation=impl)
    # Switch gets its attention mask (see make_hf_model): without one, transformers builds it only
    # when not compiling and dynamo gives up on the encoder frame.
    checks.compiled_matches_eager(model, args, train=train, output=primary_output)


@pytest.mark.parametrize("arch,impl", CASES)
def test_inspect_finds_configured_moe_layers(checks, arch, impl):
    model, args = make_hf_model(arch, experts_implementation=impl)
    report = moec.inspect(model, *args)

    checks.assert_reported_layers(report, expected_moe_layers(model))
    assert report.graph_breaks == 0
    by_name = {layer.name: layer for layer in report.moe_layers}
    for want in expected_moe_details(model):
        got = by_name[want.name]
        assert (got.hidden_size, got.expert_hidden_size, got.num_shared_experts) == (
            want.hidden_size,
            want.expert_hidden_size,
            want.num_shared_experts,
        ), want.name


@pytest.mark.parametrize("train", MODES)
def test_default_inner_inductor_mixtral(checks, train):
    model, args = make_hf_model("mixtral")
    checks.compiled_matches_eager(model, args, train=train, inner=None, output=primary_output)


# --- dynamic token counts -----------------------------------------------------------------------

SEQ_LENS = (5, 9, 13)


def _dynamic_subject(which: str):
    """(model, make_input(seq_len), output) for the two models the dynamic-shape tests use."""
    gen = torch.Generator().manual_seed(1)
    if which == "mixtral":
        model, _ = make_hf_model("mixtral")
        return model, lambda s: torch.randint(3, 128, (2, s), generator=gen), primary_output
    model, (x_BSH,) = BUILTIN_MODELS[DEFAULT_BUILTIN]()
    return model, lambda s: torch.randn(2, s, x_BSH.shape[-1], generator=gen), lambda out: out


@pytest.mark.parametrize("which", ["mixtral", DEFAULT_BUILTIN])
@pytest.mark.parametrize("mark_dynamic", [False, True], ids=["automatic", "mark_dynamic"])
def test_dynamic_token_count(checks, which, mark_dynamic):
    model, make_input, output = _dynamic_subject(which)
    ref = copy.deepcopy(model)
    compiled = checks.compile(model)

    with torch.no_grad():
        for i, seq_len in enumerate(SEQ_LENS):
            x = make_input(seq_len)
            if mark_dynamic and i == 0:
                torch._dynamo.mark_dynamic(x, 1)
            torch.testing.assert_close(output(compiled(x)), output(ref(x)), msg=lambda m: f"S={seq_len}: {m}")

    assert checks.graph_breaks() == {}
    # Automatic dynamic: the first call specialises, the first new length recompiles once with a
    # symbolic length, the rest reuse it. mark_dynamic: symbolic from the start.
    if mark_dynamic:
        assert checks.graph_count() == 1
    else:
        assert checks.graph_count() <= 2


# --- degenerate routing -----------------------------------------------------------------------
#
# To force routing independently of the input, give every MoE input a large positive constant
# feature (coordinate 0) and make each router row a multiple of that coordinate: the logit of
# expert e is then c_e * (large positive), so the order of the c_e fixes the choice. Distinct c_e
# for the experts that can be chosen, so no top-k tie can make compiled and eager pick differently.
# Each rigged case checks its own precondition on an eager copy before comparing.

DEGENERATE = ["one_expert", "empty_expert", "single_token", "topk_eq_num_experts"]
ONE_EXPERT_ROW = [2.0, 1.0] + [-1.0] * 6  # every token: expert 0 first, expert 1 second
EMPTY_EXPERT = 3


def _rig_router_rows(weight_EH: torch.Tensor, case: str) -> None:
    with torch.no_grad():
        if case == "one_expert":
            weight_EH.zero_()
            weight_EH[:, 0] = torch.tensor(ONE_EXPERT_ROW)
        elif case == "empty_expert":
            weight_EH[EMPTY_EXPERT].zero_()
            weight_EH[EMPTY_EXPERT, 0] = -4.0


def _mixtral_case(case: str):
    overrides = {"num_experts_per_tok": 8} if case == "topk_eq_num_experts" else None
    model, (input_ids_BS,) = make_hf_model("mixtral", overrides)
    if case == "single_token":
        input_ids_BS = input_ids_BS[:1, :1]
    if case in ("one_expert", "empty_expert"):
        # Post-norm coordinate 0 is ~ +8 for every token once the residual stream carries a constant
        # +10 from the embedding (RMSNorm divides by ~10/sqrt(64)).
        with torch.no_grad():
            model.model.embed_tokens.weight[:, 0] = 10.0
        for layer in model.model.layers:
            _rig_router_rows(layer.mlp.gate.weight, case)
    return model, (input_ids_BS,), primary_output


def _builtin_case(case: str):
    top_k = 8 if case == "topk_eq_num_experts" else 2
    model, (x_BSH,) = BUILTIN_MODELS[DEFAULT_BUILTIN](top_k=top_k)
    if case == "single_token":
        x_BSH = x_BSH[:1, :1]
    if case in ("one_expert", "empty_expert"):
        # LayerNorm output has zero mean, so shift it with the norm's bias instead.
        for layer in model.layers:
            with torch.no_grad():
                layer.norm.bias[0] = 10.0
            _rig_router_rows(layer.moe.router.weight, case)
    return model, (x_BSH,), lambda out: out


def _top_k_choices(model: torch.nn.Module, args: tuple, which: str) -> list[torch.Tensor]:
    """Each MoE layer's chosen experts [T, K], recorded on an eager copy."""
    model = copy.deepcopy(model).eval()
    choices: list[torch.Tensor] = []
    if which == "mixtral":
        routers = [layer.mlp.gate for layer in model.model.layers]
        hook = lambda mod, inp, out: choices.append(out[2])  # (logits, weights, indices)
    else:
        routers = [layer.moe.router for layer in model.layers]
        k = model.layers[0].moe.top_k
        hook = lambda mod, inp, out: choices.append(out.topk(k, dim=-1).indices)  # noqa: E731
    handles = [router.register_forward_hook(hook) for router in routers]
    with torch.no_grad():
        model(*args)
    for handle in handles:
        handle.remove()
    return choices


def _check_precondition(case: str, choices: list[torch.Tensor]) -> None:
    assert choices, "no router ran"
    for idx_TK in choices:
        if case == "one_expert":
            assert (idx_TK[:, 0] == 0).all() and (idx_TK[:, 1] == 1).all(), idx_TK
        elif case == "empty_expert":
            assert not (idx_TK == EMPTY_EXPERT).any(), idx_TK
            assert idx_TK.unique().numel() > 2, "routing collapsed; the case would not be distinct"
        elif case == "single_token":
            assert idx_TK.shape[0] == 1
        elif case == "topk_eq_num_experts":
            assert sorted(idx_TK[0].tolist()) == list(range(8))


@pytest.mark.parametrize("case", DEGENERATE)
@pytest.mark.parametrize("which", ["mixtral", DEFAULT_BUILTIN])
def test_degenerate_routing(checks, which, case):
    model, args, output = _mixtral_case(case) if which == "mixtral" else _builtin_case(case)
    _check_precondition(case, _top_k_choices(model, args, which))
    checks.compiled_matches_eager(model, args, train=True, output=output, single_graph=False)


def test_builtin_default_is_a_loop_moe():
    # The degenerate cases above reach into LoopMoE's router; keep them honest if the default moves.
    model, _ = BUILTIN_MODELS[DEFAULT_BUILTIN]()
    assert isinstance(model.layers[0].moe, builtin.LoopMoE)


@pytest.mark.parametrize("train", MODES)
def test_switch_capacity_drops_tokens(checks, train):
    # Switch routes top-1 under a per-sequence, per-expert capacity; tokens past it get no expert
    # (the residual carries them). Capacity 2 of 8 tokens per sequence forces drops.
    model, args = make_hf_model("switch_transformers", {"expert_capacity": 2})
    dispatch = []
    router = model.encoder.block[0].layer[1].mlp.router
    handle = router.register_forward_hook(
        lambda mod, inp, out: dispatch.append(next(t for t in out if t.shape[-1] == mod.num_experts
                                                   and bool(((t == 0) | (t == 1)).all()))))  # one-hot [B, S, E]
    with torch.no_grad():
        model(*args)
    handle.remove()
    dropped = bool((dispatch[0].sum(-1) == 0).any())
    import transformers

    if not dropped and tuple(int(v) for v in transformers.__version__.split(".")[:2]) < (5, 23):
        pytest.skip(f"transformers {transformers.__version__}'s Switch router does not apply expert_capacity")
    assert dropped, "no token was dropped; the case would not test capacity"

    checks.compiled_matches_eager(model, args, train=train, output=primary_output)
