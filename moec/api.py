"""The Python API: ``moec.compile`` and ``moec.inspect``.

Contract:
- ``compile(model, **options)`` is ``torch.compile(model, backend=moec_backend, ...)`` after
  converting the model's MoE layers; options: ``inner`` ("inductor", "aot_eager", "eager"),
  ``target`` ("auto", "cpu", "triton", "reference"; see ``moec.backend``), ``disable`` (pass names),
  ``dynamic`` and ``fullgraph`` (passed to torch.compile); ``expert_parallel=True`` (inside an
  initialised process group; ``group=`` narrows it, ``chunks=`` forces the pipeline depth instead
  of the cost model's choice) shards every lowered MoE layer's experts over the group: each rank
  feeds its own tokens and gets the unsharded model's output on them (``moec.passes.expert_parallel``).
  ``ranks_per_node=`` (default ``$LOCAL_WORLD_SIZE``, else the group size) and
  ``hierarchical=`` ("auto": the cost model's choice per layer, True, False): with more than one
  node, moec makes the node groups (``moec.runtime.group.ep_node_groups``, collective over the
  world) and a layer may exchange in two stages, inside the node then between nodes.
  The exchanges run on ``moec.runtime.ep_group(group, timeout_s)``, a group with moec's timeout
  (``timeout_s``, else ``$MOEC_EP_TIMEOUT``, else 300 s; creating it is collective, so every rank
  calls ``moec.compile``): a peer that dies or hangs makes a forward call raise
  ``moec.runtime.CollectiveError`` within that time. The backward's exchanges raise the backend's
  own error within the same time; wrap ``loss.backward()`` in ``moec.runtime.collective_errors``
  for the same message.
  ``placement=`` a ``moec.runtime.plan.PlacementPlan`` or a plan file (``moec place --out``):
  each rank keeps the experts the plan gives it (replicas included) and routes each token to one
  of its expert's replicas (``moec.runtime.shard``, ``moec.ir.parallel``); placed layers use the
  flat all-to-all. Without it, placement is contiguous (rank w: experts ``[w*E/W, (w+1)*E/W)``).
  ``replica_balance=`` "static" (split a replicated expert's tokens by the plan's shares) or
  "adaptive" (one small all-reduce of the step's tokens per expert, then shares that balance the
  ranks on them; ``moec::ep_route_adaptive``); default: the plan's ``replica_balance``, else
  "static". Layers without replicas route the same either way.
  ``profile=`` a ``moec.runtime.profiler.RoutingProfiler``: the compiled model records each MoE
  layer's routing into it as it runs (forward only; ``profiler.trace()`` reads it).
- ``inspect(model, *args, **kwargs)`` converts, traces the call once with dynamo (no lowering,
  the model's outputs are not used) and returns a ``Report``: the MoE layers found, the graph
  breaks of the whole call with their reasons, the layers left alone, and the captured graphs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from moec import _torch
from moec.backend import check_options, moec_backend
from moec.capture import capture_graphs, convert_model
from moec.passes.select_impl import load_target
from moec.report import Fallback, Report

_COMPILE_OPTIONS = ("inner", "target", "disable", "dynamic", "fullgraph", "expert_parallel", "group", "chunks",
                    "timeout_s", "ranks_per_node", "hierarchical", "profile", "placement", "replica_balance")
_EP_OPTIONS = ("group", "chunks", "timeout_s", "ranks_per_node", "hierarchical", "placement", "replica_balance")


def compile(model: nn.Module, **options: Any):
    unknown = sorted(set(options) - set(_COMPILE_OPTIONS))
    if unknown:
        raise TypeError(f"moec.compile: unknown options {unknown}; known: {list(_COMPILE_OPTIONS)}")
    backend_options = {k: options[k] for k in ("inner", "target", "disable") if k in options}
    plan = None
    if options.get("expert_parallel", False):
        plan = _placement(options.get("placement"), options.get("hierarchical"))
        backend_options["ep_replica_balance"] = _replica_balance(options.get("replica_balance"), plan)
        backend_options["ep_group"] = _ep_group_name(options.get("group"), options.get("timeout_s"))
        backend_options["ep_chunks"] = options.get("chunks", "auto")
        backend_options["ep_hierarchical"] = options.get("hierarchical", "auto")
        backend_options["ep_nodes"] = _ep_nodes(options.get("group"), options.get("ranks_per_node"),
                                                options.get("timeout_s"), backend_options["ep_hierarchical"])
    elif any(k in options for k in _EP_OPTIONS):
        raise TypeError(f"moec.compile: {', '.join(k for k in _EP_OPTIONS if k in options)} apply to expert "
                        "parallelism; pass expert_parallel=True")
    if options.get("profile") is not None:
        backend_options["profile"] = options["profile"]
        if isinstance(model, nn.Module) and hasattr(options["profile"], "bind"):
            options["profile"].bind(model)  # compiled graphs then name layers as eager recording does
    backend_options = check_options(backend_options, "moec.compile")
    if backend_options["target"] == "triton":
        load_target("triton")  # fail here, not inside dynamo, when no GPU or interpreter can run the kernels
    if isinstance(model, nn.Module):
        convert_model(model)
        if backend_options.get("ep_group") is not None:
            from moec.runtime.shard import shard_experts

            shard_experts(model, backend_options["ep_group"], plan)
    return torch.compile(
        model,
        backend=moec_backend,
        options=backend_options,
        dynamic=options.get("dynamic"),
        fullgraph=options.get("fullgraph", False),
    )


def _placement(placement, hierarchical):
    """The placement plan: a ``PlacementPlan``, a plan file's path, or None (contiguous)."""
    import os

    from moec.runtime.plan import PlacementPlan

    if placement is None or isinstance(placement, PlacementPlan):
        plan = placement
    elif isinstance(placement, (str, os.PathLike)):
        plan = PlacementPlan.load(placement)
    else:
        raise TypeError(f"moec.compile: placement must be a moec.runtime.plan.PlacementPlan or a plan file's path, "
                        f"got {type(placement).__name__}")
    if plan is not None and hierarchical is True:
        raise ValueError("moec.compile: placed layers use the flat all-to-all; drop hierarchical=True or the placement")
    return plan


