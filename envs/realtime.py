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

Diffusion-agnostic: `chunk_fn(obs, budget_s) -> (chunks (B, H, Da), record)` is any chunking
policy; `budget_s` is the time it may take (an anytime sampler stops there, others ignore it).
`record` may hold `converged` (bool or per-row list) to count anytime deliveries.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from envs.rollout import scalars

ChunkFn = Callable[[Any, float | None], tuple[np.ndarray, dict[str, Any]]]
CLOCKS = ("simulated", "wall")


def max_lead_steps(horizon: int, n_obs_steps: int, n_action_steps: int) -> int:
    """Most ticks a chunk may take to arrive before the previous chunk runs out of actions."""
    return horizon - n_obs_steps + 1 - n_action_steps


@dataclass
class _Request:
    """One chunk request: when it was made, and (once known) when it was ready and what it said."""

    tick: int
    future: Future | None = None
    chunks: np.ndarray | None = None
    record: dict[str, Any] = field(default_factory=dict)
    ready_tick: int | None = None


class RealtimeController:
    """Runs one robot's control loop on a clock; see the module docstring for the schedule.

    Per request it records `request_tick`, `latency_ms` (chunk_fn's own `latency_ms` when it
    reports one, else the controller's measurement), `ready_tick`, `late` (ready after its due
    tick), `anytime` (on time but unconverged) plus chunk_fn's scalars; per call `held_steps`
    (ticks the robot held its last action) and `ticks`. Call `close()` (or use it as a context
    manager) to stop the worker thread.
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
        self.requests: list[dict[str, Any]] = []
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
                pending.record.update(late=True, anytime=False, delivered=False, ready_tick=None)
                self.requests.append(pending.record)
        self._start_episode()

    # ------------------------------------------------------------------------------ chunks
    def _run_chunk(self, obs: Any, budget_s: float | None) -> tuple[np.ndarray, dict, float]:
        start = self.clock()
        chunks, record = self.chunk_fn(obs, budget_s)
        latency_s = self.clock() - start
        chunks = np.asarray(chunks)
        expected = (self.horizon,)
        if chunks.ndim != 3 or chunks.shape[1:2] != expected:
            raise ValueError(
                f"chunk_fn must return chunks of shape (B, {self.horizon}, Da); "
                f"got {chunks.shape}"
            )
        return chunks, dict(record), latency_s

    def _submit(self, obs: Any) -> _Request:
        request = _Request(tick=self.tick)
        if self.clock_mode == "wall":
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk")
            request.future = self._executor.submit(self._run_chunk, obs, self.budget_s)
        else:
            self._finish(request, *self._run_chunk(obs, self.budget_s))
            latency_s = request.record["latency_ms"] / 1e3
            ticks = max(1, math.ceil(latency_s * self.control_hz - 1e-9))
            request.ready_tick = request.tick + ticks
        return request

    def _finish(
        self, request: _Request, chunks: np.ndarray, record: dict, latency_s: float
    ) -> None:
        request.chunks = chunks
        request.record = {
            **scalars(record),
            "latency_ms": float(record.get("latency_ms", latency_s * 1e3)),
            "request_tick": request.tick,
            "converged": _all_converged(record),
        }

    def _ready_at(self, request: _Request, tick: int) -> bool:
        """Whether `request`'s chunk can drive tick `tick` (never the tick it was asked at)."""
        if tick <= request.tick:
            return False
        if request.ready_tick is not None:
            return request.ready_tick <= tick
        if request.future is not None and request.future.done():
            self._finish(request, *request.future.result())
            request.ready_tick = tick
            return True
        return False

    def _deliver(self, request: _Request) -> dict[str, Any]:
        late = request.ready_tick > request.tick + self.lead_steps
        request.record.update(
            ready_tick=request.ready_tick,
            late=bool(late),
            anytime=bool(not late and not request.record["converged"]),
        )
        self.requests.append(request.record)
        self._current = request
        return request.record

    # ------------------------------------------------------------------------------- ticks
    def _wait_for_tick(self, tick: int) -> None:
        if self.clock_mode != "wall":
            return
        delay = self._t0 + tick / self.control_hz - self.clock()
        if delay > 0:
            self.sleep(delay)

    def __call__(self, obs: Any) -> tuple[np.ndarray, dict[str, Any]]:
        """Actions (B, Ta, Da) for the next Ta ticks from the observation at the current tick."""
        record: dict[str, Any] = {"ticks": self.n_action_steps}
        if self._current is None:  # episode start: await the first chunk, then start the clock
            first = _Request(tick=self.tick)
            self._finish(first, *self._run_chunk(obs, None))
            first.ready_tick = self.tick
            first.record["startup"] = True
            record.update(self._deliver(first))
            self._t0 = self.clock() - self.tick / self.control_hz
        elif self._pending is None:  # the worker is free: ask for the next chunk now
            self._pending = self._submit(obs)
        else:
            record["skipped_request"] = True  # still computing an older request

        actions, held = [], 0
        for tick in range(self.tick, self.tick + self.n_action_steps):
            self._wait_for_tick(tick)
            if self._pending is not None and self._ready_at(self._pending, tick):
                record.update(self._deliver(self._pending))
                self._pending = None
            index = tick - self._current.tick + self.n_obs_steps - 1
            if index < self.horizon:
                self._last_action = self._current.chunks[:, index]
            else:
                held += 1
            actions.append(self._last_action)
        self.tick += self.n_action_steps
        record["held_steps"] = held
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


def _all_converged(record: dict[str, Any]) -> bool:
    """chunk_fn's `converged` (a bool or per-row list) as one bool; True when not reported."""
    value = record.get("converged", True)
    if isinstance(value, list | tuple | np.ndarray):
        return bool(np.all(value))
    return bool(value)


def timed_requests(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The requests made under a deadline: all but each episode's awaited first chunk."""
    return [r for r in requests if not r.get("startup")]


def summarize_realtime(calls: list[dict[str, Any]], requests: list[dict[str, Any]]) -> dict:
    """deadline_miss_rate (late or never delivered), anytime_rate (on time but unconverged), both
    over timed requests; held_step_rate (held ticks / ticks), skipped_requests."""
    timed = timed_requests(requests)
    ticks = sum(c.get("ticks", 0) for c in calls)
    return {
        "deadline_miss_rate": float(np.mean([r["late"] for r in timed])) if timed else None,
        "anytime_rate": float(np.mean([r["anytime"] for r in timed])) if timed else None,
        "held_step_rate": sum(c.get("held_steps", 0) for c in calls) / ticks if ticks else None,
        "skipped_requests": sum(bool(c.get("skipped_request")) for c in calls),
        "n_timed_requests": len(timed),
    }
