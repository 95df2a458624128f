"""Split MoE layers: routing and experts reached through two of the layer's methods, other code between.

Contract: some MoE modules are never called as a layer. JetMoE's mixture of attention heads
routes each token and projects it once per chosen expert in one method (``map``: [*, H] ->
[*, K, D]), lets attention run on the K projections, then projects each back with the same
expert and sums them with the routing weights in another (``reduce``: [*, K, D] -> [*, H]); the
routing travels from one to the other as an object the caller passes through. Nothing here reads
those names:

- ``record_methods`` runs the model once more with every method of the module's own classes
  wrapped, keeping each one's first call (arguments, output, and the identity of every tensor
  or object handed in or out);
- ``recognise_split`` finds, among the recorded calls, a *first* half that takes the hidden
  state and returns a [*, K, D] tensor, and a *second* half that takes a [*, K, D] tensor and
  an object the first returned, and returns the hidden state's shape. It then observes what they
  compute on random probes: which expert made each of the K rows of a token (the row equals
  ``x W_in[e]`` for exactly one expert table slice), the weight of each row in the second half's
  sum (least squares over the rows' ``W_out[e] z`` contributions), the constant it adds (a bias
  of the module, found by value), and the router form choosing those experts with those weights
  (``match.match_selection`` / ``match_weights``, as for any layer). Every other output of the
  first half must be the router logits.
- ``install_split`` swaps both methods on the module for canonical ones, live only while a
  moec backend traces (``hook.capture_active``) on a verified call signature. The first half is
  ``route -> dispatch -> grouped_gemm`` back to slot order ([*, K, D]); the second
  ``grouped_gemm -> combine`` (+ the bias). The routing object becomes ``SplitRouting``; the
  second half runs moec's ops only when handed one, the module's own code otherwise.

The pair is verified before it is installed: both halves' outputs and the gradients of the input
and every parameter, through first -> (other code) -> second, in eval and training mode.

Legend: T tokens, H hidden, E experts, K slots per token (top-k), D an expert's projection width.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, NamedTuple, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from moec.capture import match as m
from moec.capture.candidates import Candidate, _join
from moec.capture.hook import capture_active
from moec.capture.match import Miss
from moec.capture.observe import overwritten
from moec.capture.probes import Call, _detached, call_module, close, copied, find_x, random_x, rel_error, signature_of
from moec.capture.specs import RouterSpec


class SplitRouting(NamedTuple):
    """What moec's first half hands its second (through the model's own code, untouched)."""

    weights_TK: Tensor
    idx_TK: Tensor
    token_N: Tensor
    slot_N: Tensor
    counts_E: Tensor


@dataclasses.dataclass
class MethodCall:
    """A method's first call: detached copies of its arguments and output, and the ids of the live
    objects handed in (``arg_ids``, per argument) and out (``out_ids``, per output element)."""

    name: str
    args: tuple
    kwargs: dict
    out: Any
    arg_ids: dict
    out_ids: list


def own_methods(module: nn.Module) -> list[str]:
    """Methods defined by the module's classes (not by ``nn.Module``), ``forward`` and dunders aside."""
    names = []
    for cls in type(module).__mro__:
        if cls is nn.Module or not issubclass(cls, nn.Module):
            break
        for name, fn in vars(cls).items():
            if (inspect.isfunction(fn) and not name.startswith("__") and name != "forward"
                    and not hasattr(nn.Module, name) and name not in names):
                names.append(name)
    return names


def record_methods(root: nn.Module, modules: dict[str, nn.Module], run: Callable[[], Any]) -> dict[str, dict]:
    """{module name: {method name: MethodCall}}: the first call of each own method of each module
    while ``run()`` calls ``root`` once, eagerly (eval mode, no grad, the RNG restored)."""
    seen: dict[str, dict] = {name: {} for name in modules}
    patched, keep = [], []  # keep: outputs stay alive, so no later object reuses their ids

    def wrap(mod_name: str, module: nn.Module, meth: str):
        bound = getattr(module, meth)

        def recorder(*args, **kwargs):
            out = bound(*args, **kwargs)
            keep.append(out)
            if meth not in seen[mod_name]:
                ids = {i: id(a) for i, a in enumerate(args)} | {k: id(v) for k, v in kwargs.items()}
                outs = list(out) if isinstance(out, (tuple, list)) else [out]
                seen[mod_name][meth] = MethodCall(meth, tuple(_detached(a) for a in args),
                                                  {k: _detached(v) for k, v in kwargs.items()}, _detached(out),
                                                  ids, [id(o) for o in outs])
            return out

        return recorder

    for name, module in modules.items():
        for meth in own_methods(module):
            if meth in module.__dict__:
                continue
            module.__dict__[meth] = wrap(name, module, meth)
            patched.append((module, meth))
    training = root.training
    try:
        root.eval()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            run()
    finally:
        root.train(training)
        for module, meth in patched:
            del module.__dict__[meth]
    return seen


