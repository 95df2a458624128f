"""Find MoE-looking modules from their parameters, at any depth, whatever they are called.

Contract: ``find_candidates(root)`` returns one ``Candidate`` per module that holds, somewhere
in its subtree, E >= 2 experts and a router weight for them, in module order, and one
``Orphan`` per expert group that no router weight could be paired with. Nothing here reads a
class name, an attribute name or a forward: structure only proposes; ``observe`` and ``match``
decide what the module computes.

- Experts (``ExpertGroup``), in any of three layouts:
  ``modules``: E >= 2 children of one module with identical parameter shapes, each holding at
  least two matrices (an ``nn.ModuleList``, ``ModuleDict`` or any module of identical children);
  ``stacked``: two or more parameters of one module with a common leading dimension E >= 2
  (3-D ``[E, a, b]`` matrices, 2-D ``[E, n]`` biases);
  ``flat``: two or more ``[E*n, h]`` matrices of one module holding nothing else, E given by a
  router weight next to them (DBRX's ``w1 [E*I, H]``).
- A router weight is a 2-D parameter ``[E, H]`` or ``[H, E]`` outside the experts, where H is a
  width every expert matrix has. Each group pairs with the nearest router weight (the one
  sharing the longest module path); the candidate layer is their common ancestor.

Legend: E experts, H hidden, I expert hidden.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import torch.nn as nn
from torch import Tensor

# An expert is an FFN: a handful of tensors. More than this per child (a decoder layer in a
# list of identical layers) is not an expert.
_MAX_EXPERT_TENSORS = 8


@dataclasses.dataclass
class ExpertGroup:
    """E experts' tensors: ``names`` are paths relative to the candidate layer's module."""

    owner: str  # path of the module holding the experts, relative to the layer ("" = the layer)
    num_experts: int
    layout: str  # "modules" | "stacked" | "flat"
    names: list[str]  # modules: child names; stacked / flat: parameter names (relative to owner)
    widths: frozenset[int]  # candidate hidden sizes: widths every expert matrix has

    def member_names(self, e: int) -> list[str]:
        """Relative paths (from the owner) of expert ``e``'s parameters (modules layout)."""
        return [self.names[e]]


@dataclasses.dataclass
class Candidate:
    name: str  # module path in the model ("" = the root)
    module: nn.Module
    experts: ExpertGroup  # ``owner`` relative to ``module``
    router: str  # parameter path relative to ``module``
    router_transposed: bool  # the weight is [H, E] (used as x @ w) rather than [E, H]
    hidden: int
    # "product_key": the router weight is [2n, H] (E = n^2) and an expert's score is the sum of
    # two key scores; ``recognise`` finds which of ``specs.PRODUCT_KEY_MAPS`` the layer computes.
    logit_map: str = ""


