"""Profiled compute: recipes, the cache, the efficiency fit, and the planner reading measured times."""

from __future__ import annotations

import json

import pytest
import torch

import autopar
from autopar.cost_models import profile as P
from autopar.errors import AutoparError
from autopar.passes.annotate import annotate
from autopar.passes.trace import trace
from autopar.cost_models.hardware import load_hardware
from models import build


def _wanted(name="mlp", axes=None):
    model, inputs = build(name)
    tg = trace(model, inputs)
    an = annotate(tg, axes or {"tp": 2}, load_hardware("local"), "train", collect=True)
    return tg, an.ctx.wanted


def test_recipes_rebuild_the_traced_call_on_local_shapes():
    _, wanted = _wanted()
    mms = [w["recipe"] for w in wanted.values() if w["recipe"]["op"] == "aten.mm.default"]
    assert mms and {tuple(map(tuple, r["shapes"])) for r in mms} >= {((8, 32), (32, 64)), ((8, 32), (32, 32))}
    for recipe in mms[:3]:
        args, kwargs = P._rebuild(recipe, P._inputs(recipe, train=False))
        out = P._resolve(recipe["op"])(*args, **kwargs)
        assert out.shape == (recipe["shapes"][0][0], recipe["shapes"][1][1])
        t = P.time_recipe(recipe, repeats=3, min_sample_s=1e-4)
        assert 0 < t["fwd_s"] <= t["train_s"]
    # every key is distinct data: local shapes differ between a sharded and a replicated strategy
    assert len(wanted) == len({json.dumps(w["recipe"], sort_keys=True, default=str) for w in wanted.values()})


def test_efficiency_fit_recovers_base_and_slope():
    fit = P.fit_efficiency([("matmul", r, 3e-6 + 2.0 * r) for r in (1e-6, 1e-5, 1e-4, 1e-3)])["matmul"]
    assert fit["base_s"] == pytest.approx(3e-6, rel=1e-6) and fit["eff"] == pytest.approx(2.0, rel=1e-6)
    assert fit["max_rel_error"] < 1e-9 and fit["n"] == 4
    # a negative intercept is not allowed: the fit falls back to the slope alone
    assert P.fit_efficiency([("pointwise", r, 2.0 * r - 1e-7) for r in (1e-6, 1e-5)])["pointwise"]["base_s"] == 0.0


def test_cache_round_trip_stale_and_corrupt(tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOPAR_CACHE_DIR", str(tmp_path))
    assert P.load_profile() is None
    prof = P.new_profile()
    prof.ops["k"] = {"fwd_s": 1e-5, "train_s": 3e-5, "class": "matmul", "roofline_s": 1e-6}
    path = prof.save()
    assert path.parent == tmp_path and torch.__version__.split("+")[0] in path.name
    back = P.load_profile()
    assert back.time("k", train=True) == 3e-5 and back.time("k", train=False) == 1e-5 and back.time("x", True) is None
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "torch": "0.0.1"}))
    assert P.load_profile() is None  # another torch: re-profile rather than trust it
    path.write_text("{not json")
    with pytest.raises(AutoparError, match="unreadable"):
        P.load_profile()
    with pytest.raises(AutoparError, match="does not exist"):
        P.load_profile(tmp_path / "missing.json")


def test_planner_uses_measured_times_and_overheads(tmp_path):
    tg, wanted = _wanted()
    prof = P.new_profile()
    for key, w in wanted.items():  # every op call "measured" at 1 ms forward, 3 ms with backward
        prof.ops[key] = {"fwd_s": 1e-3, "train_s": 3e-3, "class": w["class"], "roofline_s": w["roofline_s"]}
    prof.overhead = {"op_fwd_s": 0.0, "op_train_s": 2e-4, "param_s": 5e-4}
    path = prof.save(tmp_path / "ops.json")
    model, inputs = build("mlp")
    mesh = autopar.Mesh({"tp": 2}, hardware="local")
    plan = autopar.plan(model, mesh, inputs, op_profile=str(path))
    ops = [n for n in plan.nodes if n["kind"] == "op" and n["op"] != "aten.view.default"]
    timed = [n for n in ops if n["compute_s"] == pytest.approx(3e-3 + 2e-4)]
    assert len(timed) >= 3, [(n["op"], n["compute_s"]) for n in ops]
    params = [n for n in plan.nodes if n["kind"] == "param"]
    assert all(n["compute_s"] >= 5e-4 for n in params)
    roofline = autopar.plan(model, mesh, inputs, op_profile=None)
    assert plan.step_time_s > 10 * roofline.step_time_s


def test_profile_command_times_ops_and_reuses_the_cache(tmp_path, monkeypatch, capsys):
    from autopar import cli

    monkeypatch.setenv("AUTOPAR_CACHE_DIR", str(tmp_path))
    assert cli.main(["profile", "--hardware", "local", "--model", "tiny-gpt2", "--mesh", "tp=2", "--repeats", "2"]) == 0
    first = capsys.readouterr().out
    assert "timed now" in first and "per op forward" in first and "matmul" in first, first
    prof = P.load_profile()
    assert len(prof.ops) > 20 and prof.overhead["param_s"] > 0 and "matmul" in prof.efficiency
    assert prof.overhead["collective_s_ranks"] == 2 and prof.overhead["collective_s"] >= 0
    assert cli.main(["profile", "--hardware", "local", "--model", "tiny-gpt2", "--mesh", "tp=2"]) == 0
    assert " 0 timed now" in capsys.readouterr().out  # the second run only reads the cache
    assert cli.main(["profile", "--hardware", "h100-sxm"]) == 1
    assert "times the ops on this machine" in capsys.readouterr().err


def test_pins_fix_placements_and_bad_pins_say_why():
    model, inputs = build("mlp")
    mesh = autopar.Mesh({"tp": 2}, hardware="local")
    plan = autopar.plan(model, mesh, inputs, pins={"fc*.weight": "S(1)"}, op_profile=None)
    assert all(plan.param_placements[f"fc{i}.weight"]["tp"] == "S(1)" for i in (1, 2, 3))
    assert "fc*.weight" in plan.solver["pins"]
    # inputs are pinned by their graph names (the batch split over dp from the input on)
    dp = autopar.plan(model, autopar.Mesh({"dp": 2}, hardware="local"), inputs, pins={"x": "S(0)"}, op_profile=None)
    assert dp.input_placements == [{"dp": "S(0)"}]
    with pytest.raises(AutoparError, match="match no parameter"):
        autopar.plan(model, mesh, inputs, pins={"nope.*": "R"})
    with pytest.raises(AutoparError, match="it can be: R; S"):
        autopar.plan(model, mesh, inputs, pins={"fc3.bias": "S(1)"})
    with pytest.raises(AutoparError, match="2 placement"):
        autopar.plan(model, mesh, inputs, pins={"fc1.weight": "R,R"})
    with pytest.raises(AutoparError, match="unknown mesh axis"):
        autopar.plan(model, mesh, inputs, pins={"fc1.weight": {"dp": "R"}})
    with pytest.raises(AutoparError, match="pins must be a dict"):
        autopar.plan(model, mesh, inputs, pins=["fc1.weight"])
    with pytest.raises(AutoparError, match="maps to a placement string"):
        autopar.plan(model, mesh, inputs, pins={"fc1.weight": 5})
    with pytest.raises(AutoparError, match="op_profile must be"):
        autopar.plan(model, mesh, inputs, op_profile=5)
