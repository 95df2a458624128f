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

Left whole: experts held as ``nn.ModuleList`` modules (their weights are stacked on each call, so
there is no [E, ., .] parameter to split; the graph slices the stack) and layers whose expert
count the group size does not divide (the pass reports that as an error).

After sharding, the model's state dict holds shards, its eager forward no longer runs (call the
compiled model), and an optimizer must be built after ``moec.compile`` (the parameters are new
objects). Each shard parameter carries ``_moec_shard = (first expert, number of experts)``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moec.passes.expert_parallel import resolve_group


def shard_experts(model: nn.Module, group_name: str) -> list[str]:
    group = resolve_group(group_name)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sharded = []
    for name, module in model.named_modules():
        spec = module.__dict__.get("_moec_experts_spec")
        if spec is None or spec.shard_group is not None:
            continue
        E = spec.num_experts
        if E % world:
            continue
        owned = {id(p): n for n, p in module.named_parameters()}
        fetched = [t for t in spec.ffn.fetch() if t is not None]
        if not all(id(t) in owned and t.shape[0] == E for t in fetched):
            continue  # weights stacked per call from separate modules: nothing to split in place
        L = E // world
        for t in fetched:
            owner_name, _, leaf = owned[id(t)].rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            shard = nn.Parameter(t.detach()[rank * L:(rank + 1) * L].clone(), requires_grad=t.requires_grad)
            shard._moec_shard = (rank * L, E)
            setattr(owner, leaf, shard)
        spec.shard_group = group_name
        sharded.append(name)
    return sharded
