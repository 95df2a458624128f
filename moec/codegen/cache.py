"""On-disk cache of generated kernel modules.

Contract: ``load(spec, group)`` returns the imported module holding the kernels of ``group`` for
``spec`` (a layer spec or a sub-spec; ``spec.for_kernel(group)`` is applied). The source is written
once to ``cache_dir() / f"{group}-{key}.py"`` with ``key = spec.for_kernel(group).key()`` and
imported from that file, because Triton reads a kernel's source with ``inspect.getsource``. A
module is imported at most once per process (memo by path); a later process finds the file and
does not regenerate it. Files are written to a temporary name in the same directory and renamed
with ``os.replace``, so a reader never sees a partial file; each file ends with a
``# moec-kernel-end <key>`` line, and a file without it (truncated by hand, or by a crash of a
writer that bypassed the rename) is regenerated. An existing, complete file is used as it is,
without emitting the source again, so a hand-edited kernel is what runs until the file is
deleted. ``STATS`` counts files written and modules imported, for tests.

The cache directory is ``$MOEC_CACHE_DIR`` when set, else ``~/.cache/moec/kernels``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

from moec.codegen.emit import emit_group
from moec.codegen.spec import KernelSpec

STATS = {"written": 0, "imported": 0}
_MEMO: dict[Path, ModuleType] = {}
_LOCK = threading.Lock()


def cache_root() -> Path:
    """moec's cache root: ``$MOEC_CACHE_DIR`` when set, else ``~/.cache/moec``. Kernels live in
    ``cache_dir()``; other caches (``moec.runtime.cost_model``'s calibrations) in subfolders."""
    env = os.environ.get("MOEC_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "moec"


def cache_dir() -> Path:
    # Kernel files sit directly in $MOEC_CACHE_DIR, where they were before moec had other caches.
    return cache_root() if os.environ.get("MOEC_CACHE_DIR") else cache_root() / "kernels"


def path_for(spec: KernelSpec, group: str) -> Path:
    return cache_dir() / f"{group}-{spec.for_kernel(group).key()}.py"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def ensure_file(spec: KernelSpec, group: str) -> Path:
    """The cached source file of ``group`` for ``spec``, written if absent or not as generated."""
    path = path_for(spec, group)
    end = f"# moec-kernel-end {path.stem}\n"
    try:
        complete = path.read_text().endswith(end)
    except (FileNotFoundError, UnicodeDecodeError):
        complete = False
    if not complete:
        _write_atomic(path, emit_group(spec, group) + "\n" + end)
        STATS["written"] += 1
    return path


def load(spec: KernelSpec, group: str) -> ModuleType:
    path = path_for(spec, group)
    with _LOCK:
        if path in _MEMO:
            return _MEMO[path]
        path = ensure_file(spec, group)
        name = f"moec_kernels.{path.stem.replace('-', '_')}"
        mod_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module  # Triton resolves a kernel's globals through its module
        mod_spec.loader.exec_module(module)
        STATS["imported"] += 1
        _MEMO[path] = module
        return module


def clear_memo() -> None:
    """Forget the imported modules (tests; a new ``MOEC_CACHE_DIR`` or ``TRITON_INTERPRET``)."""
    with _LOCK:
        for path in _MEMO:
            sys.modules.pop(f"moec_kernels.{path.stem.replace('-', '_')}", None)
        _MEMO.clear()
