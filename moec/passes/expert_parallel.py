"""expert_parallel: shard each lowered MoE layer's experts over a process group.

Contract: ``expert_parallel(gm, example_inputs, *, group_name, chunks)`` rewrites every lowered
dropless layer ``permute -> grouped_gemm_act -> grouped_gemm_combine`` into an expert-parallel
layer over the process group registered as ``group_name``: this rank computes only its own
experts (contiguous placement: rank w owns experts ``[w*L, (w+1)*L)``) on the rows every rank
sends it, and each rank's output is the unsharded layer's output on this rank's tokens. The
collectives are functional collectives (``_c10d_functional.all_to_all_single`` issue nodes,
``wait_tensor`` wait nodes), so the overlap scheduler (``moec.passes.schedule_overlap``) moves
them by reordering nodes. ``chunks`` is the number of token chunks r, an int or a function of
the layer's ``LayerInfo``; chunk c's exchanges and experts are independent of chunk c+1's. The
pass emits the chunks in sequential order (each exchange waited for at once). Returns the graph
and the number of layers sharded (also added to ``_torch.counters["moec"]
["expert_parallel_layers"]``); a second run finds no lowered layer left to shard.

Placed layers: when the layer's weights are ``moec::unshard`` of shards (``moec.compile(...,
placement=plan)``, ``moec.runtime.shard``), the plan in its arguments decides: ``moec::ep_route_placed``
sends each slot to one of its expert's replicas, the local experts are the rank's shard (through
``moec::replica_sync`` when the layer has replicas) and the exchanges are flat (the chunk
choice's hierarchical flag is ignored); the counter ``expert_parallel_placed_layers`` counts them.
With ``replica_balance="adaptive"`` a placed layer with replicas first sums its slots per expert
over the group (``scatter_add``, a functional ``all_reduce``) and routes with
``moec::ep_route_adaptive``, which balances the replicas' shares on those counts every step.

Preconditions: ``fuse_combine`` ran (the layer is the three lowered ops); ``torch.distributed``
is initialised and the group is registered. Layers with an expert capacity keep the canonical
route/dispatch/expert_ffn ops and stay replicated (each rank runs the whole layer on its tokens,
which is the unsharded model's output on those tokens). Weights: a layer sharded by
``moec.runtime.shard`` is traced as an all-gather of shards (or ``moec::unshard``), which this
pass replaces by the shard itself; a layer whose weights are whole on every rank (a model
sharded by hand is not) gets them sliced in the graph (``narrow``, a view), and the gradients of
the experts a rank does not own are zero there, so an all-reduce (sum) of gradients over the
group gives the unsharded model's gradients on all ranks' tokens.

Numerics: the experts see the same rows, grouped differently (rows from several ranks in one
GEMM, chunked), so results match the unsharded layer to floating-point rounding, not bitwise.

Pseudo-code, per layer (C chunks, W ranks, L local experts, all per-chunk lists of W split sizes)::

    order_TK, local_TK, counts_WC = ep_route(idx_TK, E, W, C)
    recv_WC = wait(all_to_all_single(counts_WC, [1]*W, [1]*W))
    send, recv = counts_WC.tolist(), recv_WC.tolist()          # the layer's one host sync
    for c in chunks:                                             # tensor_split pieces of x, order, local, weights
        o_n = order[c].flatten()
        xr_RH = wait(all_to_all_single_autograd(x[c][o_n // K], recv[:, c], send[:, c]))
        lr_R1 = wait(all_to_all_single(local[c].reshape(-1, 1), recv[:, c], send[:, c]))
        tok_R, slot_R, counts_L = dispatch(lr_R1, L)
        a_RI = grouped_gemm_act(xr_RH, tok_R, counts_L, w_in[rank*L:][:L], ...)
        yr_RH = grouped_gemm_combine(a_RI, slot_R, counts_L, w_out[rank*L:][:L], ..., ones_R1)   # back to arrival order
        ys_nH = wait(all_to_all_single_autograd(yr_RH, send[:, c], recv[:, c]))
        out[c] = combine(ys_nH, o_n, weights[c])
    out_TH = cat(out)

Hierarchical all-to-all (``nodes`` = (intra-node group, inter-node group, P ranks per node) and
the chunk choice says so for the layer): each exchange runs in two stages, first to the peer in
this node with the destination's local index (``ep_route`` on a key ordering slots by destination
local index, whose "local id" carries destination node and expert), then among the ranks with
that local index to the destination node (``ep_route`` again on the received ids); the way back
reverses both stages. P-1 intra-node and N-1 inter-node peers per exchange instead of W-1.

Legend: T tokens of this rank, K top-k, H hidden, E experts, W ranks, C chunks, L = E / W,
R rows received for a chunk, n slots of a chunk, I expert hidden (after the activation).
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Callable, Optional, Union

import torch
from torch.fx import Node

from moec import _torch
from moec.ir.parallel import replicated_rows  # (and registers moec::ep_route and the placed ops)
from moec.ir.ops import GATED_ACTIVATIONS
from moec.ir.verify import moec_op_name, moec_op_namespace, node_value
from moec.passes.schedule_overlap import is_wait
from moec.passes.util import getitems, mark, op, op_nodes

NAME = "expert_parallel"

A2A = torch.ops._c10d_functional.all_to_all_single.default
A2A_AUTOGRAD = torch.ops._c10d_functional_autograd.all_to_all_single.default
WAIT = torch.ops._c10d_functional.wait_tensor.default
ALL_REDUCE = torch.ops._c10d_functional.all_reduce.default


@dataclasses.dataclass(frozen=True)
class LayerInfo:
    """What the chunk choice may depend on; None where tracing recorded no static value."""

    index: int
    tokens: Optional[int]
    hidden: Optional[int]
    num_experts: int
    top_k: int
    world: int
    gated: bool
    expert_hidden: Optional[int]
    dtype: Optional[torch.dtype]


# r, or a function of the layer giving r, or (r, hierarchical)
Chunks = Union[int, Callable[[LayerInfo], Union[int, tuple[int, bool]]]]


def resolve_group(group_name: str):
    from torch.distributed.distributed_c10d import _resolve_process_group

    from moec.runtime.group import require_distributed

    require_distributed("expert parallelism")
    return _resolve_process_group(group_name)


def _static(v) -> Optional[int]:
    return v if isinstance(v, int) else None


def _top_k(idx_TK: Node) -> int:
    value = node_value(idx_TK)
    if value is not None:
        return value.shape[-1]
    router = idx_TK.args[0]  # idx is output 1 of gate or route, whose top_k argument we read
    return router.args[5] if moec_op_name(router) == "gate" else router.args[3]


def _match(ggc: Node):
    """(x, idx_TK, weights_TK, gga, ggc, permute) of a lowered dropless layer, else None."""
    gga = ggc.args[0]
    if not isinstance(gga, Node) or moec_op_name(gga) != "grouped_gemm_act" or moec_op_namespace(gga) != "moec":
        return None
    if len(gga.users) != 1:
        return None
    token_N, slot_N = gga.args[1], ggc.args[1]
    if not all(isinstance(n, Node) and n.target is operator.getitem for n in (token_N, slot_N)):
        return None
    perm = token_N.args[0]
    if slot_N.args[0] is not perm or moec_op_name(perm) != "permute" or token_N.args[1] != 0 or slot_N.args[1] != 1:
        return None
    idx_TK = perm.args[0]
    return gga.args[0], idx_TK, ggc.args[5], gga, ggc, perm


def expert_parallel(
    gm: torch.fx.GraphModule,
    example_inputs=None,
    *,
    group_name: Optional[str],
    chunks: Chunks = 1,
    nodes: Optional[tuple[str, str, int]] = None,
    replica_balance: str = "static",
) -> tuple[torch.fx.GraphModule, int]:
    if replica_balance not in ("static", "adaptive"):
        raise ValueError(f"moec: replica_balance must be 'static' or 'adaptive', got {replica_balance!r}")
    if group_name is None:
        return gm, 0
    import torch.distributed as dist

    group = resolve_group(group_name)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    graph, changed = gm.graph, 0
    for ggc in op_nodes(gm, "grouped_gemm_combine"):
        found = _match(ggc)
        if found is None:
            continue
        x, idx_TK, weights_TK, gga, ggc, perm = found
        w_in, b_in, w_out, b_out = gga.args[3], gga.args[4], ggc.args[3], ggc.args[4]
        E = node_value(w_in).shape[0]
        placement = _placement(w_in)
        if placement is None and E % world:
            raise ValueError(
                f"moec: expert parallelism over {world} ranks needs the number of experts to be a multiple of "
                f"the world size, but MoE layer {changed} has {E} experts; use a group of a size dividing {E}"
            )
        x_val, K = node_value(x), _top_k(idx_TK)
        info = LayerInfo(
            index=changed, tokens=_static(x_val.shape[0]) if x_val is not None else None,
            hidden=_static(x_val.shape[-1]) if x_val is not None else None, num_experts=E, top_k=K, world=world,
            gated=gga.args[5] in GATED_ACTIVATIONS,
            expert_hidden=_static(node_value(w_out).shape[-1 if not gga.args[6] else 1]),
            dtype=x_val.dtype if x_val is not None else None,
        )
        C = chunks(info) if callable(chunks) else chunks
        C, hierarchical = C if isinstance(C, tuple) else (C, False)
        if not (isinstance(C, int) and C >= 1):
            raise ValueError(f"moec: chunks must be a positive int, got {C!r}")
        if placement is not None:
            hierarchical = False  # placed layers exchange over the flat group (documented)
        # balanced per step: placed layers with replicas only (without, there is nothing to split)
        adaptive = replica_balance == "adaptive" and placement is not None and len(set(placement[0])) < len(placement[0])
        if hierarchical and nodes is None:
            raise ValueError("moec: a hierarchical all-to-all needs the node groups (moec.compile makes them "
                             "when ranks_per_node is less than the group size)")
        with graph.inserting_before(ggc):
            out = _emit(graph, ggc, x, idx_TK, weights_TK, gga, w_in, b_in, w_out, b_out,
                        E=E, K=K, world=world, rank=rank, chunks=C, group_name=group_name, layer=changed,
                        nodes=nodes if hierarchical else None, placement=placement, adaptive=adaptive)
        _torch.counters["moec"]["expert_parallel_hierarchical_layers"] += bool(hierarchical)
        _torch.counters["moec"]["expert_parallel_placed_layers"] += placement is not None
        _torch.counters["moec"]["expert_parallel_adaptive_layers"] += adaptive
        ggc.replace_all_uses_with(out)
        graph.erase_node(ggc)
        graph.erase_node(gga)
        for users in getitems(perm).values():
            for g in users:
                if not g.users:
                    graph.erase_node(g)
        if not perm.users:
            graph.erase_node(perm)
        changed += 1
    if changed:
        _erase_unused_gathers(graph)
        _allow_split_sizes()
        _torch.counters["moec"]["expert_parallel_layers"] += changed
    gm.recompile()
    return gm, changed


def _gather_of(w: Node) -> Optional[Node]:
    """The ``all_gather_into_tensor`` node whose result ``w`` is, in either form dynamo traces
    ``all_gather_tensor_autograd`` to: ``wait_tensor(all_gather_into_tensor(shard))`` (torch 2.13
    on), or ``getitem(autograd_function_apply(fwd, bwd, all_gather_into_tensor(shard)), 0)`` with the
    wait inside the applied function's body (torch 2.11)."""
    if not isinstance(w, Node):
        return None
    if is_wait(w):
        gather = w.args[0]
    elif (w.op == "call_function" and w.target is operator.getitem and w.args[1] == 0
          and isinstance(w.args[0], Node) and getattr(w.args[0].target, "__name__", "") == "autograd_function_apply"):
        inputs = [a for a in w.args[0].args if isinstance(a, Node) and a.op == "call_function"]
        gather = inputs[0] if len(inputs) == 1 else None
    else:
        return None
    if isinstance(gather, Node) and gather.op == "call_function" and getattr(gather.target, "__name__", "").startswith(
            "all_gather_into_tensor"):
        return gather
    return None