@dataclasses.dataclass
class SplitPlan:
    """What ``recognise_split`` proved: enough to run the two halves as moec ops."""

    first: str  # method names
    second: str
    x_pos: Union[int, str]  # where the hidden state is among the first half's arguments
    z_pos: Union[int, str]  # where the [*, K, D] rows are among the second half's arguments
    routing_pos: Union[int, str]  # where the routing object is among the second half's arguments
    q_at: int  # the rows' position in the first half's output (a tuple or list)
    routing_at: int  # the routing object's position in the first half's output
    logits_at: dict  # output position -> (flat, dtype) of the router logits returned there
    container: type  # of the first half's output (tuple or list)
    hidden: int
    width: int  # D
    top_k: int
    num_experts: int
    w_in: str  # parameter paths relative to the module
    w_out: str
    in_transposed: bool  # w_in is [E, H, D] (x @ w), else [E, D, H] (nn.Linear)
    out_transposed: bool  # w_out is [E, D, H], else [E, H, D]
    bias: Optional[str]  # an [H] parameter added to the second half's output
    router: str
    router_transposed: bool
    kind: str
    renormalize: bool
    num_groups: int
    topk_groups: int
    scaling: float
    correction: Optional[str]
    verified: dict = dataclasses.field(default_factory=lambda: {False: set(), True: set()})

    def router_spec(self, module: nn.Module) -> RouterSpec:
        def fetch():
            w = module.get_parameter(self.router)
            return (w.t() if self.router_transposed else w, None,
                    None if self.correction is None else module.get_parameter(self.correction))

        return RouterSpec(self.kind, self.top_k, self.num_experts, self.renormalize, self.num_groups,
                          self.topk_groups, self.scaling, 0, fetch=fetch)

    def halves(self, module: nn.Module) -> tuple[Callable, Callable]:
        """The two canonical methods (called with the halves' own arguments)."""
        router = self.router_spec(module)
        H, D, K, E = self.hidden, self.width, self.top_k, self.num_experts

        def moec_first(*args, **kwargs):
            x = Call(args, kwargs, self.x_pos).x
            x_TH = x.reshape(-1, H)
            logits_TE = router.logits(x_TH)
            weights_TK, idx_TK = router.route(logits_TE)
            token_N, slot_N, counts_E = torch.ops.moec.dispatch(idx_TK, E)
            q_ND = torch.ops.moec.grouped_gemm(x_TH, token_N, counts_E, module.get_parameter(self.w_in), None,
                                               self.in_transposed)
            # Back to slot order: row t*K + k is token t's k-th choice.
            q = q_ND.new_zeros(q_ND.shape).index_copy(0, slot_N, q_ND).reshape(*x.shape[:-1], K, D)
            routing = SplitRouting(weights_TK, idx_TK, token_N, slot_N, counts_E)
            items = []
            for i in range(len(self.logits_at) + 2):
                if i == self.q_at:
                    items.append(q)
                elif i == self.routing_at:
                    items.append(routing)
                else:
                    flat, dtype = self.logits_at[i]
                    items.append((logits_TE if flat else logits_TE.reshape(*x.shape[:-1], E)).to(dtype))
            return self.container(items)

        def moec_second(*args, **kwargs):
            z = Call(args, kwargs, self.z_pos).x
            routing = Call(args, kwargs, self.routing_pos).x
            y_NH = torch.ops.moec.grouped_gemm(z.reshape(-1, D), routing.slot_N, routing.counts_E,
                                               module.get_parameter(self.w_out), None, self.out_transposed)
            out_TH = torch.ops.moec.combine(y_NH, routing.slot_N, routing.weights_TK)
            if self.bias is not None:
                out_TH = out_TH + module.get_parameter(self.bias)
            return out_TH.to(z.dtype).reshape(*z.shape[:-2], H)

        return moec_first, moec_second

    def describe(self) -> str:
        return (f"split layer: {self.first}() routes ({self.kind}, top-{self.top_k} of {self.num_experts}) and "
                f"projects each choice to {self.width}; {self.second}() projects back and combines")


