"""Count the bytes every collective actually moves, to set against a plan's predictions.

DTensor issues its collectives as ``torch.ops._c10d_functional`` ops, some of them from inside
its own op dispatch (the implicit redistributions of a backward op's inputs), where a
TorchDispatchMode never sees them. The profiler does, on every thread, with shapes, dtypes and
the group size, so the counter reads them off a profiler trace. Bytes follow the cost model's
conventions (``cost_models/comm.py``): the buffer for all-reduce, the gathered output for
all-gather, the unscattered input for reduce-scatter, one rank's buffer for all-to-all.
"""

from __future__ import annotations

import math

_NAMES = {"all_reduce": "all_reduce", "all_reduce_": "all_reduce", "all_gather_into_tensor": "all_gather",
          "reduce_scatter_tensor": "reduce_scatter", "all_to_all_single": "all_to_all"}
_ITEMSIZE = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8, "long int": 8, "int": 4,
             "bool": 1, "signed char": 1, "unsigned char": 1, "short int": 2}


class CollectiveCounter:
    """``with CollectiveCounter() as c: step()``; then ``c.bytes`` is {op: total bytes}, ``c.calls``
    {op: number of calls}."""

    def __init__(self):
        self.bytes: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def __enter__(self):
        import torch

        self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        for ev in self._prof.events():
            ns, _, name = ev.name.partition("::")
            if ns != "_c10d_functional" or name not in _NAMES:
                continue
            op = _NAMES[name]
            n = math.prod(ev.input_shapes[0]) * _ITEMSIZE.get(ev.input_dtypes[0], 4)
            if op == "all_gather":
                n *= int(ev.concrete_inputs[1])  # group size
            self.bytes[op] = self.bytes.get(op, 0) + n
            self.calls[op] = self.calls.get(op, 0) + 1
        return False


def predicted_bytes(plan) -> dict[str, int]:
    """{op: total bytes} of a plan's collectives, forward, backward and gradient sync together."""
    out: dict[str, int] = {}
    for c in plan.collectives:
        out[c["op"]] = out.get(c["op"], 0) + int(c["bytes"])
    return out
