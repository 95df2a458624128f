"""``moec.compile(model, expert_parallel=True)`` on real gloo process groups against the
single-process model.

Each rank feeds its own batch rows (uneven counts, one rank may have none) and must get the
eager model's output on those rows; after ``loss = sum(out * cot)`` on every rank and a sum
all-reduce of every parameter's gradient, the gradients must equal the eager model's on all rows
with the concatenated cotangent (experts' gradients live on their owner rank, zeros elsewhere;
replicated parameters' gradients are per-rank partial sums).

One spawn per world size runs every case (spawning and compiling cost seconds); each case
compiles a fresh model after ``torch._dynamo.reset()``.

Tolerances: fp32, rtol 1e-4 and atol 1e-4 times the reference tensor's largest magnitude (1e-5 at
least): the expert GEMMs group rows differently (rows of several ranks, chunks), so sums round
differently, and an embedding's gradient sums many such rows.
"""

from __future__ import annotations

import pathlib
import zlib

import pytest
import torch
import torch.distributed as dist

import moec
from moec.models.hf import primary_output
from moec.models.spec import load_spec
from moec.runtime.launch import spawn_gloo



def _close(got, want, msg):
    atol = max(1e-5, 1e-4 * float(want.abs().max())) if want.numel() else 1e-5
    torch.testing.assert_close(got, want, rtol=1e-4, atol=atol, msg=lambda m: f"{msg}: {m}")


# The default run's cases at 2 ranks: moec's own layouts (ModuleList, stacked bmm, a shared expert
# with a rank without tokens, one token per rank, hierarchical all-to-all) and one transformers
# family; the other families, Inductor and 4 ranks run in the slow run.
CORE = ("moe-mlp", "stacked-bmm-all-to-rank0", "shared-expert-rank-without-tokens", "mixtral", "moe-mlp-one-token",
        "moe-mlp-hierarchical", "stacked-bmm-all-to-rank0-hierarchical", "post-norm")
# Layers the expert_parallel pass leaves as they are (their experts' weights still sharded and
# all-gathered): capacity limits (Switch), and a norm between the experts and the combine.
UNREWRITTEN = ("switch_transformers", "post-norm")
POST_NORM = f"{pathlib.Path(__file__).with_name('post_norm_factory.py')}:own_bank"