@dataclasses.dataclass
class Orphan:
    """Experts moec could not pair with a router weight, or per-expert weights it could not read
    as one group of experts: what the report says about an MoE-looking module it left alone."""

    name: str  # path of the experts' owner in the model
    num_experts: int
    layout: str
    why: str = ""
    # Router-less readings of the experts (the block around them, router ""), for the one tier
    # that needs no router: their own module called with the layer's expert ids and weights.
    readings: list = dataclasses.field(default_factory=list, repr=False)

    def reason(self) -> str:
        if self.why:
            return self.why
        return (f"holds {self.num_experts} experts ({self.layout}) but no router weight ([E, H] or [H, E]) was "
                "found for them: routing that is not a linear projection of the hidden state (a hash or MLP "
                "router) is not recognised")


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _is_under(path: str, prefix: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def _overlaps(path: str, others: list[str]) -> bool:
    """``path`` is inside one of ``others`` or holds one."""
    return any(_is_under(path, o) or _is_under(o, path) for o in others)


def _common_prefix(a: str, b: str) -> str:
    pa, pb = a.split(".") if a else [], b.split(".") if b else []
    out = []
    for x, y in zip(pa, pb):
        if x != y:
            break
        out.append(x)
    return ".".join(out)


def _signature(module: nn.Module) -> tuple:
    return tuple((n, tuple(t.shape), t.dtype) for n, t in module.named_parameters())


def _matrix_widths(shapes: list[tuple[int, ...]]) -> frozenset[int]:
    """Widths shared by every matrix (the hidden size is in all of them)."""
    mats = [set(s) for s in shapes if len(s) == 2]
    if len(mats) < 2:
        return frozenset()
    return frozenset(set.intersection(*mats))


def _module_groups(root: nn.Module) -> Iterator[tuple[str, ExpertGroup]]:
    for path, m in root.named_modules():
        # Parameterless children (a dropout beside the experts) are not experts.
        children = [(n, c) for n, c in m.named_children() if n != "moec_expert_shards" and list(c.parameters())]
        if len(children) < 2:
            continue
        sig = _signature(children[0][1])
        if any(_signature(c) != sig for _, c in children[1:]):
            continue
        shapes = [s for _, s, _ in sig]
        if len(sig) > _MAX_EXPERT_TENSORS or sum(len(s) == 2 for s in shapes) < 2 or any(len(s) > 2 for s in shapes):
            continue
        widths = _matrix_widths(shapes)
        if widths:
            yield path, ExpertGroup("", len(children), "modules", [n for n, _ in children], widths)


def _stacked_groups(root: nn.Module) -> Iterator[tuple[str, ExpertGroup]]:
    """3-D parameters with a common leading dim E >= 2, grouped at their lowest common module
    (one module's own parameters, or its children's: JetMoE's ``input_linear.weight`` and
    ``output_linear.weight``), with the 2-D [E, n] ones beside them (per-expert biases)."""
    by_E: dict[int, list[str]] = {}
    for n, p in root.named_parameters():
        if p.dim() == 3 and p.shape[0] >= 2:
            by_E.setdefault(p.shape[0], []).append(n)
    for E, names in by_E.items():
        by_owner: dict[str, list[str]] = {}
        for n in names:
            by_owner.setdefault(n.rpartition(".")[0], []).append(n)
        # Owners holding one such matrix each are merged at their parent (ParallelExperts pairs).
        merged: dict[str, list[str]] = {}
        for owner, ns in by_owner.items():
            key = owner if len(ns) >= 2 else owner.rpartition(".")[0]
            merged.setdefault(key, []).extend(ns)
        for path, ns in merged.items():
            if len(ns) < 2 or any(not _is_under(n, path) for n in ns):
                continue
            rel = [n[len(path) + 1:] if path else n for n in ns]
            owner = root.get_submodule(path)
            vecs = [vn for vn, v in owner.named_parameters(recurse=False) if v.dim() == 2 and v.shape[0] == E]
            if len({r.rpartition(".")[0] for r in rel}) > 1:
                # Matrices in sibling modules: their [E, n] biases are theirs too.
                vecs = [f"{r.rpartition('.')[0]}.{vn}" for r in rel for vn, v in
                        owner.get_submodule(r.rpartition(".")[0]).named_parameters(recurse=False)
                        if v.dim() == 2 and v.shape[0] == E]
            widths = _matrix_widths([tuple(owner.get_parameter(r).shape[1:]) for r in rel])
            if widths:
                yield path, ExpertGroup("", E, "stacked", rel + vecs, widths)
    yield from _padded_stacks(root)


def _padded_stacks(root: nn.Module) -> Iterator[tuple[str, ExpertGroup]]:
    """One module's own 3-D parameters with two leading dims E < E2, each held by at least one:
    E experts whose larger tensors carry E2 - E rows no expert reads (LongCat-Flash in
    transformers 5.23 allocates ``gate_up_proj`` for its identity "zero" experts too). Read as
    E experts (the rows past E left out); only agreement with the module's own output accepts
    the reading."""
    for path, module in root.named_modules():
        mats = [(n, p) for n, p in module.named_parameters(recurse=False) if p.dim() == 3 and p.shape[0] >= 2]
        counts = sorted({p.shape[0] for _, p in mats})
        if len(counts) != 2 or len(mats) < 2:
            continue
        widths = _matrix_widths([tuple(p.shape[1:]) for _, p in mats])
        if widths:
            yield path, ExpertGroup("", counts[0], "stacked", [n for n, _ in mats], widths)


def _flat_groups(root: nn.Module, routers: list[tuple[str, Tensor]]) -> Iterator[tuple[str, ExpertGroup]]:
    """Two or more [E*n, h] matrices of one module (DBRX's ``w1 [E*I, H]``), for each router
    width E next to them: same shape, n >= 2, h a width of the router."""
    for path, m in root.named_modules():
        by_shape: dict[tuple[int, int], list[str]] = {}
        for n, p in m.named_parameters(recurse=False):
            if p.dim() == 2:
                by_shape.setdefault(tuple(p.shape), []).append(n)
        for (rows, cols), names in by_shape.items():
            if len(names) < 2:
                continue
            for rpath, w in routers:
                if _is_under(rpath, path) and rpath.rpartition(".")[0] == path and rpath.rpartition(".")[2] in names:
                    continue
                for E, H in (tuple(w.shape), tuple(w.shape)[::-1]):
                    if H == cols and 2 <= E < rows and rows % E == 0 and rows // E >= 2:
                        yield path, ExpertGroup("", E, "flat", list(names), frozenset({cols}))


def _router_weights(root: nn.Module) -> list[tuple[str, Tensor]]:
    return [(n, p) for n, p in root.named_parameters() if p.dim() == 2 and min(p.shape) >= 1]


def find_candidates(root: nn.Module) -> tuple[list[Candidate], list[Orphan]]:
    """One ``Candidate`` per layer (its other router/expert pairings in ``alternatives``)."""
    routers = _router_weights(root)
    order = {name: i for i, (name, _) in enumerate(root.named_modules())}
    groups: dict[tuple[str, str, int], ExpertGroup] = {}
    for path, g in [*_module_groups(root), *_stacked_groups(root), *_flat_groups(root, routers)]:
        groups.setdefault((path, g.layout, g.num_experts), g)
    found: dict[str, list[tuple[tuple, Candidate]]] = {}  # by layer (the nearest pairing's module)
    unpaired: list[tuple[str, ExpertGroup]] = []
    # Another stacked group's own [E, H] tensors (its router or its bias) route no other experts:
    # two identical layers, each with a bare router parameter beside its stacked experts, would
    # otherwise pair each with the other's weight, at the module holding both.
    owners: dict[str, set] = {}
    for key, g in groups.items():
        if g.layout == "stacked":
            for n in g.names:
                owners.setdefault(_join(key[0], n), set()).add(key)
    paired = {key: _pairings(root, key[0], g, [(n, w) for n, w in routers if not owners.get(n, set()) - {key}])
              for key, g in groups.items()}
    # One module's [E*n, h] matrices read as flat experts for several E (a square attention
    # weight pairs with them too): only the readings whose router is nearest stay.
    nearest: dict[str, int] = {}
    for key, hyps in paired.items():
        if key[1] == "flat" and hyps:
            nearest[key[0]] = max(nearest.get(key[0], -1), _depth(hyps[0].name))
    for key in sorted(groups, key=lambda k: order[k[0]]):
        path = key[0]
        g = groups[key]
        hypotheses = paired[key]
        if key[1] == "flat" and hypotheses and _depth(hypotheses[0].name) < nearest[path]:
            continue
        if not hypotheses:
            unpaired.append((path, g))
            continue
        for rank, cand in enumerate(hypotheses):
            found.setdefault(hypotheses[0].name, []).append(((_plausibility(root, cand), rank), cand))
        # The nearest [E, H] weight sits in a submodule of the experts' own module: a router
        # there, or a per-expert tensor of the experts (Ergo's post-expert norm scale [E, H]).
        # The nearest weight outside them is read too, as a layer of its own; whichever reading
        # is recognised covers the experts (``moec.capture.convert`` drops the other's notes).
        first = hypotheses[0]
        router_path = _join(first.name, first.router)
        if key[1] != "modules" and _is_under(router_path, path) and router_path.rpartition(".")[0] != path:
            outer = _pairings(root, path, g, [(n, w) for n, w in routers if not _is_under(n, path)])
            if outer and outer[0].name not in found:
                found[outer[0].name] = [((_plausibility(root, c), rank), c) for rank, c in enumerate(outer)]
    # Identical modules that hold MoE layers (a list of decoder layers) are not experts; nor are
    # groups inside a layer's experts.
    layers = list(found)
    # Two identical MLPs side by side are as likely a model's own pair of branches: a list of
    # modules without a router is reported from three on.
    orphans = [Orphan(path, g.num_experts, g.layout, readings=_routerless(root, path, g)) for path, g in unpaired
               if not _overlaps(path, layers)
               and (g.layout != "modules" or g.num_experts >= 3)]
    orphans += _unread_stacks(root, [*layers, *(o.name for o in orphans)])
    keyed, keyed_orphans = _product_key_tables(root, [o.name for o in orphans])
    orphans += [o for o in keyed_orphans if not _overlaps(o.name, layers)]
    out = []
    for name in sorted(found, key=lambda n: order[n]):
        ranked = [c for _, c in sorted(found[name], key=lambda kc: kc[0])]
        first, *rest = ranked
        first.__dict__["alternatives"] = rest
        out.append(first)
    # A router weight routes one layer: the deepest that pairs with it (an outer module pairing
    # it with other same-shaped weights, square attention weights say, is not a layer).
    deepest: dict[int, str] = {}
    for c in out:
        rid = id(c.module.get_parameter(c.router))
        if rid not in deepest or _depth(c.name) > _depth(deepest[rid]):
            deepest[rid] = c.name
    out = [c for c in out if deepest[id(c.module.get_parameter(c.router))] == c.name]
    # A product-key layer's tables also read as flat experts ([E, H] as E / 2 experts of two
    # rows) routed by its [2n, H] projection: the product-key reading goes first, the others stay
    # its alternatives.
    by_name = {c.name: i for i, c in enumerate(out)}
    for c in keyed:
        if c.name in by_name:
            old = out[by_name[c.name]]
            if old.module.get_parameter(old.router) is c.module.get_parameter(c.router):
                c.__dict__["alternatives"] = [old, *old.__dict__.pop("alternatives", [])]
                out[by_name[c.name]] = c
            else:  # another weight routes the layer as it reads: the product-key reading last
                old.__dict__.setdefault("alternatives", []).append(c)
        elif not _overlaps(c.name, layers):
            c.__dict__["alternatives"] = []
            out.append(c)
    out = sorted(out, key=lambda c: order[c.name])
    return out, orphans


_LAYOUT_RANK = {"modules": 0, "stacked": 1, "flat": 2}


def _depth(path: str) -> int:
    return len(path.split(".")) if path else 0


def _plausibility(root: nn.Module, cand: Candidate) -> tuple:
    """Sort key among a layer's readings, most plausible first: experts as modules, stacked,
    then flat (a flat reading with more rows per expert first: any [n, H] weight whose rows
    divide the experts' pairs with them, a shared expert's up-projection included)."""
    g = cand.experts
    rows = 0
    if g.layout == "flat":
        owner = cand.module.get_submodule(g.owner) if g.owner else cand.module
        rows = owner.get_parameter(g.names[0]).shape[0] // g.num_experts
    return _LAYOUT_RANK[g.layout], -rows


def _routerless(root: nn.Module, path: str, g: ExpertGroup) -> list[Candidate]:
    """Stacked experts in a module of their own, read with the block holding them as the layer."""
    if g.layout != "stacked" or not path:
        return []
    block = path.rpartition(".")[0]
    rel = path[len(block) + 1:] if block else path
    return [Candidate(block, root.get_submodule(block), dataclasses.replace(g, owner=rel), "", False, H)
            for H in sorted(g.widths, reverse=True)]


def _unread_stacks(root: nn.Module, covered: list[str]) -> list[Orphan]:
    """Modules holding [n, a, b] parameters (per-expert weights, as far as shape says) outside
    every layer and orphan found: e.g. LongCat's ``gate_up_proj [E + Z, ...]`` beside its
    ``down_proj [E, ...]``, whose counts disagree."""
    found: dict[str, list[tuple[str, tuple]]] = {}
    for n, p in root.named_parameters():
        owner = n.rpartition(".")[0]
        if p.dim() == 3 and p.shape[0] >= 2 and not any(_is_under(owner, c) for c in covered):
            found.setdefault(owner, []).append((n.rpartition(".")[2], tuple(p.shape)))
    out = []
    for owner, params in found.items():
        if len(params) < 2:  # one [n, a, b] weight alone is a convolution's as likely
            continue
        counts = sorted({shape[0] for _, shape in params})
        listed = ", ".join(f"{n} {list(shape)}" for n, shape in params)
        why = "they are not one group of experts with a router: " + (
            f"their expert counts differ ({counts}; extra 'zero' or identity experts?)" if len(counts) > 1 else
            "no second matrix or no router weight goes with them")
        out.append(Orphan(owner, counts[0], "stacked", f"holds per-expert weights ({listed}) but {why}"))
    return out


def _product_key_tables(root: nn.Module, covered: list[str]) -> tuple[list[Candidate], list[Orphan]]:
    """Modules whose own or children's parameters hold two [E, H] tables with E = n^2 and a
    projection H -> 2n beside them: single-row experts behind product-key routing (Doge's
    CDMoE, PEER): a candidate whose logits are sums of two key scores (``logit_map``). More than
    two such tables are reported, never silent."""
    cands, orphans = [], []
    for path, module in root.named_modules():
        if _overlaps(path, covered):
            continue
        params = [(n, tuple(p.shape)) for n, p in module.named_parameters() if n.count(".") <= 1 and p.dim() == 2]
        for (name, (E, H)) in params:
            n = int(round(E ** 0.5))
            if E < 4 or n * n != E:
                continue
            tables = [t for t, shape in params if shape == (E, H)]
            keys = [(t, shape == (H, 2 * n)) for t, shape in params if shape in ((2 * n, H), (H, 2 * n))]
            if len(tables) == 2 and keys:
                group = ExpertGroup("", E, "flat", tables, frozenset({H}))
                cands.append(Candidate(path, module, group, keys[0][0], keys[0][1], H, logit_map="product_key"))
                covered = [*covered, path]
            elif len(tables) > 2 and keys:
                orphans.append(Orphan(path, E, "rows", (
                    f"looks like a product-key MoE layer ({E} single-row experts in {', '.join(tables)}, "
                    f"a projection {keys[0][0]} to 2 x {n} key scores) but was left alone: experts: more than two "
                    "[E, H] tables, so which two are the experts' input and output rows is not known")))
            if len(tables) >= 2 and keys:
                break
    return cands, orphans


def _pairings(root: nn.Module, path: str, g: ExpertGroup, routers: list[tuple[str, Tensor]]) -> list[Candidate]:
    """Every (router weight, experts) reading of group ``g``, nearest router first."""
    outside, beside = [], []
    for rpath, w in routers:
        owner, _, leaf = rpath.rpartition(".")
        members = g.names
        if g.layout == "modules":
            if _is_under(rpath, path) and rpath != path:
                continue  # inside the experts
        elif owner == path and leaf in g.names:
            if g.layout == "flat":
                continue
            # A [E, H] parameter next to stacked experts: the router, or one of their biases.
            members = [n for n in g.names if n != leaf]
            if sum(root.get_parameter(_join(path, n)).dim() == 3 for n in members) < 2:
                continue
        for transposed, (E, H) in ((False, tuple(w.shape)), (True, tuple(w.shape)[::-1])):
            if E != g.num_experts or H not in g.widths:
                continue
            layer = _common_prefix(rpath, path)
            rel = path[len(layer) + 1:] if layer else path
            cand = Candidate(
                name=layer, module=root.get_submodule(layer),
                experts=dataclasses.replace(g, owner=rel, names=list(members)),
                router=rpath[len(layer) + 1:] if layer else rpath, router_transposed=transposed, hidden=H,
            )
            (outside if members is g.names else beside).append((len(layer.split(".")) if layer else 0, cand))
    # The nearest router weights (deepest common module) outside the experts first, then the
    # [E, H] parameters beside them (as likely biases as routers).
    nearest = []
    if outside:
        depth = max(d for d, _ in outside)
        nearest = [c for d, c in outside if d == depth]
    return nearest + [c for _, c in beside]


def expert_tensors(cand: Candidate) -> list[tuple[str, Tensor]]:
    """Every tensor the experts hold: (path relative to the layer, tensor)."""
    g = cand.experts
    owner = cand.module.get_submodule(g.owner) if g.owner else cand.module
    out = []
    if g.layout == "modules":
        for n in g.names:
            out += [(_join(g.owner, n, pn), p) for pn, p in owner.get_submodule(n).named_parameters()]
    else:
        out += [(_join(g.owner, n), owner.get_parameter(n)) for n in g.names]
    return out


def expert_slices(cand: Candidate, e: int) -> list[Tensor]:
    """Views of expert ``e``'s tensors (writes go to the module's parameters)."""
    g = cand.experts
    owner = cand.module.get_submodule(g.owner) if g.owner else cand.module
    if g.layout == "modules":
        return list(owner.get_submodule(g.names[e]).parameters())
    if g.layout == "stacked":
        return [owner.get_parameter(n)[e] for n in g.names]  # (rows past E of a padded stack: unread)
    out = []
    for n in g.names:
        p = owner.get_parameter(n)
        rows = p.shape[0] // g.num_experts
        out.append(p[e * rows:(e + 1) * rows])
    return out


def owner_of(cand: Candidate) -> nn.Module:
    return cand.module.get_submodule(cand.experts.owner) if cand.experts.owner else cand.module


def find_owner_path(root: nn.Module, module: nn.Module) -> Optional[str]:
    for name, m in root.named_modules():
        if m is module:
            return name
    return None
