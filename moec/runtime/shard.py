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

With a placement plan (``moec.runtime.plan.PlacementPlan``; ``shard_experts(..., plan=)``), layer
i of the plan is the model's i-th recognised MoE layer in module order (``moec inspect``'s order),
and this rank keeps the experts the plan lists for it, in that order, replicas included; the
layer's spec records the placement, the traced layer rebuilds all experts with ``moec::unshard``
(``moec.ir.parallel``), and the ``expert_parallel`` pass routes by the plan. The plan must match
the group (world size), the layers (count) and each layer's expert count (``PlanError``
otherwise); layers whose expert count the group does not divide can be placed.

After sharding, the model's state dict holds shards, its eager forward no longer runs (call the
compiled model), and an optimizer must be built after ``moec.compile`` (the parameters are new
objects). Each shard parameter carries ``_moec_shard = (experts held, in row order; number of
experts)``.

Checkpoints: ``full_state_dict(model)`` (collective over each layer's group) is the state dict the
unsharded model would have: every expert's weights gathered (an expert's first replica), under
the model's own parameter names (module-list experts back in their per-expert modules), loadable
into a fresh copy of the model, which then runs eagerly. ``load_full_state_dict(model, state)``
(no communication) loads such a state dict into a sharded model: each rank takes the rows of the
experts it holds.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

import moec.ir.parallel  # noqa: F401  (registers moec::unshard)
from moec.ir.parallel import flatten_placement
from moec.passes.expert_parallel import resolve_group

# Where a module-list layer's stacked shards live (on the layer or its parent: ``shards_holder``).
SHARDS = "moec_expert_shards"


def moe_layers(model: nn.Module) -> list[tuple[str, object]]:
    """(name, ExpertsSpec) of every recognised MoE layer, in module order: what plan layers index."""
    return [(name, m.__dict__["_moec_experts_spec"]) for name, m in model.named_modules()
            if m.__dict__.get("_moec_experts_spec") is not None]


