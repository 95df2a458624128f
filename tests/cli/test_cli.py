"""The moec command: user mistakes end in one stderr line and exit 2; reports and benchmarks print
what they promise. Run both as a subprocess (the real stdout/stderr and exit status) and in-process."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import moec
from moec.cli.main import main
from moec.report import Fallback, MoELayer, Report

REPO = Path(__file__).resolve().parents[2]


def moec_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "moec.cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env, timeout=600)


def assert_user_error(rc: int, stderr: str, *needles: str) -> None:
    assert rc == 2, stderr
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moec: "), stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def write(tmp_path, body: str) -> str:
    path = tmp_path / "factory.py"
    path.write_text("import torch\nfrom torch import nn\n" + textwrap.dedent(body))
    return str(path)


# --- user errors -----------------------------------------------------------------------------

def test_unknown_scheme_subprocess():
    result = moec_cli("inspect", "nope:x")
    assert_user_error(result.returncode, result.stderr, "nope:x", "builtin:NAME")
    assert result.stdout == ""


def test_unknown_scheme_in_process(capsys):
    rc = main(["inspect", "nope:x"])
    out, err = capsys.readouterr()
    assert_user_error(rc, err, "nope:x")
    assert out == ""


def test_missing_file(capsys, tmp_path):
    rc = main(["inspect", f"{tmp_path}/absent.py:make"])
    assert_user_error(rc, capsys.readouterr().err, "absent.py")


def test_factory_that_raises(capsys, tmp_path):
    path = write(tmp_path, """
        def make():
            raise ValueError("no experts today")
    """)
    rc = main(["inspect", f"{path}:make"])
    assert_user_error(rc, capsys.readouterr().err, "ValueError: no experts today")


def test_bench_bad_tokens(capsys, tmp_path):
    path = write(tmp_path, """
        def make():
            return nn.Linear(4, 4)
    """)
    rc = main(["bench", f"{path}:make", "--tokens", "0", "--out", str(tmp_path / "b.json")])
    assert_user_error(rc, capsys.readouterr().err, "--tokens")


def test_model_without_moe_layer_subprocess(tmp_path):
    path = write(tmp_path, """
        def make():
            return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
    """)
    result = moec_cli("inspect", f"{path}:make")
    assert_user_error(result.returncode, result.stderr, "no MoE layer found", f"{path}:make")


# --- help ------------------------------------------------------------------------------------

def test_help_subprocess():
    result = moec_cli("inspect", "--help")
    assert result.returncode == 0
    assert "SPEC" in result.stdout and "hf:ARCH" in result.stdout and "--json" in result.stdout


def test_help_in_process(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "inspect" in out and "bench" in out


# --- inspect output, on a stand-in report (the CLI's own logic, whatever capture finds) --------

FAKE = Report(
    moe_layers=[MoELayer(name="layers.0.moe", num_experts=4, top_k=2, hidden_size=16, expert_hidden_size=32,
                         router="softmax_topk", num_shared_experts=0, activation="swiglu")],
    fallbacks=[Fallback(location="layers.1.moe", reason="data-dependent loop")],
    graphs=["graph():\n    %moe = call_function[target=moec.moe_ffn](...)"],
)


@pytest.fixture
def fake_inspect(monkeypatch):
    fake = SimpleNamespace(calls=[], report=FAKE)

    def inspect(model, *args, **kwargs):
        fake.calls.append((model, args))
        return fake.report

    # Through the module dict: getattr would import moec.api for the old value.
    monkeypatch.setitem(vars(moec), "inspect", inspect)
    return fake


@pytest.fixture
def linear_spec(tmp_path):
    return write(tmp_path, """
        def make():
            return nn.Linear(16, 16)
    """) + ":make"


def test_inspect_table_and_graph(capsys, fake_inspect, linear_spec):
    assert main(["inspect", linear_spec, "--graph"]) == 0
    out = capsys.readouterr().out
    assert "layers.0.moe" in out and "softmax_topk" in out and "data-dependent loop" in out
    assert "moec.moe_ffn" in out
    (model, args), = fake_inspect.calls
    assert args[0].shape == (1, 16, 16)


def test_inspect_json_is_only_json(capsys, fake_inspect, linear_spec):
    assert main(["inspect", linear_spec, "--json"]) == 0
    out, _ = capsys.readouterr()
    assert json.loads(out) == FAKE.to_dict()


def test_inspect_no_moe_names_fallbacks(capsys, fake_inspect, linear_spec):
    fake_inspect.report = Report(fallbacks=[Fallback(location="blocks.0", reason="unknown router")])
    rc = main(["inspect", linear_spec, "--json"])
    out, err = capsys.readouterr()
    assert_user_error(rc, err, "no MoE layer found", "blocks.0: unknown router")
    assert out == ""


# --- the real thing --------------------------------------------------------------------------

def test_inspect_default_builtin(capsys):
    assert main(["inspect"]) == 0
    assert "MoE layer(s)" in capsys.readouterr().out


def test_inspect_hf_mixtral_json():
    from moec.models.hf import expected_moe_layers, make_hf_model

    model = make_hf_model("mixtral")[0]
    config = model.config
    result = moec_cli("inspect", "hf:mixtral", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    layers = report["moe_layers"]
    assert len(layers) == config.num_hidden_layers
    assert len({layer["name"] for layer in layers}) == len(layers)
    for layer in layers:
        assert layer["num_experts"] == config.num_local_experts
        assert layer["top_k"] == config.num_experts_per_tok
        assert layer["router"] == "softmax_topk"
    found = sorted((layer["name"], layer["num_experts"], layer["top_k"]) for layer in layers)
    assert found == sorted(expected_moe_layers(model))


def test_bench_writes_json(tmp_path, capsys):
    out_file = tmp_path / "bench.json"
    rc = main(["bench", "builtin:moe-mlp", "--tokens", "4", "--repeat", "2", "--warmup", "0", "--out", str(out_file),
               "--quiet"])
    stdout = capsys.readouterr().out
    assert rc == 0
    assert str(out_file) in stdout and "x best baseline" in stdout
    doc = json.loads(out_file.read_text())
    assert {"platform", "processor", "cpu_count", "torch", "torch_threads", "device", "device_name"} <= set(doc["machine"])
    rows = doc["results"]
    assert [(r["backend"], r["tokens"]) for r in rows] == [("eager", 4), ("inductor", 4), ("moec", 4)]
    for r in rows:
        assert len(r["times_ms"]) == 2 and r["median_ms"] > 0 and r["speedup_vs_eager"] > 0
    moec_row = rows[-1]
    assert moec_row["ok"] and moec_row["compile_s"] >= 0 and moec_row["rel_err"] <= 1e-4


def test_bench_defaults_to_a_mixtral_proportioned_model_at_decode_and_prefill_tokens(monkeypatch):
    from moec.cli import bench
    from moec.models.spec import load_spec

    seen = {}
    monkeypatch.setattr(bench, "bench_main", lambda opts: seen.update(vars(opts)) or 0)
    assert main(["bench"]) == 0
    assert seen["spec"] == bench.DEFAULT_SPEC and seen["tokens"] == [1, 16, 256, 1024]
    model, _, _ = load_spec(seen["spec"])
    w1 = model.get_submodule("layers.0.moe.experts.0.w1").weight
    assert tuple(w1.shape) == (1792, 512)  # 4096 : 14336 at 1/8 width
    import moec.cli.main as cli_main

    monkeypatch.setattr(cli_main, "inspect_main", lambda opts: seen.update(inspected=opts.spec) or 0)
    assert main(["inspect"]) == 0 and seen["inspected"] == "builtin:moe-mlp"  # inspect keeps the small model


# --- codegen ---------------------------------------------------------------------------------

def test_codegen_prints_the_layer_kernels_from_the_ir(capsys):
    assert main(["codegen", "hf:gpt_oss", "--layer", "1", "--target", "interpret"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# moec codegen hf:gpt_oss --layer 1 (MoE layer 1 of 2")
    # GPT-OSS's layer, read off the lowered graph: top-k then softmax (softmax then top-k
    # renormalised is the same router), router bias, clamped SwiGLU on interleaved gate/up
    # columns with expert biases.
    assert "router_kind='topk_softmax'" in out or ("router_kind='softmax_topk'" in out and "renormalize=True" in out)
    for needle in ("has_router_bias=True", "activation='clamped_swiglu'",
                   "interleaved=True", "limit=7.0", "has_bias_in=True", "has_bias_out=True", "@triton.jit"):
        assert needle in out, needle
    compile(out, "<codegen>", "exec")  # the printed module is valid Python


def test_codegen_prints_a_split_layers_kernels(tmp_path, capsys):
    """A split layer (routing and single-projection experts in two methods) runs the routing,
    permutation and plain grouped-GEMM kernels: those are printed, with no activation."""
    factory = tmp_path / "split_model.py"
    factory.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1] / 'capture')!r})\n"
        "from test_split import _model, H\n"
        "def make():\n    return _model('gathered'), torch.randn(2, 9, H)\n")
    assert main(["codegen", f"{factory}:make", "--layer", "1", "--target", "interpret"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# moec codegen {factory}:make --layer 1 (MoE layer 1 of 2, in graph order; a split layer")
    assert "moec_grouped_gemm_kernel" in out and "moec_gate_kernel" in out and "transposed=True" in out
    assert "activation=" not in out and "moec_grouped_gemm_act_kernel" not in out
    compile(out, "<codegen>", "exec")


def test_codegen_all_layers_and_bad_layer(capsys):
    assert main(["codegen", "builtin:shared-expert"]) == 0
    out = capsys.readouterr().out
    assert out.count("# moec codegen builtin:shared-expert --layer") == 2
    rc = main(["codegen", "builtin:shared-expert", "--layer", "7"])
    assert_user_error(rc, capsys.readouterr().err, "--layer 7", "2 MoE layers")


def _bf16_bench():
    from moec.cli import bench
    from moec.models.spec import load_spec

    model, args, _ = load_spec("builtin:moe-mlp")
    settings = bench.BenchSettings(tokens=(64,), repeat=1, warmup=0, train=True, backends=("eager", "moec"))
    args = tuple(a.to(torch.bfloat16) if a.is_floating_point() else a for a in args)
    return bench.run_bench(model.to(torch.bfloat16), args, settings)


def test_bench_in_bf16_judges_against_a_float32_copy():
    """bf16 training: the rows carry their RMS error against a float32 copy of the model, and moec
    passes when it is about as accurate as eager there (eager is no oracle in bf16)."""
    doc = _bf16_bench()
    eager, moec_row = doc["results"]
    assert 0 < eager["fp32_rms_err"] < 0.2 and moec_row["fp32_rms_err"] < 0.2
    assert moec_row["ok"], moec_row
    from moec.cli.bench import format_table

    assert "float32 copy" in format_table(doc)


def test_bench_in_bf16_still_catches_a_wrong_backend(monkeypatch):
    from moec.cli import bench

    def top_1(module):  # a "backend" that drops every token's second expert: wrong, not noisy
        for layer in module.modules():
            if hasattr(layer, "route") and hasattr(layer, "top_k"):
                layer.top_k = 1
        return module

    monkeypatch.setattr(bench, "_compilers", lambda settings: {"moec": top_1})
    doc = _bf16_bench()
    eager, wrong = doc["results"]
    assert not wrong["ok"] and wrong["fp32_rms_err"] > 4 * eager["fp32_rms_err"], (eager, wrong)
