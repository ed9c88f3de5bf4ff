"""Heterogeneous device roles (DESIGN.md section 5): role tables, the role-sharded forward pass under
`shard_map`, and `RolesEngine`, the decode engine on a device mesh; FP8 routed experts, random weights drawn on the
devices and the per-device memory plan."""
from glm_fast.parallel.engine import RolesEngine
from glm_fast.parallel.fp8 import EXPERT_FORMATS, Fp8Weight
from glm_fast.parallel.init import abstract_model, random_params, reference_model, reference_params
from glm_fast.parallel.memory import MemoryPlan, check_fits, format_plan, memory_plan
from glm_fast.parallel.roles import LAYOUTS, ROLES, RoleError, RoleTable, build_roles

__all__ = ["EXPERT_FORMATS", "Fp8Weight", "LAYOUTS", "MemoryPlan", "ROLES", "RoleError", "RoleTable", "RolesEngine",
           "abstract_model", "build_roles", "check_fits", "format_plan", "memory_plan", "random_params",
           "reference_model", "reference_params"]
