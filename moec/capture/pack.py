"""Experts held as E separate modules, packed once into moec's stacked layout.

Contract: ``pack_experts`` moves every expert parameter of a module-list layer into the
tensors ``moec::expert_ffn`` takes (``w_in`` [E, F, H], ``w_out`` [E, H, I], biases), kept as
non-persistent buffers of the module holding the experts; each parameter stays the same
``nn.Parameter`` object (optimizers, hooks and ``state_dict`` keys are untouched) and becomes
a view into those buffers (``param.data = view``). A compiled graph run without gradients then
reads the packed tensors: no ``torch.stack`` / ``torch.cat`` of all the experts' weights on
every call. With gradients on, the graph keeps stacking the parameters (their gradients must
reach them).

Numerics: the values are the parameters' own, element for element; nothing is converted.

Staying in step: in-place writes to a parameter (optimizer steps, ``load_state_dict``,
``copy_``) land in the packed storage. A parameter re-bound to other memory (``p.data = t``,
``setattr(module, "weight", Parameter(...))``, ``load_state_dict(assign=True)``, ``module.to``)
is noticed before the next run, by comparing each parameter's data pointer with the view it
was given (``Pack.sync``: the moec backend's compiled callables call it first; eager reads
check it too): the values are copied back into the packed tensors and the views re-made.

A layer is packed only when every parameter is a strided view of the packed layout (found by
running the layer's own stacking function on element numbers): gate/up halves stored swapped
or odd-interleaved in one tensor are not, and keep the copy.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch import Tensor

KEYS = ("w_in", "w_out", "b_in", "b_out")
BUFFER = "_moec_packed_"

_live: "weakref.WeakSet[Pack]" = weakref.WeakSet()


class Holder:
    """Where a module-list layer's fetch finds its pack (set once the layer is installed)."""

    pack: Optional["Pack"] = None


class PackError(RuntimeError):
    pass


def _views(form, shapes: list[tuple[int, ...]]) -> Optional[list[tuple[int, tuple, tuple, int]]]:
    """For each expert parameter i: (packed key index, shape, strides, storage offset) of its view
    into one expert's slice of the packed tensors; None when some parameter is not a strided view."""
    sizes = [math.prod(s) for s in shapes]
    bases = [sum(sizes[:i]) for i in range(len(sizes))]
    total = sum(sizes)
    ids = [torch.arange(b, b + n, dtype=torch.int64).reshape(1, *s) for b, n, s in zip(bases, sizes, shapes)]
    outs = form.build(lambda i: ids[i])
    key_of = torch.full((total,), -1, dtype=torch.int64)
    pos_of = torch.full((total,), -1, dtype=torch.int64)
    covered = 0
    for k, out in enumerate(outs):
        if out is None:
            continue
        flat = out[0].reshape(-1)
        if bool((key_of[flat] >= 0).any()):
            return None  # an element used twice
        key_of[flat] = k
        pos_of[flat] = torch.arange(flat.numel())
        covered += flat.numel()
    if covered != total:
        return None
    views = []
    for b, n, s in zip(bases, sizes, shapes):
        keys = key_of[b:b + n]
        if n == 0 or bool((keys != keys[0]).any()):
            return None
        pos = pos_of[b:b + n].reshape(s)
        offset = int(pos.reshape(-1)[0])
        strides = []
        for d, size in enumerate(s):
            if size == 1:
                strides.append(1)
                continue
            at = [0] * len(s)
            at[d] = 1
            strides.append(int(pos[tuple(at)]) - offset)
        if any(st <= 0 for st in strides):
            return None
        numel = int(outs[int(keys[0])][0].numel())
        if offset < 0 or offset + sum((n - 1) * st for n, st in zip(s, strides)) >= numel:
            return None
        if not torch.equal(torch.arange(numel).as_strided(s, strides, offset), pos):
            return None
        views.append((int(keys[0]), tuple(s), tuple(strides), offset))
    return views