def _cases(world: int, core: bool = False) -> list[dict]:
    """``rows[r]``: batch rows of rank r; ``to_rank0``: router bias makes rank 0's experts win.
    ``core``: only the ``CORE`` cases."""
    uneven = [2, 1, 3, 1][:world]
    cases = [
        dict(name="moe-mlp", spec="builtin:moe-mlp", rows=uneven, chunks=1, inner="aot_eager"),
        dict(name="stacked-bmm-all-to-rank0", spec="builtin:stacked-bmm", rows=uneven, chunks=2,
             inner="aot_eager", to_rank0=True),
        dict(name="shared-expert-rank-without-tokens", spec="builtin:shared-expert", rows=[2, 0, 1, 2][:world],
             chunks=2, inner="aot_eager"),
        dict(name="stacked-bmm-inductor", spec="builtin:stacked-bmm", rows=uneven, chunks=3, inner="inductor"),
        dict(name="mixtral", spec="hf:mixtral", rows=[1] * world, chunks=1, inner="aot_eager"),
        dict(name="deepseek_v3", spec="hf:deepseek_v3", rows=[1] * world, chunks=2, inner="aot_eager"),
        # One token per rank, two chunks: one chunk of every rank is empty.
        dict(name="moe-mlp-one-token", spec="builtin:moe-mlp", rows=[1] * world, seq=1, chunks=2,
             inner="aot_eager"),
        # An RMSNorm with a per-expert scale on each expert's output row (Ergo's post-norm).
        dict(name="post-norm", spec=POST_NORM, rows=uneven, chunks=1, inner="aot_eager"),
    ]
    # hierarchical all-to-all: nodes of 2 ranks at 4 ranks, of 1 rank at 2
    cases += [
        dict(name="moe-mlp-hierarchical", spec="builtin:moe-mlp", rows=uneven, chunks=2, inner="aot_eager",
             ranks_per_node=world // 2, hierarchical=True),
        dict(name="stacked-bmm-all-to-rank0-hierarchical", spec="builtin:stacked-bmm", rows=[2, 0, 1, 2][:world],
             chunks=1, inner="aot_eager", to_rank0=True, ranks_per_node=world // 2, hierarchical=True),
    ]
    if world == 2:
        cases += [
            dict(name="sort-split", spec="builtin:sort-split", rows=uneven, chunks=1, inner="aot_eager"),
            dict(name="qwen2_moe", spec="hf:qwen2_moe", rows=[1, 2], chunks=2, inner="aot_eager"),
            dict(name="qwen3_moe", spec="hf:qwen3_moe", rows=[1, 1], chunks=1, inner="aot_eager"),
            dict(name="olmoe", spec="hf:olmoe", rows=[1, 1], chunks=1, inner="aot_eager"),
            dict(name="gpt_oss", spec="hf:gpt_oss", rows=[1, 1], chunks=2, inner="aot_eager"),
            # Capacity-limited layers stay replicated: still the eager output on each rank's rows.
            dict(name="switch_transformers", spec="hf:switch_transformers", rows=[1, 1], chunks=1,
                 inner="aot_eager"),
        ]
    return [c for c in cases if c["name"] in CORE] if core else cases


def _build(case: dict, world: int):
    """The model, the full batch (tuple of args) and the cotangent; the same in every process."""
    model, args, _ = load_spec(case["spec"])
    g = torch.Generator().manual_seed(zlib.crc32(case["name"].encode()) + world)
    B = sum(case["rows"])
    if not case["spec"].startswith("hf:"):
        shape = args[0].shape[1:] if "seq" not in case else (case["seq"], *args[0].shape[2:])
        full = (torch.randn(B, *shape, generator=g),)
    else:
        ids = torch.randint(3, 100, (B, args[0].shape[1]), generator=g)
        full = (ids,) + tuple(torch.ones_like(ids) for _ in args[1:])
    if case.get("to_rank0"):
        with torch.no_grad():
            for name, module in model.named_modules():
                if name.endswith("router") or name.endswith("gate"):
                    E = module.weight.shape[0]
                    module.bias[: E // world] += 50.0
    out = primary_output(model(*full))
    cot = torch.randn(out.shape, generator=g)
    return model, full, cot


def _rows(case: dict, rank: int) -> slice:
    start = sum(case["rows"][:rank])
    return slice(start, start + case["rows"][rank])


def _grads(model) -> dict:
    return {n: (torch.zeros_like(p) if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}


def _run_rank(case: dict, world: int, rank: int) -> dict:
    torch._dynamo.reset()
    model, full, cot = _build(case, world)
    mine = tuple(a[_rows(case, rank)] for a in full)
    compiled = moec.compile(model, expert_parallel=True, chunks=case["chunks"], inner=case["inner"],
                            ranks_per_node=case.get("ranks_per_node"), hierarchical=case.get("hierarchical", "auto"))
    torch._dynamo.utils.counters["moec"].clear()
    out = primary_output(compiled(*mine))
    sharded = torch._dynamo.utils.counters["moec"]["expert_parallel_layers"]
    # Every MoE layer is sharded but Switch's capacity-limited ones (rows per rank: 0 is fine).
    assert (sharded == 0) == (case["name"] in UNREWRITTEN), (case["name"], sharded)
    hierarchical = torch._dynamo.utils.counters["moec"]["expert_parallel_hierarchical_layers"]
    assert hierarchical == (sharded if case.get("hierarchical") else 0), (case["name"], hierarchical)
    (out * cot[_rows(case, rank)]).sum().backward()
    return dict(out=out.detach(), grads=_rank_grads(model))


def _rank_grads(model) -> dict:
    """Per parameter (its ``_moec_shard`` or None, its gradient); replicated parameters' gradients
    summed over the ranks (collective)."""
    grads = {}
    for name, p in model.named_parameters():
        g = torch.zeros_like(p) if p.grad is None else p.grad.clone()
        shard = getattr(p, "_moec_shard", None)  # (experts held, E): this rank's experts only
        if shard is None:
            dist.all_reduce(g)
        grads[name] = (shard, g)
    return grads


def _reference(case: dict, world: int) -> dict:
    model, full, cot = _build(case, world)
    out = primary_output(model(*full))
    (out * cot).sum().backward()
    grads = _grads(model)
    grads.update(_stacked_list_grads(model))
    return dict(out=out.detach(), grads=grads)


def _stacked_list_grads(model) -> dict:
    """Gradients of module-list experts stacked as ``moec.runtime.shard`` stacks their weights,
    under the shard module's parameter names: the layer's ``fetch`` run on the gradients (each
    parameter's data swapped with its gradient for the call)."""
    from moec.capture import convert_model
    from moec.runtime.shard import shards_holder

    convert_model(model)  # eager calls still run the model's own code
    out = {}
    for name, module in list(model.named_modules()):
        spec = module.__dict__.get("_moec_experts_spec")
        if spec is None or not spec.ffn.sources:
            continue
        params = [p for m in spec.ffn.sources for p in m.parameters()]
        saved = [p.data for p in params]
        for p in params:
            p.data = p.grad if p.grad is not None else torch.zeros_like(p)
        stacked = spec.ffn.fetch()
        for p, d in zip(params, saved):
            p.data = d
        holder = shards_holder(model, name)
        for key, g in zip(("w_in", "w_out", "b_in", "b_out"), stacked):
            if g is not None:
                out[f"{holder}.moec_expert_shards.{key}".lstrip(".")] = g.detach().clone()
    return out


def _worker(rank: int, world: int, core: bool = False) -> dict:
    return {case["name"]: _run_rank(case, world, rank) for case in _cases(world, core)}


def check_ranks(results: list[dict], case: dict, world: int, ref: dict, contiguous: bool = True) -> None:
    """Every rank's output and gradients against the single-process ones: a shard's rows against
    the reference gradient of the experts it holds (``contiguous``: rank w's ``[w*E/W, (w+1)*E/W)``)."""
    for rank in range(world):
        got = results[rank][case["name"]]
        where = f"{case['name']}, rank {rank}/{world}"
        _close(got["out"], ref["out"][_rows(case, rank)], f"{where}, output")
        shards = 0
        for name, (shard, mine) in got["grads"].items():
            g = ref["grads"][name]
            if mine.numel() == 0 and g.numel() > 0:
                continue  # a per-expert weight emptied by sharding: its rows live in the shard
            if shard is not None:
                shards += 1
                experts, E = shard
                assert E == g.shape[0] and len(experts) == mine.shape[0], (where, name)
                if contiguous:
                    assert list(experts) == list(range(rank * E // world, (rank + 1) * E // world)), (where, name)
                g = g[list(experts)]
            _close(mine, g, f"{where}, d{name}")
        # every layer's experts are sharded (Switch's capacity layers gather them back each step)
        assert shards > 0, (where, shards)


# 4 ranks on 2 cores: the same checks as 2 ranks, four times the compiles (slow run only)
@pytest.mark.parametrize("world, core", [(2, True), pytest.param(2, False, marks=pytest.mark.slow),
                                         pytest.param(4, False, marks=pytest.mark.slow)])
def test_compiled_expert_parallel_matches_single_process(world, core):
    results = spawn_gloo(_worker, world, core)
    for case in _cases(world, core):
        check_ranks(results, case, world, _reference(case, world))
