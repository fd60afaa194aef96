"""`autopar validate` runs a plan on local ranks and reports predicted against measured."""

from __future__ import annotations

import os

import pytest

from autopar import cli

PRESET = os.path.join(os.path.dirname(__file__), "data", "compute_bound.json")


def test_validate_reports_time_and_equal_collective_bytes(capsys, tmp_path):
    out = tmp_path / "plan.json"
    code = cli.main(["validate", "--model", "tiny-gpt2", "--mesh", "tp=2", "--hardware", PRESET, "--steps", "2",
                     "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "step time   predicted" in text and "measured" in text
    rows = [ln for ln in text.splitlines() if ln.startswith(("all_gather", "all_reduce", "reduce_scatter", "all_to_all"))]
    assert rows, text  # the compute-bound preset makes the plan shard, so it communicates
    predicted = sum(int(r.split()[1].replace(",", "")) for r in rows)
    measured = sum(int(r.split()[2].replace(",", "")) for r in rows)
    assert measured > 0 and abs(predicted - measured) <= 0.05 * measured, text
    assert out.exists()


def test_validate_rejects_bad_input(capsys):
    assert cli.main(["validate", "--model", "tiny-gpt2", "--mesh", "xp=2"]) == 1
    assert "unknown mesh axis" in capsys.readouterr().err
    assert cli.main(["validate", "--model", "no-such-model", "--mesh", "tp=2"]) == 1
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err and "Traceback" not in err  # the rank's error, not its stack


def test_validate_on_the_local_preset_predicts_every_collective_byte_exactly(tmp_path):
    """The hand-written GPT (examples/gpt.py) on tp=2 with the calibrated local preset: its plan
    communicates, and every collective type's bytes, forward and backward, are predicted exactly."""
    from autopar.validate import CLASSES, report, validate

    res = validate(os.path.join(os.path.dirname(__file__), "..", "examples", "gpt.py:small"), {"tp": 2},
                   steps=1, rounds=1, profile=False)
    assert res["measured_bytes"], "the plan communicates nothing; this test would prove nothing"
    assert res["predicted_bytes"] == res["measured_bytes"]
    assert set(res["classes"]["measured"]) == set(CLASSES) and res["classes"]["measured"]["matmul"] > 0
    assert sum(res["classes"]["measured"].values()) == pytest.approx(res["measured_s"], rel=1e-6)
    text = report(res)
    assert "op class" in text and "matmul" in text and "equal" in text
