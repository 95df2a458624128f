"""Process groups with moec's timeout, and clear errors when a peer rank dies or hangs.

Contract: a rank that dies or hangs makes the others fail with :class:`CollectiveError` within the
timeout (plus a little slack), never hang forever, provided that

* the collectives run on a group from :func:`ep_group` (its timeout is ``timeout_s``, else the
  environment variable ``MOEC_EP_TIMEOUT`` in seconds, else ``DEFAULT_TIMEOUT_S``; the default
  group keeps torch's own timeout, 30 minutes for gloo), and
* they run inside :func:`collective_errors`, which turns the backend's error into a
  ``CollectiveError`` naming this rank, the operation, the timeout and what to do, chained with the
  backend's error (``raise ... from err``). Errors that are not a lost peer or a timeout (a split
  that does not add up, a dtype mismatch, ...) pass through unchanged.

What gloo raises (torch 2.13, CPU, measured with 3 ranks and a 3 s group timeout), always a plain
``RuntimeError``, the same for ``all_to_all_single``, ``all_to_all_single(async_op=True)`` +
``work.wait()``, the autograd ``torch.distributed.nn.functional.all_to_all_single`` (forward and
backward), ``all_reduce`` and the functional ``_c10d_functional.all_to_all_single`` +
``wait_tensor``. The async and functional forms return at once and raise in ``wait()`` /
``wait_tensor``, so the ``collective_errors`` block must enclose the wait, not only the issue; the
backward exchanges run in ``loss.backward()``, outside any block inside the layer::

    peer exited      ~0.02 s  [.../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:PORT:
                              Connection reset by peer. This is typically caused by a remote worker
                              hanging or bugs in the application. ...
                     or       [.../pair.cc:553] Connection closed by peer [127.0.0.1]:PORT. ...
    peer hung        ~3.0 s   [.../gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting
                              3000ms for send operation to complete   (``recv`` for all_reduce)
    same group again  0 s     Application timeout caused pair closure   (after a timeout), or the
                              connection error again (after a lost peer)
    new_group, peer absent    torch.distributed.DistStoreError: wait timeout after 3000ms, keys: ...

After a ``CollectiveError`` the group is broken: every later collective on it fails at once (the
third row). The job cannot recover in place, since the group includes the lost rank: let the
error propagate and exit non-zero so the launcher (torchrun, SLURM) restarts or stops the job.
On gloo ``dist.destroy_process_group()`` then returned in ~0.03 s and the interpreter exited
normally; with NCCL it may block on the lost peer, so prefer exiting without it (``os._exit``)
if it does not return. Survivors can still talk among themselves on a fresh group of their own
ranks (``new_group(survivors, use_local_synchronization=True)`` worked on gloo), which is enough
to agree on a checkpoint before exiting, not to continue the MoE layer. NCCL is untested here.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import time
from typing import Iterator, Optional

import torch.distributed as dist

from moec import _torch

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
    "CollectiveError",
    "collective_errors",
    "ep_group",
    "ep_node_groups",
    "group_timeout_s",
    "timeout_from_env",
]

TIMEOUT_ENV = "MOEC_EP_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0  # when MOEC_EP_TIMEOUT is unset

# Substrings (lower-cased) of the backend messages that mean "no answer in time" and "a peer went
# away". gloo's are measured (module docstring); the NCCL ones ("remote process exited",
# "communicator was aborted") are taken from its error strings and untested here.
_TIMEOUT_MARKS = ("timed out", "timeout")
_PEER_LOST_MARKS = (
    "connection reset by peer",
    "connection closed by peer",
    "broken pipe",
    "connection refused",
    "remote process exited",
    "communicator was aborted",
)


def require_distributed(who: str) -> None:
    """Raise the one clear error when torch.distributed is not initialised; ``who`` names what needs it."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"moec: {who} needs torch.distributed initialised; call "
                           "torch.distributed.init_process_group(...) on every rank first (torchrun sets it up)")


