import json
import sys
import textwrap
import time
from pathlib import Path

import pytest

from autopar import cli
from autopar.plan import Plan


def gpt_like_plan(*, tp_fc: str = "S(1)", step: float = 0.25, extra_collective: bool = False) -> Plan:
    params = {}
    nodes = []
    for i in range(12):
        for name, pl, shape in (
            (f"transformer.h.{i}.attn.c_attn.weight", {"dp": "R", "tp": "S(1)"}, [768, 2304]),
            (f"transformer.h.{i}.mlp.c_fc.weight", {"dp": "R", "tp": tp_fc if i == 5 else "S(1)"}, [768, 3072]),
        ):
            params[name] = pl
            nodes.append({"name": "p_" + name.replace(".", "_"), "op": "placeholder", "shape": shape,
                          "dtype": "float32", "placements": pl, "compute_s": 0.0})
    params["lm_head.weight"] = {"dp": "R", "tp": "S(0)"}
    nodes.append({"name": "addmm_3", "op": "aten.addmm.default", "shape": [8, 1024, 3072], "dtype": "float32",
                  "placements": {"dp": "S(0)", "tp": "S(2)"}, "compute_s": 2e-4})
    collectives = [
        {"op": "all_reduce", "axis": "tp", "bytes": 6 * 2**20, "time_s": 1e-4 * (k + 1), "phase": "fwd",
         "tensor": "addmm_3", "node": f"add_{k}", "src": {"tp": "P(sum)"}, "dst": {"tp": "R"}}
        for k in range(12)
    ] + [
        {"op": "all_reduce", "axis": "dp", "bytes": 500 * 2**20, "time_s": 0.02, "phase": "grad_sync",
         "tensor": "p_transformer_h_5_mlp_c_fc_weight", "node": "optimizer"},
    ]
    if extra_collective:
        collectives.append({"op": "all_gather", "axis": "tp", "bytes": 2**20, "time_s": 5e-5, "phase": "bwd",
                            "tensor": "addmm_3", "node": "mm_9"})
    return Plan(
        mesh={"dp": 2, "tp": 4},
        hardware="h100-sxm",
        mode="train",
        graph_hash="0123456789abcdef",
        model="GPT2LMHeadModel",
        step_time_s=step,
        peak_memory_bytes=12 * 2**30,
        memory={"params": 2**30, "grads": 2**30, "optimizer": 2 * 2**30, "activations": 8 * 2**30},
        time_breakdown={"compute_s": 0.2, "comm_fwd_s": 0.0078, "comm_bwd_s": 0.0078, "grad_sync_s": 0.02},
        param_placements=params,
        input_placements=[{"dp": "S(0)", "tp": "R"}],
        nodes=nodes,
        collectives=collectives,
        solver={"name": "cp-sat", "status": "OPTIMAL", "objective_s": step, "solve_time_s": 1.5},
        warnings=["activation memory dominates: consider activation checkpointing"],
        explanations={
            "transformer.h.5.mlp.c_fc.weight": {
                "chosen": "dp=R tp=S(1)",
                "alternatives": [
                    {"placements": {"dp": "R", "tp": "R"}, "cost_s": 0.031},
                    {"placements": {"dp": "R", "tp": "S(0)"}, "cost_s": 0.027},
                ],
                "reason": "column-parallel: no forward all-gather, one all-reduce after c_proj",
            }
        },
    )


@pytest.fixture
def plan_path(tmp_path):
    path = tmp_path / "plan.json"
    gpt_like_plan().save(path)
    return path


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_tables(capsys, plan_path):
    code, out, _ = run_cli(capsys, "inspect", plan_path)
    assert code == 0
    for text in ("GPT2LMHeadModel", "dp=2,tp=4 (8 devices)", "h100-sxm", "0123456789abcdef", "OPTIMAL",
                 "Parameter placements (25 parameters)", "Memory per device", "Predicted step time",
                 "activation checkpointing", "Top 10 collectives by time"):
        assert text in out, text
    # Repeated layers collapse into one row when their placements agree.
    assert "transformer.h.{0..11}.attn.c_attn.weight" in out
    assert "transformer.h.{0..11}.mlp.c_fc.weight" in out
    assert "(768, 2304)" in out
    # Collectives aggregated by (phase, op, axis).
    row = next(line for line in out.splitlines() if line.startswith("fwd") and " 12 " in line)
    assert "all_reduce" in row and "72.00 MiB" in row
    assert "500.00 MiB" in out


