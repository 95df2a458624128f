"""Checkpoints of expert-parallel models (``moec.runtime.shard``): ``full_state_dict`` of a
sharded model is, bitwise, the state dict the model had before sharding (stacked and module-list
experts, contiguous and placed with replicas); a changed shard shows in it; ``load_full_state_dict``
puts an unsharded state back; a fresh model loaded with the full state dict runs eagerly and
matches the compiled expert-parallel model (rtol 1e-4, atol 1e-4 x max|out|). 2 gloo ranks."""

from __future__ import annotations

import pytest
import torch

import moec
from moec.models.hf import primary_output
from moec.models.spec import load_spec
from moec.runtime.launch import spawn_gloo
from moec.runtime.shard import full_state_dict, load_full_state_dict
from test_compile_ep import _close
from test_placement_ep import _plan

CASES = [
    dict(name="moe-mlp", spec="builtin:moe-mlp", placed=False),
    dict(name="moe-mlp-placed", spec="builtin:moe-mlp", placed=True),
    dict(name="stacked-bmm-placed", spec="builtin:stacked-bmm", placed=True),
    dict(name="mixtral", spec="hf:mixtral", placed=False),
]


def _diff(got: dict, want: dict) -> list[str]:
    """Keys missing or extra, and keys whose tensors are not bitwise equal."""
    out = sorted(set(got) ^ set(want))
    out += [k for k in sorted(set(got) & set(want)) if not torch.equal(got[k], want[k])]
    return out


def _case(case: dict, world: int, rank: int) -> dict:
    torch._dynamo.reset()
    model, args, _ = load_spec(case["spec"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = _plan(dict(case, rows=[1] * world), world) if case["placed"] else None
    compiled = moec.compile(model, expert_parallel=True, inner="aot_eager", placement=plan)
    with torch.no_grad():
        out = primary_output(compiled(*args))
    experts = {n for n, p in model.named_parameters() if hasattr(p, "_moec_shard")}
    assert experts, case["name"]
    result = dict(same=_diff(full_state_dict(model), before))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in experts:
                p.add_(1.0)
    changed = full_state_dict(model)
    result["changed"] = sorted(k for k in before if not torch.equal(changed[k], before[k]))
    result["plus_one"] = [k for k in result["changed"] if not torch.equal(changed[k], before[k] + 1)]
    load_full_state_dict(model, before)
    result["restored"] = _diff(full_state_dict(model), before)
    fresh, _, _ = load_spec(case["spec"])
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(full_state_dict(model))
    with torch.no_grad():
        result["eager"], result["compiled"] = primary_output(fresh(*args)), out
    return result


def _worker(rank: int, world: int) -> dict:
    return {case["name"]: _case(case, world, rank) for case in CASES}


def test_full_state_dict_round_trips_and_runs_eagerly():
    results = spawn_gloo(_worker, 2)
    for rank, by_case in enumerate(results):
        for case in CASES:
            r = by_case[case["name"]]
            where = f"{case['name']}, rank {rank}"
            assert r["same"] == [], (where, r["same"])
            assert r["changed"] and r["plus_one"] == [], (where, r["changed"], r["plus_one"])
            assert r["restored"] == [], (where, r["restored"])
            _close(r["eager"], r["compiled"], f"{where}: eager model from the full state dict")


def test_load_full_state_dict_names_a_missing_expert_weight():
    with pytest.raises(torch.multiprocessing.ProcessRaisedException, match="moec: the state dict has no"):
        spawn_gloo(_missing_worker, 2)


def _missing_worker(rank: int, world: int) -> None:
    model, args, _ = load_spec("builtin:moe-mlp")
    state = {k: v for k, v in model.state_dict().items() if "experts.0." not in k}
    moec.compile(model, expert_parallel=True, inner="aot_eager")
    load_full_state_dict(model, state)
