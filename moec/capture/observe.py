"""Observe what an MoE-looking layer computes, by calling it with some of its parameters changed.

Contract: ``observe(cand, call)`` calls the layer on one probe and returns an ``Observation``:
its output; its output with every expert's tensors zeroed (``rest``: whatever the layer adds
besides its routed experts — a residual, shared experts, a dense branch); and each expert's
contribution, the output minus the output with that expert alone zeroed. An expert that a
token was not routed to contributes exactly nothing to it, so ``member_TE`` is the routing the
layer did, whatever code did it; and when the layer is a sum of routed expert outputs, the
contributions add up to ``output - rest``. Nothing is assumed about names or code. Every
parameter is restored afterwards (a ``finally`` restores them when a call raises).

``randomized_constants(module, keep)`` gives constant-valued floating tensors (a correction
bias or a gate initialised to zeros, norm weights of ones) random values while the layer is
probed: a constant tensor cannot show how it is used, so a replacement that ignored it would
still match the probes and then be wrong once trained values are loaded.

Legend: T tokens (leading dims flattened), H hidden, E experts.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterable, Union

import torch
import torch.nn as nn
from torch import Tensor

from moec.capture.candidates import Candidate, expert_slices, expert_tensors
from moec.capture.probes import Call, Declined, call_module, main_output


@dataclasses.dataclass
class Observation:
    call: Call
    out: Any  # the layer's own output
    main_pos: int  # where the hidden-state-shaped output is in ``out`` (-1: ``out`` itself)
    main_TH: Tensor
    rest_TH: Tensor
    contrib_ETH: Tensor  # float64
    member_TE: Tensor  # bool

    @property
    def x_TH(self) -> Tensor:
        x = self.call.x
        return x.reshape(-1, x.shape[-1])

    def additivity_error(self) -> float:
        """How far ``output - rest`` is from the sum of the experts' contributions (relative)."""
        moe = self.main_TH.double() - self.rest_TH.double()
        scale = max(moe.abs().max().item(), 1e-30)
        return float((moe - self.contrib_ETH.sum(0)).abs().max().item() / scale)


@contextlib.contextmanager
def zeroed(tensors: Iterable[Tensor]):
    """Zero ``tensors`` for the block; restore them after, from the tensor a copy was made of
    (``copy_as`` records it as ``_moec_source``) where there is one, else from a clone: observing
    a bf16 layer then holds its fp32 copy once, not twice (22 GB of bf16 experts in DeepSeek-V3)."""
    tensors = list(tensors)
    saved = [getattr(t, "_moec_source", None) if _exact_source(t) else t.detach().clone() for t in tensors]
    try:
        with torch.no_grad():
            for t in tensors:
                t.zero_()
        yield
    finally:
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)
                if s is getattr(t, "_moec_source", None):  # equal to its source again
                    t._moec_versions = (t._version, s._version)


def _exact_source(t: Tensor) -> bool:
    """``t`` was copied from ``t._moec_source`` without loss (a wider float dtype), and neither has
    been written since (their version counters say so)."""
    src = getattr(t, "_moec_source", None)
    return (src is not None and src.shape == t.shape and torch.finfo(t.dtype).bits >= torch.finfo(src.dtype).bits
            and t.__dict__.get("_moec_versions") == (t._version, src._version))


@contextlib.contextmanager
def randomized_constants(module: nn.Module, keep: Iterable[Tensor] = (), seed: int = 1234):
    keep_ids = {id(t) for t in keep}
    gen = torch.Generator().manual_seed(seed)
    values = []
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) in keep_ids or not t.is_floating_point() or t.numel() < 2:
            continue
        flat = t.detach().reshape(-1)
        if bool((flat == flat[0]).all()):
            base = 1.0 if float(flat[0]) == 1.0 else 0.0  # ones stay near one (norm weights)
            values.append((t, base + torch.randn(t.shape, generator=gen, dtype=torch.float32) * 0.5))
    with overwritten(values):
        yield


