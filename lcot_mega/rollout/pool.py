"""Several rollout engines behind one `RolloutEngine`: least-loaded dispatch, failover, restart and resync.

`EnginePool.generate` cuts the prompts into chunks and sends each to the live engine with the fewest prompts in
flight, all chunks at once (one thread each), and puts the answers back in prompt order. A chunk whose engine
fails (connection refused or reset, timeout, HTTP 5xx: `is_engine_failure`) goes to another live engine after an
exponential backoff; the failed engine is marked dead. Anything else (a 400 `ValueError`, another 4xx) is a bug
of the caller and is raised at once, never re-sent.

Recovery runs on a background thread, outside the request path: `on_dead(i)` returns a replacement engine (for
servers: `ServerSupervisor.restart(i)` and a fresh client), `resync(i, engine)` brings it to the weights the
pool holds now, and only then does it rejoin. Weight loads through the pool (`update_weights`, `for_each_live`)
and resyncs hold one lock, so a replacement never rejoins behind a weight update that happened meanwhile. While
every engine is being restarted, weight loads and memory calls only record the version (`version`) and the released
tags for the replacement, requests wait up to `recovery_wait_s` for it, and so does `weight_version`.

Give the pool HTTP clients with `retries=0`: a client that retries on its own could send a request to a
restarted server before it is resynced, and failover is the pool's job anyway.

SGLang's router (the `sglang_router` package, where installed) balances requests over several SGLang servers
itself: a user may point one `SGLangHTTPEngine` at the router's URL instead of using this pool (weight updates
then go to every server, not through the router). The pool is for what the router does not do: failover with
restart and resync, and engines that are not HTTP servers.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import threading
import time
import urllib.error
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import TypeVar

import torch

from lcot_mega.rollout.http_client import EngineHTTPError
from lcot_mega.rollout.protocol import Completion, RolloutEngine, SamplingParams, check_memory_tags
from lcot_mega.types import SampleStatus

log = logging.getLogger(__name__)

T = TypeVar("T")
OnDead = Callable[[int], "RolloutEngine | None"]
Resync = Callable[[int, RolloutEngine], None]

_SEED_STRIDE = 0x9E3779B97F4A7C15  # odd 64-bit constant: chunk seeds of one call never collide


class NoLiveEngineError(RuntimeError):
    """No engine of the pool can take the request; the message names each engine and its last error."""


def is_engine_failure(e: BaseException) -> bool:
    """True when `e` says the engine is gone or stuck (re-send elsewhere), False for a bad request (raise).

    Connection refused / reset, timeouts and HTTP 5xx are engine failures; `ValueError` (HTTP 400), other 4xx
    and anything else are not."""
    if isinstance(e, EngineHTTPError):
        return e.status >= 500
    return isinstance(e, ConnectionError | TimeoutError | urllib.error.URLError | http.client.HTTPException)


def engine_name(engine: object) -> str:
    return getattr(engine, "base_url", None) or type(engine).__name__


def chunk_seed(seed: int | None, start: int) -> int | None:
    """Seed of the chunk starting at prompt `start`: engines count samples from 0 in every call, so chunks
    sent with one seed would share random streams. Chunk 0 keeps `seed` (a one-chunk call equals the engine's)."""
    return None if seed is None else (seed + start * _SEED_STRIDE) % 2**63


class EnginePool:
    """`RolloutEngine` over several engines (in-process or HTTP clients); see the module docstring."""

    def __init__(
        self,
        engines: Sequence[RolloutEngine],
        *,
        chunk_size: int | None = None,
        max_attempts: int = 4,
        backoff_s: float = 0.5,
        on_dead: OnDead | None = None,
        resync: Resync | None = None,
        recovery_wait_s: float = 0.0,
        max_workers: int = 64,
    ) -> None:
        """`chunk_size`: prompts per chunk (None: one chunk per live engine). `max_attempts`: sends of one chunk
        before giving up. `recovery_wait_s`: how long a request waits for a recovering engine when none is live
        (0: raise `NoLiveEngineError` at once)."""
        if not engines:
            raise ValueError("an EnginePool needs at least one engine")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be None or >= 1, got {chunk_size}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.chunk_size, self.max_attempts, self.backoff_s = chunk_size, max_attempts, backoff_s
        self.on_dead, self.resync = on_dead, resync
        self.recovery_wait_s, self.max_workers = recovery_wait_s, max_workers
        n = len(engines)
        self._engines: list[RolloutEngine] = list(engines)
        self._live = [True] * n
        self._load = [0] * n  # prompts in flight per engine
        self._generation = [0] * n  # bumped when a replacement joins: late failures of the old one are ignored
        self._errors: list[BaseException | None] = [None] * n
        self._recovering: dict[int, threading.Thread] = {}
        self._cond = threading.Condition()  # guards all of the above
        self._weights_lock = threading.RLock()  # weight loads and resyncs, one at a time
        self._released: set[str] = set()  # memory tags released through the pool and not resumed
        self._calls: set[threading.Event] = set()  # abort flags of the generate calls running now
        self._known_version = 0
        self._closed = False
        self.failures = 0
        """Engines marked dead (a failed request, or a failed weight or control call)."""
        self.failovers = 0
        """Chunks (and score requests) re-sent after an engine failure."""
        self.rejoined = 0
        """Replacement engines that joined after a resync."""
        self._taken = {"failures": 0, "failovers": 0, "restarts": 0}  # the counters at the last take_counters()

    # ------------------------------------------------------------------------------------------ state

    @property
    def engines(self) -> list[RolloutEngine]:
        with self._cond:
            return list(self._engines)

    def live(self) -> list[int]:
        with self._cond:
            return [i for i, ok in enumerate(self._live) if ok]

    def dead(self) -> list[int]:
        with self._cond:
            return [i for i, ok in enumerate(self._live) if not ok]

    def loads(self) -> list[int]:
        """Prompts in flight per engine."""
        with self._cond:
            return list(self._load)

    @property
    def last_errors(self) -> list[BaseException | None]:
        """Per engine: the failure that last took it out (or its failed recovery); None if it never failed."""
        with self._cond:
            return list(self._errors)

    @property
    def version(self) -> int:
        """The weight version last loaded through the pool (0 before any): what `resync` brings a replacement to."""
        with self._cond:
            return self._known_version

    def take_counters(self) -> dict[str, int]:
        """Engine failures, re-sent requests and restarted engines (rejoined after resync) since the last call."""
        with self._cond:
            now = {"failures": self.failures, "failovers": self.failovers, "restarts": self.rejoined}
            taken, self._taken = self._taken, now
        return {k: now[k] - taken[k] for k in now}

    def wait_recovered(self, timeout_s: float | None = None) -> bool:
        """Block until no recovery is running; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._recovering, timeout_s)

    # ------------------------------------------------------------------------------------------ dispatch

    def _acquire(self, weight: int) -> tuple[int, RolloutEngine, int]:
        """The least-loaded live engine, its load raised by `weight`; waits up to `recovery_wait_s` for one."""
        end = time.monotonic() + self.recovery_wait_s
        with self._cond:
            while True:
                live = [i for i, ok in enumerate(self._live) if ok]
                if live:
                    i = min(live, key=lambda j: (self._load[j], j))
                    self._load[i] += weight
                    return i, self._engines[i], self._generation[i]
                left = end - time.monotonic()
                if self._closed or not self._recovering or left <= 0:
                    raise self._no_live_error()
                self._cond.wait(left)

    def _release(self, i: int, weight: int) -> None:
        with self._cond:
            self._load[i] -= weight

    def _no_live_error(self, what: str = "no live rollout engine can take the request") -> NoLiveEngineError:
        lines = [
            f"  [{i}] {engine_name(e)}: {'live' if ok else 'dead'}; last error: {err!r}"
            for i, (e, ok, err) in enumerate(zip(self._engines, self._live, self._errors, strict=True))
        ]
        return NoLiveEngineError(f"{what}:\n" + "\n".join(lines))

    def _call(self, fn: Callable[[RolloutEngine], T], weight: int, pinned: tuple[int, RolloutEngine, int]) -> T:
        """`fn(engine)` on the engine `pinned` (acquired by the caller); on an engine failure mark it dead, back
        off and re-send to the least-loaded live engine, up to `max_attempts` sends in all."""
        slot = pinned
        for attempt in range(1, self.max_attempts + 1):
            i, engine, generation = slot
            try:
                return fn(engine)
            except Exception as e:
                if not is_engine_failure(e):
                    raise
                log.warning("rollout engine %d (%s) failed: %r; re-sending", i, engine_name(engine), e)
                self._mark_dead(i, generation, e)
                if attempt == self.max_attempts:
                    with self._cond:
                        error = self._no_live_error(f"a request failed on {attempt} engine(s)")
                    raise error from e
            finally:
                self._release(i, weight)
            time.sleep(self.backoff_s * 2 ** (attempt - 1))
            slot = self._acquire(weight)
            with self._cond:
                self.failovers += 1
        raise AssertionError("unreachable")

    def _mark_dead(self, i: int, generation: int, error: BaseException) -> None:
        with self._cond:
            if generation != self._generation[i] or not self._live[i]:
                return  # already out, or a late failure of the engine a replacement took over from
            self._live[i], self._errors[i] = False, error
            self.failures += 1
            if self.on_dead is None or self._closed or i in self._recovering:
                return
            thread = threading.Thread(target=self._recover, args=(i,), name=f"engine-pool-recover-{i}", daemon=True)
            self._recovering[i] = thread
        thread.start()

    # ------------------------------------------------------------------------------------------ recovery

    def _recover(self, i: int) -> None:
        """Background: replacement from `on_dead`, brought to the pool's weights by `resync`, then live."""
        try:
            engine = self.on_dead(i)
            if engine is None:
                log.warning("rollout engine %d: on_dead returned no replacement; it stays out", i)
                return
            with self._weights_lock:
                if self._closed:
                    engine.shutdown()
                    return
                if self.resync is not None:
                    self.resync(i, engine)
                if self._released:
                    engine.release_memory(sorted(self._released))
                self._check_version(i, engine)
                with self._cond:
                    self._engines[i], self._live[i] = engine, True
                    self._generation[i] += 1
                    self.rejoined += 1
            log.info("rollout engine %d (%s) rejoined the pool", i, engine_name(engine))
        except Exception as e:
            log.exception("rollout engine %d: recovery failed; it stays out", i)
            with self._cond:
                self._errors[i] = e
        finally:
            with self._cond:
                self._recovering.pop(i, None)
                self._cond.notify_all()

    def _check_version(self, i: int, engine: RolloutEngine) -> None:
        """A replacement must hold the version the live engines hold (else `resync` did not do its job)."""
        others = {}
        for j, live_engine, _ in self._live_slots():
            try:
                others[j] = live_engine.weight_version
            except Exception as e:
                if not is_engine_failure(e):
                    raise
        mine = engine.weight_version
        if others and set(others.values()) != {mine}:
            raise RuntimeError(
                f"engine {i} came back at weight version {mine} but the live engines hold {others}: "
                "the resync callback must load the pool's current weights"
            )

    # ------------------------------------------------------------------------------------------ protocol

    def generate(self, prompt_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        """All chunks at once, each to the least-loaded live engine; each chunk samples with `chunk_seed`."""
        prompts = [list(map(int, p)) for p in prompt_ids]
        if not prompts:
            return []
        size = self.chunk_size or -(-len(prompts) // max(1, len(self.live())))
        starts = list(range(0, len(prompts), size))
        aborted = threading.Event()
        with self._cond:
            self._calls.add(aborted)
        try:
            with ThreadPoolExecutor(min(len(starts), self.max_workers), thread_name_prefix="engine-pool") as ex:
                futures = [
                    self._submit(ex, prompts[s : s + size], replace(params, seed=chunk_seed(params.seed, s)), aborted)
                    for s in starts
                ]
                groups = [g for f in futures for g in f.result()]
        finally:
            with self._cond:
                self._calls.discard(aborted)
        self._fill_unsent(groups)
        return groups

    def _submit(
        self, ex: ThreadPoolExecutor, chunk: list[list[int]], params: SamplingParams, aborted: threading.Event
    ) -> Future[list[list[Completion]]]:
        """Acquire the engine here, in chunk order (so the choice sees every earlier chunk's load), send there."""
        slot = self._acquire(len(chunk))

        def send(engine: RolloutEngine) -> list[list[Completion]]:
            if aborted.is_set():
                return [[_aborted(p) for _ in range(params.n)] for p in chunk]
            groups = engine.generate(chunk, params)
            if len(groups) != len(chunk) or any(len(g) != params.n for g in groups):
                raise RuntimeError(f"{engine_name(engine)} answered {len(groups)} groups for {len(chunk)} prompts")
            return groups

        try:
            return ex.submit(self._call, send, len(chunk), slot)
        except BaseException:
            self._release(slot[0], len(chunk))
            raise

    def _fill_unsent(self, groups: list[list[Completion]]) -> None:
        """Samples of chunks aborted before they were sent carry the version the call's other samples report."""
        unsent = [c for g in groups for c in g if c.weight_version < 0]
        if unsent:
            sent = [c.weight_version for g in groups for c in g if c.weight_version >= 0]
            for c in unsent:
                c.weight_version = sent[0] if sent else self._known_version

    def score(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> torch.Tensor:
        """Teacher-forced log-probs from one live engine (all hold the same weights)."""
        return self._call(lambda e: e.score(prompt_ids, response_ids), 1, self._acquire(1))

    def abort(self) -> None:
        """Abort in-flight generation on every live engine; chunks not yet sent come back ABORTED and empty."""
        with self._cond:
            for flag in self._calls:
                flag.set()
        self._fan_out(lambda e: e.abort(), require_live=False)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Send the same tensors to every live engine; an engine that fails on the way is marked dead (its
        replacement is resynced)."""
        named = list(named_tensors)  # an iterator can be read once, the engines need it each
        with self._weights_lock:
            self._fan_out(lambda e: e.update_weights(named, version), recovering_ok=True)
            with self._cond:
                self._known_version = version

    @contextlib.contextmanager
    def loading_elsewhere(self, version: int) -> Iterator[None]:
        """Hold the weight lock around a load that does not pass through the pool (the trainer broadcasting to the
        servers itself, disaggregated mode); when the block completes, `version` is what a replacement is resynced
        to. A block that raises records nothing."""
        with self._weights_lock:
            yield
            with self._cond:
                self._known_version = version

    def mark_dead(self, i: int, error: BaseException) -> None:
        """Take engine `i` out and start its recovery, as a failed request would (for failures found outside the
        pool, e.g. a failed health check before a broadcast); a no-op for an engine already out."""
        with self._cond:
            generation = self._generation[i]
        self._mark_dead(i, generation, error)

    def for_each_live(self, fn: Callable[[RolloutEngine], T]) -> dict[int, T]:
        """`fn(engine)` on every live engine under the weight lock (for loads outside the protocol, e.g.
        `SGLangHTTPEngine.load_from_disk`); results by engine index."""
        with self._weights_lock:
            return self._fan_out(fn)

    @property
    def weight_version(self) -> int:
        """The version every live engine holds; raises if they disagree. While every engine is being restarted, waits
        up to `recovery_wait_s` for one to rejoin (call it without holding the pool's weight lock)."""
        versions = self._fan_out(lambda e: e.weight_version, recovering_ok=True)
        if not versions:
            with self._cond:
                self._cond.wait_for(lambda: any(self._live) or not self._recovering, self.recovery_wait_s)
            versions = self._fan_out(lambda e: e.weight_version)
        if len(set(versions.values())) != 1:
            raise RuntimeError(f"live engines disagree on the weight version: {versions}")
        return next(iter(versions.values()))

    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        """Release on every live engine; a replacement joining later is released too before it rejoins."""
        checked = check_memory_tags(tags)
        with self._weights_lock:
            self._fan_out(lambda e: e.release_memory(tags), recovering_ok=True)
            self._released.update(checked)

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        checked = check_memory_tags(tags)
        with self._weights_lock:
            self._fan_out(lambda e: e.resume_memory(tags), recovering_ok=True)
            self._released.difference_update(checked)

    def flush_cache(self) -> None:
        self._fan_out(lambda e: e.flush_cache(), recovering_ok=True)

    def health(self) -> bool:
        """True when at least one live engine answers healthy."""
        return any(e.health() for _, e, _ in self._live_slots())

    def shutdown(self) -> None:
        """Stop recoveries from rejoining and shut every engine down (a dead one's error is only logged)."""
        with self._cond:
            self._closed = True
            engines = list(self._engines)
            self._cond.notify_all()
        for i, e in enumerate(engines):
            try:
                e.shutdown()
            except Exception as err:
                log.warning("rollout engine %d (%s): shutdown failed: %r", i, engine_name(e), err)

    # ------------------------------------------------------------------------------------------ fan-out

    def _live_slots(self) -> list[tuple[int, RolloutEngine, int]]:
        with self._cond:
            return [(i, self._engines[i], self._generation[i]) for i, ok in enumerate(self._live) if ok]

    def _fan_out(
        self, fn: Callable[[RolloutEngine], T], *, require_live: bool = True, recovering_ok: bool = False
    ) -> dict[int, T]:
        """`fn` on every live engine concurrently. Engine failures mark that engine dead; any other error is
        raised after all calls returned. With `require_live`, raise `NoLiveEngineError` if none answered, unless
        `recovering_ok` and an engine is being restarted (a weight load or memory call then reaches it through
        `resync` and the released tags before it rejoins)."""
        slots = self._live_slots()
        results: dict[int, T] = {}
        errors: list[Exception] = []
        if slots:
            with ThreadPoolExecutor(len(slots), thread_name_prefix="engine-pool") as ex:
                futures = [(i, g, ex.submit(fn, e)) for i, e, g in slots]
            for i, generation, f in futures:
                try:
                    results[i] = f.result()
                except Exception as e:
                    if not is_engine_failure(e):
                        errors.append(e)
                        continue
                    log.warning("rollout engine %d failed: %r", i, e)
                    self._mark_dead(i, generation, e)
        if errors:
            raise errors[0]
        if require_live and not results:
            with self._cond:
                if not (recovering_ok and self._recovering and not self._closed):
                    raise self._no_live_error()
        return results


def _aborted(prompt: list[int]) -> Completion:
    # weight_version -1 marks it unsent; `_fill_unsent` puts the version of the call's other samples there.
    return Completion([], [], SampleStatus.ABORTED, weight_version=-1, prompt_tokens=len(prompt))