def test_inspect_keeps_differing_layer_apart(capsys, tmp_path):
    path = tmp_path / "plan.json"
    gpt_like_plan(tp_fc="R").save(path)
    _, out, _ = run_cli(capsys, "inspect", path)
    assert "transformer.h.{0..4,6..11}.mlp.c_fc.weight" in out
    assert "transformer.h.5.mlp.c_fc.weight" in out


def test_inspect_json(capsys, plan_path):
    code, out, _ = run_cli(capsys, "inspect", plan_path, "--json")
    assert code == 0
    data = json.loads(out)
    assert list(data) == ["summary", "parameters", "collectives", "memory", "time", "pipeline", "warnings", "sections"]
    s = data["summary"]
    assert s["mesh"] == {"dp": 2, "tp": 4} and s["devices"] == 8 and s["step_time_s"] == 0.25
    assert s["peak_memory_bytes"] == 12 * 2**30 and s["plan_hash"] == Plan.load(plan_path).hash()
    assert s["mfu"] is None and "no model FLOPs" in s["mfu_missing"]
    group = next(g for g in data["parameters"] if g["name"] == "transformer.h.{0..11}.attn.c_attn.weight")
    assert group == {"name": "transformer.h.{0..11}.attn.c_attn.weight", "count": 12, "shape": [768, 2304],
                     "placements": {"dp": "R", "tp": "S(1)"}}
    assert {"phase": "fwd", "op": "all_reduce", "axis": "tp", "count": 12, "bytes": 72 * 2**20,
            "time_s": pytest.approx(7.8e-3)} in data["collectives"]["totals"]
    assert data["collectives"]["count"] == 13 and len(data["collectives"]["top"]) == 10
    assert data["memory"]["per_device"]["activations"] == 8 * 2**30 and data["memory"]["pp_ranks"] == []
    assert data["time"]["breakdown"]["grad_sync_s"] == 0.02 and data["pipeline"] is None
    assert "Memory per device" in [x["title"] for x in data["sections"]]


def test_inspect_json_has_the_pipeline_timeline(capsys, tmp_path):
    path = tmp_path / "pp.json"
    pipeline_plan(schedule="1f1b", v=1).save(path)
    code, out, _ = run_cli(capsys, "inspect", path, "--json")
    assert code == 0
    pipe = json.loads(out)["pipeline"]
    assert pipe["schedule"] == "1f1b" and "simulated step" in pipe["timeline"]["summary"]
    events = pipe["timeline"]["events"]
    assert len(events) == 4 * 8 * 2 and set(events[0]) == {"rank", "stage", "kind", "microbatch", "start_s", "end_s"}
    assert json.loads(out)["memory"]["pp_ranks"] == [2**30] * 4


def test_inspect_on_a_terminal_draws_rich_tables_and_bars(capsys, tmp_path, monkeypatch):
    path = tmp_path / "pp.json"
    pipeline_plan(schedule="1f1b", v=1).save(path)
    code, plain, _ = run_cli(capsys, "inspect", path)
    assert code == 0 and "\x1b[" not in plain and "█" not in plain  # a pipe gets plain text
    assert "#" * 30 in plain or "#." in plain  # the memory bars, as text
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich's own switch: draw as on a terminal
    monkeypatch.setenv("COLUMNS", "120")
    code, out, _ = run_cli(capsys, "inspect", path)
    assert code == 0 and "\x1b[" in out
    assert "╭─ Plan" in out and "pp=4,dp=2,tp=4 (32 devices)" in out
    for title in ("Parameter placements (25 parameters)", "Collectives (13 in all)", "Memory per device",
                  "Predicted step time", "Pipeline stages", "Pipeline schedule"):
        assert title in out, title
    assert "█" in out and "░" in out  # memory bars
    assert "transformer.h.{0..11}.attn.c_attn.weight" in out and "72.00 MiB" in out
    assert "rank 3 |" in out and "forward 0-9, backward a-j" in out  # the timeline, coloured by pass


