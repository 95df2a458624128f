"""``benchmarks/gpu_check.sh --dry-run``: the GPU machine's one command, run on the CPU with tiny
layers (Triton interpreted), so that its steps cannot rot between the sessions that get a GPU."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run(tmp_path):
    if not torch.cuda.is_available():
        from moec.codegen.triton_ops import interpreter_numpy_problem

        if interpreter_numpy_problem():
            pytest.skip(interpreter_numpy_problem())
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--dry-run"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:]
    for step in ("gpu-tests", "gpu-kernels", "layers", "decode", "train"):
        assert f"{step}: ok" in done.stdout, done.stdout
    doc = json.loads((tmp_path / "gpu-check.json").read_text())
    assert doc["mode"] == "dry-run" and doc["failed"] == [] and doc["device"].startswith("cpu")
    assert {"torch", "triton", "transformers", "python"} <= set(doc["versions"])
    rows = doc["layers"]["results"]
    assert {r["shape"] for r in rows} == {"tiny-mixtral", "tiny-deepseek", "tiny-qwen"}
    assert all(r["ok"] for r in rows if r["backend"] == "moec"), rows  # moec's Triton kernels, interpreted
    assert doc["layers"]["target"] == "triton"
    assert any(r["backend"] == "stream-read" for r in doc["decode"]["results"])
    assert doc["train"]["mode"] == "train"


def test_gpu_check_rejects_a_missing_folder_argument():
    done = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh")], env=dict(os.environ, PYTHON=sys.executable),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert done.returncode == 2 and "out_dir" in done.stdout and "Traceback" not in done.stdout


def test_gpu_check_rejects_an_unknown_step(tmp_path):
    done = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--only", "lyers"],
                          env=dict(os.environ, PYTHON=sys.executable), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=60)
    assert done.returncode == 2 and "no step named lyers" in done.stdout and "Traceback" not in done.stdout


def test_a_step_past_its_limit_leaves_its_stacks():
    """A hung step is killed at its limit, after printing where each thread was."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.pop(0)
    env = dict(os.environ, PYTHONFAULTHANDLER="1")
    code = "import time\ndef hang_here():\n    time.sleep(60)\nprint('started', flush=True)\nhang_here()\n"
    step = gpu_check.run_step("hang", [sys.executable, "-c", code], 3, env, 1, 1)
    assert step["rc"] == 124 and step["seconds"] < 30
    assert "started" in step["output"] and "hang_here" in step["output"], step["output"]
