"""fuse_inference: a CPU layer's four ops become one moec_cpu::moe_inference in graphs that compute
no gradient; bitwise equal to the unfused ops; left alone when gradients are needed or an
intermediate has another reader."""

import copy
import operator

import pytest
import torch

import moec
from moec.capture.trace import capture_graphs
from moec.models.builtin import BUILTIN_MODELS
from moec.models.hf import make_hf_model
from moec.passes.fuse_inference import fuse_inference
from moec.passes.pipeline import check_graph, op_counts, run_pipeline

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _subject(name):
    return BUILTIN_MODELS[name]() if name in BUILTIN_MODELS else make_hf_model(name)


def _lowered(name, disable=()):
    model, args = _subject(name)
    model.eval()
    (gm,) = capture_graphs(model, *args)
    gm, _ = run_pipeline(gm, target="cpu", disable=("lower_small", "fuse_inference", *disable), check=True)
    return model, args, gm


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS) + ["mixtral", "qwen2_moe"])
def test_every_layer_fuses_once_and_the_graph_stays_valid(name):
    model, args, gm = _lowered(name)
    layers = op_counts(gm).get("moec_cpu::grouped_gemm_combine", 0)
    assert layers >= 1
    with torch.no_grad():
        gm, changes = fuse_inference(gm, None)
    assert changes == layers
    check_graph(gm)
    left = op_counts(gm)
    assert left.get("moec_cpu::moe_inference") == layers
    for gone in ("gate", "permute", "grouped_gemm_act", "grouped_gemm_combine"):
        assert f"moec_cpu::{gone}" not in left
    assert not [n for n in gm.graph.nodes if n.target is operator.getitem and not n.users]
    assert fuse_inference(gm, None)[1] == 0


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS) + ["mixtral", "deepseek_v3"])
def test_compiled_without_gradients_is_bitwise_the_unfused_ops(name):
    model, args = _subject(name)
    model.eval()
    outs = []
    for disable in (("lower_small",), ("lower_small", "fuse_inference")):  # tiny layers: keep the grouped ops
        torch._dynamo.reset()
        compiled = moec.compile(copy.deepcopy(model), disable=list(disable), inner="aot_eager")
        with torch.no_grad():
            out = compiled(*args)
        outs.append(out.logits if hasattr(out, "logits") else out)
    assert torch.equal(outs[0], outs[1])
    with torch.no_grad():
        ref = model(*args)
    torch.testing.assert_close(outs[0], ref.logits if hasattr(ref, "logits") else ref)


def test_graphs_that_compute_gradients_are_left_alone():
    _, _, gm = _lowered("moe-mlp")
    needs = [torch.zeros(2, requires_grad=True)]
    with torch.enable_grad():
        assert fuse_inference(gm, needs)[1] == 0
    with torch.no_grad():  # the same inputs, gradients off: fused
        assert fuse_inference(gm, needs)[1] == 2


def test_training_through_moec_still_gets_gradients():
    model, args = _subject("moe-mlp")
    ref = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = moec.compile(model, inner="aot_eager", disable=["lower_small"])
    compiled(*args).sum().backward()
    ref(*args).sum().backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{n}: {m}")


def test_an_intermediate_with_another_reader_keeps_the_chain():
    _, _, gm = _lowered("moe-mlp")
    gate = next(n for n in gm.graph.nodes if "moec_cpu.gate" in str(n.target))
    weights = next(u for u in gate.users if u.args[1] == 0)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        extra = gm.graph.call_function(torch.sum, (weights,))
    out.args = ((*out.args[0], extra),) if isinstance(out.args[0], tuple) else ((out.args[0], extra),)
    gm.recompile()
    with torch.no_grad():
        gm, changes = fuse_inference(gm, None)
    assert changes == 1  # the other layer only
    assert op_counts(gm)["moec_cpu::gate"] == 1


@pytest.mark.parametrize("name", ["moe-mlp", "sort-split", "shared-expert"])
def test_padded_layers_are_bitwise_the_unfused_ops(name, monkeypatch):
    """At 128 tokens the experts' products run padded (``moec.codegen.cpu._padded``); the fused op
    keeps the activations padded between its two products, the unfused ops un-pad and re-pad them:
    the same values either way."""
    from moec.cli.bench import resize_args
    from moec.codegen import cpu

    layouts = []
    real_layout = cpu._padded_layout
    monkeypatch.setattr(cpu, "_padded_layout", lambda *a: layouts.append(1) or real_layout(*a))
    model, args = _subject(name)
    model.eval()
    (x,) = resize_args(model, args, 128, torch.Generator().manual_seed(0))
    outs = []
    for disable in (("lower_small",), ("lower_small", "fuse_inference")):
        torch._dynamo.reset()
        compiled = moec.compile(copy.deepcopy(model), disable=list(disable), inner="aot_eager")
        with torch.no_grad():
            outs.append(compiled(x))
    assert layouts, "no layer ran padded"
    assert torch.equal(outs[0], outs[1])
    with torch.no_grad():
        torch.testing.assert_close(outs[0], model(x))
