"""FLOPs, bytes and roofline time of single ATen ops."""

import math

import pytest

from autopar.cost_models.compute import compute_time, op_bytes, op_flops, op_name
from autopar.cost_models.hardware import load_hardware


def test_op_names():
    assert op_name("aten.addmm.default") == "addmm"
    assert op_name("aten::mm") == op_name("mm") == "mm"
    assert op_name("aten.add_.Tensor") == "add"
    assert op_name("<built-in function getitem>") == op_name("operator.getitem") == "getitem"
    assert op_name("aten._unsafe_view.default") == "_unsafe_view"


def test_matmul_flops_by_hand():
    assert op_flops("aten.mm.default", [(64, 32), (32, 16)], [(64, 16)]) == 2 * 64 * 32 * 16
    assert op_flops("aten.addmm.default", [(16,), (64, 32), (32, 16)], [(64, 16)]) == 2 * 64 * 32 * 16
    assert op_flops("aten.bmm.default", [(4, 64, 32), (4, 32, 16)], [(4, 64, 16)]) == 2 * 4 * 64 * 32 * 16
    assert op_flops("aten.baddbmm.default", [(4, 64, 16), (4, 64, 32), (4, 32, 16), None, None],
                    [(4, 64, 16)]) == 2 * 4 * 64 * 32 * 16
    assert op_flops("aten.linear.default", [(2, 10, 32), (16, 32), (16,)], [(2, 10, 16)]) == 2 * 20 * 32 * 16


def test_sdpa_flops_and_gqa():
    q, k, v = (2, 8, 128, 64), (2, 8, 256, 64), (2, 8, 256, 32)
    expected = 2 * 16 * 128 * 256 * 64 + 2 * 16 * 128 * 256 * 32
    assert op_flops("aten.scaled_dot_product_attention.default", [q, k, v, None], [(2, 8, 128, 32)]) == expected
    # GQA: 2 key/value heads serve 8 query heads; the work is still per query head
    kv2, vv2 = (2, 2, 256, 64), (2, 2, 256, 32)
    assert op_flops("aten.scaled_dot_product_attention.default", [q, kv2, vv2], [(2, 8, 128, 32)]) == expected
    bwd = op_flops("aten._scaled_dot_product_flash_attention_backward.default", [(2, 8, 128, 32), q, k, v], [q, k, v])
    assert bwd == 2 * expected


def test_convolution_flops():
    x, w, out = (2, 3, 32, 32), (16, 3, 3, 3), (2, 16, 30, 30)
    assert op_flops("aten.convolution.default", [x, w, None], [out]) == 2 * math.prod(out) * 3 * 9
    # depthwise: groups = 16, weight (16, 1, 3, 3)
    assert op_flops("aten.convolution.default", [(2, 16, 32, 32), (16, 1, 3, 3)], [out]) == 2 * math.prod(out) * 9


def test_zero_flop_ops():
    for op in ("aten.view.default", "aten.t.default", "aten.permute.default", "aten.expand.default",
               "aten._unsafe_view.default", "aten.split_with_sizes.default", "<built-in function getitem>",
               "aten.embedding.default", "aten.clone.default", "aten.detach.default"):
        assert op_flops(op, [(8, 16), None], [(16, 8)]) == 0, op


def test_elementwise_and_reduction_defaults():
    assert op_flops("aten.add.Tensor", [(4, 1), (4, 8)], [(4, 8)]) == 32  # largest output
    assert op_flops("aten.gelu.default", [(4, 8), None], [(4, 8)]) == 32
    assert op_flops("aten.sum.dim_IntList", [(4, 8), None], [(4,)]) == 32  # largest input
    assert op_flops("aten.native_layer_norm.default", [(4, 8), None, (8,), (8,), None],
                    [(4, 8), (4, 1), (4, 1)]) == 32


