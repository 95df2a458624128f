"""The ``moec`` dynamo backend.

Contract: ``moec_backend(gm, example_inputs, options=None)`` receives a dynamo graph in which
every recognised MoE layer already appears as ``moec::`` ops (the capture hook converted the
model before tracing, see ``moec.capture.hook``), checks it with the IR verifier, and lowers it
with the inner compiler named by ``options["inner"]``:

- ``"inductor"`` (default): Inductor compiles the graph; moec ops run as their registered
  lowering (the reference on CPU) and the rest of the graph fuses around them.
- ``"aot_eager"``: AOT autograd traces forward and backward graphs, which run eagerly.
- ``"eager"``: the dynamo graph runs as is.

Before lowering, the pass pipeline (``moec.passes.pipeline``) rewrites the graph into the
grouped-GEMM form and picks the implementation of the lowered ops by ``options["target"]``:
``"auto"`` (default: ``"triton"`` when the graph's inputs are on a CUDA device, else ``"cpu"``),
``"cpu"``, ``"triton"`` or ``"reference"`` (the ops' plain-PyTorch bodies). ``options["disable"]``
names passes to skip; ``MOEC_CHECK=1`` verifies the graph after every pass.
``options["ep_group"]`` (a process group's ``group_name``) makes every lowered MoE layer expert
parallel over that group, with its tokens in ``options["ep_chunks"]`` pipelined chunks ("auto":
chosen by the cost model; an int forces it). ``options["ep_nodes"]`` = (intra-node group name,
inter-node group name, ranks per node) allows a hierarchical all-to-all, used per layer as
``options["ep_hierarchical"]`` says ("auto": the cost model's choice, True, False).
``options["ep_replica_balance"]``: "static" (default; placed layers split a replicated expert's
tokens by the plan's shares) or "adaptive" (by shares balanced on each step's routing,
``moec::ep_route_adaptive``).
``options["profile"]`` (a ``moec.runtime.profiler.RoutingProfiler``) runs the
``profile_routing`` pass first: the compiled graph records every MoE layer's routing into it.

Registered as the ``torch_dynamo_backends`` entry point ``moec``, so
``torch.compile(model, backend="moec", options={...})`` works without importing moec.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

from moec import _torch
import moec.capture  # noqa: F401  (installs the capture hook)
from moec.ir.verify import verify
from moec.passes.pipeline import PASS_NAMES, run_pipeline
from moec.passes.schedule_overlap import PostGradSchedule, is_issue, schedule_overlap
from moec.capture.pack import packs_read_by, synced

INNER_COMPILERS = ("inductor", "aot_eager", "eager")


def lower(gm: torch.fx.GraphModule, example_inputs: list, inner: str, schedule: bool = False,
          in_flight: bool = False):
    """Compile ``gm`` with the inner compiler. ``in_flight``: the graph issues collectives;
    ``schedule``: then also run ``schedule_overlap`` on the forward and backward graphs AOT
    autograd derives."""
    schedule = schedule and in_flight
    if inner == "inductor":
        # Inductor reuses a buffer once its last reader ran, but an issued all-to-all still reads
        # its input (and fills its output) until its wait: with the waits moved late by
        # schedule_overlap, reuse corrupted rows in flight (seen on gloo). Keep buffers apart.
        patch = dict(allow_buffer_reuse=not in_flight)
        if schedule:
            patch["post_grad_custom_post_pass"] = PostGradSchedule()
        with _torch.inductor_config().patch(**patch):
            return _torch.inductor_compile_fx()(gm, example_inputs)
    if inner == "aot_eager":
        if schedule:
            return _torch.lookup_backend("aot_eager")(gm, example_inputs, fw_compiler=_scheduled,
                                                      bw_compiler=_scheduled)
        return _torch.lookup_backend("aot_eager")(gm, example_inputs)
    return gm.forward


def _scheduled(graph_module: torch.fx.GraphModule, inputs):
    """aot_eager's forward/backward compiler with the overlap schedule: run the graph as is."""
    from functorch.compile import make_boxed_func

    schedule_overlap(graph_module)
    _torch.counters["moec"]["scheduled_aot_graphs"] += 1
    return make_boxed_func(graph_module.forward)


TARGETS = ("auto", "cpu", "triton", "reference")
_OPTIONS = ("inner", "target", "disable", "ep_group", "ep_chunks", "ep_nodes", "ep_hierarchical",
            "ep_replica_balance", "profile")
REPLICA_BALANCE = ("static", "adaptive")


def resolve_target(target: str, example_inputs: list) -> str:
    """A checked target (see ``check_options``), with "auto" decided by the inputs' device."""
    if target != "auto":
        return target
    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
    return "triton" if on_cuda else "cpu"


