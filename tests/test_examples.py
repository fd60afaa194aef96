"""Every script in examples/ runs as a user would run it, in its small configuration.

Each case is a subprocess in a fresh working directory: ``python examples/X.py --small`` or
``python -m autopar.cli run examples/X.py --nproc N -- --small`` (what ``autopar run`` does). The
training examples compare themselves with the same model trained in one process and print
``max |grad diff| vs 1 process: ...``; the tests read those lines back. A script with a main that
no case runs fails ``test_every_example_is_run``, so a new example cannot be forgotten.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import autopar
from autopar import Plan

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ROOT = Path(autopar.__file__).resolve().parent.parent  # the autopar under test, also in the subprocesses
TOLERANCE = 1e-4  # the scripts' own bound on every difference from one process

# (script, ranks (None: plain python), its arguments, lines its output must contain)
CASES = [
    ("plan_preset.py", None, ["--small"], ["on mesh dp=2,tp=2", "saved gpt2-dp2-tp2.json"]),
    ("inspect_export.py", None, ["--small"], ["(the same after Plan.load)", "Parameter placements", "chosen: ",
                                             "--- plan_tp.json\n+++ plan_dp_tp.json"]),
    ("moe.py", None, ["--small"], ["moe_0: ep=all-to-all", "predicted step: "]),
    ("moe.py", 2, ["--small"], ["MoE layers: ['ep=all-to-all']"]),
    ("train_gpt.py", 4, ["--small"], ["on mesh dp=2,tp=2"]),
    ("train_llama_2x2.py", 4, ["--small"], ["on mesh dp=2,tp=2"]),
    ("train_mixtral_ep.py", 2, ["--small", "--mesh", "ep=2"], ["MoE layers: 1, layout ep=all-to-all"]),
    # cp=2 alone on 2 ranks: the ring is the same; dp=2 x cp=2 (the default) adds only data parallelism
    ("train_long_context.py", 2, ["--small", "--mesh", "cp=2"], ["attention layers: 1, scheme ring"]),
    # 2-D, not the default 3-D pp=2 x dp=2 x tp=2: its 8 ranks take 100 s of CPU on a 2-core machine,
    # these 4 take 40 s; tensor-parallel stages exercise more of the stage programs than dp would
    ("train_pipeline.py", 4, ["--small", "--mesh", "pp=2,tp=2"], ["2 stages [[0, 1], [1, 2]]"]),
]


def _id(case) -> str:
    script, ranks, _, _ = case
    return script.removesuffix(".py") + ("" if ranks is None else f"-{ranks}ranks")


def run_example(cwd: Path, script: str, ranks: int | None, args: list[str]) -> subprocess.CompletedProcess:
    path = str(EXAMPLES / script)
    cmd = [sys.executable, path, *args] if ranks is None else \
        [sys.executable, "-m", "autopar.cli", "run", path, "--nproc", str(ranks), "--", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_example_runs(case, tmp_path):
    script, ranks, args, expected = case
    r = run_example(tmp_path, script, ranks, args)
    out = r.stdout
    what = f"{script} {' '.join(args)}:\n{out[-3000:]}\n{r.stderr[-3000:]}"
    assert r.returncode == 0, what
    for line in expected:
        assert line in out, (line, what)
    diffs = {k: float(v) for k, v in re.findall(r"max \|(\w+) diff\| vs 1 process: (\S+)", out)}
    if ranks is not None:  # a training run checks itself against one process
        assert set(diffs) == {"loss", "grad", "param"} and "OK: matches 1 process" in out, what
        assert all(d <= TOLERANCE for d in diffs.values()), (diffs, what)
        assert len(re.findall(r"^step \d+: loss ", out, re.M)) == 2, what  # --small: two steps
    saved = {p.name: Plan.load(p) for p in tmp_path.glob("*.json")}  # every plan a script saves reads back
    if script == "plan_preset.py":
        assert saved["gpt2-dp2-tp2.json"].mesh == {"dp": 2, "tp": 2}
    if script == "inspect_export.py":
        assert (tmp_path / "report.html").read_text().lstrip().lower().startswith("<!doctype html")


def _has_main(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    return any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)


def _imports(path: Path) -> set[str]:
    names = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.Import):
            names |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module:
            names.add(n.module)
    return names


def test_every_example_is_run():
    """A script with a main has a case above; a module without one (gpt.py: the factories for
    ``autopar plan examples/gpt.py:small``; common.py: the training harness) is imported by an
    example that has one."""
    scripts = sorted(p for p in EXAMPLES.glob("*.py"))
    run = {c[0] for c in CASES}
    assert run <= {p.name for p in scripts}, f"cases for missing scripts: {run - {p.name for p in scripts}}"
    for p in scripts:
        if _has_main(p):
            assert p.name in run, f"examples/{p.name} has a main but tests/test_examples.py does not run it"
        else:
            users = [q.name for q in scripts if q.name in run and p.stem in _imports(q)]
            assert users, f"examples/{p.name} is neither run nor imported by an example that is"
        doc = ast.get_docstring(ast.parse(p.read_text())) or ""
        assert f"examples/{p.name}" in doc, f"examples/{p.name}: the docstring should say how to run it"
