"""A rank that dies or hangs makes the others fail with ``CollectiveError`` within the timeout
(``moec.runtime.group``), never hang.

The distributed tests spawn W = 3 gloo ranks. All ranks make their groups with ``ep_group`` and run
one healthy ``ep_moe`` (ranks 0 and 1 also make an ``ep_group`` of a subgroup in non-sorted rank
order, which only they call, and all-reduce on it); then the last rank either exits (``os._exit(1)``) or hangs (sleeps until the
parent kills it) and the others run, each on its own ``ep_group`` so that each one times out on its
own: ``ep_moe`` (sync ``all_to_all_single``), an ``async_op=True`` all-to-all + ``wait()``, and the
functional ``all_to_all_single`` + ``wait_tensor``, each inside ``collective_errors``, then a
model compiled with ``moec.compile(..., expert_parallel=True, timeout_s=...)`` (one healthy step
first), which must raise ``CollectiveError`` by itself. Each survivor
writes what it saw to a JSON file; the parent joins the survivors with a deadline, kills whatever is
left, and checks the files. The elapsed-time bound (timeout + 15 s) is a bound, not a benchmark.

Legend: W ranks, T tokens per rank, H hidden, I expert hidden, K top-k, E experts (one per rank).
"""

from __future__ import annotations

import datetime
import inspect
import json
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moec
from moec.models.builtin import BUILTIN_MODELS
from moec.runtime import ep_moe
from moec.runtime.group import (
    DEFAULT_TIMEOUT_S,
    CollectiveError,
    collective_errors,
    ep_group,
    group_timeout_s,
    timeout_from_env,
)

W, T, H, I, K = 3, 4, 16, 8, 2
E = W
# One group per failing operation; distinct timeouts make distinct (cached) groups.
OP_TIMEOUTS_S = {"ep_moe": 3.0, "async_wait": 2.0, "functional": 2.5}
COMPILED_TIMEOUT_S = 3.5  # moec.compile(..., expert_parallel=True, timeout_s=...)
SLACK_S = 15.0
JOIN_DEADLINE_S = 90.0  # the parent gives up (and fails) after this; a healthy run takes ~15 s

# What gloo says (torch 2.13), for the message-level unit tests.
GLOO_RESET = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
              "[127.0.0.1]:2754: Connection reset by peer. This is typically caused by a remote worker "
              "hanging or bugs in the application. Check the logs of the remote worker before reporting "
              "an error. GLHF!")
GLOO_CLOSED = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed "
               "by peer [127.0.0.1]:17315. This is typically caused by a remote worker crashing.")
GLOO_TIMEOUT = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:129] Timed out "
                "waiting 3000ms for send operation to complete")
GLOO_PAIR_CLOSED = "Application timeout caused pair closure"
GLOO_SIZE = "[enforce fail at /__w/pytorch/pytorch/third_party/gloo/gloo/alltoall.cc:30] in->size == out->size. "


