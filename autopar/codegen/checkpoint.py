"""Checkpoints: parameters and optimizer state written sharded by every rank, loadable under any
plan and mesh, or into a plain single-process model.

On disk a checkpoint is a torch.distributed.checkpoint directory plus ``autopar-checkpoint.json``
(the marker: the plan's hash, its mesh, every tensor's global shape and dtype, versions,
``complete``). Tensors are keyed ``model.<fqn>`` and ``optim.state.<fqn>.<name>``, in the
model's own order: expert tensors stored permuted (the plan's expert placement) are put back in
expert order when saved and permuted again when loaded, so a checkpoint does not depend on the
plan that wrote it.

A save is atomic. Every rank writes into ``<path>.tmp-<token>``; once all have finished, rank 0
writes the marker last and swaps the directory in for ``<path>`` (one ``renameat2`` exchange on
Linux, else rename the old one aside first). A save killed at any point leaves the previous
checkpoint at ``<path>`` and a ``.tmp-`` directory without a marker, which no load accepts.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import uuid
import warnings

import torch
import torch.nn as nn

from ..errors import AutoparError

MARKER = "autopar-checkpoint.json"
FORMAT = 1


def save_checkpoint(model: nn.Module, path, optimizer=None) -> None:
    """Write ``model``'s parameters and buffers (and ``optimizer``'s state, keyed by FQN) to the
    directory ``path``, replacing an earlier checkpoint there only once the new one is complete.

    A compiled module's ranks all call this together, each writing its own shards; a plain model
    in a single process writes everything. See the module docstring for the layout."""
    path = os.path.abspath(os.fspath(path))
    _check_replaceable(path)
    token = _agree(uuid.uuid4().hex[:12])
    tmp = f"{path}.tmp-{token}"
    state, local = _state(model, optimizer, _orders(model), saving=True,
                          with_state=optimizer is not None and bool(optimizer.state))
    _dcp("save", state, tmp)
    tensors = _union(local)
    _barrier()
    if _rank() == 0:
        from .. import __version__

        plan = _plan(model)
        _write_json(os.path.join(tmp, MARKER), {
            "format": FORMAT, "complete": True, "torch": torch.__version__, "autopar": __version__,
            "plan_hash": plan and plan.hash(), "mesh": plan and dict(plan.mesh), "optimizer": optimizer is not None,
            "tensors": tensors})
        _swap_in(tmp, path, token)
    _barrier()


def load_checkpoint(model: nn.Module, path, optimizer=None) -> None:
    """Load a checkpoint written by ``save_checkpoint`` into ``model`` (a compiled module on any
    plan and mesh, or a plain ``nn.Module`` in one process, no process group needed), and into
    ``optimizer`` when given (created on ``model``'s parameters; it needs no state yet).

    Refuses, before reading any tensor, a directory whose save did not finish, and a model whose
    tensor names or shapes differ from the checkpoint's (naming them)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    path = os.path.abspath(os.fspath(path))
    marker = read_marker(path)
    if optimizer is not None and not marker["optimizer"]:
        raise AutoparError(f"checkpoint at {path} holds no optimizer state (it was saved without optimizer=); "
                           "load it without optimizer= or save one with it")
    orders, stepped = _orders(model), optimizer is not None and bool(optimizer.state)
    state, local = _state(model, optimizer, orders, saving=False,
                          with_state=any(k.startswith("optim.state.") for k in marker["tensors"]))
    try:
        _check_fits(path, marker["tensors"], _union(local))
    except AutoparError:
        if optimizer is not None and not stepped:
            optimizer.state.clear()  # as it was: torch made its state to compare with a zero step
        raise
    _dcp("load", state, path)
    with torch.no_grad():
        params = model.state_dict(keep_vars=True)
        for fqn, order in orders.items():
            if fqn in state["model"]:
                params[fqn].copy_(_permute(state["model"][fqn], order))
                for v in state.get("optim", {}).get("state", {}).get(fqn, {}).values():
                    if _is_expert_tensor(v, order):
                        v.copy_(_permute(v, order))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])


def read_marker(path) -> dict:
    """The marker of the complete checkpoint at ``path``; a clear error for anything else."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        aside = sorted(p for p in glob.glob(glob.escape(path) + ".old-*") if os.path.isfile(os.path.join(p, MARKER)))
        hint = f"; a save was killed while replacing it: the previous checkpoint is complete at {aside[-1]}, " \
               f"rename it back to {path}" if aside else ""
        raise AutoparError(f"no checkpoint at {path}{hint}")
    try:
        with open(os.path.join(path, MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        marker = {}
    if marker.get("complete") is not True or marker.get("format") != FORMAT:
        raise AutoparError(f"checkpoint at {path} is incomplete: it was not finished (no autopar marker {MARKER}); "
                           "the save was interrupted — use an earlier checkpoint")
    unfinished = glob.glob(glob.escape(path) + ".tmp-*")
    if unfinished:
        warnings.warn(f"ignoring {len(unfinished)} unfinished save(s) next to {path} "
                      f"({', '.join(sorted(unfinished))}): a save was interrupted; they can be deleted", stacklevel=3)
    return marker


def _plan(model):
    from .runtime import CompiledModule

    return model.plan if isinstance(model, CompiledModule) else None


def _orders(model) -> dict[str, list[int]]:
    """Expert tensor FQN -> its stored row order, for tensors not stored in the model's order."""
    from .runtime import expert_orders

    orders = expert_orders(_plan(model)) if _plan(model) is not None else {}
    return {f: o for f, o in orders.items() if list(o) != sorted(o)}


