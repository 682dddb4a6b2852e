"""Where the actor ranks and rollout engines run: one process (local) or Ray (colocated, disaggregated).

Names resolve on first use, so importing the package pulls in neither torch nor Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ActorGroup": "lcot_mega.cluster.actor_group",
    "ActorRank": "lcot_mega.cluster.actor_group",
    "LocalRanks": "lcot_mega.cluster.actor_group",
    "local_actor": "lcot_mega.cluster.actor_group",
    "Runtime": "lcot_mega.cluster.runtime",
    "build_runtime": "lcot_mega.cluster.runtime",
    "RayRanks": "lcot_mega.cluster.ray_group",
    "ServedEngines": "lcot_mega.cluster.served",
    "RemoteEngine": "lcot_mega.cluster.ray_engines",
    "ServedEngineGroup": "lcot_mega.cluster.ray_engines",
    "RayStartError": "lcot_mega.cluster.ray_runtime",
    "build_ray_runtime": "lcot_mega.cluster.ray_runtime",
    "start_ray": "lcot_mega.cluster.ray_runtime",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lcot_mega.cluster' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