def shard_experts(model: nn.Module, group_name: str, plan=None) -> list[str]:
    group = resolve_group(group_name)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    layers = moe_layers(model)
    if plan is not None:
        _check_plan(plan, layers, world)
    sharded = []
    for i, (name, spec) in enumerate(layers):
        if spec.shard_group is not None:
            continue
        module = model.get_submodule(name)
        E = spec.num_experts
        if plan is not None:
            experts = [int(e) for e in plan.layers[i].rank_experts[rank]]
        elif E % world:
            continue
        else:
            experts = list(range(rank * (E // world), (rank + 1) * (E // world)))
        owned = {id(p): n for n, p in module.named_parameters()}
        fetched = spec.ffn.fetch()
        if all(t is None or (id(t) in owned and t.shape[0] == E) for t in fetched):
            for t in fetched:
                if t is not None:
                    owner_name, _, leaf = owned[id(t)].rpartition(".")
                    owner = module.get_submodule(owner_name) if owner_name else module
                    setattr(owner, leaf, _shard(t, experts, E))
        elif len(spec.ffn.sources) == E:
            _shard_module_list(model, name, spec, fetched, experts, E)
        else:
            continue
        spec.shard_group = group_name
        if plan is not None:
            lp = plan.layers[i]
            spec.placement = tuple(map(tuple, flatten_placement(lp.rank_experts, lp.shares)))
        sharded.append(name)
    return sharded


def _check_plan(plan, layers, world: int) -> None:
    from moec.runtime.plan import PlanError

    if plan.world_size != world:
        raise PlanError(f"the placement plan is for {plan.world_size} ranks but the expert-parallel group has "
                        f"{world}; plan for {world} ranks (moec place --world-size {world})")
    plan.validate(num_layers=len(layers))
    recorded = (plan.meta or {}).get("layer_names")
    if recorded and not _same_layers([str(n) for n in recorded], [name for name, _ in layers]):
        raise PlanError(f"the placement plan was made for MoE layers {list(recorded)[:4]}... but this model's are "
                        f"{[name for name, _ in layers][:4]}...: plan on a trace of this model (moec profile)")
    for i, (name, spec) in enumerate(layers):
        try:
            dataclasses.replace(plan, layers=[plan.layers[i]]).validate(num_experts=spec.num_experts)
        except PlanError as e:
            raise PlanError(f"MoE layer {i} ({name or '<root>'}, {spec.num_experts} experts): {e}") from None


def _same_layers(recorded: list[str], names: list[str]) -> bool:
    """Whether a trace's MoE layer names (the layer modules, ``<root>`` for the model itself) are
    this model's layers, in order (``names``: the modules holding the experts, the layers or
    their children)."""
    def holds(layer: str, name: str) -> bool:
        return layer == "<root>" or name == layer or name.startswith(layer + ".")

    return len(recorded) == len(names) and all(holds(r, n) for r, n in zip(recorded, names))


def _shard(t: torch.Tensor, experts: list[int], E: int) -> nn.Parameter:
    rows = torch.tensor(experts, dtype=torch.int64, device=t.device)
    shard = nn.Parameter(t.detach().index_select(0, rows).clone(), requires_grad=t.requires_grad)
    shard._moec_shard = (tuple(experts), E)
    return shard


class ExpertShards(nn.Module):
    """This rank's experts of a module-list layer, stacked once: ``w_in``, ``w_out`` (and biases).
    ``sources`` and ``source_fetch`` are the per-expert modules and the layer's stacking function,
    kept to map stacked rows back to per-expert parameters (``full_state_dict``)."""

    def __init__(self, weights, experts: list[int], E: int, sources=(), source_fetch=None):
        super().__init__()
        for key, t in zip(("w_in", "w_out", "b_in", "b_out"), weights):
            self.register_parameter(key, None if t is None else _shard(t, experts, E))
        self.__dict__["sources"] = tuple(sources)  # not submodules: they stay where the model has them
        self.__dict__["source_fetch"] = source_fetch
        self.__dict__["source_shapes"] = [tuple(p.shape) for m in sources for p in m.parameters()]

    def fetch(self):
        return self.w_in, self.w_out, self.b_in, self.b_out


def shards_holder(model: nn.Module, name: str) -> str:
    """The module that holds layer ``name``'s ``moec_expert_shards``: the layer, or its nearest
    ancestor that is not a module list or dict."""
    while name and isinstance(model.get_submodule(name), (nn.ModuleList, nn.ModuleDict)):
        name = name.rpartition(".")[0]
    return name


def _shard_module_list(model, name, spec, fetched, experts, E) -> None:
    """Experts held as E modules: stack this rank's into ``moec_expert_shards`` (on the layer, or
    on its parent when the layer is itself a module list or dict) and free the per-expert weights."""
    sources = spec.ffn.sources
    shards = ExpertShards(fetched, experts, E, sources, spec.ffn.fetch)
    model.get_submodule(shards_holder(model, name)).add_module(SHARDS, shards)
    pack = spec.ffn.packer() if spec.ffn.packer is not None else None
    if pack is not None:
        pack.release()  # the shards hold this rank's experts now; the parameters are emptied below
    spec.ffn = dataclasses.replace(spec.ffn, fetch=shards.fetch, sources=(), packer=None)
    with torch.no_grad():
        for expert in sources:
            for p in expert.parameters():
                p.data = p.data.new_empty(0)  # the eager forward no longer runs (documented)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

_KEYS = ("w_in", "w_out", "b_in", "b_out")


def _sharded_layers(model: nn.Module):
    """(name, spec, holder, shards) of every sharded layer: ``holder`` names the module that would
    hold its ``ExpertShards``, ``shards`` is that module for module-list experts, None for stacked
    parameters sharded in place."""
    for name, spec in moe_layers(model):
        if spec.shard_group is None:
            continue
        holder = shards_holder(model, name)
        shards = model.get_submodule(holder)._modules.get(SHARDS)
        yield name, spec, holder, shards if shards is not None and shards.sources else None


def _placement_args(spec, world: int) -> tuple[list[int], list[int], list[float]]:
    if spec.placement is not None:
        return tuple(list(a) for a in spec.placement)
    L = spec.num_experts // world
    return list(range(spec.num_experts)), [L] * world, []


def _index_map(shards: ExpertShards) -> tuple[list[nn.Parameter], list[Optional[torch.Tensor]]]:
    """The per-expert parameters of a module-list layer, and for each stacked weight the flat
    position (in those parameters, concatenated) of each of its elements: the layer's own
    stacking function run on parameters holding their element numbers."""
    params = [p for m in shards.sources for p in m.parameters()]
    saved = [p.data for p in params]
    offset = 0
    try:
        for p, shape in zip(params, shards.source_shapes):
            n = math.prod(shape)
            p.data = torch.arange(offset, offset + n, dtype=torch.float64).reshape(shape)
            offset += n
        with torch.no_grad():
            stacked = [None if t is None else t.detach().long() for t in shards.source_fetch()]
    finally:
        for p, d in zip(params, saved):
            p.data = d
    covered = torch.cat([t.flatten() for t in stacked if t is not None])
    if covered.numel() != offset or not torch.equal(covered.sort().values, torch.arange(offset)):
        raise RuntimeError("moec: this layer's stacking of its expert modules is not a permutation of their "
                           "weights; its shards cannot be mapped back to them")
    return params, stacked


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded model's state dict (see the module docstring); collective."""
    state = model.state_dict()
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    for name, spec, holder, shards in _sharded_layers(model):
        group = resolve_group(spec.shard_group)
        slots, counts, shares = _placement_args(spec, dist.get_world_size(group))

        def gather(t):
            return torch.ops.moec.unshard(t.detach(), spec.shard_group, slots, counts, shares, spec.num_experts)

        if shards is None:  # stacked parameters sharded in place
            for t in spec.ffn.fetch():
                if t is not None:
                    state[names[id(t)]] = gather(t)
            continue
        params, index = _index_map(shards)
        flat = torch.empty(sum(math.prod(shape) for shape in shards.source_shapes), dtype=shards.w_in.dtype)
        for key, idx in zip(_KEYS, index):
            if idx is not None:
                flat[idx.flatten()] = gather(getattr(shards, key)).flatten().to(flat.dtype)
            state.pop(f"{holder}.{SHARDS}.{key}".lstrip("."), None)
        offset = 0
        for p, shape in zip(params, shards.source_shapes):
            n = math.prod(shape)
            state[names[id(p)]] = flat[offset:offset + n].reshape(shape).clone()
            offset += n
    return state


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load an unsharded state dict into a sharded model: each shard takes its experts' rows."""
    state = dict(state)
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    with torch.no_grad():
        for name, spec, _, shards in _sharded_layers(model):
            if shards is None:
                for t in spec.ffn.fetch():
                    if t is not None:
                        rows = torch.tensor(t._moec_shard[0], dtype=torch.int64)
                        t.copy_(state.pop(names[id(t)]).index_select(0, rows))
                continue
            params, index = _index_map(shards)
            missing = [names[id(p)] for p in params if names[id(p)] not in state]
            if missing:
                raise KeyError(f"moec: the state dict has no {missing[0]} (and {len(missing) - 1} more expert "
                               f"weights of layer {name or '<root>'})")
            flat = torch.cat([state.pop(names[id(p)]).flatten().to(shards.w_in.dtype) for p in params])
            for key, idx in zip(_KEYS, index):
                if idx is not None:
                    shard = getattr(shards, key)
                    rows = torch.tensor(shard._moec_shard[0], dtype=torch.int64)
                    shard.copy_(flat[idx.index_select(0, rows)])
    missing, unexpected = model.load_state_dict(state, strict=False)
    shard_keys = {n for n, p in model.named_parameters() if hasattr(p, "_moec_shard")}
    emptied = {n for n, p in model.named_parameters() if p.numel() == 0}
    missing = [k for k in missing if k not in shard_keys and k not in emptied]
    if missing or unexpected:
        raise KeyError(f"moec: state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
