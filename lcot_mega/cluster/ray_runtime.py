"""The two Ray modes of `build_runtime`: colocated and disaggregated (see DESIGN.md, Ray).

colocated: actor ranks are Ray actors (`RayRanks` under an `ActorGroup`); the rollout engine lives inside rank 0's
process and is loaded in place after every step; the driver reaches it through `RemoteEngine`.
disaggregated: the same actor ranks, plus `cluster.num_engines` served engines in their own placement group; the
driver spreads requests over them with an `EnginePool`, and rank 0 broadcasts weights to them (`BroadcastSync`).

Ray start: `cluster.ray_address` joins a running cluster (checked for reachability first: Ray itself retries an
unreachable address for minutes); otherwise a local instance is started with as many logical CPUs as the
placement groups reserve, no dashboard and quiet logs, and shut down again by `Runtime.close`. An already
initialized Ray (a caller's, or a test's) is reused and left running. Token authentication (on by default in
Ray 2.60) is left as the user set it: a local instance binds the node's address, not loopback, so turning it off
would let anyone who reaches this machine run code in our processes; `RAY_AUTH_MODE=disabled` in the environment
turns it off for those who want that.

Code: a local instance's workers import `lcot_mega` from the driver's working directory and sys.path; on a
running cluster every node needs the package installed (same version), as `ray job submit` images provide.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Callable, Sequence
from typing import Any

from lcot_mega.cluster.runtime import Runtime, load_tokenizer
from lcot_mega.config import ClusterConfig, Config

PLACEMENT_TIMEOUT_S = 120.0
"""How long a placement group may wait for its resources before we name what is missing."""
REACH_TIMEOUT_S = 5.0


class RayStartError(RuntimeError):
    """Ray could not be started or joined, or cannot place what the config asks for; the message says which key."""


def import_ray() -> Any:
    """The `ray` module, or a RayStartError saying how to install it."""
    try:
        import ray
    except ImportError as e:
        raise RayStartError(
            "cluster.mode = 'colocated' / 'disaggregated' needs Ray: `pip install ray` (or use cluster.mode=local)"
        ) from e
    return ray


def reserved_cpus(cluster: ClusterConfig) -> int:
    """Logical CPUs the placement groups of `cluster` reserve, rounded up."""
    cpus = cluster.actor_ranks * cluster.cpus_per_rank
    if cluster.mode == "disaggregated":
        cpus += cluster.num_engines * cluster.cpus_per_engine
    return max(1, math.ceil(cpus))


def check_reachable(address: str, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """RayStartError unless `address` ("host:port" or "ray://host:port") accepts TCP connections; "auto" and
    other forms are left to Ray (it fails fast on those)."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise RayStartError(
            f"cannot reach the Ray cluster at cluster.ray_address = {address!r}: {e}. Start one there (`ray start"
            " --head`), fix the address, or unset cluster.ray_address to start a local Ray instance"
        ) from None


def start_ray(cluster: ClusterConfig) -> Callable[[], None] | None:
    """Join or start Ray for `cluster`; the matching shutdown if we started (or joined) it, None if it was
    already initialized (then it is not ours to stop)."""
    ray = import_ray()
    if ray.is_initialized():
        return None
    if cluster.ray_address:
        check_reachable(cluster.ray_address)
        try:
            ray.init(address=cluster.ray_address, logging_level=logging.WARNING)
        except Exception as e:
            raise RayStartError(
                f"could not join the Ray cluster at cluster.ray_address = {cluster.ray_address!r}: "
                f"{type(e).__name__}: {e}"
            ) from e
    else:
        # address="local": a new instance even when another Ray cluster runs on this machine (`ray start`, or a
        # neighbouring run): without cluster.ray_address the run is meant to be self-contained.
        ray.init(
            address="local", num_cpus=reserved_cpus(cluster), include_dashboard=False, logging_level=logging.WARNING
        )
    return ray.shutdown