def _layer_args(rank: int):
    g = torch.Generator().manual_seed(rank)
    return (torch.randn(T, H, generator=g), torch.randint(0, E, (T, K), generator=g), torch.rand(T, K, generator=g),
            torch.randn(E // W, 2 * I, H, generator=g) * H**-0.5, torch.randn(E // W, H, I, generator=g) * I**-0.5,
            None, None)


def _run_op(op: str, group) -> None:
    if op == "ep_moe":
        ep_moe(*_layer_args(dist.get_rank()), num_experts=E, activation="swiglu", group=group)
    elif op == "async_wait":
        x = torch.ones(2 * W, H)
        dist.all_to_all_single(torch.empty_like(x), x, group=group, async_op=True).wait()
    else:
        splits = [2] * W
        y = torch.ops._c10d_functional.all_to_all_single(torch.ones(2 * W, H), splits, splits, group.group_name)
        torch.ops._c10d_functional.wait_tensor(y)


def _wait_for(paths: list[str], deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while not all(os.path.exists(p) for p in paths):
        if time.monotonic() > end:
            raise TimeoutError(f"peers never became ready: {paths}")
        time.sleep(0.02)


def _worker(rank: int, world: int, tmp: str, mode: str) -> None:
    torch.set_num_threads(1)  # W ranks share 2 cores
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    result: dict = {"ops": {}}
    try:
        groups = {op: ep_group(timeout_s=t) for op, t in OP_TIMEOUTS_S.items()}
        result["cached"] = ep_group(timeout_s=OP_TIMEOUTS_S["ep_moe"]) is groups["ep_moe"]
        result["distinct"] = len({id(g) for g in groups.values()}) == len(groups)
        result["healthy_rows"] = ep_moe(*_layer_args(rank), num_experts=E, activation="swiglu",
                                        group=groups["ep_moe"]).shape[0]
        # A subgroup in non-sorted rank order: only its members call ep_group; group ranks are kept.
        # (torch 2.11's new_group always sorts: the subgroup is [0, 1] there)
        unsorted = "sort_ranks" in inspect.signature(dist.new_group).parameters
        sub = dist.new_group([1, 0], sort_ranks=False) if unsorted else dist.new_group([0, 1])
        if rank in (0, 1):
            ep_sub = ep_group(sub, timeout_s=5)
            total = torch.tensor([float(dist.get_rank(ep_sub))])
            dist.all_reduce(total, group=ep_sub)
            result["subgroup"] = [dist.get_process_group_ranks(ep_sub), dist.get_rank(ep_sub), total.item()]
        # A compiled expert-parallel model: moec.compile makes its group (collective), a healthy step.
        model, (x,) = BUILTIN_MODELS["moe-mlp"](num_experts=2 * W)
        compiled = moec.compile(model, expert_parallel=True, timeout_s=COMPILED_TIMEOUT_S, inner="aot_eager")
        result["compiled_shape"] = list(compiled(x[rank % 2:][:1]).shape)
        open(os.path.join(tmp, f"ready{rank}"), "w").close()
        if rank == world - 1:
            # Only after every survivor finished the healthy step, so none of its data is lost in flight.
            _wait_for([os.path.join(tmp, f"ready{r}") for r in range(world - 1)], 30)
            if mode == "exit":
                os._exit(1)
            time.sleep(3600)  # hangs: never joins the next collective; the parent kills it
        for op, group in groups.items():
            start = time.monotonic()
            try:
                with collective_errors(f"{op} in layer 'test.moe'", group_timeout_s(group)):
                    _run_op(op, group)
                seen = dict(error=None)
            except Exception as err:  # noqa: BLE001 - recorded and checked by the parent
                cause = err.__cause__
                seen = dict(error=type(err).__name__, message=str(err), kind=getattr(err, "kind", None),
                            cause=None if cause is None else f"{type(cause).__name__}: {cause}")
            seen["elapsed_s"] = time.monotonic() - start
            result["ops"][op] = seen
        start = time.monotonic()
        try:
            compiled(x[:1])
            seen = dict(error=None)
        except Exception as err:  # noqa: BLE001 - recorded and checked by the parent
            seen = dict(error=type(err).__name__, message=str(err), kind=getattr(err, "kind", None))
        seen["elapsed_s"] = time.monotonic() - start
        result["compiled"] = seen
    except BaseException:  # noqa: BLE001
        result["crash"] = traceback.format_exc()
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    start = time.monotonic()
    dist.destroy_process_group()
    with open(os.path.join(tmp, f"destroy{rank}.json"), "w") as f:
        json.dump(time.monotonic() - start, f)


def _spawn(mode: str, tmp: str) -> list[dict]:
    """Run W ranks; return the survivors' results. Never waits past ``JOIN_DEADLINE_S``."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, W, tmp, mode), daemon=True) for r in range(W)]
    for p in procs:
        p.start()
    try:
        end = time.monotonic() + JOIN_DEADLINE_S
        for p in procs[:-1]:
            p.join(max(0.0, end - time.monotonic()))
        stuck = [r for r, p in enumerate(procs[:-1]) if p.is_alive()]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
    assert not stuck, f"ranks {stuck} still running after {JOIN_DEADLINE_S} s: a collective hung"
    assert [p.exitcode for p in procs[:-1]] == [0] * (W - 1), "survivors must exit cleanly"
    results = []
    for r in range(W - 1):
        with open(os.path.join(tmp, f"rank{r}.json")) as f:
            results.append(json.load(f))
        assert "crash" not in results[-1], f"rank {r}:\n{results[-1]['crash']}"
        with open(os.path.join(tmp, f"destroy{r}.json")) as f:
            assert json.load(f) < 10, f"rank {r}: destroy_process_group took too long"
    return results


@pytest.mark.parametrize("mode, kind", [("exit", "peer_lost"), ("hang", "timeout")])
def test_dead_or_hung_rank_raises_collective_error(mode, kind, tmp_path):
    for rank, result in enumerate(_spawn(mode, str(tmp_path))):
        assert result["cached"] and result["distinct"], rank
        assert result["healthy_rows"] == T, rank
        if "sort_ranks" in inspect.signature(dist.new_group).parameters:
            assert result["subgroup"] == [[1, 0], 1 - rank, 1.0], rank
        else:
            assert result["subgroup"] == [[0, 1], rank, 1.0], rank
        for op, timeout_s in OP_TIMEOUTS_S.items():
            seen = result["ops"][op]
            where = f"{mode}, rank {rank}, {op}: {seen}"
            assert seen["error"] == "CollectiveError", where
            assert seen["kind"] == kind, where
            assert seen["elapsed_s"] < timeout_s + SLACK_S, where
            if mode == "hang":  # it did wait for the timeout, not fail early for another reason
                assert seen["elapsed_s"] > timeout_s * 0.9, where
            assert seen["cause"].startswith("RuntimeError: "), where
            # ep_moe raises its own CollectiveError (the outer block passes a nested one through)
            what = "the all-to-alls of ep_moe" if op == "ep_moe" else f"{op} in layer 'test.moe'"
            head = f"moec: rank {rank} of {W}: {what} failed after "
            assert seen["message"].startswith(head), where
            assert f"(it is {timeout_s:g} s here)" in seen["message"], where
        seen = result["compiled"]
        where = f"{mode}, rank {rank}, compiled model: {seen}"
        assert result["compiled_shape"] == [1, 8, 64], where
        assert seen["error"] == "CollectiveError" and seen["kind"] == kind, where
        assert seen["elapsed_s"] < COMPILED_TIMEOUT_S + SLACK_S, where
        assert seen["message"].startswith(f"moec: rank {rank} of {W}: the expert-parallel all-to-alls of a "
                                          "compiled graph failed after "), where


# ---- single-process tests ----------------------------------------------------------------------


def test_timeout_from_env(monkeypatch):
    monkeypatch.delenv("MOEC_EP_TIMEOUT", raising=False)
    assert timeout_from_env() == DEFAULT_TIMEOUT_S == 300.0
    for raw, value in (("12.5", 12.5), (" 7 ", 7.0), ("", DEFAULT_TIMEOUT_S)):
        monkeypatch.setenv("MOEC_EP_TIMEOUT", raw)
        assert timeout_from_env() == value, raw
    monkeypatch.setenv("MOEC_EP_TIMEOUT", "5m")
    with pytest.raises(ValueError, match=r"^moec: environment variable MOEC_EP_TIMEOUT='5m' is not a number; "):
        timeout_from_env()
    for raw in ("0", "-3", "inf", "nan"):
        monkeypatch.setenv("MOEC_EP_TIMEOUT", raw)
        with pytest.raises(ValueError, match="environment variable MOEC_EP_TIMEOUT must be a positive, finite "):
            timeout_from_env()


def test_collective_error_message():
    err = CollectiveError("all-to-all of token rows in layer 'model.layers.0.mlp'", 3.0, "timeout", GLOO_TIMEOUT, 3.01)
    assert str(err) == (
        "moec: this rank: all-to-all of token rows in layer 'model.layers.0.mlp' failed after 3.0 s: no answer "
        "from a peer rank within the timeout of 3 s. A peer rank died or hung; check the other ranks' logs for "
        "the first error. If the step is legitimately slow, raise MOEC_EP_TIMEOUT (seconds) (it is 3 s here) or "
        "pass timeout_s= to moec.runtime.ep_group. The process group is unusable now: exit this process and "
        "restart the job. Backend error: " + GLOO_TIMEOUT
    )
    assert (err.what, err.timeout_s, err.kind, err.elapsed_s) == (
        "all-to-all of token rows in layer 'model.layers.0.mlp'", 3.0, "timeout", 3.01)
    lost = str(CollectiveError("x", None, "peer_lost"))
    assert "x failed: a peer rank closed its connection (it exited or crashed). " in lost
    assert "raise MOEC_EP_TIMEOUT (seconds) or pass" in lost and "Backend error" not in lost


@pytest.mark.parametrize("err, kind", [
    (RuntimeError(GLOO_RESET), "peer_lost"),
    (RuntimeError(GLOO_CLOSED), "peer_lost"),
    (RuntimeError(GLOO_TIMEOUT), "timeout"),
    (RuntimeError(GLOO_PAIR_CLOSED), "timeout"),
    (dist.DistStoreError("wait timeout after 3000ms, keys: /default_pg/0//2//cpu//0/2"), "timeout"),
    (dist.DistNetworkError("failed to connect"), "backend"),
    (dist.DistBackendError("NCCL error: remote process exited or there was a network error"), "peer_lost"),
], ids=lambda v: v if isinstance(v, str) else type(v).__name__)
def test_collective_errors_translates(err, kind):
    with pytest.raises(CollectiveError) as info:
        with collective_errors("all-to-all of counts", 3.0):
            raise err
    assert info.value.kind == kind
    assert info.value.__cause__ is err
    assert str(info.value).startswith("moec: this rank: all-to-all of counts failed after ")


@pytest.mark.parametrize("err", [
    RuntimeError(GLOO_SIZE),
    RuntimeError("Split sizes doesn't match total dim 0 size"),
    ValueError("Invalid usage of tensors with different dtypesFound torch.int64 and  torch.float32"),
    dist.DistBackendError("NCCL error: invalid usage"),
    CollectiveError("inner", 3.0, "timeout"),
    KeyError("x"),
], ids=lambda v: type(v).__name__)
def test_collective_errors_passes_other_errors(err):
    with pytest.raises(type(err)) as info:
        with collective_errors("all-to-all of counts", 3.0):
            raise err
    assert info.value is err


def test_ep_group_without_process_group_raises():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="^moec: ep_group needs torch.distributed initialised; "):
        ep_group()


@pytest.fixture
def single_rank_group(tmp_path):
    def init(name: str):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/{name}", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60))
    init("rendezvous")
    try:
        yield init
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_ep_group_cached_per_timeout(single_rank_group, monkeypatch):
    monkeypatch.setenv("MOEC_EP_TIMEOUT", "7")
    g = ep_group()
    assert ep_group() is g and ep_group(timeout_s=7) is g and ep_group(g) is g
    assert dist.get_process_group_ranks(g) == [0] and g is not dist.group.WORLD
    assert group_timeout_s(g) == 7.0 and group_timeout_s(None) is None
    g5 = ep_group(timeout_s=5)
    assert g5 is not g and group_timeout_s(g5) == 5.0
    for bad, exc in ((0, ValueError), (-1.0, ValueError), (float("inf"), ValueError), ("3", TypeError)):
        with pytest.raises(exc, match="^moec: timeout_s must be a "):
            ep_group(timeout_s=bad)
    # a re-initialised world drops the old (destroyed) groups
    dist.destroy_process_group()
    single_rank_group("rendezvous2")
    assert ep_group() is not g
    assert group_timeout_s(g) is None


def test_ep_moe_on_ep_group_and_shape_error_passes_through(single_rank_group):
    g = ep_group(timeout_s=5)
    x_TH, idx_TK, weights_TK, w_in, w_out, _, _ = _layer_args(0)
    w_in, w_out = torch.randn(2, 2 * I, H), torch.randn(2, H, I)
    with collective_errors("ep_moe in layer 'test.moe'", 5):
        out_TH = ep_moe(x_TH, idx_TK % 2, weights_TK, w_in, w_out, None, None, num_experts=2, activation="swiglu",
                        group=g)
    assert out_TH.shape == (T, H)
    with pytest.raises(RuntimeError, match=r"in->size == out->size") as info:
        with collective_errors("all-to-all", 5):
            dist.all_to_all_single(torch.empty(5, 4), torch.ones(6, 4), group=g)
    assert type(info.value) is RuntimeError
