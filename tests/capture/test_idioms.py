"""moec captures every hand-written MoE idiom whole and computes what eager computes.

Two parts:
* The builtin models (``moec.models.builtin``): a Python loop with ``torch.where``/``nonzero`` +
  ``index_add_``, gathered stacked weights through ``bmm``, a sort + ``split(bincount().tolist())``
  permute, a shared expert, each in a two-block model. Plain ``aot_eager`` breaks 6-9 times on the
  loop and sort-split idioms; with moec each must be one graph with no break, equal to eager
  (outputs and every gradient), and ``moec.inspect`` must find its two MoE blocks.
* The issue's idiom list, each idiom in at least two spellings: single layers of
  ``moec.models.random_moe`` written out as explicit specs (see the comment above ``IDIOM_SPECS``).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import math

import pytest
import torch
from torch._dynamo.utils import counters

import moec
from moec.cli.fuzz import degenerate_calls, differential
from moec.models.builtin import BUILTIN_MODELS, HIDDEN, INTERMEDIATE, expected_moe_layers
from moec.models.random_moe import LayerSpec, Names, build, describe

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


# ================================================================================================
# The idiom list, each idiom in at least two spellings (``moec.models.random_moe`` layers
# written out as explicit specs). For each entry:
# * ``moec.inspect`` finds exactly one MoE layer, with the entry's number of experts and top-k,
#   and no graph break;
# * ``torch.compile(layer, backend="moec", options={"inner": "aot_eager"})`` matches an eager
#   copy in train mode, forward and every gradient (parameters and input; fp32 assert_close
#   defaults, ``moec.cli.fuzz.compare``), with no graph break, on 12 random tokens and then on 12
#   identical tokens (all on the same k experts, the others empty; not for Expert Choice, where
#   identical tokens tie and which of them an expert takes is arbitrary).
# Degenerate routing beyond that: one token, top-k = E, capacity drops (checked to happen).
# ================================================================================================

TOKENS = 12

BASE = LayerSpec(num_experts=4, top_k=2, hidden=16, intermediate=8, renorm="sum")
# Names no capture should count on: nothing is called experts, router, gate or top_k.
ODD = Names(layer_class="ConditionalFFN", expert_class="PositionwiseFF", experts_class="ExpertBank",
            router_class="TokenChooser", mlp_class="AlwaysOn", norm_class="T5LayerNorm", linear_class="Linear",
            experts="bank", router="selector", router_weight="proj", correction_bias="moe_statics",
            shared="always_on", shared_gate="shared_coef", dense="parallel_mlp", norm="ffn_norm",
            num_experts="expert_count", top_k="experts_per_token", linear_weight="kernel", expert_key="ffn_",
            matrices=("W_g", "W_in", "W_out", "W_gi"))
ODD_UNGATED = dataclasses.replace(ODD, matrices=("", "c_fc", "c_proj", ""))


def S(**kw) -> LayerSpec:
    if kw.get("gated") is False:
        kw.setdefault("activation", "relu")
        kw.setdefault("names", dataclasses.replace(BASE.names, matrices=("", "fc1", "fc2", "")))
    return dataclasses.replace(BASE, **kw)


GROUPED = dict(router="grouped_topk", num_experts=8, num_groups=4, topk_groups=2)

# id -> spec; ``idioms_of`` derives what each covers, and a test checks every idiom is covered twice.
# Each entry packs several axes, to keep the file fast.
IDIOM_SPECS: dict[str, LayerSpec] = {
    # Python loops over a list of expert modules
    "mixtral-where-index-add": S(),
    "nonzero-accumulate-odd-names-BSH": S(input_rank=3, flatten="view", names=ODD, expert_linear="custom_out_in",
                                          container="children", spelling="nonzero_accumulate", activation="gelu",
                                          renorm="none", norm="layernorm"),
    "tolist-continue-bare-params-bias": S(expert_linear="raw_params", first="HF", second="IH", ffn_bias=True,
                                          container="module_dict", spelling="tolist_continue", router="topk_softmax",
                                          renorm="none", router_weight="linear_bias", activation="gelu_tanh",
                                          names=ODD),
    "sort-split-custom-linear-in-out": S(expert_linear="custom_in_out", gated=False, activation="relu2",
                                         names=ODD_UNGATED, spelling="sort_split", renorm="none",
                                         router_weight="param_he"),
    "expert-hit-fused-gate-up-router-module": S(gate_up="gate_first", ffn_bias=True, spelling="expert_hit",
                                                activation="relu", act_module=True, router="sigmoid_topk",
                                                score_fn="sigmoid", correction_bias="buffer", router_holder="module"),
    "experts-forward-list-shared": S(holder="child_forward", container="module_dict", gated=False, activation="silu",
                                     act_module=True, spelling="tolist_continue", router="sigmoid_topk",
                                     score_fn="sigmoid", renorm="none", router_weight="param_flinear",
                                     shared_expert="plain", shared_intermediate=16),
    "dense-mask-children-shared-gated-dense": S(spelling="dense_mask", container="children", activation="gelu",
                                                expert_linear="raw_params", gate_up="up_first",
                                                shared_expert="sigmoid_gated", dense_branch=True),
    # stacked [E, ., .] weights
    "stacked-interleaved-gathered-bmm-BSH": S(layout="stacked", gate_up="interleaved", spelling="gathered_bmm",
                                              input_rank=3, flatten="flatten", activation="relu", renorm="l2",
                                              routed_scaling=2.5),
    "stacked-HF-IH-bias-gathered-einsum": S(layout="stacked", first="HF", second="IH", ffn_bias=True, gated=False,
                                            activation="gelu_tanh", spelling="gathered_einsum", router="topk_softmax",
                                            renorm="none", router_weight="param_he", names=ODD_UNGATED),
    "stacked-weights-child-nonzero-rmsnorm": S(layout="stacked", holder="child", gated=False, activation="relu",
                                               spelling="nonzero_accumulate", input_rank=3,
                                               norm="rmsnorm", shared_expert="sigmoid_gated"),
    "stacked-experts-forward-deepseek-v3": S(**GROUPED, layout="stacked", holder="child_forward", gate_up="up_first",
                                             first="HF", second="HI", spelling="expert_hit", score_fn="sigmoid",
                                             group_score="top2sum", correction_bias="buffer", routed_scaling=2.5,
                                             shared_expert="plain"),
    "stacked-gpt-oss-dense-mask": S(router="topk_softmax", renorm="none", router_weight="linear_bias",
                                    activation="clamped_swiglu", clamp_limit=1.0, gate_up="interleaved",
                                    ffn_bias=True, layout="stacked", first="HF", second="IH", spelling="dense_mask"),
    "stacked-sort-split-layernorm": S(layout="stacked", gate_up="gate_first", spelling="sort_split", input_rank=3,
                                      norm="layernorm", activation="relu", router="sigmoid_topk", score_fn="sigmoid",
                                      correction_bias="parameter", routed_scaling=2.5,
                                      router_weight="param_matmul_t"),
    "stacked-tolist-continue-bias": S(layout="stacked", first="HF", second="IH", ffn_bias=True,
                                      spelling="tolist_continue", gate_up="separate", activation="gelu_tanh",
                                      act_module=True),
    # DBRX's flat [E*I, H] weights
    "flat-dbrx-where-l1": S(layout="flat", first="FH", second="IH", renorm="l1", names=ODD,
                            router_weight="param_matmul_t"),
    "flat-sort-split-child": S(layout="flat", first="FH", second="IH", gated=False, activation="silu",
                               spelling="sort_split", holder="child", input_rank=3),
    "flat-gathered-einsum-dense-branch": S(layout="flat", first="FH", second="IH", spelling="gathered_einsum",
                                           activation="gelu", dense_branch=True, norm="nn_rmsnorm"),
    # routers with groups, capacity, expert choice
    "grouped-softmax-max-router-module": S(**GROUPED, score_fn="softmax", group_score="max", group_fill="zero",
                                           renorm="none", routed_scaling=16.0, router_holder="module", names=ODD,
                                           gated=False, activation="gelu", spelling="tolist_continue"),
    "switch-top1-fixed-onehot": S(router="capacity", top_k=1, renorm="none", capacity_mode="fixed", capacity=2,
                                  spelling="onehot_einsum", gated=False, activation="relu", ffn_bias=True),
    "switch-top1-floor-loop": S(router="capacity", top_k=1, renorm="none", capacity_mode="floor",
                                capacity_factor=0.5, spelling="capacity_loop", container="module_dict",
                                gated=False, activation="relu2"),
    "gshard-top2-ceil-choice-onehot": S(router="capacity", capacity_mode="ceil", capacity_factor=0.5,
                                        priority="choice", spelling="onehot_einsum", layout="stacked",
                                        activation="gelu"),
    "gshard-top2-fixed-token-loop": S(router="capacity", renorm="none", capacity_mode="fixed", capacity=3,
                                      priority="token", spelling="capacity_loop", names=ODD, activation="gelu_tanh"),
    "expert-choice-loop-clamped": S(router="expert_choice", renorm="none", capacity_factor=1.0, spelling="ec_loop",
                                    activation="clamped_swiglu", clamp_limit=1.0, gate_up="separate"),
    "expert-choice-batched-stacked": S(router="expert_choice", renorm="none", capacity_factor=0.5,
                                       spelling="ec_batched", layout="stacked", names=ODD_UNGATED, gated=False,
                                       activation="gelu"),
    "expert-choice-onehot": S(router="expert_choice", renorm="none", capacity_factor=1.25, spelling="ec_onehot",
                              gated=False, activation="gelu_tanh", gate_up="separate"),
}

# The idioms of the issue, as ``idioms_of`` names them; each must be covered by two entries or more.
REQUIRED_IDIOMS = (
    ["rank:[T,H]", "rank:[B,S,H]",
     "layout:custom-linear", "layout:bare-params", "layout:three-matrices", "layout:two-matrices", "layout:bias",
     "layout:no-bias", "layout:stacked", "layout:flat", "layout:module-list", "layout:module-dict",
     "layout:children", "layout:experts-forward", "layout:odd-names", "gathered",
     "router:softmax_topk", "router:renorm", "router:no-renorm", "router:topk_softmax", "router:sigmoid_topk",
     "router:correction-bias", "router:grouped_topk", "router:routed-scaling", "router:weight-linear-bias",
     "router:weight-param", "router:module", "router:capacity", "router:capacity-top1", "router:capacity-top2",
     "router:expert_choice",
     "ffn:split-gate-first", "ffn:split-up-first", "ffn:split-interleaved", "ffn:separate", "ffn:act-module",
     "block:residual-norm", "block:shared", "block:shared-sigmoid", "block:dense-branch",
     "python:tolist-continue", "python:where-loop", "python:index_add_", "python:y[idx]+=",
     "python:split(counts.tolist())", "python:argsort-unsort", "python:one-hot-einsum", "python:dense-mask"]
    + [f"ffn:gated-{a}" for a in ("silu", "gelu", "gelu_tanh", "relu", "clamped_swiglu")]
    + [f"ffn:ungated-{a}" for a in ("relu", "relu2", "gelu", "gelu_tanh", "silu")]
)


def idioms_of(s: LayerSpec) -> set[str]:
    out = {"rank:[T,H]" if s.input_rank == 2 else "rank:[B,S,H]", f"router:{s.router}",
           "ffn:" + ("gated-" if s.gated else "ungated-") + s.activation,
           "layout:bias" if s.ffn_bias else "layout:no-bias", f"layout:{s.layout}"}
    if s.layout == "list":
        out.add({"module_list": "layout:module-list", "module_dict": "layout:module-dict",
                 "children": "layout:children"}[s.container])
        out.add({"nn_linear": "layout:nn-linear", "custom_out_in": "layout:custom-linear",
                 "custom_in_out": "layout:custom-linear", "raw_params": "layout:bare-params"}[s.expert_linear])
    out.add("layout:three-matrices" if s.gated and s.gate_up == "separate" else "layout:two-matrices")
    if s.holder == "child_forward":
        out.add("layout:experts-forward")
    if s.names.experts != "experts" and s.names.router not in ("gate", "router"):
        out.add("layout:odd-names")
    if s.spelling.startswith("gathered"):
        out.add("gathered")
    if s.router in ("softmax_topk", "sigmoid_topk", "grouped_topk", "capacity"):
        out.add("router:renorm" if s.renorm != "none" else "router:no-renorm")
    if s.correction_bias != "none":
        out.add("router:correction-bias")
    if s.routed_scaling != 1.0:
        out.add("router:routed-scaling")
    if s.router_weight == "linear_bias":
        out.add("router:weight-linear-bias")
    if s.router_weight.startswith("param"):
        out.add("router:weight-param")
    if s.router_holder == "module":
        out.add("router:module")
    if s.router == "capacity":
        out.add(f"router:capacity-top{s.top_k}")
    if s.gated:
        out.add(f"ffn:{s.gate_up}" if s.gate_up == "separate" else f"ffn:split-{s.gate_up.replace('_', '-')}")
    if s.act_module and s.activation != "clamped_swiglu":
        out.add("ffn:act-module")
    if s.norm != "none":
        out.add("block:residual-norm")
    if s.shared_expert != "none":
        out.add("block:shared")
    if s.shared_expert == "sigmoid_gated":
        out.add("block:shared-sigmoid")
    if s.dense_branch:
        out.add("block:dense-branch")
    spelling = {
        "where_index_add": ["python:where-loop", "python:index_add_"],
        "nonzero_accumulate": ["python:where-loop", "python:y[idx]+="],
        "tolist_continue": ["python:tolist-continue", "python:where-loop", "python:index_add_"],
        "expert_hit": ["python:where-loop", "python:index_add_"],
        "sort_split": ["python:split(counts.tolist())", "python:argsort-unsort"],
        "dense_mask": ["python:dense-mask"],
        "onehot_einsum": ["python:one-hot-einsum"],
        "capacity_loop": ["python:where-loop", "python:index_add_"],
        "ec_loop": ["python:index_add_"],
        "ec_batched": [],
        "ec_onehot": ["python:one-hot-einsum"],
    }
    out.update(spelling.get(s.spelling, []))
    return out


def test_idiom_table_covers_every_idiom_twice():
    seen = collections.Counter(i for spec in IDIOM_SPECS.values() for i in idioms_of(spec))
    thin = {i: seen[i] for i in REQUIRED_IDIOMS if seen[i] < 2}
    assert not thin, f"idioms with fewer than two spellings: {thin}"
    for name, spec in IDIOM_SPECS.items():  # the table itself builds and runs eagerly
        layer, make_input = build(spec, seed=0)
        assert torch.isfinite(layer(make_input(TOKENS))).all(), name


def _check_inspect(spec: LayerSpec, tokens: int = TOKENS) -> None:
    layer, make_input = build(spec, seed=0)
    report = moec.inspect(layer, make_input(tokens, seed=5))
    found = [(m.num_experts, m.top_k) for m in report.moe_layers]
    why = "; ".join(f"{f.location}: {f.reason}" for f in report.fallbacks)[:1500]
    assert found == [(spec.num_experts, spec.top_k)], f"{describe(spec)}\nfound {found}; {why}"
    assert report.graph_breaks == 0, why


def _check_compiled(spec: LayerSpec, calls=None) -> None:
    if calls is None:  # random tokens, then identical ones where that is well defined
        calls = [(TOKENS, False)] + degenerate_calls(spec, TOKENS)
    layer, make_input = build(spec, seed=0)
    ref = copy.deepcopy(layer)
    compiled = torch.compile(layer, backend="moec", options={"inner": "aot_eager"})
    mismatches = differential(layer, ref, make_input, calls, compiled)
    assert not mismatches, describe(spec) + "\n" + "\n".join(
        f"call {m['call']} (T={m['tokens']}, identical={m['identical']}): {m['error']}" for m in mismatches[:6])
    assert dict(counters["graph_break"]) == {}, dict(counters["graph_break"])


@pytest.mark.parametrize("name", list(IDIOM_SPECS))
def test_idiom_inspect_finds_the_layer(name):
    _check_inspect(IDIOM_SPECS[name])


@pytest.mark.parametrize("name", list(IDIOM_SPECS))
def test_idiom_compiled_matches_eager(name):
    _check_compiled(IDIOM_SPECS[name])


# --- degenerate routing ---------------------------------------------------------------------------

ONE_TOKEN = ["mixtral-where-index-add", "sort-split-custom-linear-in-out", "stacked-interleaved-gathered-bmm-BSH",
             "stacked-experts-forward-deepseek-v3", "gshard-top2-ceil-choice-onehot", "expert-choice-batched-stacked"]


@pytest.mark.parametrize("name", ONE_TOKEN)
def test_one_token(name):
    _check_compiled(IDIOM_SPECS[name], calls=((1, False),))


TOP_K_IS_E = {
    "loop": S(top_k=4, renorm="none", spelling="tolist_continue"),
    "gathered": S(top_k=4, layout="stacked", spelling="gathered_einsum", router="topk_softmax", renorm="none"),
}


@pytest.mark.parametrize("name", list(TOP_K_IS_E))
def test_top_k_equals_num_experts(name):
    spec = TOP_K_IS_E[name]
    _check_inspect(spec)
    torch._dynamo.reset()
    counters.clear()
    _check_compiled(spec)


CAPACITY = [n for n, s in IDIOM_SPECS.items() if s.router in ("capacity", "expert_choice")]


@pytest.mark.parametrize("name", CAPACITY)
def test_capacity_drops_tokens(name):
    """The capacity entries really drop assignments on their inputs (so their tests above cover
    drops): a token none of whose experts kept it gets no MoE output; Expert Choice with capacity
    factor < 1 leaves some token unpicked."""
    spec = IDIOM_SPECS[name]
    layer, make_input = build(spec, seed=0)
    x = make_input(TOKENS, seed=0)
    with torch.no_grad():
        out = layer(x).reshape(-1, spec.hidden)
    kept = int((out.abs().sum(-1) != 0).sum())
    if spec.router == "capacity":
        cap = {"fixed": spec.capacity, "ceil": math.ceil(spec.capacity_factor * TOKENS * spec.top_k / 4),
               "floor": max(int(spec.capacity_factor * TOKENS * spec.top_k / 4), 1)}[spec.capacity_mode]
        assert cap * spec.num_experts < TOKENS * spec.top_k, "capacity leaves room for every assignment"
        if spec.top_k == 1:
            assert kept <= cap * spec.num_experts < TOKENS
    elif spec.capacity_factor < 1:
        assert kept < TOKENS


def test_bf16_layer():
    spec = S(dtype="bfloat16", layout="stacked", spelling="gathered_bmm", norm="rmsnorm")
    _check_inspect(spec)
    torch._dynamo.reset()
    counters.clear()
    _check_compiled(spec)
