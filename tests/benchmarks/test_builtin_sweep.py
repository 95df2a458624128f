"""``benchmarks/builtin_sweep.py`` on one small model: the JSON it commits holds the commit, the
rows, the per-call/per-layer fit and a summary consistent with the rows (timings themselves are
not checked: they belong to benchmarks)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

from moec.models.builtin import BUILTIN_MODELS

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _sweep_module():
    spec = importlib.util.spec_from_file_location("builtin_sweep", ROOT / "benchmarks" / "builtin_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_builtin_sweep_writes_a_consistent_result(tmp_path, monkeypatch, capsys):
    sweep = _sweep_module()
    monkeypatch.setattr(sweep, "BUILTIN_MODELS", {"moe-mlp": BUILTIN_MODELS["moe-mlp"]})
    out = tmp_path / "sweep.json"
    rc = sweep.main(["--tokens", "1", "3", "--repeat", "1", "--overhead-layers", "1", "2", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "builtin_sweep" and set(doc["source"]) == {"commit", "dirty"}
    rows = [r for r in doc["models"]["moe-mlp"]["results"] if r["backend"] == "moec"]
    assert [r["tokens"] for r in rows] == [1, 3] and all(r["ok"] for r in rows)
    below = [(b["model"], b["tokens"]) for b in doc["summary"]["below_floor"]]
    assert below == [("moe-mlp", r["tokens"]) for r in rows if r["speedup_vs_eager"] < sweep.FLOOR]
    assert rc == (1 if below else 0)
    fit = doc["overhead"]["fit"]
    assert set(fit) == {"eager", "moec"} and all(len(f["median_ms"]) == 2 for f in fit.values())
    assert "moec x eager per model and token count" in capsys.readouterr().out