def _check_timeout(value: float, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"moec: {source} must be a number of seconds, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"moec: {source} must be a positive, finite number of seconds, got {value!r}")
    return float(value)


def timeout_from_env() -> float:
    """The collective timeout in seconds: ``MOEC_EP_TIMEOUT`` when set (and not empty), else
    ``DEFAULT_TIMEOUT_S``. Read at each call, so setting the variable after import counts."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(
            f"moec: environment variable {TIMEOUT_ENV}={raw!r} is not a number; set it to the collective "
            f"timeout in seconds (e.g. {TIMEOUT_ENV}=600) or unset it for the default {DEFAULT_TIMEOUT_S:g} s"
        ) from None
    return _check_timeout(value, f"environment variable {TIMEOUT_ENV}")


def _rank_text() -> str:
    if dist.is_available() and dist.is_initialized():
        return f"rank {dist.get_rank()} of {dist.get_world_size()}"
    return "this rank"


class CollectiveError(RuntimeError):
    """A collective failed because a peer rank died or hung (or is slower than the timeout).

    Attributes: ``what`` (the operation), ``timeout_s`` (``None`` if unknown), ``kind``
    (``"timeout"``, ``"peer_lost"`` or ``"backend"``), ``elapsed_s`` (time spent in the failing
    block, ``None`` if unknown). The backend's error is ``__cause__``."""

    def __init__(self, what: str, timeout_s: Optional[float], kind: str, detail: str = "",
                 elapsed_s: Optional[float] = None):
        self.what, self.timeout_s, self.kind, self.elapsed_s = what, timeout_s, kind, elapsed_s
        limit = "the process group's timeout" if timeout_s is None else f"the timeout of {timeout_s:g} s"
        reason = {
            "timeout": f"no answer from a peer rank within {limit}",
            "peer_lost": "a peer rank closed its connection (it exited or crashed)",
        }.get(kind, "the communication backend reported a failure")
        after = "" if elapsed_s is None else f" after {elapsed_s:.1f} s"
        timeout_now = "" if timeout_s is None else f" (it is {timeout_s:g} s here)"
        first_line = detail.strip().splitlines()[0][:300] if detail.strip() else ""
        super().__init__(
            f"moec: {_rank_text()}: {what} failed{after}: {reason}. A peer rank died or hung; check the "
            f"other ranks' logs for the first error. If the step is legitimately slow, raise {TIMEOUT_ENV} "
            f"(seconds){timeout_now} or pass timeout_s= to moec.runtime.ep_group. The process group is "
            f"unusable now: exit this process and restart the job."
            + (f" Backend error: {first_line}" if first_line else "")
        )


def _failure_kind(err: BaseException) -> Optional[str]:
    """``"timeout"`` / ``"peer_lost"`` / ``"backend"`` when ``err`` is a lost peer or a timeout,
    ``None`` when it is some other error (which must pass through unchanged)."""
    if isinstance(err, CollectiveError) or not isinstance(err, RuntimeError):
        return None
    text = str(err).lower()
    if any(mark in text for mark in _PEER_LOST_MARKS):
        return "peer_lost"
    if any(mark in text for mark in _TIMEOUT_MARKS):
        return "timeout"
    # Network and store errors are lost peers whatever the wording; a DistBackendError may be a
    # usage error (NCCL "invalid usage"), so it needs one of the marks above.
    if isinstance(err, (dist.DistNetworkError, dist.DistStoreError)):
        return "backend"
    return None


@contextlib.contextmanager
def collective_errors(what: str, timeout_s: Optional[float]) -> Iterator[None]:
    """Turn a lost peer or a timeout raised inside the block into :class:`CollectiveError`.

    ``what`` names the operation for the message, e.g. ``"all-to-all of token rows in layer
    'model.layers.0.mlp'"``; ``timeout_s`` is the group's timeout, for the message only (it does not
    set one: the group's own timeout does; see :func:`group_timeout_s`). Other errors, and a
    ``CollectiveError`` from a nested block, pass through unchanged. Works as a decorator too."""
    start = time.monotonic()
    try:
        yield
    except RuntimeError as err:
        kind = _failure_kind(err)
        if kind is None:
            raise
        raise CollectiveError(what, timeout_s, kind, str(err), time.monotonic() - start) from err


# (world group, group ranks in group-rank order, timeout in s) -> group. Keyed on the world group
# too so that a destroy_process_group() + init_process_group() drops the dead groups.
_GROUPS: dict[tuple, dist.ProcessGroup] = {}


def ep_group(group: Optional[dist.ProcessGroup] = None, timeout_s: Optional[float] = None) -> dist.ProcessGroup:
    """A process group over the ranks of ``group`` (the world when ``None``), in the same rank order,
    whose collectives fail after ``timeout_s`` seconds (default: :func:`timeout_from_env`).

    Collective: every rank of ``group`` must call it, with the same arguments, in the same order
    relative to its other process-group creations (``torch.distributed.new_group``). For the world
    that is every rank of the job; for a subgroup, only its members (non-members must not call).
    Cached per (ranks, timeout): later calls return the same group without communicating, and all
    ranks must agree on that too (a rank that misses the cache would wait for the others in
    ``new_group``). Creating the group also waits at most ``timeout_s`` for the peers and raises
    :class:`CollectiveError` if one is missing."""
    require_distributed("ep_group")
    timeout_s = timeout_from_env() if timeout_s is None else _check_timeout(timeout_s, "timeout_s")
    if group is not None and not isinstance(group, dist.ProcessGroup):  # NON_GROUP_MEMBER is an int
        raise ValueError(f"moec: rank {dist.get_rank()} is not a member of the group passed to ep_group")
    world = dist.group.WORLD
    world_size = dist.get_world_size()
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world_size))
    if dist.get_rank() not in ranks:
        raise ValueError(f"moec: rank {dist.get_rank()} is not a member of the group passed to ep_group")
    for key in [k for k in _GROUPS if k[0] is not world]:
        del _GROUPS[key]
    key = (world, tuple(ranks), timeout_s)
    if key not in _GROUPS:
        whole = len(ranks) == world_size
        naming = contextlib.nullcontext() if whole else _torch.members_only_group_naming(_count_members_only(ranks))
        with collective_errors(f"creating the expert-parallel process group over ranks {ranks}", timeout_s), naming:
            _GROUPS[key] = dist.new_group(
                ranks,
                timeout=datetime.timedelta(seconds=timeout_s),
                use_local_synchronization=not whole,  # non-members of a subgroup do not call us
                # keep the caller's group-rank order (experts are placed by group rank); passed only
                # when needed because torchcomms' new_group rejects sort_ranks=False
                **({} if ranks == sorted(ranks) else dict(sort_ranks=False)),
                group_desc="moec_ep",
            )
    return _GROUPS[key]