def placement_group(bundles: Sequence[dict[str, float]], what: str, timeout_s: float = PLACEMENT_TIMEOUT_S) -> Any:
    """A ready PACK placement group of `bundles` (zero GPU entries dropped: CPU-only nodes have no GPU
    resource); RayStartError naming the cluster's resources if they cannot be reserved in `timeout_s`."""
    import ray
    from ray.util.placement_group import placement_group as make_pg

    bundles = [{k: v for k, v in b.items() if v > 0} for b in bundles]
    pg = make_pg(bundles, strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.util.remove_placement_group(pg)
        raise RayStartError(
            f"Ray could not reserve {what} {bundles} in {timeout_s:g}s; the cluster has "
            f"{ray.cluster_resources()}. Lower cluster.actor_ranks / num_engines / cpus_per_* / gpus_per_*,"
            " or add nodes"
        ) from None
    return pg


def check_cluster_fits(cfg: Config) -> None:
    """RayStartError listing every reason `cfg`'s placement groups cannot be placed on the alive nodes (see
    `fit`): at once, instead of after `PLACEMENT_TIMEOUT_S` with only a resource dict. Layout errors
    (`fit.layout_errors`) are `trainer.preflight`'s, refused before any work."""
    from lcot_mega.cluster.fit import check_fit, nodes_from_ray

    report = check_fit(cfg, nodes_from_ray())
    if report.placement:
        raise RayStartError(f"the layout does not fit the Ray cluster:\n{report}")


def build_ray_runtime(cfg: Config) -> Runtime:
    """The actor and engine of `cfg.cluster.mode` ('colocated' or 'disaggregated') on Ray, weights in sync at
    version 0 (actor and engines load the same HF directory). `Runtime.close` stops everything started here."""
    mode = cfg.cluster.mode
    if mode not in ("colocated", "disaggregated"):
        raise ValueError(f"build_ray_runtime: cluster.mode must be 'colocated' or 'disaggregated', got {mode!r}")
    runtime = Runtime(actor=None, engine=None, tokenizer=load_tokenizer(cfg))  # type: ignore[arg-type]
    stop_ray = start_ray(cfg.cluster)
    if stop_ray is not None:
        runtime.closers.append(stop_ray)
    try:
        check_cluster_fits(cfg)
        (_colocated if mode == "colocated" else _disaggregated)(cfg, runtime)
    except BaseException:
        runtime.close()
        raise
    return runtime


def _colocated(cfg: Config, runtime: Runtime) -> None:
    from lcot_mega.cluster.actor_group import ActorGroup
    from lcot_mega.cluster.ray_engines import RemoteEngine
    from lcot_mega.cluster.ray_group import ColocatedEngine, RayRanks

    ranks = RayRanks(cfg)
    runtime.actor = ActorGroup(ranks)
    runtime.closers.append(runtime.actor.shutdown)
    ranks.attach(ColocatedEngine(str(cfg.model.path), cfg.model.dtype, cfg.trainer.seed))
    runtime.engine = RemoteEngine(ranks.workers[0])
    runtime.closers.append(runtime.engine.shutdown)


def _disaggregated(cfg: Config, runtime: Runtime) -> None:
    """Served engines in their own bundles, kept by `ServedEngines`: a server that dies or hangs is restarted in
    its bundle and re-synced by a re-formed weight group (`cluster.served.BroadcastToLive`)."""
    from lcot_mega.cluster.actor_group import ActorGroup
    from lcot_mega.cluster.ray_engines import SERVER_START_TIMEOUT_S, ServedEngineGroup
    from lcot_mega.cluster.ray_group import RayRanks
    from lcot_mega.cluster.served import BroadcastToLive, ServedEngines

    c = cfg.cluster
    servers = ServedEngineGroup(  # starts without waiting: the servers load while the actor ranks build
        str(cfg.model.path), cfg.model.dtype, cfg.trainer.seed, c.num_engines, c.cpus_per_engine, c.gpus_per_engine,
        cfg.rollout.request_timeout_s,
    )  # fmt: skip
    backend = "nccl" if c.gpus_per_rank > 0 and c.gpus_per_engine > 0 else "gloo"
    served = ServedEngines(servers, servers.restart, None)
    runtime.served = served
    runtime.closers.append(servers.shutdown)
    ranks = RayRanks(cfg)
    runtime.actor = ActorGroup(ranks)
    runtime.closers.append(runtime.actor.shutdown)  # runs before the servers go: rank 0 asks them to leave its group
    route = BroadcastToLive(ranks, servers, backend)
    runtime.engine = served.start_pool(servers.clients(), SERVER_START_TIMEOUT_S)
    runtime.closers.append(runtime.engine.shutdown)  # popped first: no recovery starts once teardown began
    route.attach()
    served.route, served.actor = route, runtime.actor