def _gathered_shard(w: Node) -> Optional[Node]:
    """``shard`` when ``w`` is the all-gather of ``shard`` (``_gather_of``), else None."""
    gather = _gather_of(w)
    return None if gather is None else gather.args[0]


def _placement(w: Node) -> Optional[tuple[list[int], list[int], list[float]]]:
    """(slots, slot_counts, shares) when ``w`` is a placed layer's ``moec::unshard``, else None."""
    if isinstance(w, Node) and moec_op_name(w) == "unshard":
        return list(w.args[2]), list(w.args[3]), list(w.args[4])
    return None


def _erase_unused_gathers(graph: torch.fx.Graph) -> None:
    """Erase the all-gathers the layers no longer read (they use their shards), with every node
    between the gather and its result that only they used (the wait, or the applied function and
    its bodies)."""
    for node in reversed(list(graph.nodes)):
        if _gather_of(node) is not None and not node.users:
            dead = [node]
            while dead:
                n = dead.pop()
                inputs = n.all_input_nodes
                graph.erase_node(n)
                dead += [i for i in inputs if not i.users and i.op in ("call_function", "get_attr")
                         and i not in dead]
        elif _placement(node) is not None and not node.users:
            graph.erase_node(node)


def _allow_split_sizes() -> None:
    """Let the inner compiler trace the layer's ``.tolist()`` of received counts: dynamo's fake
    mode refuses data-dependent scalars unless ``capture_scalar_outputs`` was set while tracing;
    the split sizes become unbacked SymInts, bounded below by the ``torch._check`` nodes."""
    context = _torch.tracing_context()
    if context is not None and context.fake_mode is not None:
        context.fake_mode.allow_scalar_outputs = True


