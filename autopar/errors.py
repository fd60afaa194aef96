"""Typed errors. Every error autopar raises on purpose derives from AutoparError."""


class AutoparError(Exception):
    """Base class of every error autopar raises on purpose."""


class MeshError(AutoparError, ValueError):
    """A mesh (or its hardware preset) is invalid or does not match the process group."""


class TraceError(AutoparError):
    """The model could not be traced to an ATen graph."""


class PlanError(AutoparError):
    """A plan file is malformed, has the wrong schema version, or belongs to another model.

    ``path`` is the JSON path (e.g. ``$.param_placements["fc1.weight"]``) of the offending value,
    or ``"$"`` when the whole document is at fault.
    """

    def __init__(self, message: str, path: str = "$"):
        super().__init__(f"{message} (at {path})")
        self.path = path


class InfeasibleError(AutoparError):
    """No plan satisfies the constraints; ``explanation`` says which constraint cannot be met.
    ``need_bytes``: when memory is to blame, what every layout was proved to need per device."""

    def __init__(self, explanation: str, need_bytes: float | None = None):
        super().__init__(explanation)
        self.explanation, self.need_bytes = explanation, need_bytes