def install_split(module: nn.Module, plan: SplitPlan) -> None:
    """Swap the two halves for moec's, live only while a moec backend traces a verified call."""
    first, second = plan.halves(module)
    own_first, own_second = getattr(module, plan.first), getattr(module, plan.second)
    H = plan.hidden

    def first_half(*args, **kwargs):
        if capture_active():
            pos = find_x(args, kwargs, H)
            if pos == plan.x_pos and signature_of(Call(args, kwargs, pos)) in plan.verified[module.training]:
                return first(*args, **kwargs)
        return own_first(*args, **kwargs)

    def second_half(*args, **kwargs):
        if capture_active() and isinstance(Call(args, kwargs, plan.routing_pos).x, SplitRouting):
            return second(*args, **kwargs)
        return own_second(*args, **kwargs)

    module.__dict__[plan.first] = first_half
    module.__dict__[plan.second] = second_half
    module.__dict__["_moec_split_methods"] = (plan.first, plan.second)


def run_pair(module: nn.Module, plan: SplitPlan, *args, **kwargs) -> Tensor:
    """The first half on its arguments, its rows straight into the second half: the layer on its
    own, without the model's code between the halves (what ``moec zoo`` compiles alone)."""
    outs = getattr(module, plan.first)(*args, **kwargs)
    return _call_second(getattr(module, plan.second), plan.z_pos, plan.routing_pos, outs[plan.q_at],
                        outs[plan.routing_at])


# ----------------------------------------------------------------------------------------------
# Recognition
# ----------------------------------------------------------------------------------------------


def _arguments(call: MethodCall) -> list[tuple[Union[int, str], Any]]:
    """(position or name, value) of every argument of a recorded call."""
    return [(i, a) for i, a in enumerate(call.args)] + list(call.kwargs.items())


def _halves(cand: Candidate, calls: dict[str, MethodCall]) -> Union[tuple, Miss]:
    """(first, second, x position, z position, routing position, q position, routing's output
    position, D, K) of the recorded calls, or why no pair of them is a split layer."""
    H = cand.hidden
    for first in calls.values():
        x_pos = find_x(first.args, first.kwargs, H)
        if x_pos is None:
            continue
        x = Call(first.args, first.kwargs, x_pos).x
        lead = tuple(x.shape[:-1])
        if not isinstance(first.out, (tuple, list)):
            continue  # the routing object must come out of the first half beside the rows
        outs = list(first.out)
        for q_at, q in enumerate(outs):
            if not (isinstance(q, Tensor) and q.is_floating_point() and q.dim() == len(lead) + 2
                    and tuple(q.shape[:len(lead)]) == lead):
                continue
            K, D = q.shape[-2:]
            for second in calls.values():
                if second is first:
                    continue
                z_pos = next((k for k, v in _arguments(second) if isinstance(v, Tensor)
                              and tuple(v.shape) == tuple(q.shape)), None)
                r = [(k, first.out_ids.index(second.arg_ids[k])) for k, _ in _arguments(second)
                     if k != z_pos and second.arg_ids[k] in first.out_ids]
                y = second.out
                if z_pos is None or len(r) != 1 or not (isinstance(y, Tensor) and tuple(y.shape) == tuple(x.shape)):
                    continue
                if len(_arguments(second)) != 2 or len(_arguments(first)) != 1:
                    return Miss("shapes", f"{first.name}() and {second.name}() look like the two halves of a split "
                                          "MoE layer but take other arguments too (not supported)")
                routing_pos, routing_at = r[0]
                return first, second, x_pos, z_pos, routing_pos, q_at, routing_at, int(D), int(K)
    return Miss("shapes", "the model never calls it with a hidden state, and no two of its methods were seen "
                          "routing the hidden state to [*, K, D] rows and combining such rows back")


