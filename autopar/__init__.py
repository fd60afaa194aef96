"""autopar: a compiler that parallelizes PyTorch models automatically.

    mesh = autopar.Mesh({"dp": 2, "tp": 2})
    pm = autopar.compile(model, mesh, example_inputs=(ids,))
"""

import warnings as _warnings

# torch's pytree deprecation notice fires inside torch.export for every model, on every rank; it
# is torch's own, not the user's concern
_warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*", category=FutureWarning)

from .errors import AutoparError, InfeasibleError, MeshError, PlanError, TraceError  # noqa: E402
from .mesh import Mesh
from .plan import Plan  # noqa: E402  (loads the submodule autopar.plan before the function shadows it)
from .api import compile, plan  # noqa: E402,A004  the function autopar.plan replaces the submodule attribute
from .codegen.runtime import ParallelModule  # noqa: E402
from .codegen.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402  (plain models, one process)
from .batching import BatchPlan, plan_batch  # noqa: E402
from .routing import RoutingStats, profile_routing  # noqa: E402
from .compression import CompressionStats, calibrate_compression  # noqa: E402

__version__ = "0.1.0"

__all__ = ["AutoparError", "InfeasibleError", "MeshError", "PlanError", "TraceError", "Mesh", "Plan", "ParallelModule",
           "plan", "compile", "save_checkpoint", "load_checkpoint", "BatchPlan", "plan_batch", "RoutingStats", "profile_routing",
           "CompressionStats", "calibrate_compression"]