def test_inspect_html(capsys, plan_path, tmp_path):
    report = tmp_path / "report.html"
    code, _, _ = run_cli(capsys, "inspect", plan_path, "--html", report)
    assert code == 0
    text = report.read_text()
    assert text.startswith("<!DOCTYPE html>") and "<svg" in text and "<table>" in text
    assert "transformer.h.{0..11}.attn.c_attn.weight" in text
    assert "src=" not in text and "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "report.html"]


def test_html_to_missing_directory_is_refused(capsys, plan_path, tmp_path):
    code, _, err = run_cli(capsys, "inspect", plan_path, "--html", tmp_path / "nope" / "r.html")
    assert code == 1 and "autopar: error:" in err and "does not exist" in err


def test_explain_param(capsys, plan_path):
    code, out, _ = run_cli(capsys, "explain", plan_path, "transformer.h.5.mlp.c_fc.weight")
    assert code == 0
    assert "parameter placement: dp=R tp=S(1)" in out
    assert "column-parallel" in out
    assert "dp=R tp=S(0)" in out and "27.000 ms" in out and "31.000 ms" in out
    # Alternatives are listed cheapest first.
    assert out.index("27.000 ms") < out.index("31.000 ms")
    assert "collectives touching transformer.h.5.mlp.c_fc.weight (1)" in out and "grad_sync" in out


def test_explain_node(capsys, plan_path):
    code, out, _ = run_cli(capsys, "explain", plan_path, "addmm_3")
    assert code == 0
    assert "aten.addmm.default" in out and "dp=S(0) tp=S(2)" in out
    assert "collectives touching addmm_3 (12)" in out


def test_explain_unknown_target_suggests(capsys, plan_path):
    code, _, err = run_cli(capsys, "explain", plan_path, "transformer.h.5.mlp.c_fc.weigth")
    assert code == 1
    assert err.startswith("autopar: error:") and "Traceback" not in err
    assert "transformer.h.5.mlp.c_fc.weight" in err


def test_diff(capsys, plan_path, tmp_path):
    other = tmp_path / "other.json"
    gpt_like_plan(tp_fc="R", step=0.3, extra_collective=True).save(other)
    code, out, _ = run_cli(capsys, "diff", plan_path, other)
    assert code == 0
    assert "+20.0%" in out
    assert "Parameter placements that differ (1)" in out
    row = next(line for line in out.splitlines() if line.startswith("transformer.h.5.mlp.c_fc.weight"))
    assert "dp=R tp=S(1)" in row and "dp=R tp=R" in row
    assert "all_gather" in out and "0 -> 1" in out
    assert "grad_sync" not in out.split("Collective totals that differ")[1]


def test_diff_across_meshes_ignores_parameters_replicated_on_both(capsys, tmp_path):
    """tp=R and dp=R,tp=R are one layout: a diff of plans on two meshes lists only real changes."""
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    plan = gpt_like_plan()
    plan.save(a)

    def no_dp(x):  # the same plan on a mesh without its dp axis
        if isinstance(x, dict):
            return {k: no_dp(v) for k, v in x.items() if k != "dp"}
        return [no_dp(v) for v in x] if isinstance(x, list) else x
    doc = json.loads(plan.to_json())
    doc.update({k: no_dp(doc[k]) for k in ("mesh", "param_placements", "input_placements", "nodes")},
               collectives=[c for c in doc["collectives"] if c["axis"] != "dp"])
    Plan.from_dict(doc).save(b)
    code, out, _ = run_cli(capsys, "diff", a, b)
    assert code == 0 and "Parameter placements that differ (0)" in out


def test_diff_identical(capsys, plan_path):
    code, out, _ = run_cli(capsys, "diff", plan_path, plan_path)
    assert code == 0 and "identical" in out