def _state(model, optimizer, orders, saving: bool, with_state: bool):
    """The state dict DCP reads or writes, and this rank's ``key -> [shape, dtype]``.

    Expert tensors are given in the model's order: copies put back in order when ``saving``,
    empty ones of the same placement to be loaded into (and permuted back) otherwise. Without
    ``with_state`` (an optimizer that has not stepped yet) only its hyperparameters are kept."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    def canonical(t, order):
        if not saving:
            return torch.empty_like(t)
        inverse = [0] * len(order)
        for r, e in enumerate(order):
            inverse[e] = r
        return _permute(t, inverse)

    with torch.no_grad():
        state = {"model": {k: canonical(v, orders[k]) if k in orders else v for k, v in model.state_dict().items()}}
        if optimizer is not None:
            stepped = bool(optimizer.state)
            osd = get_optimizer_state_dict(model, optimizer)  # FQN keys; creates an empty optimizer's state
            if not with_state:
                osd["state"] = {}
                if not stepped:
                    optimizer.state.clear()  # torch made it with a zero step, which Adam counts
            for fqn, entry in osd["state"].items():
                if fqn in orders:
                    osd["state"][fqn] = {k: canonical(v, orders[fqn]) if _is_expert_tensor(v, orders[fqn]) else v
                                         for k, v in entry.items()}
            state["optim"] = osd
    local = {f"model.{k}": _describe(v) for k, v in state["model"].items() if isinstance(v, torch.Tensor)}
    for fqn, entry in state.get("optim", {}).get("state", {}).items():
        local.update({f"optim.state.{fqn}.{k}": _describe(v) for k, v in entry.items() if isinstance(v, torch.Tensor)})
    return state, local


def _check_fits(path, saved: dict, mine: dict) -> None:
    """Name the tensors whose names or shapes differ between the checkpoint and this model."""
    wrong = [f"{k[6:]}: checkpoint {tuple(saved[k][0])}, model {tuple(v[0])}" for k, v in mine.items()
             if k.startswith("model.") and k in saved and list(saved[k][0]) != list(v[0])]
    missing = [k[6:] for k in mine if k.startswith("model.") and k not in saved]
    extra = [k[6:] for k in saved if k.startswith("model.") and k not in mine]
    if wrong or missing or extra:
        parts = [f"{len(wrong)} tensor(s) have other shapes: " + "; ".join(wrong[:4]) if wrong else "",
                 f"{len(missing)} missing from the checkpoint: " + ", ".join(missing[:4]) if missing else "",
                 f"{len(extra)} not in this model: " + ", ".join(extra[:4]) if extra else ""]
        raise AutoparError(f"checkpoint at {path} does not fit this model: {'; '.join(p for p in parts if p)}; "
                           "it was saved from another architecture")
    missing = [k[12:] for k in mine if k.startswith("optim.") and k not in saved]
    if missing:
        raise AutoparError(f"checkpoint at {path} has no optimizer state {', '.join(missing[:4])}: it was saved "
                           "with another optimizer; load it without optimizer= or with the same optimizer class")


def _permute(t, index):
    """Rows ``index`` of ``t`` (``out[r] = t[index[r]]``), a DTensor kept in its placements."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    idx = torch.tensor(index, device=t.device)
    if not isinstance(t, DTensor):
        return t[idx]
    return distribute_tensor(t.full_tensor()[idx], t.device_mesh, t.placements, src_data_rank=None)


def _is_expert_tensor(v, order) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == len(order)


def _describe(t) -> list:
    return [list(t.shape), str(t.dtype).removeprefix("torch.")]


def _check_replaceable(path: str) -> None:
    """Only a checkpoint (or an empty directory) at ``path`` may be replaced by a save."""
    if os.path.lexists(path) and not (os.path.isdir(path) and not os.path.islink(path) and (
            not os.listdir(path) or os.path.exists(os.path.join(path, MARKER))
            or os.path.exists(os.path.join(path, ".metadata")))):
        raise AutoparError(f"{path} exists and is not a checkpoint; refusing to replace it: save to another path")


def _swap_in(tmp: str, path: str, token: str) -> None:
    """Put the complete directory ``tmp`` at ``path``: at every instant ``path`` holds either the
    old checkpoint or the new one (or, without renameat2, the old one is at ``path.old-<token>``)."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
    elif _exchange(tmp, path):
        shutil.rmtree(tmp)  # now the old checkpoint
    else:
        old = f"{path}.old-{token}"
        os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old)
    _fsync_dir(os.path.dirname(path))


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _write_json(path: str, data: dict) -> None:
    with open(path + ".partial", "w", encoding="utf-8") as f:
        json.dump(data, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".partial", path)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dcp(what: str, state: dict, path: str) -> None:
    """torch.distributed.checkpoint's save or load; without a process group, in this process
    alone (quietly: that is what a plain model asks for)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        getattr(dcp, what)(state, checkpoint_id=path, no_dist=_dist() is None)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _rank() -> int:
    return _dist().get_rank() if _dist() else 0


def _barrier() -> None:
    if _dist():
        _dist().barrier()


def _agree(value):
    """Rank 0's ``value``, on every rank."""
    dist = _dist()
    if dist is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _union(local: dict) -> dict:
    """Every rank's ``key -> description`` merged (a pipeline's ranks hold different stages)."""
    dist = _dist()
    if dist is None:
        return dict(local)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}
