"""The plan's per-layer gradient compression (autopar/compression.py): on a slow inter-node link the
large gradients are compressed and the small ones are not; on NVLink nothing is."""

import json
import sys
from pathlib import Path

import pytest
import torch

import autopar
from autopar.passes.trace import trace
from autopar.compression import CompressionStats, calibrate_compression, sent_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import gpt  # noqa: E402


CONFIG = dict(vocab=512, d=256, heads=4, layers=2, max_len=128)


@pytest.fixture(scope="module")
def model_and_stats():
    """Errors measured on a runnable copy (8 sequences); plans for a meta copy with a batch big
    enough (1024 x 128 tokens) that data parallelism pays even over Ethernet."""
    torch.manual_seed(0)
    model = gpt.WithLoss(**CONFIG)
    ids = torch.randint(0, 512, (8, 128), generator=torch.Generator().manual_seed(2))
    stats = calibrate_compression(model, (ids,), loss_fn=lambda loss: loss)
    with torch.device("meta"):
        big = gpt.WithLoss(**CONFIG)
    return big, (torch.zeros(1024, 128, dtype=torch.long, device="meta"),), stats, model


def test_calibration_measures_every_option(model_and_stats):
    _, _, stats, model = model_and_stats
    assert stats.source == "measured"
    for name, p in model.named_parameters():
        st = stats.params[name]
        assert st["norm2"] > 0 and st["shape"] == list(p.shape)
        # int8 is far more accurate than dropping 99% of the entries; more PowerSGD rank, less error
        assert 0 < st["rel_err"]["int8"] < 0.05 < st["rel_err"]["topk:0.01"] <= 1.0
        if p.dim() == 2:
            assert st["rel_err"]["powersgd:16"] <= st["rel_err"]["powersgd:4"] + 1e-6
        assert model.gpt.wte.weight.grad is None  # calibration leaves .grad as it was


def test_slow_ethernet_compresses_the_large_layers_only(model_and_stats, tmp_path):
    model, inputs, stats, _ = model_and_stats
    mesh = autopar.Mesh({"dp": 4}, hardware="a10g-eth10g")  # four one-GPU nodes on 10 Gb/s Ethernet
    plan = autopar.plan(model, mesh, inputs, compression={"grads": "auto", "calibration": stats})
    grads = plan.compression["grads"]
    params = dict(model.named_parameters(remove_duplicate=False))
    # every gradient whose sync is one all-reduce (wpe's is reduced as its activation's gradient)
    assert set(grads) == set(params) - {"gpt.wte.weight", "gpt.wpe.weight"}
    big = {n for n in grads if params[n].numel() >= 1 << 16}
    small = {n for n in grads if params[n].numel() <= 1024}
    assert len(big) == 13 and len(small) == 16  # lm_head (tied to wte) + 6 matrices per block; biases, norms
    assert all(grads[n]["method"] != "none" for n in big), {n: grads[n]["method"] for n in big}
    assert all(grads[n]["method"] == "none" for n in small), {n: grads[n]["method"] for n in small}
    pred = plan.compression["predicted"]
    assert pred["rel_error"] <= plan.compression["error_budget"]
    assert pred["compressed_grad_sync_s"] < pred["grad_sync_s"] and pred["compressed_exposed_s"] < 0.5 * pred["exposed_s"]
    assert plan.compression["calibration"] == "measured"
    # the plan lists each layer's choice and its predicted savings, and survives a JSON round trip
    assert all(g["saved_s"] > 0 for n, g in grads.items() if n in big)
    path = tmp_path / "plan.json"
    plan.save(path)
    assert autopar.Plan.load(path).compression == json.loads(path.read_text())["compression"]


def test_nvlink_leaves_compression_off(model_and_stats):
    model, inputs, stats, _ = model_and_stats
    plan = autopar.plan(model, autopar.Mesh({"dp": 8}, hardware="h100-sxm"), inputs,
                        compression={"grads": "auto", "calibration": stats})
    assert {g["method"] for g in plan.compression["grads"].values()} == {"none"}
    pred = plan.compression["predicted"]  # NVLink's all-reduces are short: a codec costs more than it saves
    assert pred["compressed_grad_sync_s"] == pred["grad_sync_s"] and pred["codec_s"] == 0.0


def test_zero_budget_and_fixed_methods(model_and_stats):
    model, inputs, stats, _ = model_and_stats
    mesh = autopar.Mesh({"dp": 4}, hardware="a10g-eth10g")
    plan = autopar.plan(model, mesh, inputs, compression={"grads": "auto", "calibration": stats, "error_budget": 0.0})
    assert {g["method"] for g in plan.compression["grads"].values()} == {"none"}
    plan = autopar.plan(model, mesh, inputs, compression="int8")
    assert {g["method"] for g in plan.compression["grads"].values()} == {"int8"}


def test_meta_models_use_synthetic_calibration():
    with torch.device("meta"):
        model, inputs = gpt.WithLoss(**CONFIG), (torch.zeros(1024, 128, dtype=torch.long),)
    plan = autopar.plan(model, autopar.Mesh({"dp": 4}, hardware="a10g-eth10g"), inputs, compression="auto")
    assert plan.compression["calibration"] == "synthetic"
    assert any(g["method"] != "none" for g in plan.compression["grads"].values())


def test_bad_compression_options_say_what_to_do(model_and_stats, tmp_path):
    model, inputs, _, _ = model_and_stats
    mesh = autopar.Mesh({"dp": 2}, hardware="a10g-eth10g")
    traced = trace(model, inputs)
    for bad, msg in [({"grads": "zip"}, "zip"), ({"error_budget": 2}, "error_budget"), ({"pipline": "int8"}, "unknown keys"),
                     ({"pipeline": "fp4"}, "pipeline")]:
        with pytest.raises(autopar.AutoparError, match=msg):
            autopar.plan(model, mesh, inputs, compression=bad, traced=traced)
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(autopar.AutoparError, match="not a compression calibration file"):
        CompressionStats.load(tmp_path / "x.json")


def test_wire_bytes_shrink_as_predicted():
    n, p = 1 << 20, 4
    none = sent_bytes("none", (n,), p)
    assert none == 2 * (p - 1) / p * 4 * n  # a ring all-reduce sends 2(p-1)/p of the buffer
    assert sent_bytes("int8", (n,), p) / none == pytest.approx((1 + 4 / 64) / 4)  # int8 + one fp32 scale per 64
    assert sent_bytes("topk:0.01", (n,), p) / none == pytest.approx(p * 0.01 * 8 / 8, rel=1e-4)  # (value, index) pairs, gathered
    assert sent_bytes("powersgd:4", (512, 2048), p) / sent_bytes("none", (512, 2048), p) == pytest.approx(4 * 2560 / 2048 / 512)


def test_a_plan_without_gradient_all_reduces_says_there_is_nothing_to_compress():
    with torch.device("meta"):
        model, ids = gpt.GPT(**CONFIG), torch.zeros(8, 128, dtype=torch.long)
    plan = autopar.plan(model, autopar.Mesh({"dp": 4}, hardware="a10g-eth10g"), (ids,), compression="auto")
    assert plan.compression is None
    assert any("nothing to compress" in w for w in plan.warnings), plan.warnings