_MEMBERS_ONLY: dict[tuple, int] = {}


def _count_members_only(ranks: list[int]) -> int:
    """How many members-only groups over ``ranks`` this rank made before (the same on each member,
    which create them in the same order): salts the new group's name (``_torch.members_only_group_naming``)."""
    key = (dist.group.WORLD, tuple(sorted(ranks)))
    n = _MEMBERS_ONLY.get(key, 0)
    _MEMBERS_ONLY[key] = n + 1
    return n


def group_timeout_s(group: Optional[dist.ProcessGroup]) -> Optional[float]:
    """The timeout in seconds of a group made by :func:`ep_group`; ``None`` for any other group
    (including the default group), whose timeout moec does not track."""
    for (_, _, timeout_s), pg in _GROUPS.items():
        if pg is group:
            return timeout_s
    return None


# (world group, group ranks, ranks per node, timeout) -> (intra-node group, inter-node group) of this rank
_NODE_GROUPS: dict[tuple, tuple[dist.ProcessGroup, dist.ProcessGroup]] = {}


def ep_node_groups(group: Optional[dist.ProcessGroup], ranks_per_node: int,
                   timeout_s: Optional[float] = None) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """This rank's two groups for a hierarchical all-to-all over ``group`` (the world when None):
    the ranks of its node (group ranks ``[n*P, (n+1)*P)``, in order) and the ranks with its local
    index in every node (``l, P+l, 2P+l, ...``), both with moec's timeout.

    Collective over the whole world: every rank of the job calls it with the same arguments (it
    creates every node's and every local index's group, keeping its own two). ``group`` must span
    the world, and its size must be a multiple of ``ranks_per_node``."""
    require_distributed("ep_node_groups")
    timeout_s = timeout_from_env() if timeout_s is None else _check_timeout(timeout_s, "timeout_s")
    world_size = dist.get_world_size()
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world_size))
    if len(ranks) != world_size:
        raise ValueError("moec: a hierarchical all-to-all needs the expert-parallel group to span every rank; "
                         f"this one has {len(ranks)} of {world_size}")
    P = ranks_per_node
    if not (isinstance(P, int) and 1 <= P <= world_size and world_size % P == 0):
        raise ValueError(f"moec: ranks_per_node={P!r} must divide the {world_size} ranks of the group")
    key = (dist.group.WORLD, tuple(ranks), P, timeout_s)
    if key not in _NODE_GROUPS:
        mine = {}
        timeout = datetime.timedelta(seconds=timeout_s)
        with collective_errors(f"creating the node groups of {P} ranks over ranks {ranks}", timeout_s):
            for kind, members in ([("intra", ranks[n * P:(n + 1) * P]) for n in range(world_size // P)]
                                  + [("inter", ranks[l::P]) for l in range(P)]):
                pg = dist.new_group(members, timeout=timeout, group_desc=f"moec_ep_{kind}")
                if dist.get_rank() in members:
                    mine[kind] = pg
        _NODE_GROUPS[key] = (mine["intra"], mine["inter"])
    return _NODE_GROUPS[key]
