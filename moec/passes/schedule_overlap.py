"""schedule_overlap: issue collectives as early and wait for them as late as the graph allows.

Contract: ``schedule_overlap(gm, example_inputs)`` reorders the nodes of a graph that holds
functional collectives (``_c10d_functional*`` issue nodes and ``wait_tensor`` nodes) so that
communication overlaps computation, and returns the graph and the number of nodes that moved.
It is a scheduler only: it adds, removes and rewires nothing, so it must not change any tensor
value (outputs stay bitwise equal to the unscheduled graph). A graph without collectives is
left alone. Running it twice moves nothing the second time.

On an expert-parallel layer emitted in r chunks by ``expert_parallel`` (each exchange waited for
at once) the result is the pipeline: every chunk's dispatch is issued before the first expert
GEMM; chunk c's experts run while chunk c+1's rows travel; chunk c's combine is issued as soon
as its experts finish and waited for only where the layer's output is read; computation that
does not depend on the exchanges (a shared expert, other dense ops) runs between the issues
and the first wait.

Mutation: a node that may write a tensor in place (``is_barrier``) is not ordered by data edges
against the other readers of that tensor, so the graph is cut at such nodes and each run between
them is scheduled on its own; a barrier never moves and nothing crosses one.

Backward: the pass runs on the dynamo graph, before AOT autograd derives the backward. The
backend applies the same scheduler (``schedule_graph``) to the forward and backward graphs AOT
autograd produces (``aot_eager``: as its forward/backward compilers; ``inductor``: as the
post-grad custom pass), so the backward's exchanges of one chunk overlap the gradient GEMMs of
another the same way. The experts' backward is two ops per fused op (``moec.ir.lowered``): an
input-gradient op, which feeds the reverse exchange and so is a feeder, and a weight-gradient op,
which only the parameter gradients read and so is ordinary computation. The same tiers then
place the weight gradients under the exchange of their own chunk (Lancet)::

    wait(grad_c) -> combine_backward_input_c -> act_backward_input_c -> issue(d_x_c)
        -> combine_backward_weight_c, act_backward_weight_c -> wait(grad_c+1) -> ... -> wait(d_x_c)

Preconditions: the graph is a valid FX graph; every rank schedules the same graph (the order is
a function of the graph alone, so all ranks issue their collectives in the same order).

Pseudo-code (list scheduling, ties broken by the original position)::

    feeders = nodes from which an issue is reachable without passing through a data wait
              (a wait read only by .tolist()/.item(), the split sizes, or by ep_route_adaptive,
              the step's expert counts, is a feeder)
    tier(n) = 0 if n is a placeholder
              1 if n is an issue, a feeder or an assertion   # start communication first
              2 if n is other computation                    # overlap it
              3 if n is a data wait                          # block only when nothing else can run
              4 if n is the output
    repeat: schedule the ready node with the smallest (tier, original position); among data
            waits, the one whose collective was issued first (they complete in issue order)
"""

from __future__ import annotations

import heapq
import operator

import torch
from torch.fx import Node

from moec import _torch
from moec.ir.verify import moec_op_name

CustomGraphPass, get_hash_for_files = _torch.custom_graph_pass()

NAME = "schedule_overlap"

WAIT = torch.ops._c10d_functional.wait_tensor.default
_COLLECTIVE_NAMESPACES = ("_c10d_functional", "_c10d_functional_autograd")


def _namespace(target) -> str | None:
    if isinstance(target, _torch.OpOverload):
        return target.namespace
    if isinstance(target, _torch.OpOverloadPacket):  # dynamo records some ops as packets
        return target._qualified_op_name.split("::")[0]
    return None


def is_wait(node: Node) -> bool:
    return node.op == "call_function" and node.target in (WAIT, WAIT.overloadpacket)


def is_issue(node: Node) -> bool:
    return (node.op == "call_function" and _namespace(node.target) in _COLLECTIVE_NAMESPACES
            and not is_wait(node))


# moec ops that read a waited tensor on the host to plan an exchange (the step's expert counts)
_HOST_READERS = ("ep_route_adaptive",)


