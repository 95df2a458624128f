"""The capture hook: torch.compile(backend="moec") converts before tracing; eager stays eager."""

import copy

import torch

import moec
from moec.capture import hook
from moec.models.builtin import BUILTIN_MODELS, DEFAULT_BUILTIN


def test_compile_converts_model_before_tracing_and_keeps_eager_calls_eager():
    model, args = BUILTIN_MODELS[DEFAULT_BUILTIN]()
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="moec", options={"inner": "eager"})
    torch.testing.assert_close(compiled(*args), reference(*args))
    converted = [m for m in model.modules() if hasattr(m, "_moec_original_forward")]
    assert converted, "the moec compile hook did not convert the MoE layers"
    # Outside a moec trace the module runs its own code: bitwise equal to the untouched copy.
    assert torch.equal(model(*args), reference(*args))
    assert not hook.capture_active()


def test_hooks_survive_dynamo_reset():
    torch._dynamo.reset()
    handler = torch._dynamo.callback.callback_handler
    assert hook._on_compile_start in handler.start_callbacks
    assert hook._on_compile_end in handler.end_callbacks


def test_other_backends_do_not_see_moec_ops():
    model, args = BUILTIN_MODELS[DEFAULT_BUILTIN]()
    moec.inspect(model, *args)  # converts the model
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, backend=backend)(*args)
    assert seen and not any("moec" in t for t in seen)


def test_graph_shows_moec_ops():
    model, args = BUILTIN_MODELS[DEFAULT_BUILTIN]()
    report = moec.inspect(model, *args)
    text = "\n".join(report.graphs)
    for op in ("moec.route", "moec.dispatch", "moec.expert_ffn", "moec.combine"):
        assert op in text