def _tables(cand: Candidate, D: int) -> list[tuple[str, bool, str, bool]]:
    """(w_in, in_transposed, w_out, out_transposed) readings of the stacked expert tables."""
    E, H = cand.experts.num_experts, cand.hidden
    if cand.experts.layout != "stacked":
        return []
    names = [_join(cand.experts.owner, n) for n in cand.experts.names]
    shapes = {n: tuple(cand.module.get_parameter(n).shape) for n in names}
    found = []
    for a in names:
        for b in names:
            if a == b or len(shapes[a]) != 3 or len(shapes[b]) != 3:
                continue
            for tin in (False, True):
                for tout in (False, True):
                    want_a = (E, H, D) if tin else (E, D, H)
                    want_b = (E, D, H) if tout else (E, H, D)
                    if shapes[a] == want_a and shapes[b] == want_b:
                        found.append((a, tin, b, tout))
    return found


def _slot_experts(q_TKD: Tensor, cand_TED: Tensor, tol: float) -> Optional[Tensor]:
    """[T, K] expert of each row: the one table slice that reproduces it, or None."""
    diff_TKE = (q_TKD.unsqueeze(2) - cand_TED.unsqueeze(1)).abs().amax(-1)
    scale = max(q_TKD.abs().max().item(), 1e-30)
    best = diff_TKE.topk(min(2, diff_TKE.shape[-1]), dim=-1, largest=False)
    if bool((best.values[..., 0] > tol * scale).any()):
        return None
    if best.values.shape[-1] > 1 and bool((best.values[..., 1] <= 10 * tol * scale).any()):
        return None  # two experts give the same row: which one made it is not observable
    return best.indices[..., 0]


def _apply(w_EAB: Tensor, rows_NA: Tensor, ids_N: Tensor, transposed: bool) -> Tensor:
    w = w_EAB[ids_N]
    return torch.einsum("na,nab->nb", rows_NA, w) if transposed else torch.einsum("na,nba->nb", rows_NA, w)


def recognise_split(cand: Candidate, calls: dict[str, MethodCall]) -> Union[SplitPlan, Miss]:
    from moec.capture.recognise import _tol

    found = _halves(cand, calls)
    if isinstance(found, Miss):
        return found
    first, second, x_pos, z_pos, routing_pos, q_at, routing_at, D, K = found
    module, H = cand.module, cand.hidden
    x_rec = Call(first.args, first.kwargs, x_pos).x
    tol = _tol(x_rec.dtype)
    own_first, own_second = _own(module, first.name), _own(module, second.name)
    probe = Call(first.args, first.kwargs, x_pos).with_x(random_x(tuple(x_rec.shape), x_rec, seed=41))
    x = probe.x
    x_TH = x.reshape(-1, H).double()
    out = call_module(own_first, probe)
    if isinstance(out, str):
        return Miss("shapes", f"{first.name}() fails on a probe: {out}")
    if not isinstance(out, (tuple, list)):
        return Miss("outputs", f"{first.name}() returned {type(out).__name__} on a probe, a tuple when recorded")
    outs = list(out)
    q_TKD = outs[q_at].reshape(-1, K, D).double()
    readings = _tables(cand, D)
    if not readings:
        return Miss("experts", f"no two stacked expert tables map {H} -> {D} and back")
    closest = "no table reading reproduces the rows"
    for w_in, tin, w_out, tout in readings:
        W_in = module.get_parameter(w_in).detach().double()
        cand_TED = torch.einsum("th,ehd->ted", x_TH, W_in) if tin else torch.einsum("th,edh->ted", x_TH, W_in)
        ids_TK = _slot_experts(q_TKD, cand_TED, tol)
        if ids_TK is None:
            continue
        plan = _second_half(cand, first, second, outs, probe, own_second, ids_TK, (w_in, tin, w_out, tout),
                            (x_pos, z_pos, routing_pos, q_at, routing_at, D, K), out)
        if not isinstance(plan, Miss):
            return plan
        closest = str(plan)
    return Miss("experts", f"{first.name}()'s [*, {K}, {D}] rows are not one expert table slice each times the "
                           f"hidden state, or its pair does not combine them", closest)


