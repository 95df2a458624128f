"""``moec optimize``: the schedule per layer and why, the simulator table, JSON, and the error
contract (user mistakes: exit 2, one ``moec: ...`` line on stderr, no traceback).

Every test points ``MOEC_CACHE_DIR`` at a temporary folder, so a calibration stored on the machine
running the tests does not change what is printed. Most run ``main`` in-process; one runs the real
command to check the error contract on a real stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import assert_user_error  # tests/cli is on sys.path (rootdir-relative test modules)

from moec.cli.main import main
from moec.runtime.cost_model import Calibration
from moec.runtime.simulate import NODE_SIZES, WORLD_SIZES

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEC_CACHE_DIR", str(tmp_path / "cache"))



def run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["optimize", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_default_model_schedule_and_reasons(capsys):
    rc, out, err = run(capsys, "--world-size", "16")
    assert rc == 0, err
    assert "moec optimize builtin:moe-mlp: 2 MoE layer(s), 16 rank(s), 8 per node, 4096 tokens per rank" in out
    assert "calibration: assumed defaults" in out
    header = next(line for line in out.splitlines() if line.startswith("layer "))
    for col in ("r", "a2a", "overlaps", "sequential ms", "moec ms", "exposed comm ms"):
        assert col in header
    rows = [line for line in out.splitlines() if line.startswith("layers.") and "ms" not in line.split()[1]]
    assert [r.split()[0] for r in rows[:2]] == ["layers.0.moe", "layers.1.moe"]
    assert "t(r) = " in out and "alpha_inter" in out and "why: " in out
    assert "layers.1.moe: same shape as layers.0.moe" in out
    assert "model (MoE layers): sequential" in out


def test_single_rank(capsys):
    rc, out, _ = run(capsys, "builtin:shared-expert", "--world-size", "1")
    assert rc == 0
    assert "one rank: no all-to-all" in out


def test_simulate_prints_rows_for_8_to_2048_ranks(capsys):
    rc, out, err = run(capsys, "--world-size", "8", "--simulate")
    assert rc == 0, err
    table = out[out.index("simulated forward step"):].splitlines()[1:]
    assert table[0].split()[:3] == ["ranks", "node", "layer"]
    seen = {(int(line.split()[0]), int(line.split()[1]), line.split()[2]) for line in table[1:]}
    for nodes in NODE_SIZES:
        for world in WORLD_SIZES:
            assert (world, nodes, "model") in seen
            assert (world, nodes, "layers.0.moe") in seen
    assert len(table) == 1 + 2 * len(NODE_SIZES) * len(WORLD_SIZES)


def test_json_parses_and_carries_the_schedules(capsys, tmp_path):
    calib = Calibration.default()
    calib.device = "test device"
    path = calib.save(tmp_path / "calib.json")
    rc, out, err = run(capsys, "--world-size", "64", "--ranks-per-node", "4", "--tokens", "256", "--json",
                       "--simulate", "--calibration", str(path))
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["world_size"] == 64 and doc["ranks_per_node"] == 4 and doc["tokens_per_rank"] == 256
    assert doc["calibration"]["device"] == "test device" and doc["calibration_source"] == f"--calibration {path}"
    assert [layer["layer"] for layer in doc["layers"]] == ["layers.0.moe", "layers.1.moe"]
    for layer in doc["layers"]:
        assert layer["chunks"] >= 1 and isinstance(layer["hierarchical"], bool)
        assert layer["predicted_s"]["moec"] <= layer["predicted_s"]["sequential"]
        assert "why:" in layer["explanation"]
    assert doc["model"]["moec_s"] == pytest.approx(sum(layer["predicted_s"]["moec"] for layer in doc["layers"]))
    assert {row["world_size"] for row in doc["simulation"]} == set(WORLD_SIZES)


def test_stored_calibration_is_used(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEC_CACHE_DIR", str(tmp_path / "other"))
    calib = Calibration.default()
    calib.device = "stored device"
    stored = calib.save()
    rc, out, _ = run(capsys, "--world-size", "2")
    assert rc == 0
    assert f"calibration: stored calibration {stored}" in out and "stored device" in out


@pytest.mark.parametrize("args, needle", [
    (["--world-size", "0"], "--world-size must be at least 1, got 0"),
    (["--world-size", "12"], "--world-size 12 does not fill nodes of --ranks-per-node 8"),
    (["--world-size", "4", "--tokens", "0"], "--tokens must be at least 1"),
    (["--world-size", "4", "--skew", "0.5"], "--skew"),
    (["--world-size", "4", "--calibration", "/nonexistent/c.json"], "no calibration file /nonexistent/c.json"),
    (["builtin:nope", "--world-size", "4"], "unknown builtin model 'nope'"),
])
def test_user_errors_exit_2_with_one_line(capsys, args, needle):
    rc, out, err = run(capsys, *args)
    assert_user_error(rc, err, needle)
    assert out == ""


def test_bad_world_size_real_process():
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "moec.cli", "optimize", "--world-size", "-3"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert_user_error(proc.returncode, proc.stderr, "--world-size must be at least 1, got -3")
    assert proc.stdout == ""
