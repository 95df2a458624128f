"""Find the MoE layers of a model and give each recognised one a canonical ``moec::`` forward.

Contract: ``convert_model(root)`` walks ``root``'s modules once (the result is cached on the
root). A module is an MoE layer candidate when one child holds a single [E, H] weight (the
router) and another holds E experts (stacked [E, ., .] weights or a list of E MLPs), or the
module holds the stacked weights itself. Two recognisers are tried:

- components: the router and the experts are modules with their own forwards (Hugging Face
  style: ``router(x) -> (logits, weights, idx)``, ``experts(x, idx, weights) -> out``); each gets
  a canonical forward, and MLP-shaped siblings become ``moec::shared_expert``. The layer's own
  glue (reshapes, a shared-expert sigmoid gate, the sum) stays as traced PyTorch.
- block: the whole layer forward (hand-written loops over ``nn.ModuleList`` experts, bmm/einsum
  over stacked weights, sort-and-split) is replaced by route -> dispatch -> expert_ffn ->
  combine (+ shared expert); router kind, top-k and FFN layout are searched among candidates.

Either way the replacement is installed only after it reproduced the original forward on probe
inputs. Installed forwards run only while a moec backend traces (``hook.capture_active``);
eager calls still run the model's own code. A layer in which a stochastic module (dropout,
router jitter) is active runs its own code in training mode. What is declined or kept is
recorded as a ``Fallback`` with its reason.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from moec.capture import recognisers as rec
from moec.capture.hook import capture_active
from moec.capture.specs import ExpertsSpec, FFNSpec, RouterSpec, shared_expert
from moec.ir import ops
from moec.report import Fallback, MoELayer


@dataclasses.dataclass
class CaptureResult:
    layers: list[MoELayer]
    fallbacks: list[Fallback]


def _install(module: nn.Module, moec_forward: Callable, stochastic: bool) -> None:
    original = module.forward

    def forward(*args, **kwargs):
        if capture_active() and not (stochastic and module.training):
            return moec_forward(*args, **kwargs)
        return original(*args, **kwargs)

    module.forward = forward
    module._moec_original_forward = original


def _stochastic(*modules: nn.Module) -> Optional[str]:
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, nn.modules.dropout._DropoutNd) and sub.p > 0:
                return f"dropout p={sub.p}"
            for k, v in vars(sub).items():
                if isinstance(v, float) and v > 0 and ("jitter" in k or "noise" in k):
                    return f"{k}={v}"
    return None


def _router_candidates(module: nn.Module) -> list[tuple[str, nn.Module, int, int]]:
    """Children holding exactly one 2-D weight [E, H] with E >= 2: (name, child, E, H)."""
    found = []
    for name, child in module.named_children():
        mats = [p for p in child.parameters() if p.dim() == 2]
        if len(mats) == 1 and mats[0].shape[0] >= 2 and not any(p.dim() > 2 for p in child.parameters()):
            found.append((name, child, mats[0].shape[0], mats[0].shape[1]))
    return found


def _experts_owner(module: nn.Module, router_name: str, E: int, H: int) -> Optional[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        if name == router_name:
            continue
        found = rec.expert_container(child, H)
        if found is not None and found[0] == E:
            return name, child
    found = rec.expert_container(module, H)
    if found is not None and found[0] == E:
        return "", module
    return None


def convert_model(root: nn.Module) -> CaptureResult:
    cached = root.__dict__.get("_moec_capture")
    if cached is not None:
        return cached
    layers: list[MoELayer] = []
    fallbacks: list[Fallback] = []
    claimed: list[str] = []
    was_training = root.training
    for name, module in root.named_modules():
        if any(name == c or name.startswith(c + ".") for c in claimed):
            continue
        with torch.random.fork_rng(devices=[]):
            outcome = _convert_layer(name or "<root>", module)
        if outcome is None:
            continue
        claimed.append(name)
        layer, notes = outcome
        if layer is not None:
            layers.append(layer)
        fallbacks.extend(notes)
    root.train(was_training)
    result = CaptureResult(layers, fallbacks)
    root.__dict__["_moec_capture"] = result
    return result


def _convert_layer(name: str, module: nn.Module) -> Optional[tuple[Optional[MoELayer], list[Fallback]]]:
    reasons = []
    for router_name, router, E, H in _router_candidates(module):
        owner = _experts_owner(module, router_name, E, H)
        if owner is None:
            continue
        experts_name, experts = owner
        shared = [
            (n, c) for n, c in module.named_children()
            if n not in (router_name, experts_name) and rec.mlp_linears(c, H) is not None
        ]
        gates = [
            (n, c) for n, c in module.named_children()
            if isinstance(c, nn.Linear) and c.in_features == H and c.out_features == 1
        ]
        training = module.training
        module.eval()
        try:
            if experts is not module and not isinstance(router, nn.Linear):
                result = _convert_components(name, module, router, experts, E, H, shared)
            else:
                result = _convert_block(name, module, router, experts, E, H, shared, gates)
        finally:
            module.train(training)
        if isinstance(result, str):
            reasons.append(result)
            continue
        return result
    if reasons:
        return None, [Fallback(name, "looks like an MoE layer but was left alone: " + "; ".join(reasons))]
    return None


def _layer_record(name, E, H, router: RouterSpec, ffn: FFNSpec, n_shared: int, recogniser: str) -> MoELayer:
    return MoELayer(
        name=name, num_experts=E, top_k=router.top_k, hidden_size=H, expert_hidden_size=ffn.expert_hidden_size,
        router=router.report_kind, num_shared_experts=n_shared, activation=ffn.activation,
        renormalize=router.renormalize, num_groups=router.num_groups, topk_groups=router.topk_groups,
        routed_scaling=router.scaling, capacity=router.capacity, expert_bias=ffn.has_bias, recogniser=recogniser,
    )


def _shared_count(shared_specs: list[FFNSpec], expert_hidden: int) -> int:
    # A fused shared MLP of width n*I counts as n shared experts (DeepSeek's n_shared_experts).
    return sum(max(1, s.expert_hidden_size // expert_hidden) if s.expert_hidden_size % expert_hidden == 0 else 1
               for s in shared_specs)


def _convert_components(name, module, router, experts, E, H, shared):
    r = rec.recognise_router(router, E, H)
    if isinstance(r, str):
        return f"router: {r}"
    interface = "onehot" if "onehot" in r.roles else "index"
    spec = rec.recognise_experts(experts, H, E, r.spec.top_k, interface)
    if isinstance(spec, str):
        return f"experts: {spec}"
    shared_specs = []
    notes = []
    for sname, smod in shared:
        s = rec.recognise_shared(smod, H)
        if isinstance(s, str):
            notes.append(Fallback(f"{name}.{sname}", f"shared expert kept as traced PyTorch: {s}"))
            continue
        shared_specs.append((smod, s))
    stochastic = _stochastic(router, experts)
    if stochastic:
        notes.append(Fallback(name, f"training mode runs the model's own code ({stochastic} is active)"))
    _install(router, r.forward(H, router.forward), bool(stochastic))
    _install(experts, _experts_forward(spec, interface), bool(stochastic))
    experts.__dict__["_moec_experts_spec"] = spec
    for smod, s in shared_specs:
        _install(smod, lambda x, *a, _s=s, **k: shared_expert(_s, x), bool(_stochastic(smod)))
    layer = _layer_record(name, E, H, r.spec, spec.ffn, _shared_count([s for _, s in shared_specs],
                                                                      spec.ffn.expert_hidden_size), "components")
    return layer, notes


def _experts_forward(spec: ExpertsSpec, interface: str):
    def moec_experts_forward(x, selected, weights, *args, **kwargs):
        if interface == "onehot":
            idx = torch.where(selected.sum(-1) > 0, selected.argmax(-1), -1)
            weights = weights.reshape(idx.shape)
        else:
            idx = selected
        return spec(x, idx, weights)

    return moec_experts_forward


# ----------------------------------------------------------------------------------------------
# Block recogniser: the layer's forward is replaced as a whole
# ----------------------------------------------------------------------------------------------


def _block_probes(module, H):
    like = next(module.parameters())
    probes = []
    for seed, T in enumerate((7, 16)):
        x = rec._probe_x((1, T, H), like, 300 + seed)
        out = rec._call(module, x)
        if isinstance(out, str):
            return f"forward failed on a probe: {out}"
        probes.append((x, out))
    return probes


def _convert_block(name, module, router, experts, E, H, shared, gates):
    if not isinstance(router, nn.Linear):
        return "router is not an nn.Linear and returns no top-k choice"
    probes = _block_probes(module, H)
    if isinstance(probes, str):
        return probes
    out0 = probes[0][1]
    extra = None
    if isinstance(out0, tuple):
        if len(out0) == 2 and isinstance(out0[1], Tensor) and out0[1].shape[-1] == E:
            extra = "logits"
        else:
            return "forward returns a tuple moec cannot reproduce"
    elif not isinstance(out0, Tensor):
        return "forward does not return a tensor"
    found = rec.expert_container(experts, H)
    ffn_candidates = found[1]()
    if isinstance(ffn_candidates, str):
        return f"experts: {ffn_candidates}"
    if isinstance(experts, (nn.ModuleList, nn.ModuleDict)) or experts is not module and not list(
        experts.parameters(recurse=False)
    ):
        ffn_candidates = _verify_first_expert(list(experts.children())[0], ffn_candidates, H)
        if isinstance(ffn_candidates, str):
            return f"experts: {ffn_candidates}"
    shared_specs = []
    for sname, smod in shared:
        s = rec.recognise_shared(smod, H)
        if isinstance(s, str):
            return f"shared expert {sname}: {s}"
        shared_specs.append(s)
    gate_options = [None] + [g for _, g in gates] if shared_specs else [None]
    ints = rec._int_attrs(module, router)
    ks = [k for k in sorted(ints) if 1 <= k <= E] + [k for k in (1, 2) if k not in ints and k <= E]
    route_candidates = [
        (top_k, kind, renorm)
        for top_k in ks
        for kind, renorm, _, _, _, _ in rec._route_candidates(E, top_k, set(), [(None, None)], [0])
    ]
    for top_k, kind, renorm in route_candidates:
        router_spec = RouterSpec(kind, top_k, E, renorm, fetch=lambda r=router: (r.weight, r.bias, None))
        for ffn in ffn_candidates:
            experts_spec = ExpertsSpec(ffn, E)
            for gate in gate_options:
                fwd = _block_forward(router, router_spec, experts_spec, shared_specs, gate, H, extra)
                if all(_same_output(rec._call(fwd, x), out) for x, out in probes):
                    stochastic = _stochastic(module)
                    notes = []
                    if stochastic:
                        notes.append(Fallback(name, f"training mode runs the model's own code ({stochastic} is active)"))
                    _install(module, fwd, bool(stochastic))
                    module.__dict__["_moec_experts_spec"] = experts_spec
                    layer = _layer_record(name, E, H, router_spec, ffn,
                                          _shared_count(shared_specs, ffn.expert_hidden_size), "block")
                    return layer, notes
    return (f"no canonical MoE layer (router kinds x top-k {ks} x {len(ffn_candidates)} FFN layouts) "
            "reproduces its forward")


def _same_output(got, want) -> bool:
    if isinstance(want, tuple):
        return isinstance(got, tuple) and len(got) == len(want) and all(rec._close(g, w) for g, w in zip(got, want))
    return isinstance(got, Tensor) and rec._close(got, want)


def _verify_first_expert(expert: nn.Module, candidates: list[FFNSpec], H: int) -> Union[list[FFNSpec], str]:
    """Keep the candidates that reproduce one expert MLP on its own (cheap, narrows the search)."""
    like = next(expert.parameters())
    x = rec._probe_x((9, H), like, 400)
    want = rec._call(expert, x)
    if not isinstance(want, Tensor):
        return f"expert forward failed on a probe: {want}"
    kept = []
    for c in candidates:
        w_in, w_out, b_in, b_out = c.fetch()
        got = rec._call(ops.ffn_reference, x, w_in[0], w_out[0], None if b_in is None else b_in[0],
                        None if b_out is None else b_out[0], *c.attrs())
        if isinstance(got, Tensor) and rec._close(got, want):
            kept.append(c)
    return kept or "no canonical FFN reproduces an expert MLP"


def _block_forward(router, router_spec, experts_spec, shared_specs, gate, H, extra):
    def moec_block_forward(x, *args, **kwargs):
        x_TH = x.reshape(-1, H)
        logits = router(x_TH)
        weights, idx = router_spec.route(logits)
        out = experts_spec(x_TH, idx, weights)
        for s in shared_specs:
            y = shared_expert(s, x_TH)
            if gate is not None:
                y = torch.sigmoid(gate(x_TH)) * y
            out = out + y
        out = out.reshape(x.shape)
        return (out, logits) if extra == "logits" else out

    return moec_block_forward
