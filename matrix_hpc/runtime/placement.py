"""Placement: which worker processes host which roles."""

from __future__ import annotations

from dataclasses import dataclass

from matrix_hpc.runtime.conf import Placement


class PlacementError(ValueError):
    """The run's placement settings cannot be honoured (a configuration error: never retried)."""


@dataclass(frozen=True)
class Group:
    name: str  # group name ("all" when co-located, else the role name)
    roles: tuple[str, ...]  # roles its workers host
    instances: int  # worker processes in the group


def plan_groups(roles: tuple[str, ...], placement: Placement, num_workers: int,
                role_workers: dict[str, int]) -> list[Group]:
    """Co-located: one group hosting every role, ``num_workers`` instances.
    Per role: one group per role, ``role_workers[role]`` instances (default 1)."""
    unknown = sorted(set(role_workers) - set(roles))
    if unknown:
        raise PlacementError(f"run.role_workers names unknown role(s) {unknown}; roles of this workflow: {list(roles)}")
    if placement is Placement.colocated:
        return [Group("all", roles, num_workers)]
    return [Group(role, (role,), max(1, role_workers.get(role, 1))) for role in roles]


def spread_nodes(node_ids: list[str], count: int) -> list[str]:
    """The node each of ``count`` workers goes to: round robin over the
    cluster's alive nodes (sorted, so a rerun places alike)."""
    if not node_ids:
        return []
    nodes = sorted(node_ids)
    return [nodes[i % len(nodes)] for i in range(count)]