def check_options(options: Optional[dict[str, Any]], who: str = "moec") -> dict[str, Any]:
    """The backend options with their defaults, after checking each (``who`` prefixes the errors)."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"{who}: unknown backend options {unknown}; known: {list(_OPTIONS)}")
    inner = options.setdefault("inner", "inductor")
    if inner not in INNER_COMPILERS:
        raise ValueError(f"{who}: unknown inner compiler {inner!r}; expected one of {INNER_COMPILERS}")
    target = options.setdefault("target", "auto")
    if target not in TARGETS:
        raise ValueError(f"{who}: unknown target {target!r}; expected one of {TARGETS}")
    options["disable"] = tuple(options.get("disable", ()))
    unknown_passes = sorted(set(options["disable"]) - set(PASS_NAMES))
    if unknown_passes:
        raise ValueError(f"{who}: unknown passes {unknown_passes} in disable; passes: {list(PASS_NAMES)}")
    group = options.setdefault("ep_group", None)
    if group is not None and not isinstance(group, str):
        raise ValueError(f"{who}: ep_group must be a process group's name (group.group_name), got {group!r}")
    chunks = options.setdefault("ep_chunks", "auto")
    if chunks != "auto" and not (isinstance(chunks, int) and not isinstance(chunks, bool) and chunks >= 1):
        raise ValueError(f"{who}: ep_chunks must be 'auto' or a positive int, got {chunks!r}")
    nodes = options.setdefault("ep_nodes", None)
    if nodes is not None and not (isinstance(nodes, (tuple, list)) and len(nodes) == 3):
        raise ValueError(f"{who}: ep_nodes must be (intra-node group name, inter-node group name, ranks per node)")
    hierarchical = options.setdefault("ep_hierarchical", "auto")
    if hierarchical not in ("auto", True, False):
        raise ValueError(f"{who}: ep_hierarchical must be 'auto', True or False, got {hierarchical!r}")
    if hierarchical is True and nodes is None:
        raise ValueError(f"{who}: ep_hierarchical=True needs the node groups (ep_nodes): more than one node")
    balance = options.setdefault("ep_replica_balance", "static")
    if balance not in REPLICA_BALANCE:
        raise ValueError(f"{who}: ep_replica_balance must be one of {REPLICA_BALANCE}, got {balance!r}")
    profile = options.setdefault("profile", None)
    if profile is not None:
        from moec.runtime.profiler import RoutingProfiler

        if not isinstance(profile, RoutingProfiler):
            raise ValueError(f"{who}: profile must be a moec.runtime.profiler.RoutingProfiler, got {profile!r}")
    return options


def chunk_chooser(chunks, hierarchical="auto", ranks_per_node=None):
    """The ``chunks`` argument of the expert_parallel pass: per layer, (r, hierarchical). ``chunks``
    and ``hierarchical`` as given, or for "auto" the cost model's choice (``auto_schedule``);
    hierarchical only when there are node groups (``ranks_per_node`` given)."""
    def choose(info):
        if chunks != "auto" and hierarchical != "auto":
            return chunks, bool(hierarchical) and ranks_per_node is not None
        auto_r, auto_h = auto_schedule(info, ranks_per_node)
        r = auto_r if chunks == "auto" else chunks
        h = auto_h if hierarchical == "auto" else hierarchical
        return r, bool(h) and ranks_per_node is not None

    return choose


def auto_schedule(info, ranks_per_node=None) -> tuple[int, bool]:
    """(r, hierarchical) the cost model (``moec.runtime.cost_model``) predicts fastest for a layer
    (``moec.passes.expert_parallel.LayerInfo``), with this machine's stored calibration or the
    assumed defaults; ``ranks_per_node`` None means one node (flat all-to-all only). A layer whose
    token count or sizes are dynamic gets (1, False): nothing to predict from."""
    from moec.runtime.cost_model import Calibration, LayerShape, choose_schedule

    if None in (info.tokens, info.hidden, info.expert_hidden) or info.tokens < 1 or info.world < 2:
        return 1, False
    shape = LayerShape(tokens=info.tokens, hidden=info.hidden, expert_hidden=info.expert_hidden,
                       num_experts=info.num_experts, top_k=info.top_k, gated=info.gated,
                       dtype_bytes=info.dtype.itemsize if info.dtype is not None else 4)
    calib, _ = Calibration.for_this_machine()
    schedule = choose_schedule(shape, info.world, ranks_per_node or info.world, calib)
    return schedule.chunks, schedule.hierarchical


def moec_backend(gm: torch.fx.GraphModule, example_inputs: list, options: Optional[dict[str, Any]] = None):
    options = check_options(options)
    target = resolve_target(options["target"], example_inputs)
    verify(gm)
    if options["profile"] is not None:
        from moec.passes.profile_routing import profile_routing

        gm, _ = profile_routing(gm, example_inputs, profiler=options["profile"])
    gm, records = run_pipeline(gm, example_inputs, target=target, disable=options["disable"],
                               check=os.environ.get("MOEC_CHECK") == "1", group_name=options["ep_group"],
                               chunks=chunk_chooser(options["ep_chunks"], options["ep_hierarchical"],
                                                    options["ep_nodes"][2] if options["ep_nodes"] else None),
                               nodes=tuple(options["ep_nodes"]) if options["ep_nodes"] else None,
                               replica_balance=options["ep_replica_balance"])
    gm.meta["moec_passes"] = records
    in_flight = any(is_issue(n) for n in gm.graph.nodes)
    packs = packs_read_by(gm, example_inputs)
    compiled = synced(lower(gm, example_inputs, options["inner"], schedule="schedule_overlap" not in options["disable"],
                            in_flight=in_flight), packs)
    if options["ep_group"] is None or not in_flight:
        return compiled
    return _with_collective_errors(compiled, options["ep_group"])


def _with_collective_errors(compiled, group_name: str):
    """The compiled graph, raising ``CollectiveError`` when a peer of its exchanges is lost."""
    from moec.passes.expert_parallel import resolve_group
    from moec.runtime.group import collective_errors, group_timeout_s

    timeout_s = group_timeout_s(resolve_group(group_name))

    def run(*args):
        with collective_errors("the expert-parallel all-to-alls of a compiled graph", timeout_s):
            return compiled(*args)

    run._boxed_call = getattr(compiled, "_boxed_call", False)  # dynamo passes a list to boxed callables
    return run


moec_backend._moec_backend = True