def test_bad_plan_file_is_a_clean_error(capsys, tmp_path):
    path = tmp_path / "bad.json"
    data = json.loads(gpt_like_plan().to_json())
    data["schema_version"] = 7
    path.write_text(json.dumps(data))
    code, out, err = run_cli(capsys, "inspect", path)
    assert code == 1 and out == ""
    assert err.strip() == "autopar: error: plan schema version 7; this autopar reads versions 1 to 3 (at $.schema_version)"
    code, _, err = run_cli(capsys, "inspect", tmp_path / "missing.json")
    assert code == 1 and "does not exist" in err


def test_profile_rejects_unknown_flags_and_bad_repeats(capsys):
    code, _, _ = run_cli(capsys, "profile", "--anything")
    assert code == 2
    code, _, err = run_cli(capsys, "profile", "--repeats", "0")
    assert code == 1 and "--repeats must be a positive int" in err


def test_usage_error_returns_2(capsys):
    code, _, _ = run_cli(capsys, "inspect")
    assert code == 2


def test_candidate_meshes():
    assert cli.candidate_meshes(8, 8) == [{"dp": 8}, {"dp": 4, "tp": 2}, {"dp": 2, "tp": 4}, {"tp": 8}]
    assert cli.candidate_meshes(1024, 8) == [{"dp": 1024}, {"dp": 512, "tp": 2}, {"dp": 256, "tp": 4},
                                             {"dp": 128, "tp": 8}]
    assert cli.candidate_meshes(6, 4) == [{"dp": 6}, {"dp": 3, "tp": 2}, {"dp": 2, "tp": 3}]
    assert cli.candidate_meshes(1, 8) == [{"dp": 1}]
    # long sequences: cp inside dp, cp * tp within a node
    assert cli.candidate_meshes(8, 8, cp_sizes=(1, 2, 8)) == [
        {"dp": 8}, {"dp": 4, "tp": 2}, {"dp": 2, "tp": 4}, {"tp": 8},
        {"dp": 4, "cp": 2}, {"dp": 2, "cp": 2, "tp": 2}, {"cp": 2, "tp": 4}, {"cp": 8}]


