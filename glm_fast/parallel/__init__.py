"""Heterogeneous device roles (DESIGN.md section 5): role tables, the role-sharded forward pass under
`shard_map`, and `RolesEngine`, the decode engine on a device mesh."""
from glm_fast.parallel.engine import RolesEngine
from glm_fast.parallel.roles import LAYOUTS, ROLES, RoleError, RoleTable, build_roles

__all__ = ["LAYOUTS", "ROLES", "RoleError", "RoleTable", "RolesEngine", "build_roles"]
