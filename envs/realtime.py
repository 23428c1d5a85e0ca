"""Real-time chunk execution: the env ticks on a control clock, chunks arrive when inference ends.

A robot does not wait for its policy. `RealtimeController` is a `policy_fn` for
`envs.rollout.rollout` that plays the control loop of one robot: every tick (1 / control_hz
seconds) the env executes one action, and every Ta ticks it requests the next chunk from the
newest observation. Inference runs while the current chunk keeps executing; the new chunk takes
over at the first tick after it is ready. A chunk requested at tick n predicts the actions of
ticks n - (To - 1) .. n - (To - 1) + H - 1 (Diffusion Policy's alignment), so it is *due* at tick
n + lead (lead = H - To + 1 - Ta: the first tick the previous chunk no longer covers). A chunk
that is later than that is a deadline miss: the robot holds its last action until the chunk
arrives (held ticks are counted), then executes the chunk's actions for the ticks that remain.
The first chunk of an episode is awaited before the clock starts (the robot starts at rest).

Two clocks, one schedule:
- ``clock="simulated"`` (default, deterministic for a deterministic ``clock``): inference runs
  synchronously and its latency, read from ``clock``, decides at which tick the chunk is ready;
  env steps cost no time. This is the schedule an asynchronous controller sees when inference is
  the only computation, and it is what the benchmarks report.
- ``clock="wall"``: inference runs in a worker thread while the main thread sleeps to each tick
  of the wall clock (``sleep``), and a chunk is ready at the first tick at which its thread has
  finished.

Diffusion-agnostic: `chunk_fn(obs, budget_s) -> (chunks (B, H, Da), info)` is any chunking
policy; `budget_s` is the time it may take (an anytime sampler stops there, others ignore it).
`info` is kept as it is in each `ChunkRequest.chunk`; its `converged` (an attribute or a mapping
key: a bool or per-row list) counts anytime deliveries, its `latency_ms` replaces the
controller's own measurement. The schedule is docs/design.md §8.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from envs.rollout import record_dict

ChunkFn = Callable[[Any, float | None], tuple[np.ndarray, dict[str, Any]]]
CLOCKS = ("simulated", "wall")


def max_lead_steps(horizon: int, n_obs_steps: int, n_action_steps: int) -> int:
    """Most ticks a chunk may take to arrive before the previous chunk runs out of actions."""
    return horizon - n_obs_steps + 1 - n_action_steps


def _info_field(info: Any, name: str, default: Any) -> Any:
    """`name` of a chunk_fn's info: a mapping key or an attribute."""
    if isinstance(info, Mapping):
        return info.get(name, default)
    return getattr(info, name, default)


@dataclass
class ChunkRequest:
    """One chunk request as the robot saw it: asked at `request_tick`, ready at `ready_tick`
    (None: never delivered), `late` (after its due tick), `anytime` (on time but unconverged),
    `startup` (an episode's awaited first chunk, outside the deadline), chunk_fn's `latency_ms`
    and `converged`, and its info as `chunk`."""

    request_tick: int
    latency_ms: float = 0.0
    converged: bool = True
    chunk: Any = None
    ready_tick: int | None = None
    late: bool = False
    anytime: bool = False
    delivered: bool = True
    startup: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-able fields: the chunk info's scalars, then the request's own."""
        own = {k: getattr(self, k) for k in (
            "latency_ms", "request_tick", "converged", "ready_tick", "late", "anytime",
            "delivered", "startup")}
        return {**record_dict(self.chunk), **own}


@dataclass
class ControlStep:
    """One controller call (Ta ticks): `held_steps` ticks held the last action, whether a
    request was skipped (the worker still busy), and the request delivered in it, if any."""

    ticks: int
    held_steps: int = 0
    skipped_request: bool = False
    delivered: ChunkRequest | None = None

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-able fields (the delivered request's first)."""
        delivered = self.delivered.to_dict() if self.delivered is not None else {}
        return {**delivered, "ticks": self.ticks, "held_steps": self.held_steps,
                "skipped_request": self.skipped_request}