def test_run_missing_script(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", tmp_path / "nope.py", "--nproc", "2")
    assert code == 1 and "does not exist" in err


def test_run_launches_gloo_ranks(tmp_path, capfd):
    script = tmp_path / "allreduce.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        import torch
        import torch.distributed as dist

        assert os.environ["MASTER_ADDR"] == "127.0.0.1"
        import autopar.placements  # the launcher makes its own autopar importable
        dist.init_process_group("gloo")
        t = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(t)
        assert dist.get_world_size() == 2 and t.item() == 3.0, t
        if dist.get_rank() == 0:
            print("ALLREDUCE_OK", sys.argv[1:], flush=True)
        dist.destroy_process_group()
    """))
    code = cli.main(["run", str(script), "--nproc", "2", "--steps", "3"])
    out, _ = capfd.readouterr()
    assert code == 0
    assert "ALLREDUCE_OK ['--steps', '3']" in out


def test_run_passes_the_exit_code_on(tmp_path, capfd):
    script = tmp_path / "fail.py"
    script.write_text("import sys\nsys.exit(3)\n")
    code = cli.main(["run", str(script), "--nproc", "1"])
    capfd.readouterr()
    assert code != 0


def test_console_entry_point_runs_as_module(tmp_path, plan_path):
    import subprocess

    r = subprocess.run([sys.executable, "-m", "autopar.cli", "inspect", str(plan_path)], capture_output=True, text=True)
    assert r.returncode == 0 and "Parameter placements" in r.stdout


def _timeline_rows(out: str) -> dict[int, str]:
    """The rank rows of the "Pipeline schedule" section: rank -> the cells between the bars."""
    block = out.split("Pipeline schedule\n", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in block.splitlines():
        if line.startswith("rank "):
            label, cells = line.split("|", 1)
            rows[int(label.split()[1])] = cells.rstrip("|")
    return rows


def test_inspect_draws_the_pipeline_schedule_of_a_planned_pp_mesh(capsys, tmp_path):
    import torch

    import autopar
    from models import GPT

    with torch.device("meta"):
        model = GPT(layers=4)
    plan = autopar.plan(model, autopar.Mesh({"pp": 2, "tp": 2}, hardware="h100-sxm"),
                        (torch.zeros(8, 32, dtype=torch.long, device="meta"),), pipeline={"schedule": "1f1b"})
    pipe = plan.pipeline
    p, m = len(pipe["bounds"]), pipe["microbatches"]
    assert p == 2 and pipe["schedule"] == "1f1b"
    path, report = tmp_path / "pp.json", tmp_path / "pp.html"
    plan.save(path)
    code, out, _ = run_cli(capsys, "inspect", path, "--html", report)
    assert code == 0
    assert "Pipeline stages\n" in out and "not executed yet" not in out.split("Warnings")[0]
    rows = _timeline_rows(out)
    assert sorted(rows) == list(range(p)) and all(len(r) == cli.TIMELINE_COLUMNS for r in rows.values())
    for r, cells in rows.items():
        assert set(cells) <= set("0123456789abcdefghij.") and "0" in cells and "a" in cells, cells
    assert rows[1].startswith(".") and not rows[0].startswith(".")  # rank 1 waits for the first forward
    assert "forward 0-9, backward a-j" in out and "analytic (p-1)/m" in out and "simulated step" in out
    assert "\x1b[" not in out  # no colour codes

    text = report.read_text()
    assert text.count('<rect class="pp-') == p * m * 2
    assert text.count('<rect class="pp-F"') == text.count('<rect class="pp-B"') == p * m
    assert "<title>stage 0, microbatch 0, F, 0-" in text and f"stage 1, microbatch {m - 1}, B, " in text


def pipeline_plan(schedule: str, v: int, p: int = 4, m: int = 8) -> Plan:
    import dataclasses

    n = p * v  # stages, v on each rank
    pipe = {"bounds": [[k, k + 1] for k in range(n)], "stage_times_s": [3e-3 / v] * n,
            "stage_memory_bytes": [2**30 // v] * n, "step_time_s": 0.04, "microbatches": m, "schedule": schedule,
            "bubble": 0.1, "analytic_bubble": 0.1, "layers": [f"h.{k}" for k in range(n)], "virtual_stages": v}
    return dataclasses.replace(gpt_like_plan(), mesh={"pp": p, "dp": 2, "tp": 4}, pipeline=pipe)


@pytest.mark.parametrize("schedule, v, kinds", [("zb-h1", 1, "FBW"), ("interleaved-1f1b", 2, "FB")])
def test_inspect_timeline_of_the_other_schedules(capsys, tmp_path, schedule, v, kinds):
    p, m = 4, 8
    path, report = tmp_path / "pp.json", tmp_path / "pp.html"
    pipeline_plan(schedule, v, p, m).save(path)
    code, out, _ = run_cli(capsys, "inspect", path, "--html", report)
    assert code == 0 and sorted(_timeline_rows(out)) == list(range(p))
    if schedule == "zb-h1":
        assert "weight gradient A-J" in out and "an upper bound" in out
        assert any(set(row) & set("ABCDEFGHIJ") for row in _timeline_rows(out).values())
    else:
        assert "(p-1)/(m*v) = 18.8%" in out and "4 ranks x 2 stages each" in out
    text = report.read_text()
    assert text.count('<rect class="pp-') == p * v * m * len(kinds)
    assert ("<title>stage 0, microbatch 0, W, " in text) == ("W" in kinds)


def test_inspect_explains_a_schedule_it_cannot_draw(capsys, tmp_path):
    import dataclasses

    pipe = {"bounds": [[0, 1], [1, 2]], "stage_times_s": [1e-3, 1e-3], "stage_memory_bytes": [1, 1], "step_time_s": 0.01,
            "microbatches": 3, "schedule": "interleaved-1f1b", "bubble": 0.0, "analytic_bubble": 0.0, "layers": ["a", "b"]}
    path = tmp_path / "pp.json"
    dataclasses.replace(gpt_like_plan(), mesh={"pp": 2, "dp": 2, "tp": 4}, pipeline=pipe).save(path)
    code, out, _ = run_cli(capsys, "inspect", path)
    assert code == 0 and "no timeline: interleaved-1f1b needs the microbatch count to be a multiple" in out
    assert _timeline_rows(out) == {}


def test_plan_on_cp_shows_and_explains_each_attention_scheme(capsys, tmp_path):
    path, report = tmp_path / "cp.json", tmp_path / "cp.html"
    code, out, _ = run_cli(capsys, "plan", "tiny-llama", "--mesh", "cp=2", "--hardware", "h100-sxm",
                           "--context-parallel", "ring", "--out", path)
    assert code == 0
    section = out.split("Attention on cp (2 layers)")[1]
    assert "ring" in section and "cp=S(2)" in section
    code, out, _ = run_cli(capsys, "inspect", path, "--html", report)
    assert code == 0 and "Attention on cp" in report.read_text()
    # the explanation lists the scheme's cost (a forced scheme leaves no alternative to price)
    name = next(n["name"] for n in Plan.load(path).nodes if n.get("attention"))
    code, out, _ = run_cli(capsys, "explain", path, name)
    assert code == 0 and "chosen: ring" in out and "ring" in out.split("chosen: ring")[1]


def test_plan_bad_context_parallel_request_is_a_clear_error(capsys):
    code, _, err = run_cli(capsys, "plan", "tiny-llama", "--mesh", "tp=2", "--hardware", "h100-sxm",
                           "--context-parallel", "ulysses")
    assert code != 0 and "needs a 'cp' mesh axis" in err and "Traceback" not in err


def test_inspect_reports_the_optimality_gap_and_tied_layers():
    from autopar.report import _gap

    s = {"status": "FEASIBLE", "cp_objective_s": 2.0, "cp_bound_s": 1.9, "nodes_in": 10, "folded_nodes": 5,
         "repeated_layers": 3}
    assert _gap(s) == "; 3 repeated layers tied, 10 -> 5 nodes; optimality gap <= 5.00% (proven bound 1.900 s)"
    assert _gap({"status": "OPTIMAL", "cp_objective_s": 2.0, "cp_bound_s": 2.0}) == ""


def test_mesh_search_plans_every_mesh_and_keeps_the_fastest(capsys, tmp_path):
    from autopar import Plan

    out = tmp_path / "plan.json"
    code, text, err = run_cli(capsys, "plan", "tiny-llama", "--devices", "4", "--hardware", "h100-sxm", "--out", str(out))
    assert code == 0, err
    assert "Meshes for 4 devices" in text and "chosen mesh:" in text
    assert sum(1 for line in text.splitlines() if line.rstrip().endswith("feasible")) >= 3  # dp=4, dp=2,tp=2, tp=4, ...
    plan = Plan.load(out)
    chosen = text.split("chosen mesh: ")[1].split(" ")[0]
    assert dict((a, int(n)) for a, n in (x.split("=") for x in chosen.split(","))) == plan.mesh
    assert plan.pipeline is not None or plan.fusion is not None  # the chosen mesh's kernels are previewed


def test_plan_quiet_prints_no_progress(capsys):
    code, out, err = run_cli(capsys, "plan", "tiny-llama", "--mesh", "tp=2", "--hardware", "h100-sxm")
    assert code == 0 and "autopar: traced" in err and "autopar: solved" in err
    code, quiet_out, quiet_err = run_cli(capsys, "plan", "tiny-llama", "--mesh", "tp=2", "--hardware", "h100-sxm", "-q")
    assert code == 0 and "autopar:" not in quiet_err
    assert quiet_out.split("solver")[0] == out.split("solver")[0]  # the same plan (and plan hash) is printed
    code, _, err = run_cli(capsys, "plan", "nope", "--mesh", "tp=2", "--quiet")
    assert code == 1 and "unknown model" in err  # errors still print


def subcommands() -> dict:
    """The parser's subcommands by name, so that a new one cannot be missed by the tests below."""
    import argparse

    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("command", [None, *subcommands()])
def test_help(capsys, command):
    code, out, _ = run_cli(capsys, *([command] if command else []), "--help")
    assert code == 0
    assert out.startswith(f"usage: autopar {command}" if command else "usage: autopar")
    if command is None:
        assert all(name in out for name in subcommands())


# A run of each command that takes --quiet, with its slow part stubbed (the real runs: profile in
# tests/cost_models/test_profile.py and test_calibrate.py, validate in tests/test_validate.py).
QUIET_RUNS = {
    "plan": None,  # test_plan_quiet_prints_no_progress
    "profile": ["profile", "--collectives", "--max-bytes", "2048"],
    "validate": ["validate", "--model", "tiny-gpt2", "--mesh", "tp=2"],
}


def stub_slow_parts(monkeypatch) -> dict:
    import autopar.cost_models.calibrate as calibrate
    import autopar.profiler as profiler
    import autopar.validate as validate

    calls = {}
    monkeypatch.setattr(validate, "validate", lambda *a, **k: {"plan": gpt_like_plan().to_json()})
    monkeypatch.setattr(validate, "report", lambda res: "VALIDATE REPORT")
    monkeypatch.setattr(profiler, "profile_model", lambda *a, **k: calls.setdefault("verbose", k["verbose"]))
    monkeypatch.setattr(profiler, "report", lambda res: "PROFILE REPORT")
    times = {"all_reduce": {1024: 1e-4, 2048: 1.5e-4}}
    monkeypatch.setattr(calibrate, "launch_local", lambda *a, **k: times)
    return calls


def test_every_quiet_command_has_a_run():
    quiet = {name for name, p in subcommands().items() if "--quiet" in p._option_string_actions}
    assert quiet == set(QUIET_RUNS)


@pytest.mark.parametrize("command", sorted(c for c in QUIET_RUNS if QUIET_RUNS[c]))
def test_quiet(capsys, monkeypatch, command):
    stub_slow_parts(monkeypatch)
    code, out, err = run_cli(capsys, *QUIET_RUNS[command])
    assert code == 0 and "autopar: " in err, err
    code, quiet_out, quiet_err = run_cli(capsys, *QUIET_RUNS[command], "-q")
    assert code == 0 and quiet_err == "" and quiet_out == out


def test_profile_quiet_silences_the_profiling_rank(capsys, monkeypatch):
    calls = stub_slow_parts(monkeypatch)
    code, out, err = run_cli(capsys, "profile", "--quiet")
    assert code == 0 and out == "PROFILE REPORT\n" and err == "" and calls["verbose"] is False


def test_progress_reporter(capsys, monkeypatch):
    from autopar import progress

    assert progress.phase(print, "tracing") is progress.NULL  # plain callables keep working
    with progress.phase(print, "solving", total=3, clock=True) as ph:
        ph.advance()
    quiet = progress.Reporter(quiet=True)
    quiet("hidden")
    assert quiet.phase("x") is progress.NULL and capsys.readouterr().err == ""
    assert progress.Reporter(live=False).phase("x") is progress.NULL  # not a terminal: lines only

    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setattr(progress, "DELAY_S", 0.0)
    r = progress.Reporter(live=True)
    with r.phase("mesh search", total=2) as search:
        search.advance()
        with progress.phase(r, "solving", total=4, clock=True):
            deadline = time.monotonic() + 5
            while r._bars is None or len(r._bars.tasks) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            r("a message above the bars")
            time.sleep(0.3)
    assert r._bars is None and r._phases == []
    err = capsys.readouterr().err
    assert "autopar: mesh search" in err and "1/2" in err and "autopar: a message above the bars" in err


def test_explain_on_a_golden_plan_lists_alternatives_with_cost_deltas(capsys):
    """Megatron's column-parallel fc1 on tp=8: explain says why, with every other placement's
    predicted cost against it, from the solver's objective."""
    golden = Path(__file__).resolve().parent / "golden" / "gpt_block_tp8_h100.json"
    code, out, _ = run_cli(capsys, "explain", str(golden), "fc1.weight")
    assert code == 0 and "chosen: tp=S(0)" in out
    rows = {line.split()[0]: line.split()[-2:] for line in out.splitlines() if line.startswith("tp=")}
    assert rows["tp=S(0)"] == ["0.0", "us"]
    assert rows["tp=R"][0].startswith("+") and rows["tp=S(1)"][0].startswith("+")
