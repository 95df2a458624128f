"""Expert parallelism (``moec.runtime.expert_parallel``) on real gloo process groups on CPU.

Each distributed test spawns W ranks once and runs every case in that one group (spawning costs
seconds). All ranks build the same global data from the case's seed and keep their slice; each
rank saves its output and gradients, and the parent compares them with the whole layer run in one
process on all tokens with the full weights through the ``moec::`` reference ops
(``permute -> grouped_gemm_act -> grouped_gemm_combine``). The loss is a fixed random cotangent
dotted with the outputs, summed over ranks, so the reference's gradients sliced by rank are the
per-rank gradients.

Tolerances: fp32, rtol 1e-5 / atol 1e-6; inputs and weights are scaled so outputs are O(1).

Legend: W ranks, T tokens, H hidden, E experts, K top-k, F first-GEMM width, I expert hidden.
"""

from __future__ import annotations

import datetime
import zlib

import pytest
import torch
import torch.distributed as dist

from moec.ir.ops import GATED_ACTIVATIONS
from moec.runtime import contiguous_placement, ep_moe
from moec.runtime.launch import spawn_gloo

TOL = dict(rtol=1e-5, atol=1e-6)
H, I = 16, 8


def _cases(world: int) -> list[dict]:
    """Picklable case descriptions; ``tokens`` is the token count of each rank."""
    many = [5, 3, 7, 1][:world]
    return [
        dict(name="random_swiglu", E=2 * world, K=2, activation="swiglu", bias=False, transposed=False,
             interleaved=False, routing="random", tokens=many, impl="moec"),
        dict(name="random_relu_bias_transposed_cpu", E=2 * world, K=min(3, 2 * world), activation="relu", bias=True,
             transposed=True, interleaved=False, routing="random", tokens=many, impl="moec_cpu"),
        dict(name="all_to_rank0_swiglu_bias_interleaved", E=2 * world, K=2, activation="swiglu", bias=True,
             transposed=False, interleaved=True, routing="rank0", tokens=many, impl="moec"),
        dict(name="rank_with_zero_tokens", E=2 * world, K=2, activation="swiglu", bias=True, transposed=False,
             interleaved=False, routing="random", tokens=[4, 0, 6, 2][:world], impl="moec"),
        dict(name="topk_equals_experts_relu_bias", E=2 * world, K=2 * world, activation="relu", bias=True,
             transposed=False, interleaved=False, routing="random", tokens=many, impl="moec"),
    ]


def _global_data(case: dict, world: int) -> dict:
    """The same tensors on every rank and in the parent (seeded by the case)."""
    g = torch.Generator().manual_seed(zlib.crc32(case["name"].encode()) + world)  # hash() differs per process
    E, K = case["E"], case["K"]
    T = sum(case["tokens"])
    F = 2 * I if case["activation"] in GATED_ACTIVATIONS else I
    routed_E = E // world if case["routing"] == "rank0" else E
    idx_TK = torch.rand(T, routed_E, generator=g).topk(K, dim=-1).indices
    shape_in, shape_out = ((E, H, F), (E, I, H)) if case["transposed"] else ((E, F, H), (E, H, I))
    data = dict(
        x_TH=torch.randn(T, H, generator=g),
        idx_TK=idx_TK,
        weights_TK=torch.rand(T, K, generator=g),
        w_in=torch.randn(*shape_in, generator=g) * H**-0.5,
        w_out=torch.randn(*shape_out, generator=g) * I**-0.5,
        b_in=torch.randn(E, F, generator=g) * 0.1 if case["bias"] else None,
        b_out=torch.randn(E, H, generator=g) * 0.1 if case["bias"] else None,
        cot_TH=torch.randn(T, H, generator=g),
    )
    return data


def _token_slice(case: dict, rank: int) -> slice:
    start = sum(case["tokens"][:rank])
    return slice(start, start + case["tokens"][rank])


def _leaf(t):
    return None if t is None else t.clone().requires_grad_(True)


def _grad(t):
    # A rank that received no rows still gets a (zero) gradient: the backward exchange runs anyway.
    if t is None:
        return None
    return torch.zeros_like(t) if t.grad is None else t.grad


