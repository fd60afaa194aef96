"""The cost context prices collectives from the preset, per collective when it is calibrated."""

from __future__ import annotations

import json

from autopar.cost_models.hardware import PRESET_DIR, load_hardware
from autopar.passes.annotate import CostContext
from autopar.placements import REPLICATE as R
from autopar.placements import partial, shard


def test_calibrated_collectives_are_priced_with_their_own_fit(tmp_path):
    doc = json.loads((PRESET_DIR / "local.json").read_text())
    doc.pop("collectives")  # the bundled preset is calibrated; start from its plain links
    (tmp_path / "plain.json").write_text(json.dumps(doc))
    slow_gather = {"bandwidth_Bps": 1e6, "latency_s": 0.0}
    doc["collectives"] = {"all_gather": {**slow_gather, "max_rel_error": 0.1}}
    path = tmp_path / "calibrated.json"
    path.write_text(json.dumps(doc))
    plain = CostContext({"tp": 2}, load_hardware(str(tmp_path / "plain.json")))
    calibrated = CostContext({"tp": 2}, load_hardware(str(path)))
    shape, item = (1024, 1024), 4
    (g,) = calibrated.collectives((shard(0),), (R,), shape, item)
    assert g.op == "all_gather" and g.time_s == (1 / 2) * (4 << 20) / 1e6  # the fitted link, not the preset's
    assert plain.time((shard(0),), (R,), shape, item) < g.time_s
    # collectives without a fit keep the preset's link
    assert calibrated.time((partial(),), (R,), shape, item) == plain.time((partial(),), (R,), shape, item)


def test_greedy_steps_are_dtensors_steps_on_every_placement_pair():
    """The cost model's redistribution steps (strategies.greedy_steps) equal what DTensor plans,
    for every pair of placements over R, P(sum), S(0), S(1) on 1-, 2- and 3-D meshes."""
    import itertools

    from autopar.passes.strategies import greedy_steps, redistribute_steps

    options = [R, partial(), shard(0), shard(1)]
    for sizes in ((4,), (2, 4), (2, 2, 2)):
        axes = {f"a{i}": n for i, n in enumerate(sizes)}
        pls = list(itertools.product(options, repeat=len(sizes)))
        checked = 0
        for src, dst in itertools.product(pls, pls):
            ref = tuple((d, a, b) for d, a, b, _ in redistribute_steps(axes, src, dst, (8, 8), 4))
            assert greedy_steps(sizes, src, dst) == ref, (sizes, src, dst)
            checked += 1
        assert checked == len(pls) ** 2