def _second_half(cand, first, second, outs, probe, own_second, ids_TK, tables, where, out) -> Union[SplitPlan, Miss]:
    from moec.capture.recognise import _kind, _tol

    module, H, E = cand.module, cand.hidden, cand.experts.num_experts
    w_in, tin, w_out, tout = tables
    x_pos, z_pos, routing_pos, q_at, routing_at, D, K = where
    x = probe.x
    tol = _tol(x.dtype)
    T = x.reshape(-1, H).shape[0]
    routing = outs[routing_at]
    z = random_x(tuple(outs[q_at].shape), x, seed=43)

    def second_on(z_):
        with torch.no_grad():
            return _call_second(own_second, z_pos, routing_pos, z_, copied(routing))

    try:
        y_TH, rest_TH = second_on(z).reshape(T, H).double(), second_on(torch.zeros_like(z)).reshape(T, H).double()
    except Exception as err:
        return Miss("shapes", f"{second.name}() fails on a probe: {type(err).__name__}: {err}".splitlines()[0][:200])
    # What the second half adds whatever the rows: nothing, or an [H] parameter of the module
    # (found by setting each to random values: a zero-initialised bias shows no value to match).
    scale = max(y_TH.abs().max().item(), 1e-30)
    bias, left_TH = None, rest_TH
    for name, p in module.named_parameters():
        if p.dim() != 1 or p.shape[0] != H or bias is not None:
            continue
        r_H = random_x((H,), p, seed=59)
        with overwritten([(p, r_H)]):
            moved_TH = second_on(torch.zeros_like(z)).reshape(T, H).double() - rest_TH
        if close(moved_TH, r_H.double().expand(T, H), tol):
            bias, left_TH = name, rest_TH - p.detach().double()
    if left_TH.abs().max().item() > tol * scale:
        return Miss("rest", f"{second.name}() adds something besides the rows' weighted sum and a bias")
    W_out = module.get_parameter(w_out).detach().double()
    c_TKH = _apply(W_out, z.reshape(-1, D).double(), ids_TK.reshape(-1), tout).reshape(T, K, H)
    w_TK = torch.linalg.lstsq(c_TKH.transpose(1, 2), (y_TH - rest_TH).unsqueeze(-1)).solution.squeeze(-1)
    off = rel_error(torch.einsum("tkh,tk->th", c_TKH, w_TK), y_TH - rest_TH)
    if off > tol:
        return Miss("combine", f"{second.name}()'s output is not a weighted sum of each row's expert projection "
                               f"({w_out})", f"off by {off:.2g}")
    # The router: the form that chooses those experts with those weights.
    logits_TE = m.router_logits(cand, x.reshape(-1, H), None)
    member_TE = torch.zeros(T, E, dtype=torch.bool).scatter(1, ids_TK, True)
    weights_TE = torch.zeros(T, E, dtype=torch.float64).scatter(1, ids_TK, w_TK)
    if bool((member_TE.sum(-1) != K).any()):
        return Miss("router", "a token's rows come from the same expert twice")
    ints, floats = m.int_attrs(module), m.float_attrs(module)
    skip = m.expert_ids(cand)
    vectors = m.vectors_E(module, E, skip)
    sels, agree = m.match_selection(logits_TE, member_TE, vectors, ints)
    if not sels:
        return Miss("router", "no router form chooses the experts the rows came from",
                    f"{agree:.0%} of tokens' expert sets reproduced")
    forms, err = m.match_weights([(s, m.intended(s, logits_TE, vectors, K)) for s in sels], logits_TE, member_TE,
                                 weights_TE, floats, ints, tol)
    if not forms:
        return Miss("weights", "no router form's weights are the combine weights", f"off by {err:.2g}")
    logits_at = {}
    for i, o in enumerate(outs):
        if i in (q_at, routing_at):
            continue
        flat = isinstance(o, Tensor) and tuple(o.shape) == (T, E)
        if not (isinstance(o, Tensor) and (flat or tuple(o.shape) == (*x.shape[:-1], E))
                and close(o.reshape(T, E).double(), logits_TE, tol)):
            return Miss("outputs", f"{first.name}() returns something at {i} that is not the router logits")
        logits_at[i] = (flat, o.dtype)
    for form in forms:
        sel = form.selection
        plan = SplitPlan(
            first.name, second.name, x_pos, z_pos, routing_pos, q_at, routing_at, logits_at,
            type(out), H, D, K, E, w_in, w_out, tin, tout, bias,
            cand.router, cand.router_transposed, _kind(form, ()), form.renormalize, sel.num_groups, sel.topk_groups,
            form.scaling, sel.correction)
        why = verify_split(plan, module, [probe, probe.with_x(random_x(tuple(x.shape), x, seed=47, scale=4.0))])
        if why is None:
            return plan
    return Miss("verify", f"the canonical halves differ from {first.name}() / {second.name}()", why)


