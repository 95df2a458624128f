"""Kernel source emission: a ``KernelSpec`` to Python module source text.

Contract: ``emit(spec)`` returns ``{group: source}`` for every kernel group of ``KERNEL_GROUPS``,
each a complete importable module (``HEADER``, its constants, its ``@triton.jit`` kernels)
generated from ``spec.for_kernel(group)``, so the text of a group depends only on the fields that
group uses. ``emit_group(spec, group)`` is one entry of it. ``layer_source(spec)`` is all of a
layer's kernels (or those of some groups) as one readable module (what ``moec codegen SPEC --layer
N`` prints); it is for
reading and diffing, the runtime loads the per-group modules through ``moec.codegen.cache``.
Emission is pure text generation: it needs neither a GPU nor an importable Triton.
"""

from __future__ import annotations

from dataclasses import fields

from moec.codegen import templates
from moec.codegen.spec import _GROUP_FIELDS, KERNEL_GROUPS, KernelSpec


def _spec_comment(spec: KernelSpec, groups: tuple[str, ...] = KERNEL_GROUPS) -> str:
    """The spec's fields, but those only groups outside ``groups`` read (a split layer's activation)."""
    unread = set().union(*(_GROUP_FIELDS[g] for g in KERNEL_GROUPS if g not in groups)) - set().union(
        *(_GROUP_FIELDS[g] for g in groups))
    values = ", ".join(f"{f.name}={getattr(spec, f.name)!r}" for f in fields(spec) if f.name not in unread)
    return f"# spec: {values}\n"


def emit_group(spec: KernelSpec, group: str) -> str:
    sub = spec.for_kernel(group)
    make, const_kw = templates.GROUP_SOURCES[group]
    return (templates.HEADER + _spec_comment(sub) + "\n" + templates.constants(sub, **const_kw)
            + make(sub).rstrip() + "\n")


def emit(spec: KernelSpec) -> dict[str, str]:
    return {group: emit_group(spec, group) for group in KERNEL_GROUPS}


def layer_source(spec: KernelSpec, groups: tuple[str, ...] = KERNEL_GROUPS) -> str:
    """One module with every kernel of the layer (of ``groups``: a split layer runs fewer).
    Constants that two groups share with different values (``TOP_K`` of a sub-spec that dropped it)
    cannot collide: each group's sub-spec keeps the layer's value of every constant it emits."""
    out = [templates.HEADER, _spec_comment(spec, groups), "\n"]
    seen: set[str] = set()
    for group in groups:
        sub = spec.for_kernel(group)
        make, const_kw = templates.GROUP_SOURCES[group]
        out.append(f"\n# {'-' * 94}\n# {group}\n# {'-' * 94}\n")
        for line in templates.constants(sub, **const_kw).splitlines():
            if line not in seen:
                seen.add(line)
                out.append(line + "\n")
        out.append(make(sub).rstrip() + "\n")
    return "".join(out)
