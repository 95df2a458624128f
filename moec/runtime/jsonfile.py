"""JSON files moec writes and reads (calibrations, placement plans): written atomically (a
temporary file renamed over the target, so a reader never sees half a file), read with one-line
errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: os.PathLike, doc: Any, indent: int = 1) -> Path:
    """Write ``doc`` to ``path`` (its folder made if missing), atomically; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=indent) + "\n")
    os.replace(tmp, path)
    return path


def read_json(path: os.PathLike, what: str, error: type[Exception] = ValueError, hint: str = "",
              prefix: str = "") -> Any:
    """The JSON document in ``path``; ``error`` with one line (``prefix``, then what went wrong
    with the ``what`` file) when the file is missing or unreadable (``hint`` appended to the latter)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{prefix}no {what} file {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{prefix}cannot read {what} {path}: {' '.join(str(e).split())}{hint}") from None
