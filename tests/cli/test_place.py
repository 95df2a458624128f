"""``moec place``: the tables it prints, the plan file, --json, --previous, --plot, and the error
contract (user mistakes: exit 2, one ``moec: ...`` line on stderr, no traceback). Mostly
in-process; one subprocess run checks the contract on a real stderr."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from test_cli import assert_user_error, moec_cli  # tests/cli is on sys.path (rootdir-relative test modules)

from moec.cli.main import main
from moec.runtime.plan import PlacementPlan
from moec.runtime.synthetic import synthetic_trace

TRACE = "synthetic:zipf64-affinity"
METHODS = ["moec", "contiguous", "round-robin", "eplb-hierarchical", "eplb-global"]


def run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["place", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_tables_and_plan_file(capsys, tmp_path):
    out_path = tmp_path / "plan.json"
    rc, out, err = run(capsys, TRACE, "--world-size", "16", "--ranks-per-node", "8", "--slots", "5",
                       "--out", str(out_path))
    assert rc == 0, err
    assert f"moec place {TRACE}: 64 experts, 8 layer(s), 4 window(s); 16 rank(s), 8 per node, 5 slot(s) per rank" in out
    assert "planned on window 0, scored on window 1" in out
    assert "calibration: assumed H100-class defaults" in out
    assert "moec's plan runs with replica_balance=static (--replica-balance auto: predicted " in out
    assert "adaptive on the planning windows), and is scored so" in out
    totals = out[out.index("totals"):out.index("per layer")].strip().splitlines()
    floor = totals.pop()
    assert floor.startswith("traffic floor on window 1: no plan with 5 slot(s) per rank and max/mean <= 1.05 "
                            "crosses less than x-rank "), floor
    assert totals[1].split()[:3] == ["method", "max/mean", "load"]
    assert [line.split()[0] for line in totals[2:]] == METHODS
    layers = out[out.index("per layer"):].strip().splitlines()
    rows = [line.split() for line in layers[2:] if line.split() and line.split()[0].isdigit()]
    assert len(rows) == 8 * len(METHODS)
    assert {r[1] for r in rows} == set(METHODS)
    assert f"plan written to {out_path}" in out
    plan = PlacementPlan.load(out_path)
    plan.validate(num_experts=64, num_layers=8, slots_per_rank=5)
    assert plan.world_size == 16 and plan.meta["method"] == "moec" and plan.meta["scored_on"] == 1


def test_json_previous_and_window(capsys, tmp_path):
    first = tmp_path / "first.json"
    rc, _, err = run(capsys, TRACE, "--world-size", "8", "--ranks-per-node", "4", "--slots", "10", "--out", str(first))
    assert rc == 0, err
    second = tmp_path / "second.json"
    rc, out, err = run(capsys, TRACE, "--world-size", "8", "--ranks-per-node", "4", "--slots", "10", "--window", "1",
                       "--previous", str(first), "--out", str(second), "--json")
    assert rc == 0, err
    doc = json.loads(out)  # nothing but the document on stdout
    assert doc["planned_on"] == 1 and doc["scored_on"] == 2 and doc["previous"] == str(first)
    assert doc["history"] == 0.5  # every method planned on the moving average of windows 0-1
    assert list(doc["methods"]) == ["moec", "moec-scratch", *METHODS[1:]]
    kept, scratch = doc["methods"]["moec"]["totals"], doc["methods"]["moec-scratch"]["totals"]
    assert kept["moved"] <= 0.5 * scratch["moved"]
    assert kept["time_s"] <= 1.02 * scratch["time_s"]
    assert len(doc["methods"]["moec"]["layers"]) == 8
    assert PlacementPlan.from_dict(doc["plan"]) == PlacementPlan.load(second)
    assert doc["calibration"]["assumed"]  # the assumed constants are marked as such
    floor = doc["traffic_floor"]
    assert floor["max_mean"] == 1.05 and 0 < floor["cross_rank"] <= kept["cross_rank"]
    assert 0 <= floor["cross_node"] <= kept["cross_node"]


def _read_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + n
    width, height, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    raw = zlib.decompress(chunks[b"IDAT"])
    assert len(raw) == height * (width + 1)
    pixels = np.frombuffer(raw, dtype=np.uint8).reshape(height, width + 1)
    assert (pixels[:, 0] == 0).all()  # filter byte
    return width, height, depth, color, pixels[:, 1:]


def test_plot_writes_a_heat_map(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run(capsys, TRACE, "--world-size", "8", "--ranks-per-node", "8", "--slots", "10", "--plot", "h.png")
    assert rc == 0, err
    assert (tmp_path / "moec-plan-zipf64-affinity.json").exists()  # the default --out
    width, height, depth, color, img = _read_png(tmp_path / "h.png")
    assert (width, depth, color) == (8 * 12, 8, 0)
    assert height == len(METHODS) * 8 * 12 + (len(METHODS) - 1) * 6
    moec_block = img[:8 * 12].astype(float)
    assert abs(moec_block.mean() - 127.5) < 10  # every rank near the mean load: mid-grey
    contiguous = img[8 * 12 + 6:2 * 8 * 12 + 6]
    assert contiguous.min() < moec_block.min()  # contiguous has a rank far over the mean


def test_npz_trace_with_one_window(capsys, tmp_path):
    path = synthetic_trace(8, 2, 1, 256, 2, affinity=0.5, seed=4).save(tmp_path / "t.npz")
    rc, out, err = run(capsys, path, "--world-size", "4", "--ranks-per-node", "2", "--slots", "3",
                       "--out", str(tmp_path / "p.json"))
    assert rc == 0, err
    assert "scored on window 0 (the trace has one window: scored on the planning window)" in out


@pytest.mark.parametrize("args, needles", [
    (["synthetic:nope", "--world-size", "8", "--ranks-per-node", "8", "--slots", "10"], ["unknown synthetic trace 'nope'"]),
    (["absent.npz", "--world-size", "8", "--ranks-per-node", "8", "--slots", "10"], ["absent.npz", "not found"]),
    ([TRACE, "--world-size", "8", "--ranks-per-node", "8", "--slots", "7"],
     ["slots fewer than experts", "8 rank(s) x 7 slot(s) = 56 < 64", "--slots 8"]),
    ([TRACE, "--world-size", "8", "--ranks-per-node", "8", "--slots", "10", "--window", "4"],
     ["--window 4 is out of range", "4 window(s)"]),
    ([TRACE, "--world-size", "12", "--ranks-per-node", "8", "--slots", "10"], ["does not fill nodes"]),
    ([TRACE, "--world-size", "8", "--ranks-per-node", "8", "--slots", "0"], ["--slots must be at least 1"]),
    ([TRACE, "--world-size", "8", "--ranks-per-node", "8", "--slots", "10", "--history", "1.5"],
     ["--history is a decay in [0, 1)"]),
])
def test_user_errors(capsys, args, needles):
    rc, out, err = run(capsys, *args)
    assert_user_error(rc, err, *needles)
    assert out == ""


def test_bad_previous_plans(capsys, tmp_path):
    common = [TRACE, "--world-size", "8", "--ranks-per-node", "8", "--slots", "10", "--out", str(tmp_path / "o.json")]
    broken = tmp_path / "broken.json"
    broken.write_text("{oops")
    rc, _, err = run(capsys, *common, "--previous", str(broken))
    assert_user_error(rc, err, "cannot read plan", "broken.json")
    other = PlacementPlan.contiguous(64, 4, 8).save(tmp_path / "four.json")
    rc, _, err = run(capsys, *common, "--previous", str(other))
    assert_user_error(rc, err, "is for 4 ranks, not --world-size 8")
    short = PlacementPlan.contiguous(64, 8, 3).save(tmp_path / "short.json")
    rc, _, err = run(capsys, *common, "--previous", str(short))
    assert_user_error(rc, err, "plan has 3 layer(s) but the model/trace has 8")
    assert not (tmp_path / "o.json").exists()


def test_error_contract_subprocess():
    result = moec_cli("place", "synthetic:nope", "--world-size", "8", "--ranks-per-node", "8", "--slots", "10")
    assert_user_error(result.returncode, result.stderr, "unknown synthetic trace")
    assert result.stdout == ""