def _split_wait(node: Node) -> bool:
    """A wait whose tensor is only read on the host (split sizes, the expert counts an adaptive
    route reads), so it gates an issue."""
    return all((u.op == "call_method" and u.target in ("tolist", "item")) or moec_op_name(u) in _HOST_READERS
               for u in node.users)


def _feeders(nodes: list[Node]) -> set[Node]:
    found: set[Node] = set()
    stack = [n for n in nodes if is_issue(n)]
    while stack:
        node = stack.pop()
        for inp in node.all_input_nodes:
            if inp in found or (is_wait(inp) and not _split_wait(inp)):
                continue
            found.add(inp)
            stack.append(inp)
    return found


def is_barrier(node: Node) -> bool:
    """A node that may mutate a tensor (an in-place method or op, setitem, a module call): the
    data edges do not order it against other readers, so nothing moves across it."""
    if node.op == "call_module":
        return True
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.startswith("__")
    if node.op != "call_function":
        return False
    target = node.target
    if isinstance(target, _torch.OpOverload):
        return target._schema.is_mutable
    if target is operator.setitem or getattr(target, "__name__", "").startswith("__i"):
        return True
    name = getattr(target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


def schedule(nodes: list[Node]) -> list[Node]:
    """The overlapped order of ``nodes`` (a whole graph, in a valid topological order):
    each run of nodes between barriers is scheduled on its own; barriers stay in place."""
    order: list[Node] = []
    segment: list[Node] = []
    for node in nodes:
        if is_barrier(node):
            order += _schedule_segment(segment) + [node]
            segment = []
        else:
            segment.append(node)
    return order + _schedule_segment(segment)


def _schedule_segment(nodes: list[Node]) -> list[Node]:
    members = set(nodes)
    position = {n: i for i, n in enumerate(nodes)}
    feeders = _feeders(nodes)

    def tier(n: Node) -> int:
        if n.op == "placeholder":
            return 0
        if n.op == "output":
            return 4
        if is_issue(n) or n in feeders or (n.op == "call_function" and not n.users):
            return 1  # an assertion (torch._check of a split size) must precede the issue it guards
        return 3 if is_wait(n) else 2

    missing = {n: len(set(n.all_input_nodes) & members) for n in nodes}
    scheduled_at: dict[Node, int] = {}

    def key(n: Node) -> tuple:
        t = tier(n)
        if t == 3:
            # Collectives complete in issue order: wait first for the one issued first.
            issue = n.args[0] if isinstance(n.args[0], Node) else None
            return (t, scheduled_at.get(issue, position[n]), position[n], n)
        return (t, 0, position[n], n)

    ready = [key(n) for n in nodes if missing[n] == 0]
    heapq.heapify(ready)
    order: list[Node] = []
    while ready:
        node = heapq.heappop(ready)[-1]
        scheduled_at[node] = len(order)
        order.append(node)
        for user in node.users:
            if user not in members:
                continue
            missing[user] -= 1
            if missing[user] == 0:
                heapq.heappush(ready, key(user))
    if len(order) != len(nodes):
        raise AssertionError("moec: schedule_overlap lost nodes (the graph is not a DAG)")
    return order


def schedule_overlap(gm: torch.fx.GraphModule, example_inputs=None) -> tuple[torch.fx.GraphModule, int]:
    moved = schedule_graph(gm.graph)
    if moved:
        gm.recompile()
    return gm, moved


def schedule_graph(graph: torch.fx.Graph) -> int:
    """``schedule_overlap`` on a bare graph (Inductor's post-grad hook hands one over); returns
    the number of nodes moved."""
    nodes = list(graph.nodes)
    if not any(is_issue(n) for n in nodes):
        return 0
    order = schedule(nodes)
    moved = sum(a is not b for a, b in zip(order, nodes))
    if moved:
        if order[0] is not nodes[0]:
            nodes[0].prepend(order[0])
        for before, node in zip(order, order[1:]):
            before.append(node)
        graph.lint()
    return moved


class PostGradSchedule(CustomGraphPass):
    """``schedule_graph`` as Inductor's ``post_grad_custom_post_pass``: the forward and backward
    graphs Inductor compiles (AOT autograd's, in aten ops) get the same schedule."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        schedule_graph(graph)

    def uuid(self):
        return get_hash_for_files((__file__,))