def _own(module: nn.Module, name: str) -> Callable:
    """The module's own method ``name`` (not an installed replacement)."""
    return getattr(type(module), name).__get__(module)


def _call_second(fn: Callable, z_pos, routing_pos, z: Tensor, routing: Any):
    given = {z_pos: z, routing_pos: routing}
    args = [given[i] for i in sorted(k for k in given if isinstance(k, int))]
    return fn(*args, **{k: v for k, v in given.items() if isinstance(k, str)})


def _pair(first: Callable, second: Callable, plan: SplitPlan, z_TKD: Tensor) -> Callable:
    """first -> rows + z -> second, as one function of the first half's arguments (the other code
    between the halves, attention in JetMoE, stands in as adding ``z``): the first half's tensor
    outputs, then the second half's."""

    def run(*args, **kwargs):
        out = first(*args, **kwargs)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        q = outs[plan.q_at]
        y = _call_second(second, plan.z_pos, plan.routing_pos, q * 0.5 + z_TKD.to(q.dtype), outs[plan.routing_at])
        return (*[o for i, o in enumerate(outs) if i != plan.routing_at], y)

    return run


def verify_split(plan: SplitPlan, module: nn.Module, probes: list[Call]) -> Optional[str]:
    """None when the canonical halves reproduce the module's own (outputs, and the gradients of the
    input and every parameter through both halves), in eval and in training mode."""
    from moec.capture.recognise import _compare, _tol

    first, second = plan.halves(module)
    own = _own(module, plan.first), _own(module, plan.second)
    training = module.training
    try:
        for mode in (False, True):
            module.train(mode)
            for probe in probes:
                x = probe.x
                tol = _tol(x.dtype)
                z = random_x((*x.shape[:-1], plan.top_k, plan.width), x, seed=53)
                ref, canon = _pair(*own, plan, z), _pair(first, second, plan, z)
                results = []
                for fn in (ref, canon):
                    xg = x.detach().clone().requires_grad_(True)
                    params = [p for p in module.parameters() if p.requires_grad]
                    with torch.enable_grad():
                        got = call_module(fn, probe.with_x(xg), grad=True)
                        if isinstance(got, str):
                            return f"{'moec' if fn is canon else 'the module'} fails: {got}"
                        r = torch.Generator().manual_seed(5)
                        loss = sum((o.double() * torch.randn(o.shape, generator=r, dtype=torch.float64)).sum()
                                   for o in got if isinstance(o, Tensor) and o.is_floating_point())
                        grads = torch.autograd.grad(loss, [xg, *params], allow_unused=True)
                    results.append((tuple(o.detach() for o in got), grads, params))
                why = _compare(results[1][0], results[0][0], tol)
                if why:
                    return f"{'training' if mode else 'eval'}: {why}"
                for i, (want, got) in enumerate(zip(results[0][1], results[1][1])):
                    like = x if i == 0 else results[0][2][i - 1]
                    want = torch.zeros_like(like) if want is None else want
                    got = torch.zeros_like(like) if got is None else got
                    if not close(got, want, max(tol, 1e-3) if i else tol):
                        what = "the input" if i == 0 else "a parameter"
                        return (f"{'training' if mode else 'eval'}: the gradient of {what} is off by "
                                f"{rel_error(got, want):.2g}")
                plan.verified[mode].add(signature_of(probe))
    finally:
        module.train(training)
    return None
