"""Find the MoE layers of a model and give each recognised one a canonical ``moec::`` forward.

Contract: ``convert_model(root, example=None)`` finds every MoE-looking module of ``root``
(``candidates``: a router weight and E experts in any layout, at any depth, whatever their
names), learns how each is called (``example=(args, kwargs)``: one eager call of ``root`` is
recorded; without one, the hidden state alone as ``[T, H]`` and ``[B, S, H]``), and recognises
it:

1. observed: the layer is called with its experts zeroed one at a time, which shows the
   routing it did, each expert's contribution and everything else it adds; a canonical layer
   (premap, route, dispatch, expert FFN, combine, plus residual / shared / dense terms) is
   matched to that and verified (``recognise``);
2. components, when that fails: a router module that returns (logits, weights, choice) and an
   experts module taking (x, choice, weights) get canonical forwards each (Hugging Face
   style); the layer's own glue stays as traced PyTorch (``recognisers``).
3. split, for a module never called with a hidden state: two of its methods seen on a recorded
   run routing the hidden state to per-expert [*, K, D] rows and combining such rows back, with
   the model's own code between them (JetMoE's mixture of attention heads), get canonical
   halves (``split``).

A replacement is installed only after it reproduced the module's own forward, per call
signature and per mode (eval; train when the module is deterministic in training), and runs
only while a moec backend traces (``hook.capture_active``) on a verified signature: any other
call runs the module's own code. Identical layers (same class, tensor shapes and attributes)
share one recognition: the plan proved on the first is bound to the others and re-verified on
one probe each, so capture cost grows with the number of distinct layer kinds. Every
MoE-looking module that is left alone gets a ``Fallback`` saying which step failed and how
close the best candidate came. The result is cached on ``root``; a later call with an example
whose signatures were not verified yet extends it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from moec.capture import recognisers as rec
from moec.capture.candidates import Candidate, Orphan, _is_under, expert_tensors, find_candidates, owner_of
from moec.capture.hook import active, capture_active
from moec.capture.match import Miss
from moec.capture.plan import BlockPlan
from moec.capture.probes import (Call, call_module, copied, describe_signature, find_x, record_calls, signature_of,
                                 synthetic_calls)
from moec.capture.recognise import own_forward, recognise, same_kind_key, verify
from moec.capture.specs import ExpertsSpec, FFNSpec, RouterSpec, shared_expert
from moec.capture.split import SplitPlan, install_split, recognise_split, record_methods, verify_split
from moec.report import Fallback, MoELayer


@dataclasses.dataclass
class CaptureResult:
    layers: list[MoELayer]
    fallbacks: list[Fallback]


@dataclasses.dataclass
class _Layer:
    """What capture knows about one MoE-looking module."""

    cand: Candidate
    record: Optional[MoELayer] = None  # set once recognised (by either recogniser)
    notes: list[Fallback] = dataclasses.field(default_factory=list)
    plan: Optional[BlockPlan] = None  # the observed recogniser's plan
    verified: dict = dataclasses.field(default_factory=lambda: {False: set(), True: set()})
    tried: set = dataclasses.field(default_factory=set)  # call signatures already probed
    calls: list = dataclasses.field(default_factory=list)  # the calls probed (recorded, else synthetic)
    seconds: float = 0.0

    def needs(self, calls: list[Call]) -> bool:
        if self.record is not None and self.plan is None:
            return False  # components: converted for good
        if self.record is None and self.cand.__dict__.get("method_calls") and "split_tried" not in self.cand.__dict__:
            return True  # methods seen called on a recorded run: a split layer to try
        return any(signature_of(c) not in self.tried for c in calls)


@dataclasses.dataclass
class _State:
    layers: list[_Layer]
    orphans: list[Orphan]
    kinds: dict  # same_kind_key -> BlockPlan proved on a layer of that kind
    result: Optional[CaptureResult] = None
    recorded: bool = False  # a real call was recorded (probes then follow it)


def convert_model(root: nn.Module, example: Optional[tuple[tuple, dict]] = None,
                  rerun: Optional[Callable[[], object]] = None) -> CaptureResult:
    """``example``: (args, kwargs) of a call of ``root``; ``rerun``: a function that makes such a
    call (the compile hook's frame). Either is run once, eagerly, to record how each layer is
    called; the first recording is kept, later ones are skipped."""
    state = root.__dict__.get("_moec_capture_state")
    if state is None:
        candidates, orphans = find_candidates(root)
        # Experts without a router weight: their module alone may still be recognised.
        for orphan in orphans:
            if orphan.readings:
                first, *rest = orphan.readings
                first.__dict__["alternatives"] = rest
                first.__dict__["orphan"] = orphan
                candidates.append(first)
        state = _State([_Layer(c) for c in candidates], [o for o in orphans if not o.readings], {})
        root.__dict__["_moec_capture_state"] = state
    elif state.recorded or (example is None and rerun is None) or not state.layers:
        return state.result
    if example is not None:
        rerun = lambda: root(*copied(example[0]), **copied(example[1]))  # noqa: E731
    calls = _calls(root, state, rerun)
    was_training = root.training
    for layer in state.layers:
        layer_calls = calls[layer.cand.name]
        if not layer.needs(layer_calls) or _covered(layer, state):
            continue
        start = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=[]):
                _convert(layer, state, layer_calls)
        except Exception as err:  # capture's own failure leaves the layer to its own code, with the reason
            _failed(layer, err)
        layer.tried |= {signature_of(c) for c in layer_calls}
        layer.calls = layer_calls
        layer.seconds += time.perf_counter() - start
    root.train(was_training)
    state.result = _result(state)
    for module in root.modules():
        if module is root or any(k.startswith("_moec_") for k in module.__dict__):
            _copy_as_unconverted(module)
    return state.result


# What capture adds to a module's __dict__: its installed forward and the state behind it.
_INSTALLED = ("forward", "_moec_original_forward", "_moec_experts_spec", "_moec_block_installed",
              "_moec_capture_state", "_moec_pack_holder", "_moec_split_methods", "__deepcopy__", "__getstate__")


def _unconverted_state(module: nn.Module) -> dict:
    """``module.__dict__`` without what capture installed (and its packed expert buffers)."""
    own = module.__dict__
    drop = set(_INSTALLED) | set(own.get("_moec_split_methods", ()))
    if "_moec_original_forward" not in own:
        drop.discard("forward")  # a forward the model itself set
    state = {k: v for k, v in own.items() if k not in drop}
    state["_buffers"] = {k: v for k, v in own["_buffers"].items() if not k.startswith("_moec_packed_")}
    return state


def _copy_as_unconverted(module: nn.Module) -> None:
    """``copy.deepcopy`` and pickling (``torch.save``) of a converted module give the module as
    it was before capture: its installed forwards close over this module (a deep copy would
    compute with this module's parameters) and are local functions (pickle refuses them). A
    moec compile of the copy captures it afresh."""

    def deepcopy(memo: dict) -> nn.Module:
        import copy

        cls = type(module)
        new = cls.__new__(cls)
        memo[id(module)] = new
        new.__dict__.update(copy.deepcopy(_unconverted_state(module), memo))
        return new

    module.__dict__["__deepcopy__"] = deepcopy
    module.__dict__["__getstate__"] = lambda: _unconverted_state(module)


def _calls(root: nn.Module, state: _State, rerun) -> dict[str, list[Call]]:
    """The calls to probe each layer with: recorded from one example call, else synthetic."""
    recorded: dict[str, Call] = {}
    if rerun is not None:
        modules = {layer.cand.name: (layer.cand.module, layer.cand.hidden) for layer in state.layers}
        try:
            recorded = record_calls(root, modules, rerun)
            state.recorded = True
        except Exception:  # the example does not run eagerly: fall back to synthetic probes
            recorded = {}
    out = {}
    not_called = {layer.cand.name: layer.cand.module for layer in state.layers
                  if layer.cand.name not in recorded and layer.cand.router}
    if state.recorded and rerun is not None and not_called:  # parts used through other methods (``split``)
        try:
            methods = record_methods(root, not_called, rerun)
        except Exception:
            methods = {}
        for layer in state.layers:
            layer.cand.__dict__["method_calls"] = methods.get(layer.cand.name, {})
    for layer in state.layers:
        cand = layer.cand
        if cand.name in recorded:
            out[cand.name] = [recorded[cand.name]]
        else:
            like = cand.module.get_parameter(cand.router) if cand.router else next(cand.module.parameters())
            out[cand.name] = synthetic_calls(like, cand.hidden)
            # Recorded, yet never called with a hidden state: its parts are used some other way.
            cand.__dict__["not_called"] = bool(recorded) or state.recorded
    return out


def _failed(layer: _Layer, err: Exception) -> None:
    what = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    if isinstance(err, torch.OutOfMemoryError):
        size = sum(t.numel() * t.element_size() for _, t in expert_tensors(layer.cand)) / 2**30
        what = (f"capture ran out of memory ({what}); observing a layer takes a float32 copy of it when it "
                f"is in half precision, and its experts hold {size:.1f} GiB: capture it where more memory is "
                "free (before other copies of the model are made)")
    if layer.record is None and layer.plan is None:
        _left_alone(layer, f"capture failed: {what}")
    else:
        layer.notes.append(Fallback(layer.cand.name or "<root>", f"capture failed on a new call: {what}"))


def _left_alone(layer: _Layer, why: str) -> None:
    cand = layer.cand
    layer.notes = [Fallback(cand.name or "<root>", f"looks like an MoE layer ({cand.experts.num_experts} experts, "
                                                   f"{cand.experts.layout}) but was left alone: {why}")]


def _convert(layer: _Layer, state: _State, calls: list[Call]) -> None:
    cand = layer.cand
    runnable = [c for c in calls if not isinstance(call_module(cand.module, c), str)]
    if not runnable:
        why = call_module(cand.module, calls[0])
        if not cand.router:  # router-less experts whose block is not called with a hidden state
            orphan = cand.__dict__["orphan"]
            layer.notes = [Fallback(orphan.name or "<root>", orphan.reason())]
        elif layer.record is None and cand.__dict__.get("not_called"):
            cand.__dict__["split_tried"] = True
            found = _split(cand, state)
            if isinstance(found, Miss):
                _left_alone(layer, f"{found}; called as a layer it fails: {why}")
            else:
                install_split(cand.module, found)
                first = cand.__dict__["method_calls"][found.first]
                cand.__dict__["split"] = (found, Call(first.args, first.kwargs, found.x_pos))
                layer.record = _split_record(cand, found)
                layer.notes = []
        elif layer.record is None:
            _left_alone(layer, f"shapes: it fails on a {describe_signature(signature_of(calls[0]))}: {why}")
        return
    if layer.plan is not None:  # recognised before: prove the plan on the new calls too
        new = [c for c in runnable if signature_of(c) not in layer.verified[False]]
        miss = verify(layer.plan, cand.module, new, full=True)
        if miss is None:
            _accept(layer, layer.plan, new)
        else:
            layer.notes.append(Fallback(cand.name or "<root>", f"calls as {describe_signature(signature_of(new[0]))} "
                                                               f"run the model's own code: {miss}"))
        return
    if not cand.router:  # experts without a router weight: only their own module can be recognised
        for hyp in [cand, *cand.__dict__.get("alternatives", [])]:
            experts = _try_experts_module(hyp, [c for c in runnable if c.x.shape[-1] == hyp.hidden] or runnable)
            if not isinstance(experts, Miss):
                layer.cand, layer.record = hyp, experts
                layer.notes = [Fallback(hyp.name or "<root>", "routing kept as the model's own code (no router "
                                                              "weight next to the experts); the experts run as moec ops")]
                return
        orphan = cand.__dict__["orphan"]
        layer.notes = [Fallback(orphan.name or "<root>", f"{orphan.reason()}; its experts module alone: {experts}")]
        return
    key = same_kind_key(cand.module)
    plan = state.kinds.get(key)
    # The reading the kind's plan was proved on (a router and experts other than this layer's
    # first reading, say): the layer is recorded as that reading, with its expert count.
    reading = None if plan is None else next(
        (h for h in [cand, *cand.__dict__.get("alternatives", [])]
         if h.router == plan.router and h.experts == plan.experts), None)
    if reading is not None and verify(plan, cand.module, runnable, full=False) is None:
        layer.cand = reading
    else:
        plan, first_miss = None, None
        for hyp in [cand, *cand.__dict__.get("alternatives", [])]:
            fitting = [c for c in runnable if c.x.shape[-1] == hyp.hidden]
            if not fitting:  # a reading whose hidden size is not the input's (a bias read as a router)
                continue
            found = recognise(hyp, fitting)
            if not isinstance(found, Miss):
                plan, layer.cand = found, hyp
                state.kinds[same_kind_key(hyp.module)] = plan
                break
            first_miss = first_miss or found
        if plan is None:
            components = _try_components(cand)
            if not isinstance(components, str):
                layer.record, layer.notes = components
                return
            experts = _try_experts_module(cand, runnable)
            if not isinstance(experts, Miss):
                layer.record, layer.notes = experts, [Fallback(cand.name or "<root>", (
                    f"routing kept as the model's own code (no canonical router form: {first_miss}); the experts "
                    "run as moec ops"))]
                return
            _left_alone(layer, f"{first_miss}; its experts module alone: {experts}")
            return
    _accept(layer, plan, runnable)


def _try_experts_module(cand: Candidate, calls: list[Call]):
    """Third tier: the layer's routing stays its own code and only its experts module, called
    with (x, expert ids, weights), becomes dispatch -> expert FFN -> combine. Verified on the
    whole layer, forward and gradients. A ``MoELayer`` record, or a ``Miss``."""
    from moec.capture.observe import observe
    from moec.capture.probes import probe_call, probe_shapes
    from moec.capture.recognise import _compare, _compare_grads, _tol, recognise_experts_module

    call = calls[0]
    training = cand.module.training
    cand.module.eval()
    try:
        # 32 tokens, or the recorded shape where the layer takes arguments sized to it (a
        # decoder layer's attention mask).
        for shape in (probe_shapes(call, 32), tuple(call.x.shape)):
            obs = observe(cand, probe_call(call, shape, seed=31)) if shape else "no probe shape"
            if not isinstance(obs, str):
                break
        if isinstance(obs, str):
            return Miss("shapes", obs)
        K = int(obs.member_TE.sum(-1).max())
        found = recognise_experts_module(cand, K)
        if isinstance(found, Miss):
            return found
        spec, past = found
        experts = owner_of(cand)
        _install_experts(experts, spec, past, cand.hidden, call.x.dtype)
        for c in calls:
            with active():
                got = call_module(cand.module, c)
            want = call_module(cand.module, c)
            why = _compare(got, want, _tol(c.x.dtype)) or _compare_grads(
                cand.module, _Active(cand.module), c, _tol(c.x.dtype))
            if why:
                experts.forward = experts.__dict__.pop("_moec_original_forward")
                return Miss("verify", "the layer with its experts module replaced differs", why)
    finally:
        cand.module.train(training)
    return MoELayer(
        name=cand.name, num_experts=cand.experts.num_experts, top_k=K, hidden_size=cand.hidden,
        expert_hidden_size=spec.ffn.expert_hidden_size, router="(the model's own)", num_shared_experts=0,
        activation=spec.ffn.activation, expert_bias=spec.ffn.has_bias, recogniser="experts",
        post_norm="" if spec.post_norm is None else spec.post_norm.describe(),
    )


class _Active:
    """Calls a module with capture active (its installed moec forwards running)."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        with active():
            return self.module(*args, **kwargs)


def _install_experts(experts: nn.Module, spec: ExpertsSpec, past: tuple[str, int], hidden: int,
                     dtype: torch.dtype) -> None:
    """``past``: what ids from E on mean (``recognise._ids_past``): "drop"ped slots, "identity"
    experts below a bound, or ("", 0) never emitted (dispatch raises if they are)."""
    original = experts.__dict__.get("_moec_original_forward", experts.forward)
    E = spec.num_experts
    mode, hi = past

    def forward(x, idx, weights, *args, **kwargs):
        if capture_active() and not args and not kwargs and x.dtype == dtype and x.shape[-1] == hidden:
            x_TH = x.reshape(-1, hidden)
            idx_TK = idx.reshape(x_TH.shape[0], -1)
            weights_TK = weights.reshape(idx_TK.shape)
            extra = None
            if mode == "identity":  # the token itself, times the weights of its identity slots
                ident_TK = (idx_TK >= E) & (idx_TK < hi)
                extra = (weights_TK * ident_TK).sum(-1, keepdim=True).to(x_TH.dtype) * x_TH
                idx_TK = torch.where(ident_TK, torch.full_like(idx_TK, -1), idx_TK)
            elif mode == "drop":
                idx_TK = torch.where(idx_TK >= E, torch.full_like(idx_TK, -1), idx_TK)
            out = spec(x_TH, idx_TK, weights_TK)
            return (out if extra is None else out + extra.to(out.dtype)).reshape(x.shape)
        return original(x, idx, weights, *args, **kwargs)

    experts.forward = forward
    experts._moec_original_forward = original
    experts.__dict__["_moec_experts_spec"] = spec
    _pack(spec)


def _accept(layer: _Layer, plan: BlockPlan, calls: list[Call]) -> None:
    cand = layer.cand
    layer.plan = plan
    sigs = {signature_of(c) for c in calls}
    layer.verified[False] |= sigs
    layer.notes = [n for n in layer.notes if "training mode" not in n.reason]
    train_miss = _verify_training(plan, cand.module, calls)
    if train_miss is None:
        layer.verified[True] |= sigs
    else:
        layer.notes.append(Fallback(cand.name or "<root>", f"training mode runs the model's own code: {train_miss}"))
    if "_moec_block_installed" not in cand.module.__dict__:
        _install(cand.module, plan, layer.verified)
        cand.module.__dict__["_moec_block_installed"] = True
    layer.record = _record(cand, plan)


def _verify_training(plan: BlockPlan, module: nn.Module, calls: list[Call]) -> Optional[str]:
    """None when the module, in training mode, is deterministic and the plan reproduces it."""
    training = module.training
    try:
        module.train()
        for call in calls:
            outs = []
            for seed in (1, 2):
                torch.manual_seed(seed)
                outs.append(call_module(module, call))
            if isinstance(outs[0], str):
                return f"the layer fails in training mode: {outs[0]}"
            if not _equal(outs[0], outs[1]):
                return "the layer is random in training mode (dropout, router noise or sampling)"
        from moec.capture.recognise import _compare, _tol

        fwd = plan.forward(module, lambda x: x.dtype)
        for call in calls:
            torch.manual_seed(1)
            want = call_module(module, call)
            got = call_module(fwd, call)
            why = "moec's forward failed" if isinstance(got, str) else _compare(got, want, _tol(call.x.dtype))
            if why:
                return f"it computes something else in training mode: {why}"
    finally:
        module.train(training)
    return None


def _equal(a, b) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a is b or a == b


def _install(module: nn.Module, plan: BlockPlan, verified: dict) -> None:
    original = module.__dict__.get("_moec_original_forward", module.forward)
    fwd = plan.forward(module, lambda x: x.dtype)
    H = plan.hidden

    def forward(*args, **kwargs):
        if capture_active():
            pos = find_x(args, kwargs, H)
            if pos is not None and signature_of(Call(args, kwargs, pos)) in verified[module.training]:
                return fwd(*args, **kwargs)
        return original(*args, **kwargs)

    module.forward = forward
    module._moec_original_forward = original
    _pack(module.__dict__["_moec_experts_spec"])


def _pack(spec: ExpertsSpec) -> None:
    """Module-list experts: their parameters move into moec's stacked layout once, so that graphs
    run without gradients read them as they are (``moec.capture.pack``)."""
    if spec.ffn.packer is not None:
        spec.ffn.packer()


def _record(cand: Candidate, plan: BlockPlan) -> MoELayer:
    from moec.ir.routing import RouterKind

    form = plan.ffn
    shared = 0
    for term in plan.terms:
        if term.source == "ffn":  # an MLP of the layer's own projections beside rank-one experts (Doge)
            shared += 1
        elif term.source == "module":
            # A shared MLP of width n*I counts as n shared experts (DeepSeek's n_shared_experts).
            width = term.ffn.inter if term.ffn is not None else 0
            shared += width // form.inter if width and form.inter and width % form.inter == 0 else 1
    rk = RouterKind.parse(plan.kind)
    return MoELayer(
        name=cand.name, num_experts=cand.experts.num_experts, top_k=plan.top_k, hidden_size=cand.hidden,
        expert_hidden_size=form.inter, router=plan.kind, num_shared_experts=shared, activation=form.activation,
        renormalize=plan.renormalize, num_groups=plan.num_groups, topk_groups=plan.topk_groups,
        routed_scaling=plan.scaling, capacity=plan.capacity, expert_bias=bool(form.b_in or form.b_out is not None),
        recogniser="observed", post_norm="" if form.post is None else form.post.describe(),
    ) if rk else None


def _split(cand: Candidate, state: _State) -> Union[SplitPlan, Miss]:
    """A split layer's plan: the one proved on a layer of the same kind if it holds here (one
    probe, both modes), else recognised afresh."""
    calls = cand.__dict__.get("method_calls", {})
    key = ("split", same_kind_key(cand.module))
    known = state.kinds.get(key)
    if known is not None and known.first in calls:
        first = calls[known.first]
        plan = dataclasses.replace(known, verified={False: set(), True: set()})
        if verify_split(plan, cand.module, [Call(first.args, first.kwargs, plan.x_pos)]) is None:
            return plan
    found = recognise_split(cand, calls)
    if not isinstance(found, Miss):
        state.kinds[key] = found
    return found


def _split_record(cand: Candidate, plan: SplitPlan) -> MoELayer:
    return MoELayer(
        name=cand.name, num_experts=plan.num_experts, top_k=plan.top_k, hidden_size=cand.hidden,
        expert_hidden_size=plan.width, router=plan.kind, num_shared_experts=0, activation="none (split: projections)",
        renormalize=plan.renormalize, num_groups=plan.num_groups, topk_groups=plan.topk_groups,
        routed_scaling=plan.scaling, expert_bias=False, recogniser="split")


def _experts_ids(layer: _Layer) -> frozenset:
    return frozenset(id(t) for _, t in expert_tensors(layer.cand))


def _covered(layer: _Layer, state: _State) -> bool:
    """Another reading of the same experts (a layer around or inside this one, paired with
    another router weight) was recognised: this one is not a layer of its own."""
    if layer.record is not None:
        return False
    name = layer.cand.name
    nested = [o for o in state.layers if o is not layer and o.record is not None and
              (_is_under(o.cand.name, name) or _is_under(name, o.cand.name))]
    return bool(nested) and any(_experts_ids(o) == _experts_ids(layer) for o in nested)


def _result(state: _State) -> CaptureResult:
    layers, fallbacks = [], []
    for layer in state.layers:
        if layer.record is not None:
            layers.append(layer.record)
        if not _covered(layer, state):
            fallbacks.extend(layer.notes)
    for orphan in state.orphans:
        fallbacks.append(Fallback(orphan.name or "<root>", orphan.reason()))
    return CaptureResult(layers, fallbacks)


# ----------------------------------------------------------------------------------------------
# Components: router and experts modules with routing interfaces (Hugging Face style)
# ----------------------------------------------------------------------------------------------


def _install_components(module: nn.Module, moec_forward: Callable, stochastic: bool) -> None:
    original = module.forward

    def forward(*args, **kwargs):
        if capture_active() and not (stochastic and module.training):
            return moec_forward(*args, **kwargs)
        return original(*args, **kwargs)

    module.forward = forward
    module._moec_original_forward = original


def _stochastic(module: nn.Module, fn: Callable, probe: Callable[[], tuple]) -> bool:
    """Whether ``fn`` gives different results on the same input in training mode."""
    training = module.training
    try:
        module.train()
        outs = []
        for seed in (1, 2):
            torch.manual_seed(seed)
            outs.append(rec._call(fn, *probe()))
        return not _equal(outs[0], outs[1])
    finally:
        module.train(training)


def _try_components(cand: Candidate) -> Union[tuple[MoELayer, list[Fallback]], str]:
    module, H, E = cand.module, cand.hidden, cand.experts.num_experts
    router_path = cand.router.rpartition(".")[0]
    experts_path = cand.experts.owner
    if not router_path or not experts_path or "." in router_path or "." in experts_path:
        return "router and experts are not child modules of the layer"
    router, experts = module.get_submodule(router_path), module.get_submodule(experts_path)
    if not own_forward(experts) or isinstance(router, nn.Linear):
        return "no router / experts modules with routing interfaces"
    training = module.training
    module.eval()
    try:
        r = rec.recognise_router(router, E, H)
        if isinstance(r, str):
            return f"router: {r}"
        interface = "onehot" if "onehot" in r.roles else "index"
        spec = rec.recognise_experts(experts, H, E, r.spec.top_k, interface)
        if isinstance(spec, str):
            return f"experts: {spec}"
        shared = [(n, c) for n, c in module.named_children()
                  if c is not router and c is not experts and rec.mlp_linears(c, H) is not None]
        shared_specs, notes = [], []
        for sname, smod in shared:
            s = rec.recognise_shared(smod, H)
            if isinstance(s, str):
                notes.append(Fallback(f"{cand.name}.{sname}", f"shared expert kept as traced PyTorch: {s}"))
                continue
            shared_specs.append((smod, s))
    finally:
        module.train(training)
    like = next(router.parameters())
    x_probe = rec._probe_x((5, H), like, 77)
    stochastic = _stochastic(module, router, lambda: (x_probe,))
    if not stochastic:
        idx = torch.arange(5 * r.spec.top_k, device=like.device).reshape(5, r.spec.top_k) % E
        w = torch.full((5, r.spec.top_k), 0.5, dtype=like.dtype, device=like.device)
        args = (x_probe, idx, w) if interface == "index" else (
            x_probe, torch.nn.functional.one_hot(idx[:, :1], E).reshape(5, 1, E), w[:, :1])
        stochastic = _stochastic(module, experts, lambda: args)
    if stochastic:
        notes.append(Fallback(cand.name or "<root>", "training mode runs the model's own code (the router or "
                                                      "experts are random in training mode)"))
    _install_components(router, r.forward(H, router.forward), stochastic)
    _install_components(experts, _experts_forward(spec, interface), stochastic)
    experts.__dict__["_moec_experts_spec"] = spec
    for smod, s in shared_specs:
        _install_components(smod, lambda x, *a, _s=s, **k: shared_expert(_s, x), False)
    rs = r.spec
    layer = MoELayer(
        name=cand.name, num_experts=E, top_k=rs.top_k, hidden_size=H, expert_hidden_size=spec.ffn.expert_hidden_size,
        router=rs.report_kind, num_shared_experts=_shared_count([s for _, s in shared_specs],
                                                                spec.ffn.expert_hidden_size),
        activation=spec.ffn.activation, renormalize=rs.renormalize, num_groups=rs.num_groups,
        topk_groups=rs.topk_groups, routed_scaling=rs.scaling, capacity=rs.capacity, expert_bias=spec.ffn.has_bias,
        recogniser="components",
    )
    return layer, notes


def _shared_count(shared_specs: list[FFNSpec], expert_hidden: int) -> int:
    # A fused shared MLP of width n*I counts as n shared experts (DeepSeek's n_shared_experts).
    return sum(max(1, s.expert_hidden_size // expert_hidden) if s.expert_hidden_size % expert_hidden == 0 else 1
               for s in shared_specs)


def _experts_forward(spec: ExpertsSpec, interface: str):
    def moec_experts_forward(x, selected, weights, *args, **kwargs):
        if interface == "onehot":
            idx = torch.where(selected.sum(-1) > 0, selected.argmax(-1), -1)
            weights = weights.reshape(idx.shape)
        else:
            idx = selected
        return spec(x, idx, weights)

    return moec_experts_forward


__all__ = ["CaptureResult", "convert_model", "RouterSpec"]