@dataclass
class _Request:
    """A request in flight: its record, the future (wall clock) and the chunks once ready."""

    record: ChunkRequest
    future: Future | None = None
    chunks: np.ndarray | None = None

    @property
    def tick(self) -> int:
        return self.record.request_tick


class RealtimeController:
    """Runs one robot's control loop on a clock; see the module docstring for the schedule.

    `requests` holds one ChunkRequest per request; each call returns a ControlStep as its
    record. Call `close()` (or use it as a context manager) to stop the worker thread.
    """

    def __init__(
        self,
        chunk_fn: ChunkFn,
        control_hz: float,
        n_obs_steps: int,
        n_action_steps: int,
        horizon: int,
        lead_steps: int | None = None,
        budget_margin_s: float = 0.005,
        clock_mode: str = "simulated",
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
    ):
        max_lead = max_lead_steps(horizon, n_obs_steps, n_action_steps)
        if max_lead < 1:
            raise ValueError(
                f"real-time execution needs horizon - n_obs_steps + 1 - n_action_steps >= 1 "
                f"(a chunk must outlast its successor's inference by a tick); got horizon "
                f"{horizon}, n_obs_steps {n_obs_steps}, n_action_steps {n_action_steps}"
            )
        lead_steps = max_lead if lead_steps is None else lead_steps
        if not 1 <= lead_steps <= max_lead:
            raise ValueError(f"lead_steps must be in [1, {max_lead}]; got {lead_steps}")
        if not control_hz > 0:
            raise ValueError(f"control_hz must be > 0; got {control_hz}")
        if clock_mode not in CLOCKS:
            raise ValueError(f"clock must be one of {list(CLOCKS)}; got {clock_mode!r}")
        self.chunk_fn = chunk_fn
        self.control_hz = float(control_hz)
        self.n_obs_steps = n_obs_steps
        self.n_action_steps = n_action_steps
        self.horizon = horizon
        self.lead_steps = lead_steps
        self.deadline_s = lead_steps / self.control_hz
        self.budget_s = max(self.deadline_s - budget_margin_s, 1e-4)
        self.clock_mode = clock_mode
        self.clock = clock
        self.sleep = sleep
        self.requests: list[ChunkRequest] = []
        self._executor: ThreadPoolExecutor | None = None
        self._start_episode()

    # ------------------------------------------------------------------------- episode state
    def _start_episode(self) -> None:
        self.tick = 0
        self._t0: float | None = None  # wall clock of tick 0
        self._current: _Request | None = None  # the chunk being executed
        self._pending: _Request | None = None  # the chunk being computed
        self._last_action: np.ndarray | None = None

    def on_reset(self, env_index: int, seed: int | None) -> None:
        """rollout's hook: a new episode (or idling) restarts the clock. In-flight work is
        awaited and dropped so nothing leaks into the next episode; if its due tick had passed,
        it is recorded as a miss that was never delivered."""
        pending = self._pending
        if pending is not None:
            if pending.future is not None:
                chunks, record, latency_s = pending.future.result()
                self._finish(pending, chunks, record, latency_s)
            if self.tick > pending.tick + self.lead_steps:
                record = pending.record
                record.late, record.anytime, record.delivered = True, False, False
                record.ready_tick = None
                self.requests.append(record)
        self._start_episode()

    # ------------------------------------------------------------------------------ chunks
    def _run_chunk(self, obs: Any, budget_s: float | None) -> tuple[np.ndarray, Any, float]:
        start = self.clock()
        chunks, info = self.chunk_fn(obs, budget_s)
        latency_s = self.clock() - start
        chunks = np.asarray(chunks)
        expected = (self.horizon,)
        if chunks.ndim != 3 or chunks.shape[1:2] != expected:
            raise ValueError(
                f"chunk_fn must return chunks of shape (B, {self.horizon}, Da); "
                f"got {chunks.shape}"
            )
        return chunks, info, latency_s

    def _submit(self, obs: Any) -> _Request:
        request = _Request(ChunkRequest(request_tick=self.tick))
        if self.clock_mode == "wall":
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk")
            request.future = self._executor.submit(self._run_chunk, obs, self.budget_s)
        else:
            self._finish(request, *self._run_chunk(obs, self.budget_s))
            latency_s = request.record.latency_ms / 1e3
            ticks = max(1, math.ceil(latency_s * self.control_hz - 1e-9))
            request.record.ready_tick = request.tick + ticks
        return request

    def _finish(self, request: _Request, chunks: np.ndarray, info: Any, latency_s: float) -> None:
        request.chunks = chunks
        record = request.record
        record.chunk = info
        record.latency_ms = float(_info_field(info, "latency_ms", latency_s * 1e3))
        record.converged = _all_converged(_info_field(info, "converged", True))

    def _ready_at(self, request: _Request, tick: int) -> bool:
        """Whether `request`'s chunk can drive tick `tick` (never the tick it was asked at)."""
        if tick <= request.tick:
            return False
        if request.record.ready_tick is not None:
            return request.record.ready_tick <= tick
        if request.future is not None and request.future.done():
            self._finish(request, *request.future.result())
            request.record.ready_tick = tick
            return True
        return False

    def _deliver(self, request: _Request) -> ChunkRequest:
        record = request.record
        record.late = bool(record.ready_tick > request.tick + self.lead_steps)
        record.anytime = bool(not record.late and not record.converged)
        self.requests.append(record)
        self._current = request
        return record

    # ------------------------------------------------------------------------------- ticks
    def _wait_for_tick(self, tick: int) -> None:
        if self.clock_mode != "wall":
            return
        delay = self._t0 + tick / self.control_hz - self.clock()
        if delay > 0:
            self.sleep(delay)

    def __call__(self, obs: Any) -> tuple[np.ndarray, ControlStep]:
        """Actions (B, Ta, Da) for the next Ta ticks from the observation at the current tick."""
        record = ControlStep(ticks=self.n_action_steps)
        if self._current is None:  # episode start: await the first chunk, then start the clock
            first = _Request(ChunkRequest(request_tick=self.tick, startup=True))
            self._finish(first, *self._run_chunk(obs, None))
            first.record.ready_tick = self.tick
            record.delivered = self._deliver(first)
            self._t0 = self.clock() - self.tick / self.control_hz
        elif self._pending is None:  # the worker is free: ask for the next chunk now
            self._pending = self._submit(obs)
        else:
            record.skipped_request = True  # still computing an older request

        actions, held = [], 0
        for tick in range(self.tick, self.tick + self.n_action_steps):
            self._wait_for_tick(tick)
            if self._pending is not None and self._ready_at(self._pending, tick):
                record.delivered = self._deliver(self._pending)
                self._pending = None
            index = tick - self._current.tick + self.n_obs_steps - 1
            if index < self.horizon:
                self._last_action = self._current.chunks[:, index]
            else:
                held += 1
            actions.append(self._last_action)
        self.tick += self.n_action_steps
        record.held_steps = held
        return np.stack(actions, axis=1), record

    # ----------------------------------------------------------------------------- cleanup
    def close(self) -> None:
        """Wait for in-flight inference and stop the worker thread."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> RealtimeController:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _all_converged(value: Any) -> bool:
    """chunk_fn's `converged` (a bool or per-row list) as one bool."""
    if isinstance(value, list | tuple | np.ndarray):
        return bool(np.all(value))
    return bool(value)


def timed_requests(requests: list[ChunkRequest]) -> list[ChunkRequest]:
    """The requests made under a deadline: all but each episode's awaited first chunk."""
    return [r for r in requests if not r.startup]


def summarize_realtime(steps: list[ControlStep], requests: list[ChunkRequest]) -> dict:
    """The real-time metrics of docs/design.md §5: deadline_miss_rate (late or never delivered)
    and anytime_rate (on time but unconverged) over timed requests; held_step_rate (held ticks /
    ticks) over the controller's steps; skipped_requests."""
    timed = timed_requests(requests)
    ticks = sum(s.ticks for s in steps)
    return {
        "deadline_miss_rate": float(np.mean([r.late for r in timed])) if timed else None,
        "anytime_rate": float(np.mean([r.anytime for r in timed])) if timed else None,
        "held_step_rate": sum(s.held_steps for s in steps) / ticks if ticks else None,
        "skipped_requests": sum(s.skipped_request for s in steps),
        "n_timed_requests": len(timed),
    }