def _run_rank(case: dict, world: int, rank: int, group=None) -> dict:
    data = _global_data(case, world)
    tok = _token_slice(case, rank)
    experts = contiguous_placement(case["E"], world)[rank]
    local = slice(experts.start, experts.stop)
    x = _leaf(data["x_TH"][tok])
    weights = _leaf(data["weights_TK"][tok])
    w_in, w_out = _leaf(data["w_in"][local]), _leaf(data["w_out"][local])
    b_in = _leaf(None if data["b_in"] is None else data["b_in"][local])
    b_out = _leaf(None if data["b_out"] is None else data["b_out"][local])
    out = ep_moe(x, data["idx_TK"][tok], weights, w_in, w_out, b_in, b_out, num_experts=case["E"],
                 activation=case["activation"], transposed=case["transposed"], interleaved=case["interleaved"],
                 group=group, impl=case["impl"])
    (out * data["cot_TH"][tok]).sum().backward()
    return dict(out=out.detach(), x=_grad(x), weights=_grad(weights), w_in=_grad(w_in), w_out=_grad(w_out),
                b_in=_grad(b_in), b_out=_grad(b_out))


def _reference(case: dict, world: int) -> dict:
    data = _global_data(case, world)
    E = case["E"]
    x, weights = _leaf(data["x_TH"]), _leaf(data["weights_TK"])
    w_in, w_out, b_in, b_out = (_leaf(data[k]) for k in ("w_in", "w_out", "b_in", "b_out"))
    idx_TK = data["idx_TK"]
    counts_E = torch.bincount(idx_TK.reshape(-1), minlength=E)
    token_N, slot_N = torch.ops.moec.permute(idx_TK, counts_E)
    a_NI = torch.ops.moec.grouped_gemm_act(x, token_N, counts_E, w_in, b_in, case["activation"], case["transposed"],
                                           case["interleaved"], 1.0, 0.0)
    out = torch.ops.moec.grouped_gemm_combine(a_NI, slot_N, counts_E, w_out, b_out, weights, case["transposed"])
    (out * data["cot_TH"]).sum().backward()
    return dict(out=out.detach(), x=_grad(x), weights=_grad(weights), w_in=_grad(w_in), w_out=_grad(w_out),
                b_in=_grad(b_in), b_out=_grad(b_out))


def _compare(case: dict, world: int, rank: int, got: dict, ref: dict) -> None:
    tok = _token_slice(case, rank)
    experts = contiguous_placement(case["E"], world)[rank]
    local = slice(experts.start, experts.stop)
    where = f"{case['name']}, rank {rank}/{world}"
    for key in ("out", "x", "weights"):
        torch.testing.assert_close(got[key], ref[key][tok], **TOL, msg=lambda m: f"{where}, {key}: {m}")
    for key in ("w_in", "w_out", "b_in", "b_out"):
        if ref[key] is None:
            assert got[key] is None, where
            continue
        torch.testing.assert_close(got[key], ref[key][local], **TOL, msg=lambda m: f"{where}, d{key}: {m}")


def _worker(rank: int, world: int) -> dict:
    return {case["name"]: _run_rank(case, world, rank) for case in _cases(world)}


@pytest.mark.parametrize("world", [2, 4])
def test_ep_moe_matches_single_process(world):
    results = spawn_gloo(_worker, world)
    for case in _cases(world):
        ref = _reference(case, world)
        for rank in range(world):
            got = results[rank][case["name"]]
            _compare(case, world, rank, got, ref)


@pytest.fixture
def single_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_ep_moe_single_rank_matches_reference(single_rank_group):
    for case in _cases(1):
        _compare(case, 1, 0, _run_rank(case, 1, 0), _reference(case, 1))


def test_contiguous_placement():
    assert contiguous_placement(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert contiguous_placement(3, 1) == [range(0, 3)]
    with pytest.raises(ValueError, match="moec: 6 experts do not split over 4 ranks; "):
        contiguous_placement(6, 4)


def _small_args(E_local: int):
    x = torch.randn(3, H)
    idx = torch.randint(0, E_local, (3, 2))
    return (x, idx, torch.rand(3, 2), torch.randn(E_local, 2 * I, H), torch.randn(E_local, H, I), None, None)


def test_ep_moe_without_process_group_raises():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="moec: expert parallelism needs torch.distributed initialised; "):
        ep_moe(*_small_args(2), num_experts=2, activation="swiglu")


def test_ep_moe_wrong_local_expert_count_raises(single_rank_group):
    with pytest.raises(ValueError, match="w_in has 2 local experts .* 4 experts over 1 ranks give 4 per rank"):
        ep_moe(*_small_args(2), num_experts=4, activation="swiglu")
