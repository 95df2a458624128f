"""``moec profile``: the trace it writes (counts add up, windows, determinism), its summary, and the
error contract (user mistakes: exit 2, one ``moec: ...`` line on stderr, no traceback)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from test_cli import assert_user_error  # tests/cli is on sys.path (rootdir-relative test modules)

from moec.cli.main import main
from moec.cli.profile import forward_shapes, window_sizes
from moec.runtime.trace import RoutingTrace


def run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["profile", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_builtin_trace_and_summary(capsys, tmp_path):
    out_path = tmp_path / "t.npz"
    rc, out, err = run(capsys, "builtin:moe-mlp", "--tokens", "100", "--windows", "3", "--batch", "2",
                       "--out", str(out_path))
    assert rc == 0, err
    t = RoutingTrace.load(str(out_path))
    assert (t.num_windows, t.num_layers, t.num_experts, t.top_k) == (3, 2, 8, 2)
    assert t.load_WLE.sum(-1).tolist() == [[68, 68], [66, 66], [66, 66]]  # 34/33/33 tokens x top-2
    np.testing.assert_array_equal(t.affinity_WLEE.sum(-1), 2 * t.load_WLE[:, :1])
    assert t.meta["source"] == "profile:builtin:moe-mlp" and t.meta["seed"] == 0
    assert t.meta["layer_names"] == ["layers.0.moe", "layers.1.moe"]
    lines = out.splitlines()
    assert lines[0].startswith("moec profile builtin:moe-mlp: 2 MoE layer(s), 8 experts, top-2, 100 tokens in "
                               "3 window(s) of 34/33, forwards of 2 x 8")
    assert lines[1].split() == ["layer", "slots", "max/mean", "top", "experts", "(share", "of", "slots)"]
    load_E = t.load_WLE.sum(0)[0]
    top = int(np.argmax(load_E))
    assert lines[2].split()[:4] == ["layers.0.moe", "200", f"{load_E.max() / load_E.mean():.2f}", str(top)]
    assert lines[-1] == f"trace written to {out_path}"
    # Same seed, same trace; another seed, other inputs.
    assert run(capsys, "builtin:moe-mlp", "--tokens", "100", "--windows", "3", "--batch", "2",
               "--out", str(tmp_path / "again.npz"))[0] == 0
    assert RoutingTrace.load(str(tmp_path / "again.npz")) == t
    run(capsys, "builtin:moe-mlp", "--tokens", "100", "--windows", "3", "--seed", "1", "--out", str(tmp_path / "s1.npz"))
    assert not np.array_equal(RoutingTrace.load(str(tmp_path / "s1.npz")).load_WLE, t.load_WLE)


def test_hf_model_default_out(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, "hf:mixtral", "--tokens", "64", "--windows", "1", "--seq-len", "5")
    assert rc == 0, err
    t = RoutingTrace.load("moec-trace-hf-mixtral.npz")
    assert t.load_WLE.sum(-1).tolist() == [[128, 128]]
    assert t.meta["layer_names"] == ["model.layers.0.mlp", "model.layers.1.mlp"] and t.meta["seq_len"] == 5


def test_window_and_forward_splits():
    assert window_sizes(10, 3) == [4, 3, 3] and window_sizes(3, 3) == [1, 1, 1]
    assert list(forward_shapes(37, 2, 8)) == [(2, 8), (2, 8), (1, 5)]
    assert list(forward_shapes(50, 2, 8)) == [(2, 8), (2, 8), (2, 8), (1, 2)]
    assert list(forward_shapes(27, 4, 8)) == [(3, 8), (1, 3)]
    assert list(forward_shapes(3, 4, 8)) == [(1, 3)]
    for tokens in range(1, 40):
        assert sum(b * s for b, s in forward_shapes(tokens, 3, 4)) == tokens


@pytest.mark.parametrize("args, needles", [
    (["--tokens", "0"], ["--tokens must be at least 1, got 0"]),
    (["--windows", "0"], ["--windows must be at least 1"]),
    (["--batch", "-1"], ["--batch must be at least 1"]),
    (["--seq-len", "0"], ["--seq-len must be at least 1"]),
    (["--tokens", "2", "--windows", "3"], ["--tokens 2 is fewer than --windows 3"]),
    (["builtin:nope"], ["unknown builtin model 'nope'"]),
])
def test_user_errors(capsys, args, needles):
    rc, out, err = run(capsys, *args)
    assert_user_error(rc, err, *needles)


def test_no_moe_layer_and_unwritable_out(capsys, tmp_path):
    dense = tmp_path / "dense.py"
    dense.write_text("import torch\n\ndef make():\n    return torch.nn.Linear(4, 4), torch.randn(1, 3, 4)\n")
    assert_user_error(*run(capsys, f"{dense}:make", "--tokens", "4")[::2], "no MoE layer found in")
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_user_error(*run(capsys, "builtin:moe-mlp", "--tokens", "4", "--windows", "1",
                           "--out", str(blocker / "t.npz"))[::2], "cannot write the trace to")


def test_real_command_error_contract(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moec.cli", "profile", "--tokens", "x"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "invalid int value: 'x'" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "moec.cli", "profile", "--windows", "0"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert_user_error(proc.returncode, proc.stderr, "--windows must be at least 1")
