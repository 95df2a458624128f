"""``moec zoo``: a representative subset of the transformers sweep (the full sweep is the command
and its committed result, benchmarks/results/zoo-transformers-*.json), and the command's
mechanics. The subset covers the three ways a layer is recognised: observed (Mixtral; GPT-OSS's
tuple output, interleaved clamped SwiGLU and biased router; Llama-4's input-scaled experts and
flat output), a router moec has no form for whose experts module still becomes moec ops
(ZAYA's MLP router with a skip class), and split layers (JetMoE's mixture of attention heads,
used through two methods with attention between them)."""

from __future__ import annotations

import json

import pytest

from moec.cli import main as cli
from moec.cli import zoo

SUBSET = ["mixtral", "gpt_oss", "llama4", "zaya", "jetmoe"]


@pytest.mark.parametrize("arch", SUBSET)
def test_arch_is_recognised_and_computes_as_eager(arch):
    rec = zoo.run_arch(arch)
    assert rec["status"] == "ok", zoo.line(rec)
    assert rec["recognised"] == rec["expected"] > 0 and rec["graph_breaks"] == 0
    assert rec["eval"] is None and rec["train"] is None


def test_unknown_arch_is_a_one_line_error(capsys):
    assert cli.main(["zoo", "no_such_arch"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moec zoo: unknown arch(s) ['no_such_arch']") and err.count("\n") == 1


def test_result_json_and_table(tmp_path):
    out = tmp_path / "zoo.json"
    assert cli.main(["zoo", "mixtral", "--out", str(out), "--markdown"]) == 0
    result = json.loads(out.read_text())
    assert result["totals"] == {"ok": 1} and result["archs"][0]["arch"] == "mixtral"
    assert "| mixtral | ok | 2 / 2 |" in zoo.table(result)