class Pack:
    """The packed tensors of one module-list layer and the views its parameters were given."""

    def __init__(self, owner: nn.Module, modules: list[nn.Module], names: list[str], form, stacked: Callable,
                 views: list[tuple[int, tuple, tuple, int]]):
        self.owner = owner
        self.modules = modules
        self.names = names
        self.form = form
        self.key = form.layout_key
        self.stacked = stacked
        self.views = views
        self.live = True
        self._expect: list[tuple[dict, str, int]] = []

    def tensors(self) -> tuple[Optional[Tensor], ...]:
        return tuple(getattr(self.owner, BUFFER + k, None) for k in KEYS)

    def in_sync(self) -> bool:
        return all(d[n].data_ptr() == ptr for d, n, ptr in self._expect)

    def sync(self) -> None:
        """Re-pack when a parameter was re-bound to other memory since the last check."""
        if self.live and not self.in_sync():
            self._rehome(strict=True)

    def _rehome(self, strict: bool) -> None:
        # Not in inference mode even when called from it: the views must stay ordinary tensors
        # that optimizers and load_state_dict may write in place later.
        with torch.inference_mode(False), torch.no_grad():
            values = self.form.build(self.stacked)
            resized = []
            for k, v in zip(KEYS, values):
                name = BUFFER + k
                if v is None:
                    continue
                buf = self.owner._buffers.get(name)
                if buf is not None and (buf.shape, buf.dtype, buf.device) == (v.shape, v.dtype, v.device):
                    buf.copy_(v)
                else:
                    self.owner.register_buffer(name, v.contiguous(), persistent=False)
                    resized.append(k)
            packed = self.tensors()
            expect = []
            for e, m in enumerate(self.modules):
                for (k, shape, strides, offset), name in zip(self.views, self.names):
                    slab = packed[k][e]
                    p = m.get_parameter(name)
                    view = slab.as_strided(shape, strides, slab.storage_offset() + offset)
                    if not torch.equal(_bits(view), _bits(p)):
                        raise PackError(f"moec: packing expert {e}'s {name} changed its values (a moec bug)")
                    p.data = view
                    owner, _, leaf = name.rpartition(".")
                    expect.append((m.get_submodule(owner)._parameters if owner else m._parameters, leaf,
                                   p.data_ptr()))
            self._expect = expect
        if strict and resized:
            raise PackError(
                f"moec: the expert parameters of {type(self.owner).__name__} were re-created with another dtype, "
                f"device or shape ({', '.join(resized)}) outside module.to(); moec re-packed them for the next "
                "call, but this call's compiled graph was made for the old ones: call the model again")

    def release(self) -> None:
        """Stop reading the packed tensors (the parameters keep their values) and free them."""
        self.live = False
        for k in KEYS:
            self.owner._buffers.pop(BUFFER + k, None)
        _live.discard(self)


def _bits(t: Tensor) -> Tensor:
    if t.is_floating_point() and t.element_size() in _INT_OF_SIZE:
        return t.view(_INT_OF_SIZE[t.element_size()])
    return t


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def pack_experts(form, stacked: Callable) -> Optional[Pack]:
    """Pack the layer whose experts ``stacked`` reads (``match.stacker`` of a module-list layer),
    for ``form``; the pack already made when there is one; None when it cannot be packed."""
    holder: Optional[Holder] = stacked.__dict__.get("holder")
    if holder is None:
        return None
    if holder.pack is not None and holder.pack.live:
        return holder.pack if holder.pack.key == form.layout_key else None
    modules, names = stacked.__dict__["sources"], stacked.__dict__["names"]
    params = [[m.get_parameter(n) for n in names] for m in modules]
    first = params[0]
    if any(p.device.type == "meta" or p.dtype != first[0].dtype or p.device != first[0].device
           for ps in params for p in ps):
        return None
    views = _views(form, [tuple(p.shape) for p in first])
    if views is None:
        return None
    pack = Pack(stacked.__dict__["owner"], list(modules), list(names), form, stacked, views)
    pack._rehome(strict=False)
    holder.pack = pack
    _live.add(pack)
    return pack


def packer(form, stacked: Callable) -> Optional[Callable[[], Optional[Pack]]]:
    """What ``FFNSpec.packer`` holds: packs the layer when called; None for stacked layouts."""
    if stacked.__dict__.get("holder") is None:
        return None
    return lambda: pack_experts(form, stacked)


def packed_fetch(form, stacked: Callable) -> Callable[[], tuple]:
    """``fetch`` for an experts spec: the packed tensors when the layer is packed for ``form``
    and gradients are off, else ``form.build(stacked)`` from the parameters themselves."""
    holder: Optional[Holder] = stacked.__dict__.get("holder")
    key = form.layout_key
    if holder is None:
        return lambda: form.build(stacked)

    def fetch():
        pack = holder.pack
        if pack is not None and pack.live and pack.key == key and not torch.is_grad_enabled():
            if not torch.compiler.is_compiling():
                pack.sync()
            return pack.tensors()
        return form.build(stacked)

    return fetch


def packs_read_by(gm: torch.fx.GraphModule, example_inputs: list) -> list[Pack]:
    """The live packs whose tensors a graph reads (as inputs or as attributes of ``gm``)."""
    seen = {id(t) for t in example_inputs if isinstance(t, Tensor)}
    seen |= {id(t) for t in gm.buffers()} | {id(t) for t in gm.parameters()}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            try:
                seen.add(id(_attr(gm, node.target)))
            except AttributeError:
                pass
    return [p for p in list(_live) if p.live and any(t is not None and id(t) in seen for t in p.tensors())]


def _attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def synced(compiled: Callable, packs: list[Pack]) -> Callable:
    """``compiled``, checking first that each pack it reads still holds its layer's parameters."""
    if not packs:
        return compiled

    def run(*args):
        for p in packs:
            p.sync()
        return compiled(*args)

    run._boxed_call = getattr(compiled, "_boxed_call", False)
    return run
