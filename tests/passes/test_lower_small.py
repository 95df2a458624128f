"""lower_small: CPU layers with a few slots of tiny experts become plain tensor ops (slots_dense);
compared with eager, forward (fp32 assert_close defaults: the sums run in another order) and
gradients (rtol 1e-4, atol 1e-5 of the model's largest gradient: summed logits make gradients
of order 100, and at one token some are rounding noise around 0); left alone past the size bound and with symbolic shapes."""

import copy

import pytest
import torch

import moec
from moec.backend import moec_backend
from moec.capture.trace import capture_graphs
from moec.cli.bench import resize_args
from moec.codegen.cpu import slots_dense
from moec.models.builtin import BUILTIN_MODELS
from moec.models.hf import make_hf_model
from moec.passes import lower_small as ls
from moec.passes.pipeline import check_graph, op_counts, run_pipeline

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
NAMES = sorted(BUILTIN_MODELS) + ["mixtral", "qwen2_moe", "deepseek_v3"]


def _subject(name, tokens=None):
    model, args = BUILTIN_MODELS[name]() if name in BUILTIN_MODELS else make_hf_model(name)
    if tokens is not None:
        args = resize_args(model, args, tokens, torch.Generator().manual_seed(3))
    return model, args


def _dense_calls(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is slots_dense)


def _recording(graphs):
    def backend(gm, example_inputs):
        out = moec_backend(gm, example_inputs)
        graphs.append(gm)
        return out

    backend._moec_backend = True
    return backend


@pytest.mark.parametrize("name", NAMES)
def test_small_layers_lower_to_dense_slots_and_keep_the_graph_valid(name):
    model, args = _subject(name, tokens=1)
    (gm,) = capture_graphs(model, *args)
    gm, records = run_pipeline(gm, target="cpu", disable=("fuse_inference",), check=True)
    lowered = next(r for r in records if r.name == "lower_small").changes
    assert lowered == _dense_calls(gm) >= 1
    assert "moec_cpu::grouped_gemm_combine" not in op_counts(gm)
    check_graph(gm)
    assert ls.lower_small(gm)[1] == 0


@pytest.mark.parametrize("name, tokens", [(n, t) for n in sorted(BUILTIN_MODELS) for t in (1, 4)]
                         + [("mixtral", 1), ("deepseek_v3", 3)])
def test_compiled_small_layers_equal_eager_forward_and_gradients(name, tokens):
    model, args = _subject(name, tokens=tokens)
    model.eval()
    ref = copy.deepcopy(model)
    graphs = []
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=_recording(graphs))
    out, want = compiled(*args), ref(*args)
    out, want = (out.logits, want.logits) if hasattr(out, "logits") else (out, want)
    torch.testing.assert_close(out, want)
    assert len(graphs) == 1 and _dense_calls(graphs[0]) >= 1  # lowered, and no graph break or fallback
    out.float().sum().backward()
    want.float().sum().backward()
    scale = max(q.grad.abs().max().item() for q in ref.parameters() if q.grad is not None)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{n}: {m}")


def test_degenerate_routing_top_k_equal_to_experts_and_one_expert():
    for kw in ({"num_experts": 4, "top_k": 4}, {"num_experts": 1, "top_k": 1}):
        model, args = BUILTIN_MODELS["stacked-bmm"](**kw)
        model.eval()
        torch._dynamo.reset()
        with torch.no_grad():
            torch.testing.assert_close(moec.compile(copy.deepcopy(model))(*args), model(*args))


def test_large_slots_keep_the_grouped_path(monkeypatch):
    model, args = _subject("moe-mlp", tokens=1)
    (gm,) = capture_graphs(model, *args)
    monkeypatch.setattr(ls, "SMALL_BYTES", 1024)
    gm, records = run_pipeline(gm, target="cpu", disable=("fuse_inference",))
    assert next(r for r in records if r.name == "lower_small").changes == 0
    assert op_counts(gm)["moec_cpu::grouped_gemm_combine"] == 2


def test_symbolic_shapes_keep_the_grouped_path():
    model, _ = _subject("moe-mlp")
    model.eval()
    graphs = []
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=_recording(graphs), dynamic=True)
    with torch.no_grad():
        for tokens in (3, 5):
            (x,) = resize_args(model, (torch.zeros(1, 1, 64),), tokens, torch.Generator().manual_seed(0))
            torch.testing.assert_close(compiled(x), model(x))
    assert graphs and all(_dense_calls(gm) == 0 for gm in graphs)
