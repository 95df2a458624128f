"""Module-list experts packed once (moec.capture.pack): graphs without gradients read the packed
weights instead of stacking every expert's on each call, and stay equal to eager whatever
happens to the parameters afterwards. Tolerance: fp32 assert_close defaults (moec's expert FFN
is not the eager loop's summation order)."""

import copy

import pytest
import torch
import torch.nn as nn

from moec.backend import moec_backend
from moec.capture.pack import KEYS, PackError, _views
from moec.models.builtin import BUILTIN_MODELS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _compiled(model):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return moec_backend(gm, example_inputs)

    backend._moec_backend = True
    torch._dynamo.reset()
    return torch.compile(model, backend=backend), graphs


def _stacks(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function"
               and getattr(n.target, "__name__", "") in ("stack", "cat"))


def _pair(name="moe-mlp"):
    model, args = BUILTIN_MODELS[name]()
    model.eval()
    return model, copy.deepcopy(model), args


def _param(model, name):
    return dict(model.named_parameters())[name]


def test_inference_graph_reads_packed_weights_without_stacking():
    model, ref, args = _pair()
    params = {n: p for n, p in model.named_parameters()}
    compiled, graphs = _compiled(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), ref(*args))
    assert graphs and all(_stacks(gm) == 0 for gm in graphs)
    # the same Parameter objects, now views of the packed buffers; state_dict keys unchanged
    assert {n: p for n, p in model.named_parameters()} == params
    packed = [n for n, _ in model.named_buffers() if "_moec_packed_" in n]
    assert packed and not any("_moec_packed_" in k for k in model.state_dict())
    assert model.state_dict().keys() == ref.state_dict().keys()
    expert = _param(model, "layers.0.moe.experts.1.w1.weight")
    buf = dict(model.named_buffers())["layers.0.moe.experts._moec_packed_w_in"]
    assert expert.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()


def test_training_graph_still_stacks_and_gradients_reach_each_expert():
    model, ref, args = _pair()
    model.train(), ref.train()
    compiled, graphs = _compiled(model)
    compiled(*args).sum().backward()
    ref(*args).sum().backward()
    assert any(_stacks(gm) > 0 for gm in graphs)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m: f"{n}: {m}")


def _rebind_weight(model, name, value):
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner), leaf, nn.Parameter(value))


@pytest.mark.parametrize("change", ["in_place", "setattr", "data", "load_state_dict", "assign", "optimizer"])
def test_parameter_changes_after_compile_are_seen(change):
    model, ref, args = _pair()
    compiled, _ = _compiled(model)
    with torch.no_grad():
        compiled(*args)
    name = "layers.1.moe.experts.2.w2.weight"
    if change == "in_place":
        with torch.no_grad():
            for m in (model, ref):
                _param(m, name).mul_(3.0)
    elif change == "setattr":
        value = torch.randn_like(_param(model, name))
        _rebind_weight(model, name, value.clone())
        _rebind_weight(ref, name, value.clone())
    elif change == "data":
        for m in (model, ref):
            _param(m, name).data = _param(m, name).data * -2.0
    elif change in ("load_state_dict", "assign"):
        state = {k: v * 1.5 for k, v in ref.state_dict().items()}
        model.load_state_dict(state, assign=change == "assign")
        ref.load_state_dict(state, assign=change == "assign")
    else:  # a training step through the compiled model, then evaluation
        for m, f in ((model, compiled), (ref, ref)):
            opt = torch.optim.SGD(m.parameters(), lr=0.01)
            m.train()
            f(*args).sum().backward()
            opt.step()
            m.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), ref(*args))


def test_repacking_inside_inference_mode_leaves_ordinary_parameters():
    model, ref, args = _pair()
    compiled, _ = _compiled(model)
    name = "layers.0.moe.experts.5.w3.weight"
    with torch.inference_mode():
        compiled(*args)
    for m in (model, ref):
        _param(m, name).data = _param(m, name).data + 1.0
    with torch.inference_mode():
        torch.testing.assert_close(compiled(*args), ref(*args))
    assert not _param(model, name).is_inference()
    with torch.no_grad():
        for m in (model, ref):
            _param(m, name).mul_(0.5)  # in place, outside inference mode
        torch.testing.assert_close(compiled(*args), ref(*args))


def test_module_to_after_compile_repacks():
    model, ref, args = _pair()
    compiled, _ = _compiled(model)
    with torch.no_grad():
        compiled(*args)
        model.double(), ref.double()
        args64 = tuple(a.double() if a.is_floating_point() else a for a in args)
        torch.testing.assert_close(compiled(*args64), ref(*args64))


def test_a_dtype_change_behind_the_buffers_raises_then_recovers():
    model, ref, args = _pair()
    compiled, _ = _compiled(model)
    with torch.no_grad():
        compiled(*args)
        for n, p in model.named_parameters():
            if ".experts." in n:
                p.data = p.data.double()
        for n, p in ref.named_parameters():
            if ".experts." in n:
                p.data = p.data.double()
        with pytest.raises(PackError, match="call the model again"):
            compiled(*args)
        with pytest.raises(Exception):  # the eager model itself mixes dtypes now
            ref(*args)


class _Odd(nn.Module):
    """One fused gate/up matrix stored up-first: not a strided view of moec's gate-first layout."""

    def __init__(self, H, I):
        super().__init__()
        self.up_gate = nn.Linear(H, 2 * I, bias=False)
        self.down = nn.Linear(I, H, bias=False)

    def forward(self, x):
        up, gate = self.up_gate(x).chunk(2, dim=-1)
        return self.down(nn.functional.silu(gate) * up)


class _ListMoE(nn.Module):
    def __init__(self, make, H=16, I=8, E=4, K=2):
        super().__init__()
        self.gate = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList(make(H, I) for _ in range(E))
        self.K = K

    def forward(self, x):
        w, idx = self.gate(x).softmax(-1).topk(self.K, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(idx == e)
            if tok.numel():
                out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])
        return out


def test_unpackable_layout_keeps_stacking_and_stays_equal():
    torch.manual_seed(0)
    model = _ListMoE(_Odd).eval()
    ref = copy.deepcopy(model)
    x = torch.randn(12, 16)
    compiled, graphs = _compiled(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref(x))
    assert not any("_moec_packed_" in n for n, _ in model.named_buffers())
    assert any(_stacks(gm) > 0 for gm in graphs)


def test_views_are_found_for_separate_and_fused_layouts():
    from moec.capture.match import FFNForm

    # gate and up as two [I, H] matrices, down [H, I]: views at offsets 0 and I*H of w_in
    form = FFNForm(w_in=(0, 1), w_in_t=(False, False), w_out=2, w_out_t=False, b_in=(), b_out=None,
                   halves="gate_up", activation="silu", inter=3)
    views = _views(form, [(3, 4), (3, 4), (4, 3)])
    assert views == [(0, (3, 4), (4, 1), 0), (0, (3, 4), (4, 1), 12), (1, (4, 3), (3, 1), 0)]
    swapped = FFNForm(w_in=(0,), w_in_t=(False,), w_out=1, w_out_t=False, b_in=(), b_out=None,
                      halves="up_gate", activation="silu", inter=3)
    assert _views(swapped, [(6, 4), (4, 3)]) is None
    assert KEYS[0] == "w_in"
