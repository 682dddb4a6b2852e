"""Rollout engines placed by Ray.

colocated: `RemoteEngine` is the driver's `RolloutEngine` for the engine that lives inside actor rank 0's
process (`ray_group.ActorWorker`), so a weight sync there is an in-place load; each call is one Ray call.
disaggregated: `ServedEngineGroup` starts one `EngineServer` Ray actor per placement-group bundle, each serving
an `EmbeddedEngine` over SGLang's HTTP subset (`RolloutServer`); the driver talks to them through HTTP clients
in an `EnginePool`, and actor rank 0 broadcasts weights to them. A server that dies or hangs is replaced in its own
bundle (`ServedEngineGroup.restart`) and re-synced (`cluster.served`).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from lcot_mega.rollout.protocol import Completion, SamplingParams

SERVER_START_TIMEOUT_S = 600.0


class RemoteEngine:
    """`RolloutEngine` proxy: every call runs on the engine inside the actor worker `worker` (a Ray handle).

    The worker is a threaded actor, so `abort` reaches the engine while a `generate` is in flight."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self._closed = False

    def _call(self, method: str, *args: Any) -> Any:
        import ray

        return ray.get(self.worker.engine_call.remote(method, *args))

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        return self._call("generate", [list(map(int, p)) for p in prompt_ids], params)

    def score(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> torch.Tensor:
        return self._call("score", list(map(int, prompt_ids)), list(map(int, response_ids)))

    def abort(self) -> None:
        self._call("abort")

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        # Only for callers outside the actor: the actor's own syncs load in place, without crossing Ray.
        self._call("update_weights", list(named_tensors), version)

    @property
    def weight_version(self) -> int:
        import ray

        return ray.get(self.worker.engine_weight_version.remote())

    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        self._call("release_memory", None if tags is None else list(tags))

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        self._call("resume_memory", None if tags is None else list(tags))

    def flush_cache(self) -> None:
        self._call("flush_cache")

    def health(self) -> bool:
        try:
            return bool(self._call("health"))
        except Exception:  # a dead worker is an unhealthy engine, not an error of the caller
            return False

    def shutdown(self) -> None:
        """Shut the engine down; the worker process itself belongs to the actor group."""
        import ray

        if not self._closed:
            self._closed = True
            ray.get(self.worker.engine_shutdown.remote(), timeout=60)


class EngineServer:
    """One served engine in its own process (wrapped by `ray.remote`): an `EmbeddedEngine` behind a
    `RolloutServer` thread, bound to the node's address and guarded by the run's API key."""

    def __init__(self, model_dir: str, dtype: str, seed: int, api_key: str, threads: int) -> None:
        from lcot_mega.cluster.ray_group import node_ip
        from lcot_mega.cluster.runtime import ROLLOUT_DTYPES
        from lcot_mega.rollout.embedded import EmbeddedEngine
        from lcot_mega.rollout.server import RolloutServer, ServeConfig

        torch.set_num_threads(max(1, threads))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        engine = EmbeddedEngine(model_dir, dtype=ROLLOUT_DTYPES[dtype], device=device, seed=seed)
        config = ServeConfig(host=node_ip(), port=0, api_key=api_key)
        self.server = RolloutServer(engine, config, model_path=model_dir).start()

    def url(self) -> str:
        return self.server.url

    def pid(self) -> int:
        return os.getpid()

    def raise_signal(self, sig: int) -> None:
        """Send `sig` to this server's own process, wherever its node is (SIGKILL, SIGSTOP: the fault drills)."""
        os.kill(os.getpid(), sig)

    def shutdown(self) -> None:
        self.server.shutdown()
        self.server.engine.shutdown()


class ServedEngineGroup:
    """`cluster.num_engines` `EngineServer` actors in one PACK placement group; their URLs and API key.

    On GPUs the production path is real SGLang servers: start them from these bundles with
    `lcot_mega.rollout.launcher.sglang_command` / `ServerSupervisor` (one per bundle, `--host` the node address,
    `--api-key` this group's key) instead of `EngineServer`. Not wired yet: with gpus_per_engine > 0 this group
    still serves the embedded transformers engine (on the bundle's GPU), which is correct but slow."""

    def __init__(
        self,
        model_dir: str,
        dtype: str,
        seed: int,
        num: int,
        cpus: float,
        gpus: float,
        request_timeout_s: float = 600.0,
    ) -> None:
        """`request_timeout_s`: of the clients handed out (`SGLangHTTPEngine.timeout_s`: how long a server may stay
        silent before it is probed, and hung if the probe fails)."""
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from lcot_mega.cluster.ray_runtime import placement_group

        self.api_key = secrets.token_urlsafe(24)
        """Fresh per run: the servers listen on the node's address, so requests must authenticate."""
        self._closed = False
        self.pg = placement_group([{"CPU": cpus, "GPU": gpus}] * num, "rollout engines")
        remote = ray.remote(EngineServer)

        def start(i: int) -> Any:
            return remote.options(
                num_cpus=cpus,
                num_gpus=gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i),
            ).remote(model_dir, dtype, seed + i, self.api_key, max(1, int(cpus)))

        self._start = start
        self.servers = [start(i) for i in range(num)]
        self._url_refs = [s.url.remote() for s in self.servers]
        self.urls: list[str] = []
        self.request_timeout_s = request_timeout_s

    def wait_ready(self, timeout_s: float = SERVER_START_TIMEOUT_S) -> list[str]:
        """Block until every server answers; their URLs. (Construction does not wait, so the actor ranks can
        build their models meanwhile.)"""
        import ray

        if not self.urls:
            self.urls = ray.get(self._url_refs, timeout=timeout_s)
        return self.urls

    def clients(self) -> list[Any]:
        """Fresh HTTP clients, without their own retries: failover is the pool's job (see `rollout.pool`)."""
        return [self.client(i) for i in range(len(self.wait_ready()))]

    def client(self, i: int) -> Any:
        """A fresh HTTP client of server `i` (its current URL; a restarted server has a new port)."""
        from lcot_mega.rollout.http_client import SGLangHTTPEngine

        return SGLangHTTPEngine(self.wait_ready()[i], self.api_key, timeout_s=self.request_timeout_s, retries=0)

    def restart(self, i: int, timeout_s: float = SERVER_START_TIMEOUT_S) -> Any:
        """Kill server `i` (dead, hung or stopped alike) and start a fresh one in the same bundle, serving the model
        it started from; a client of the new one, which holds the model's own weights until it is re-synced."""
        import ray

        urls = self.wait_ready()
        ray.kill(self.servers[i], no_restart=True)  # frees the bundle; a SIGSTOPped process is force-killed
        self.servers[i] = self._start(i)
        urls[i] = ray.get(self.servers[i].url.remote(), timeout=timeout_s)
        return self.client(i)

    @property
    def processes(self) -> list[RayServerProcess]:
        """One handle per server for fault drills (`trainer.faults.fire_engine_fault`), like `ServerSupervisor`'s."""
        return [RayServerProcess(s) for s in self.servers]

    def shutdown(self) -> None:
        from lcot_mega.cluster.ray_group import stop_actors

        if self._closed:
            return
        self._closed = True
        stop_actors(self.servers, self.pg, "rollout servers")


class RayServerProcess:
    """A served engine's process, as fault drills see it: its pid and a way to signal it on any node."""

    def __init__(self, server: Any) -> None:
        self.server = server

    @property
    def pid(self) -> int:
        import ray

        return ray.get(self.server.pid.remote(), timeout=60)

    def signal(self, sig: int) -> None:
        self.server.raise_signal.remote(sig)  # no reply to wait for: the process stops or dies