def test_bytes():
    assert op_bytes("aten.add.Tensor", [(4, 1), (4, 8)], [(4, 8)], 2) == (4 + 32 + 32) * 2
    assert op_bytes("aten.mm.default", [(64, 32), (32, 16)], [(64, 16)], 4) == (64 * 32 + 32 * 16 + 64 * 16) * 4
    assert op_bytes("aten.clone.default", [(8, 16)], [(8, 16)], 4) == 2 * 128 * 4  # copies move data
    for op in ("aten.view.default", "aten.transpose.int", "aten.slice.Tensor", "<built-in function getitem>"):
        assert op_bytes(op, [(8, 16), None], [(16, 8)], 4) == 0
    # an embedding reads the rows it returns, not the whole 50k-row table
    assert op_bytes("aten.embedding.default", [(50000, 64), (2, 10)], [(2, 10, 64)], 4) == (20 + 2 * 1280) * 4


def test_tensor_list_arguments():
    assert op_bytes("aten.cat.default", [[(2, 4), (3, 4)], None], [(5, 4)], 4) == (8 + 12 + 20) * 4
    assert op_flops("aten.stack.default", [[(2, 4), (2, 4)]], [(2, 2, 4)]) == 0


def test_roofline_compute_and_memory_bound():
    hw = load_hardware("h100-sxm")
    assert compute_time(989e12, 1.0, "bfloat16", hw) == pytest.approx(1.0)
    assert compute_time(0.0, 3.35e12, "bfloat16", hw) == pytest.approx(1.0)
    # a big bf16 matmul is compute bound
    n = 4096
    f = op_flops("aten.mm.default", [(n, n), (n, n)], [(n, n)])
    b = op_bytes("aten.mm.default", [(n, n), (n, n)], [(n, n)], 2)
    assert compute_time(f, b, "torch.bfloat16", hw) == pytest.approx(f / 989e12)
    # the same matmul in fp32 runs at the fp32 peak
    assert compute_time(f, 2 * b, "torch.float32", hw) == pytest.approx(f / hw.peak("float32"))
    # an elementwise add is memory bound
    f = op_flops("aten.add.Tensor", [(1 << 20,), (1 << 20,)], [(1 << 20,)])
    b = op_bytes("aten.add.Tensor", [(1 << 20,), (1 << 20,)], [(1 << 20,)], 2)
    assert compute_time(f, b, "bfloat16", hw) == pytest.approx(b / 3.35e12)


def test_matches_torch_flop_counter():
    """Record every ATen op's shapes while torch's FlopCounterMode counts; matmul-like totals agree."""
    torch = pytest.importorskip("torch")
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.flop_counter import FlopCounterMode

    ours: dict[str, float] = {}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            shape = lambda x: tuple(x.shape) if isinstance(x, torch.Tensor) else None  # noqa: E731
            ins = [[shape(t) for t in a] if isinstance(a, (list, tuple)) else shape(a) for a in args]
            outs = [shape(t) for t in tree_flatten(out)[0]]
            name = func.overloadpacket.__name__
            ours[name] = ours.get(name, 0) + op_flops(str(func), ins, outs)
            return out

    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 16)
    conv = torch.nn.Conv2d(3, 8, 3, groups=1)
    x = torch.randn(4, 10, 32, requires_grad=True)
    img = torch.randn(2, 3, 12, 12)
    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 24, 8), torch.randn(2, 4, 24, 8)
    a, b, c = torch.randn(3, 5, 6), torch.randn(3, 6, 7), torch.randn(3, 5, 7)
    with FlopCounterMode(display=False) as counter, Record():
        lin(x).sum().backward()
        conv(img)
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
        torch.bmm(a, b)
        torch.baddbmm(c, a, b)
    theirs = {str(op).split(".")[-1]: n for op, n in counter.get_flop_counts()["Global"].items()}
    assert theirs, "FlopCounterMode counted nothing"
    for name, n in theirs.items():
        assert ours.get(name) == pytest.approx(n), name