def _emit(graph, like, x, idx_TK, weights_TK, gga, w_in, b_in, w_out, b_out, *, E, K, world, rank, chunks,
          group_name, layer, nodes, placement, adaptive=False) -> Node:
    L = E // world if placement is None else placement[1][rank]
    act, transposed, interleaved, alpha, limit = gga.args[5], gga.args[6], gga.args[7], gga.args[8], gga.args[9]

    def call(fn, *args, stage, chunk=None, **kwargs):
        node = mark(graph.call_function(fn, args, kwargs), NAME, like)
        node.meta["moec"]["ep"] = {"layer": layer, "stage": stage, "chunk": chunk}
        return node

    def method(name, *args, stage, chunk=None):
        node = mark(graph.call_method(name, args), NAME, like)
        node.meta["moec"]["ep"] = {"layer": layer, "stage": stage, "chunk": chunk}
        return node

    def pieces(t, stage):
        if chunks == 1:
            return [t]
        parts = call(torch.tensor_split, t, chunks, stage=stage)
        return [call(operator.getitem, parts, c, stage=stage) for c in range(chunks)]

    def exchange_counts(counts, peers, group, chunk=None):
        recv = call(WAIT, call(A2A, counts, [1] * peers, [1] * peers, group, stage="counts", chunk=chunk),
                    stage="counts", chunk=chunk)
        return method("tolist", counts, stage="counts", chunk=chunk), method("tolist", recv, stage="counts", chunk=chunk)

    def split_sizes(lists, c, peers, chunk=None):
        sizes = []
        for w in range(peers):
            v = call(operator.getitem, call(operator.getitem, lists, w, stage="counts", chunk=chunk), c,
                     stage="counts", chunk=chunk)
            call(torch._check, call(operator.ge, v, 0, stage="counts", chunk=chunk), stage="counts", chunk=chunk)
            sizes.append(v)
        return sizes

    if adaptive:
        # placed with replicas, balanced per step: the group's slots per expert, then shares
        group1, peers1 = group_name, world
        flat = call(torch.reshape, idx_TK, (-1,), stage="plan")
        mine = method("scatter_add", method("new_zeros", idx_TK, (E,), stage="plan"), 0, flat,
                      call(torch.ones_like, flat, stage="plan"), stage="plan")
        counts_E = call(WAIT, call(ALL_REDUCE, mine, "sum", group_name, stage="plan"), stage="plan")
        plan = call(op("ep_route_adaptive"), idx_TK, counts_E, *placement, E, rank, chunks, stage="plan")
    elif placement is not None:  # placed: the plan's slots, replicas chosen per slot
        group1, peers1 = group_name, world
        plan = call(op("ep_route_placed"), idx_TK, *placement, E, rank, chunks, stage="plan")
    elif nodes is None:  # flat: one exchange over the whole group
        group1, peers1 = group_name, world
        plan = call(op("ep_route"), idx_TK, E, world, chunks, stage="plan")
    else:
        # Hierarchical: first inside the node, to the local peer with the destination's local index
        # (l_d), then between nodes among the ranks with that local index. Stage one's key sorts by
        # l_d and carries n_d*L + expert-on-its-rank as the "local id", which stage two splits again.
        intra, inter, P = nodes
        N = world // P
        group1, peers1 = intra, P
        dest = call(torch.div, idx_TK, L, rounding_mode="floor", stage="plan")
        key = call(operator.add, call(operator.add,
                   call(operator.mul, call(torch.remainder, dest, P, stage="plan"), N * L, stage="plan"),
                   call(operator.mul, call(torch.div, dest, P, rounding_mode="floor", stage="plan"), L, stage="plan"),
                   stage="plan"), call(torch.remainder, idx_TK, L, stage="plan"), stage="plan")
        plan = call(op("ep_route"), key, E, P, chunks, stage="plan")
    order_TK, local_TK, counts_WC = (call(operator.getitem, plan, i, stage="plan") for i in range(3))
    send_l, recv_l = exchange_counts(counts_WC, peers1, group1)

    synced = replicated_rows(placement[0], placement[1], rank) if placement is not None else None

    def local(w):
        """This rank's experts of ``w``: the shard itself when ``w`` is gathered from shards
        (``moec.runtime.shard``; for a placed layer with replicas, through ``replica_sync``, whose
        backward gives every replica the expert's whole gradient), else a view of the whole tensor."""
        if w is None:
            return None
        if synced is not None:
            rows, ids, n_rep = synced
            shard = w.args[0]
            return call(op("replica_sync"), shard, group_name, rows, ids, n_rep, stage="weights") if n_rep else shard
        shard = _gathered_shard(w)
        return shard if shard is not None else call(torch.narrow, w, 0, rank * L, L, stage="weights")

    w_in_l, w_out_l, b_in_l, b_out_l = local(w_in), local(w_out), local(b_in), local(b_out)
    weights_dtype = getattr(node_value(weights_TK), "dtype", torch.float32)

    outs = []
    for c, (x_c, order_c, local_c, weights_c) in enumerate(zip(
            pieces(x, "plan"), pieces(order_TK, "plan"), pieces(local_TK, "plan"), pieces(weights_TK, "plan"))):
        send, recv = split_sizes(send_l, c, peers1), split_sizes(recv_l, c, peers1)
        order_n = call(torch.reshape, order_c, (-1,), stage="dispatch", chunk=c)
        xs_nH = call(torch.index_select, x_c, 0, call(torch.div, order_n, K, rounding_mode="floor",
                                                       stage="dispatch", chunk=c), stage="dispatch", chunk=c)
        xr_RH = call(WAIT, call(A2A_AUTOGRAD, xs_nH, recv, send, group1, stage="dispatch", chunk=c),
                     stage="dispatch_wait", chunk=c)
        ls_n1 = call(torch.reshape, local_c, (-1, 1), stage="dispatch", chunk=c)
        lr_R1 = call(WAIT, call(A2A, ls_n1, recv, send, group1, stage="dispatch", chunk=c),
                     stage="dispatch_wait", chunk=c)
        if nodes is not None:  # stage two: to the destination node, among ranks with this local index
            plan2 = call(op("ep_route"), lr_R1, N * L, N, 1, stage="dispatch", chunk=c)
            order2, local2, counts2 = (call(operator.getitem, plan2, i, stage="dispatch", chunk=c) for i in range(3))
            send2_l, recv2_l = exchange_counts(counts2, N, inter, chunk=c)
            send2, recv2 = split_sizes(send2_l, 0, N, chunk=c), split_sizes(recv2_l, 0, N, chunk=c)
            order2_r = call(torch.reshape, order2, (-1,), stage="dispatch", chunk=c)
            xs2 = call(torch.index_select, xr_RH, 0, order2_r, stage="dispatch", chunk=c)
            xr_RH = call(WAIT, call(A2A_AUTOGRAD, xs2, recv2, send2, inter, stage="dispatch", chunk=c),
                         stage="dispatch_wait", chunk=c)
            lr_R1 = call(WAIT, call(A2A, local2, recv2, send2, inter, stage="dispatch", chunk=c),
                         stage="dispatch_wait", chunk=c)
        grouped = call(op("dispatch"), lr_R1, L, stage="experts", chunk=c)
        tok_R, slot_R, counts_L = (call(operator.getitem, grouped, i, stage="experts", chunk=c) for i in range(3))
        a_RI = call(op("grouped_gemm_act"), xr_RH, tok_R, counts_L, w_in_l, b_in_l, act, transposed, interleaved,
                    alpha, limit, stage="experts", chunk=c)
        ones_R1 = call(torch.ones_like, lr_R1, dtype=weights_dtype, stage="experts", chunk=c)
        yr_RH = call(op("grouped_gemm_combine"), a_RI, slot_R, counts_L, w_out_l, b_out_l, ones_R1, transposed,
                     stage="experts", chunk=c)
        if nodes is not None:  # back between nodes, then into stage one's arrival order
            ys2 = call(WAIT, call(A2A_AUTOGRAD, yr_RH, send2, recv2, inter, stage="combine", chunk=c),
                       stage="combine_wait", chunk=c)
            yr_RH = call(torch.index_select, ys2, 0, call(torch.argsort, order2_r, stage="combine", chunk=c),
                         stage="combine", chunk=c)
        ys_nH = call(WAIT, call(A2A_AUTOGRAD, yr_RH, send, recv, group1, stage="combine", chunk=c),
                     stage="combine_wait", chunk=c)
        outs.append(call(op("combine"), ys_nH, order_n, weights_c, stage="combine", chunk=c))
    return outs[0] if chunks == 1 else call(torch.cat, outs, stage="combine")
