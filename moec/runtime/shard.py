"""Expert-parallel sharding of a converted model's expert weights: each rank keeps its experts only.

Contract: ``shard_experts(model, group_name)`` (called by ``moec.compile(..., expert_parallel=True)``
on every rank, after capture converted the model) finds every recognised MoE layer whose stacked
expert weights are parameters of the layer (``[E, ., .]`` tensors, the Hugging Face and
hand-written stacked layouts) and replaces each of them, in place, by a parameter holding only
this rank's experts (``[L, ., .]``, rows ``[rank*L, (rank+1)*L)``: contiguous placement). The
layer's ``ExpertsSpec`` then rebuilds all experts' weights by an autograd all-gather when traced,
which keeps the captured graph's meaning (every op sees all E experts); the ``expert_parallel``
pass recognises the gather and gives the local experts the shard itself, so the gather never
runs in a sharded layer. Returns the names of the layers sharded.

Experts held as E modules (an ``nn.ModuleList`` of MLPs, stacked on each call): this rank's are
stacked once into an ``ExpertShards`` module registered as ``moec_expert_shards`` on the layer
(or its parent when the layer is the list itself), the layer reads them from there, and the
per-expert parameters are emptied. Left whole: layers whose expert count the group size does not
divide (the pass reports that as an error).

After sharding, the model's state dict holds shards, its eager forward no longer runs (call the
compiled model), and an optimizer must be built after ``moec.compile`` (the parameters are new
objects). Each shard parameter carries ``_moec_shard = (first expert, number of experts)``.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from moec.passes.expert_parallel import resolve_group


def shard_experts(model: nn.Module, group_name: str) -> list[str]:
    group = resolve_group(group_name)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sharded = []
    for name, module in list(model.named_modules()):
        spec = module.__dict__.get("_moec_experts_spec")
        if spec is None or spec.shard_group is not None:
            continue
        E = spec.num_experts
        if E % world:
            continue
        owned = {id(p): n for n, p in module.named_parameters()}
        fetched = spec.ffn.fetch()
        L = E // world
        if all(t is None or (id(t) in owned and t.shape[0] == E) for t in fetched):
            for t in fetched:
                if t is not None:
                    owner_name, _, leaf = owned[id(t)].rpartition(".")
                    owner = module.get_submodule(owner_name) if owner_name else module
                    setattr(owner, leaf, _shard(t, rank * L, L, E))
        elif len(spec.ffn.sources) == E:
            _shard_module_list(model, name, spec, fetched, rank * L, L, E)
        else:
            continue
        spec.shard_group = group_name
        sharded.append(name)
    return sharded


def _shard(t: torch.Tensor, first: int, L: int, E: int) -> nn.Parameter:
    shard = nn.Parameter(t.detach()[first:first + L].clone(), requires_grad=t.requires_grad)
    shard._moec_shard = (first, E)
    return shard


class ExpertShards(nn.Module):
    """This rank's experts of a module-list layer, stacked once: ``w_in``, ``w_out`` (and biases)."""

    def __init__(self, weights, first: int, L: int, E: int):
        super().__init__()
        for key, t in zip(("w_in", "w_out", "b_in", "b_out"), weights):
            self.register_parameter(key, None if t is None else _shard(t, first, L, E))

    def fetch(self):
        return self.w_in, self.w_out, self.b_in, self.b_out


def shards_holder(model: nn.Module, name: str) -> str:
    """The module that holds layer ``name``'s ``moec_expert_shards``: the layer, or its nearest
    ancestor that is not a module list or dict."""
    while name and isinstance(model.get_submodule(name), (nn.ModuleList, nn.ModuleDict)):
        name = name.rpartition(".")[0]
    return name


def _shard_module_list(model, name, spec, fetched, first, L, E) -> None:
    """Experts held as E modules: stack this rank's into ``moec_expert_shards`` (on the layer, or
    on its parent when the layer is itself a module list or dict) and free the per-expert weights."""
    shards = ExpertShards(fetched, first, L, E)
    model.get_submodule(shards_holder(model, name)).add_module("moec_expert_shards", shards)
    sources = spec.ffn.sources
    spec.ffn = dataclasses.replace(spec.ffn, fetch=shards.fetch, sources=())
    with torch.no_grad():
        for expert in sources:
            for p in expert.parameters():
                p.data = p.data.new_empty(0)  # the eager forward no longer runs (documented)
