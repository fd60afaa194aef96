"""Count the bytes every collective actually moves, to set against a plan's predictions.

DTensor issues its collectives as ``torch.ops._c10d_functional`` ops; a TorchDispatchMode sees
each one with its real tensor. Bytes follow the cost model's conventions
(``cost_models/comm.py``): the buffer for all-reduce, the gathered output for all-gather, the
unscattered input for reduce-scatter, one rank's buffer for all-to-all.
"""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode

_NAMES = {"all_reduce": "all_reduce", "all_gather_into_tensor": "all_gather",
          "reduce_scatter_tensor": "reduce_scatter", "all_to_all_single": "all_to_all"}


class CollectiveCounter(TorchDispatchMode):
    """``with CollectiveCounter() as c: step()``; then ``c.bytes`` is {op: total bytes}."""

    def __init__(self):
        super().__init__()
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if func.namespace == "_c10d_functional" and name in _NAMES:
            op = _NAMES[name]
            t = args[0]
            n = t.numel() * t.element_size()
            if op == "all_gather":
                n *= int(args[1])  # group size
            self.bytes[op] = self.bytes.get(op, 0) + n
            self.calls[op] = self.calls.get(op, 0) + 1
        return func(*args, **kwargs)


def predicted_bytes(plan) -> dict[str, int]:
    """{op: total bytes} of a plan's collectives, forward, backward and gradient sync together."""
    out: dict[str, int] = {}
    for c in plan.collectives:
        out[c["op"]] = out.get(c["op"], 0) + int(c["bytes"])
    return out