@contextlib.contextmanager
def overwritten(values: Iterable[tuple[Tensor, Tensor]]):
    """Give each tensor its paired value (cast to its dtype) for the block; restore them after."""
    values = list(values)
    saved = [(t, t.detach().clone()) for t, _ in values]
    try:
        with torch.no_grad():
            for t, v in values:
                t.copy_(v.to(t.dtype))
        yield
    finally:
        with torch.no_grad():
            for t, old in saved:
                t.copy_(old)


def _main(out: Any, call: Call) -> Union[tuple[Tensor, int], Declined]:
    if isinstance(out, str):
        return f"the layer failed on a probe: {out}"
    found = main_output(out, call.x)
    if found is None:
        return (f"the layer returns {type(out).__name__}, with no tensor shaped like its input "
                f"{list(call.x.shape)}")
    return found


def _moved_by_random_experts(cand: Candidate, call: Call, main_TH: Tensor, noise: float) -> Union[Tensor, Declined]:
    """[T, E]: the tokens whose output moves when expert e's tensors take random values (three
    draws: one draw can leave every ReLU unit of an expert off for a token by chance)."""
    gen = torch.Generator().manual_seed(4321)
    H = main_TH.shape[-1]
    moved = []
    for e in range(cand.experts.num_experts):
        tensors = expert_slices(cand, e)
        moved_T = torch.zeros(main_TH.shape[0], dtype=torch.bool, device=main_TH.device)
        for _ in range(3):
            values = [(t, torch.randn(t.shape, generator=gen, dtype=torch.float32)
                       * max(t.detach().double().std().item() if t.numel() > 1 else 0.0, 0.1)) for t in tensors]
            with overwritten(values):
                out = _main(call_module(cand.module, call), call)
            if isinstance(out, str):
                return out
            moved_T |= (out[0].reshape(-1, H).double() - main_TH.double()).abs().amax(-1) > noise
        moved.append(moved_T)
    return torch.stack(moved, -1)


def _noise(module: nn.Module, call: Call, main_TH: Tensor) -> Union[float, Declined]:
    """How far the same call's output moves between runs: 0 on the CPU, and on a GPU under
    ``deterministic_on_gpu`` unless an op has no deterministic kernel. Memberships count only
    moves 64 times above it."""
    again = _main(call_module(module, call), call)
    if isinstance(again, str):
        return again
    return 64 * (again[0].reshape(main_TH.shape).double() - main_TH.double()).abs().max().item()


def observe(cand: Candidate, call: Call) -> Union[Observation, Declined]:
    module = cand.module
    out = call_module(module, call)
    found = _main(out, call)
    if isinstance(found, str):
        return found
    main, pos = found
    H = call.x.shape[-1]
    main_TH = main.reshape(-1, H)
    noise = _noise(module, call, main_TH)
    if isinstance(noise, str):
        return noise
    with zeroed(t for _, t in expert_tensors(cand)):
        rest = _main(call_module(module, call), call)
    if isinstance(rest, str):
        return rest
    contribs = []
    for e in range(cand.experts.num_experts):
        with zeroed(expert_slices(cand, e)):
            without = _main(call_module(module, call), call)
        if isinstance(without, str):
            return without
        contribs.append(main_TH.double() - without[0].reshape(-1, H).double())
    contrib_ETH = torch.stack(contribs)
    norms_ET = contrib_ETH.abs().amax(-1)
    # An expert a token did not use leaves its output bitwise unchanged; a used one moves it by
    # its routing weight times its output (far above rounding unless the weight is ~0).
    scale_T = (main_TH.double() - rest[0].reshape(-1, H).double()).abs().amax(-1)
    member_TE = (norms_ET > 1e-7 * scale_T.clamp_min(1e-30)).t() & (norms_ET > noise).t()
    counts = member_TE.sum(-1)
    if bool(counts.any()) and int(counts.min()) < int(counts.max()):
        # Fewer experts for some tokens: capacity drops, or an expert whose output is exactly
        # zero for the token (a ReLU expert with every unit off) so zeroing it moved nothing.
        # Random values instead of the expert's own make a used expert move its tokens.
        moved = _moved_by_random_experts(cand, call, main_TH, noise)
        if isinstance(moved, str):
            return moved
        member_TE = member_TE | moved
    return Observation(call, out, pos, main_TH, rest[0].reshape(-1, H), contrib_ETH, member_TE)
