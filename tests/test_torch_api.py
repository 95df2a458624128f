"""The private torch API moec relies on (``moec/_torch.py``): present on the installed torch, named
when it is not, and reached from nowhere else in the package."""

from __future__ import annotations

import io
import pathlib
import re
import tokenize

import torch

from moec import _torch

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "moec"
# torch._check is public API (documented with torch.cond and the export docs), not an internal.
_PRIVATE = re.compile(r"\btorch\.(?:utils\.)?_(?!check\b)[a-z]\w*")


def test_every_private_api_moec_uses_exists_on_this_torch():
    assert _torch.missing() == [], (
        f"torch {torch.__version__} lacks internals moec uses: {_torch.missing()}; adapt moec/_torch.py")


def test_this_torch_is_in_the_tested_range():
    low, high = _torch.TESTED
    assert _torch.supported(), f"torch {torch.__version__} is outside moec's tested range {low}..{high}"


def test_pyproject_allows_exactly_the_tested_torch_releases():
    import tomllib

    with open(PACKAGE.parent / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    (low, high) = _torch.TESTED
    assert f"torch>={low[0]}.{low[1]},<{high[0]}.{high[1] + 1}" in deps, deps


def test_the_capture_hook_finds_the_compile_frame():
    """The hook reads the frame being compiled from convert_frame._compile's locals: compiling a
    function with a backend whose start callback looks for that frame must find it."""
    from moec.capture import hook

    seen = []

    def on_start(*args, **kwargs):
        seen.append(hook._compiling_frame())

    handler = _torch.callback_handler()
    torch.compiler.reset()  # (clears the callbacks other than moec's: register after it)
    handler.register_start_callback(on_start)
    try:
        torch.compile(lambda x: x * 2, backend="eager")(torch.ones(3))
    finally:
        if on_start in handler.start_callbacks:
            handler.remove_start_callback(on_start)
        torch.compiler.reset()
    assert seen and seen[0] is not None, "no convert_frame._compile frame seen from the start callback"
    local_vars, backend, rerun = seen[0]
    assert "x" in local_vars and rerun["code"] is not None and rerun["globals"] is not None


def _code_tokens(path: pathlib.Path):
    """(line, text) of every name/operator token of a file, strings and comments left out."""
    text = path.read_text()
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type in (tokenize.NAME, tokenize.OP):
            out.append((tok.start[0], tok.string))
    return out


def test_no_private_torch_api_outside_moec_torch():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "_torch.py":
            continue
        lines: dict[int, str] = {}
        for line, text in _code_tokens(path):
            lines[line] = lines.get(line, "") + " " + text
        for line, code in lines.items():
            code = re.sub(r"\s*\.\s*", ".", code).strip()
            if _PRIVATE.search(code):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {code[:80]}")
    assert not offenders, "private torch API outside moec/_torch.py:\n" + "\n".join(offenders)


def test_members_only_group_naming_leaves_torchs_group_counter_as_it_was():
    from torch.distributed import distributed_c10d

    world = distributed_c10d._world
    before = world.group_count
    with _torch.members_only_group_naming(3):
        distributed_c10d._process_group_name([0, 1], use_hashed_name=True)
    assert world.group_count == before