def _replica_balance(balance, plan) -> str:
    """``replica_balance=``, else the plan's ``replica_balance``, else "static"."""
    if balance is None:
        return plan.replica_balance if plan is not None and plan.replica_balance else "static"
    if balance not in ("static", "adaptive"):
        raise ValueError(f"moec.compile: replica_balance must be 'static' or 'adaptive', got {balance!r}")
    if plan is None:
        raise ValueError("moec.compile: replica_balance applies to a placement's replicated experts; pass "
                         "placement= (a plan from `moec place`) or drop replica_balance")
    return balance


def _ep_group_name(group, timeout_s) -> str:
    import torch.distributed as dist

    from moec.runtime.group import ep_group, require_distributed

    require_distributed("moec.compile(expert_parallel=True)")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"moec.compile: group must be a torch.distributed ProcessGroup, got {type(group).__name__}")
    return ep_group(group, timeout_s).group_name


def _ep_nodes(group, ranks_per_node, timeout_s, hierarchical):
    """(intra, inter, P) group names for a hierarchical all-to-all, or None on one node."""
    import os

    import torch.distributed as dist

    from moec.runtime.group import ep_node_groups

    size = dist.get_world_size(group)
    if ranks_per_node is None:
        ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", size))  # torchrun sets it
    if ranks_per_node >= size or hierarchical is False:
        if hierarchical is True:
            raise ValueError(f"moec.compile: hierarchical=True needs more than one node, but ranks_per_node="
                             f"{ranks_per_node} covers the group's {size} ranks")
        return None
    intra, inter = ep_node_groups(group, ranks_per_node, timeout_s)
    return intra.group_name, inter.group_name, ranks_per_node


def inspect(model: nn.Module, *args: Any, **kwargs: Any) -> Report:
    if not isinstance(model, nn.Module):
        raise TypeError(f"moec.inspect: expected an nn.Module, got {type(model).__name__}")
    result = convert_model(model, (args, kwargs))
    counters = _torch.counters
    before = dict(counters["graph_break"])
    graphs = [gm.print_readable(print_output=False) for gm in capture_graphs(model, *args, share_layers=True,
                                                                             **kwargs)]
    breaks = {k: v - before.get(k, 0) for k, v in counters["graph_break"].items() if v - before.get(k, 0) > 0}
    fallbacks = list(result.fallbacks)
    fallbacks += [Fallback("graph break", f"{reason.splitlines()[0]} (x{n})") for reason, n in breaks.items()]
    if len(graphs) > 1 and not breaks:
        # Dynamo also splits a call without a counted break when it gives up on a frame (an
        # exception while tracing) or recompiles a frame for a second guard set.
        fallbacks.append(Fallback("dynamo", f"the call was captured as {len(graphs)} graphs (frames skipped or "
                                            "recompiled by dynamo; see TORCH_LOGS=graph_breaks,recompiles)"))
    return Report(
        moe_layers=list(result.layers),
        graph_breaks=sum(breaks.values()),
        num_graphs=len(graphs),
        fallbacks=fallbacks,
        graphs=graphs,
    )
