"""Real-time chunk execution: the env ticks on a control clock, chunks arrive when inference ends.

The robot side of the control loop (picard_client: numpy only; envs.realtime re-exports it
for the simulated robots of eval_policy.py). A robot does not wait for its policy.
`RealtimeController` is a `policy_fn` (of `envs.rollout.rollout`, or of a real robot's own loop,
as in examples/robot_loop.py) that plays the control loop of one robot: every tick (1 / control_hz
seconds) the env executes one action, and every Ta ticks it requests the next chunk from the
newest observation. Inference runs while the current chunk keeps executing; the new chunk takes
over at the first tick after it is ready. A chunk requested at tick n predicts the actions of
ticks n - (To - 1) .. n - (To - 1) + H - 1 (Diffusion Policy's alignment), so it is *due* at tick
n + lead (lead = H - To + 1 - Ta: the first tick the previous chunk no longer covers). A chunk
that is later than that is a deadline miss: the robot holds its last action until the chunk
arrives (held ticks are counted), then executes the chunk's actions for the ticks that remain.
The first chunk of an episode is awaited before the clock starts (the robot starts at rest).
The loop's settings (rate, clock, lead, hand-off, delays, ...) are one `RealtimeSettings` record
in SI units, checked when built; a config block in milliseconds becomes one through
`RealtimeSettings.from_config`, and `RealtimeSettings.report` gives results in milliseconds.

Two clocks, one schedule:
- ``clock="simulated"`` (default, deterministic for a deterministic ``clock``): inference runs
  synchronously and its latency, read from ``clock``, decides at which tick the chunk is ready;
  env steps cost no time. This is the schedule an asynchronous controller sees when inference is
  the only computation, and it is what the benchmarks report.
- ``clock="wall"``: inference runs in a worker thread while the main thread sleeps to each tick
  of the wall clock (``sleep``), and a chunk is ready at the first tick at which its thread has
  finished.

How a new chunk takes over from the one being executed is the *hand-off* (HANDOFFS):
- ``skip`` (skip-stale): the new chunk takes over at the first tick it is ready, at its action
  for that tick; the actions meant for the ticks its inference took are skipped.
- ``hold`` (synchronous): the robot holds its last action while each chunk is computed, then
  executes the chunk's Ta actions from the one meant for the request tick (no stale actions,
  but a pause at every boundary; a call then covers held + Ta ticks).
- ``ensemble`` (ACT's temporal ensembling): every tick executes the weighted mean of the
  actions that all delivered chunks still covering it planned for it, weights
  ``exp(-ensemble_decay * i)`` with i = 0 for the oldest chunk.
- ``inpaint`` (in the spirit of Real-Time Chunking): the request carries the committed actions
  as a `Prefix` (the executed past and the current chunk's actions for the ticks its inference
  is expected to take, weight 1; with ``soft_mask`` > 0 the rest of the current chunk with
  RTC's decaying weights times soft_mask) and the chunk function constrains the new chunk to
  them; it then takes over as with ``skip``, so the boundary continues what was executed.
``act`` (optional) is called with each tick's action (B, Da) at that tick, after the wall
clock reached it: how a real robot commands its actuators tick by tick (the returned actions
are the same ones, for a simulated env stepped after the call).
Holding sends the last action with the env's rate dims (``rate_action_dims``, e.g. OSC pose
deltas) set to 0, so a delta-action robot stands still instead of repeating its last motion.
``delay_s`` adds a fixed extra latency to every timed request (an experiment's injected
inference delay; slept in the worker on the wall clock). ``model_latency_s`` (simulated clock
only) replaces the measured latency of every timed request by that number: the schedule then
no longer depends on the machine's speed or load (same seeds, same actions, however busy the
machine), and a method that costs more compute is compared at the same delay as one that costs
less; the anytime budget is off then (it is wall time), so Picard / PCM run to their stopping
rule. The executed actions and which chunk drove each tick are kept per episode for the
boundary / within-chunk jerk (`jerk_metrics`).

Diffusion-agnostic: `chunk_fn(obs, budget_s) -> (chunks (B, H, Da), info)` is any chunking
policy (called as `chunk_fn(obs, budget_s, prefix)` with the ``inpaint`` hand-off); `budget_s`
is the time it may take (an anytime sampler stops there, others ignore it).
`info` is kept as it is in each `ChunkRequest.chunk`; its `converged` (an attribute or a mapping
key: a bool or per-row list) counts anytime deliveries, its `latency_ms` replaces the
controller's own measurement. The schedule is docs/design.md §8.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import numpy as np

from picard_client.records import record_dict

ChunkFn = Callable[..., tuple[np.ndarray, dict[str, Any]]]
CLOCKS = ("simulated", "wall")
HANDOFFS = ("hold", "skip", "ensemble", "inpaint")
HOLD_SOURCE = -1  # the source of a tick that held the last action
INPAINT_METHODS = ("replace", "guide")  # picard_sampler.INPAINT_METHODS (a test pins them equal)
GUIDANCE_CLIP = 5.0  # picard_sampler.GUIDANCE_CLIP: RTC's beta


class ChunkDims(NamedTuple):
    """A chunking policy's time layout: observed steps To, executed steps Ta, horizon H."""

    n_obs_steps: int
    n_action_steps: int
    horizon: int


def _is_number(value: Any, minimum: float, strict: bool = False) -> bool:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return ok and (value > minimum if strict else value >= minimum)


def _rule_failures(values: Mapping[str, Any], key: Callable[[str], str],
                   none: str) -> Iterator[tuple[str, str]]:
    """(field, what is allowed) for each value of a RealtimeSettings that cannot work, in
    order; ``key`` names a field (another field's name inside a message too) and ``none``
    spells None, so one list serves the record and the config block it is read from."""
    lead, model_latency = values["lead_steps"], values["model_latency_s"]
    rules = [
        ("control_hz", _is_number(values["control_hz"], 0, strict=True), "a number > 0"),
        ("clock", values["clock"] in CLOCKS, f"one of {list(CLOCKS)}"),
        ("budget_margin_s", _is_number(values["budget_margin_s"], 0), "a number >= 0"),
        ("lead_steps", lead is None or (isinstance(lead, int) and not isinstance(lead, bool)
                                        and lead >= 1), f"{none} or an int >= 1"),
        ("handoff", values["handoff"] in HANDOFFS, f"one of {list(HANDOFFS)}"),
        ("delay_s", _is_number(values["delay_s"], 0), "a number >= 0"),
        ("ensemble_decay", _is_number(values["ensemble_decay"], 0), "a number >= 0"),
        ("soft_mask", _is_number(values["soft_mask"], 0) and values["soft_mask"] <= 1,
         "a number in [0, 1]"),
        ("inpaint_method", values["inpaint_method"] in INPAINT_METHODS,
         f"one of {list(INPAINT_METHODS)}"),
        ("guidance_clip", _is_number(values["guidance_clip"], 0, strict=True), "a number > 0"),
        ("model_latency_s", model_latency is None or _is_number(model_latency, 0),
         f"{none} or a number >= 0"),
        ("model_latency_s", model_latency is None or values["clock"] == "simulated",
         f"{none} with {key('clock')}=wall (a modelled latency needs the simulated clock)"),
    ]
    return ((name, allowed) for name, ok, allowed in rules if not ok)


_FLOAT_FIELDS = ("control_hz", "budget_margin_s", "delay_s", "ensemble_decay", "soft_mask",
                 "guidance_clip", "model_latency_s")
CONFIG_MS_KEYS = {"budget_margin_s": "budget_margin_ms", "delay_s": "delay_ms",
                  "model_latency_s": "model_latency_ms"}
"""RealtimeSettings fields whose config key holds milliseconds (the others share the name)."""


@dataclass(frozen=True)
class RealtimeSettings:
    """How one robot's control loop runs (docs/design.md §8), in SI units; checked when built.

    ``control_hz``: ticks per second; ``clock``: "simulated" or "wall" (module docstring);
    ``lead_steps``: ticks from a request to its due tick (None: the most the chunk layout
    allows, ``max_lead_steps``); ``budget_margin_s``: the anytime budget is the deadline
    minus this (and minus ``delay_s``); ``handoff``: one of HANDOFFS; ``delay_s``: an injected
    extra latency per timed request; ``ensemble_decay``: the ``ensemble`` hand-off's weight
    decay; ``soft_mask``: the ``inpaint`` hand-off's soft-mask scale; ``inpaint_method`` /
    ``guidance_clip``: how the chunk side applies an inpaint prefix (replacement or RTC's
    guidance with that clip; the controller only passes the prefix); ``model_latency_s``
    (simulated clock only): every timed request takes this long instead of its measured time.
    eval_policy.py's ``realtime`` block holds the same settings with times in ms
    (``from_config``); results.json reports them in ms (``report``).
    """

    control_hz: float = 10.0
    clock: str = "simulated"
    lead_steps: int | None = None
    budget_margin_s: float = 0.005
    handoff: str = "skip"
    delay_s: float = 0.0
    ensemble_decay: float = 0.01
    soft_mask: float = 0.0
    inpaint_method: str = "replace"
    guidance_clip: float = GUIDANCE_CLIP
    model_latency_s: float | None = None

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, allowed in _rule_failures(values, str, "None"):
            raise ValueError(f"{name} must be {allowed}; got {values[name]!r}")
        for name in _FLOAT_FIELDS:  # 10 and 10.0 Hz are one setting, reported alike
            if values[name] is not None:
                object.__setattr__(self, name, float(values[name]))

    @classmethod
    def from_config(cls, block: Mapping[str, Any], prefix: str = "realtime.") -> RealtimeSettings:
        """The settings of a config block that holds the fields' values with times in ms
        (``budget_margin_ms``, ``delay_ms``, ``model_latency_ms``; other keys are ignored);
        a bad value is a ValueError naming its config key (``prefix`` + key) in config units."""
        names = [f.name for f in fields(cls)]
        raw = {name: block[CONFIG_MS_KEYS.get(name, name)] for name in names}
        values = dict(raw)
        for name in CONFIG_MS_KEYS:
            if _is_number(values[name], -math.inf):
                values[name] = float(values[name]) / 1e3

        def key(name: str) -> str:
            return prefix + CONFIG_MS_KEYS.get(name, name)

        for name, allowed in _rule_failures(values, key, "null"):
            raise ValueError(f"{key(name)} must be {allowed}; got {raw[name]!r}")
        return cls(**values)

    def resolved_lead_steps(self, dims: Sequence[int]) -> int:
        """``lead_steps`` for a policy of ``dims`` (n_obs_steps, n_action_steps, horizon),
        None resolved to the most it allows; ValueError when the layout leaves no lead or the
        lead is beyond it (the budget margin is the caller's to check against `deadline_s`;
        `budget_s` never goes below 0.1 ms)."""
        n_obs_steps, n_action_steps, horizon = dims
        max_lead = max_lead_steps(horizon, n_obs_steps, n_action_steps)
        if max_lead < 1:
            raise ValueError(
                f"real-time execution needs horizon - n_obs_steps + 1 - n_action_steps >= 1 "
                f"(a chunk must outlast its successor's inference by a tick); got horizon "
                f"{horizon}, n_obs_steps {n_obs_steps}, n_action_steps {n_action_steps}"
            )
        lead = max_lead if self.lead_steps is None else self.lead_steps
        if not 1 <= lead <= max_lead:
            raise ValueError(f"lead_steps must be in [1, {max_lead}]; got {lead}")
        return lead

    def deadline_s(self, lead_steps: int) -> float:
        """A chunk's deadline: ``lead_steps`` ticks."""
        return lead_steps / self.control_hz

    def budget_s(self, lead_steps: int) -> float | None:
        """The anytime sampling budget of a timed request: the deadline less the margin and
        the injected delay (at least 0.1 ms); None with a modelled latency (wall time then
        means nothing)."""
        if self.model_latency_s is not None:
            return None
        return max(self.deadline_s(lead_steps) - self.budget_margin_s - self.delay_s, 1e-4)

    def report(self, lead_steps: int) -> dict[str, Any]:
        """The settings as results.json's ``realtime`` record (times in ms)."""
        budget_s = self.budget_s(lead_steps)
        return {"control_hz": self.control_hz, "clock": self.clock, "lead_steps": lead_steps,
                "deadline_ms": _ms(self.deadline_s(lead_steps)), "budget_ms": _ms(budget_s),
                "handoff": self.handoff, "delay_ms": _ms(self.delay_s),
                "model_latency_ms": _ms(self.model_latency_s)}


def _ms(seconds: float | None) -> float | None:
    """Seconds as ms for a report, rounded to the nanosecond: a configured 1001 ms read in as
    1.001 s reports 1001.0, not the float product's 1000.9999999999999."""
    return None if seconds is None else round(seconds * 1e3, 6)


@dataclass
class Prefix:
    """The actions a new chunk must continue (the ``inpaint`` hand-off): `actions` (B, H, Da)
    on the new chunk's own timeline (index i is tick request_tick - (To - 1) + i) and their
    `weights` (H,) in [0, 1] (1: committed, the robot executes it whatever the new chunk says;
    0: free). `frozen` is the number of leading weight-1 steps."""

    actions: np.ndarray
    weights: np.ndarray

    @property
    def frozen(self) -> int:
        """Leading steps of weight 1."""
        below = np.flatnonzero(self.weights < 1)
        return int(below[0]) if below.size else len(self.weights)


def soft_mask_weights(n: int) -> np.ndarray:
    """Decaying weights of the n overlap steps after the frozen prefix (Real-Time Chunking's
    exponential soft mask): c = (n - r) / (n + 1), w = c (e^c - 1) / (e - 1) for r = 0..n-1."""
    c = (n - np.arange(n)) / (n + 1)
    return c * np.expm1(c) / np.expm1(1.0)


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
    (plus any injected delay) and `converged`, its info as `chunk`, `frozen_steps` (the
    inpaint prefix's committed steps, 0 without one) and `prefix_err` (the largest |chunk -
    prefix| over those steps, env action units; None without a prefix: how far the delivered
    chunk strays from what the robot committed to, 0 up to float rounding for an exact
    replacement, a measured bound for guidance)."""

    request_tick: int
    latency_ms: float = 0.0
    converged: bool = True
    chunk: Any = None
    ready_tick: int | None = None
    late: bool = False
    anytime: bool = False
    delivered: bool = True
    startup: bool = False
    frozen_steps: int = 0
    prefix_err: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-able fields: the chunk info's scalars, then the request's own."""
        own = {k: getattr(self, k) for k in (
            "latency_ms", "request_tick", "converged", "ready_tick", "late", "anytime",
            "delivered", "startup", "frozen_steps", "prefix_err")}
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
    prefix: Prefix | None = None
    index: int = HOLD_SOURCE  # its position in the controller's `requests` once delivered

    @property
    def tick(self) -> int:
        return self.record.request_tick


class RealtimeController:
    """Runs one robot's control loop on a clock; see the module docstring for the schedule.

    `requests` holds one ChunkRequest per request; each call returns a ControlStep as its
    record; `episodes` the executed actions (ticks, B, Da) and the source of each tick (the
    index of the request that drove it in `requests`' order of delivery, HOLD_SOURCE for a
    held tick) of every finished episode. Call `close()` (or use it as a context manager) to
    stop the worker thread.
    """

    def __init__(
        self,
        chunk_fn: ChunkFn,
        dims: Sequence[int],
        settings: RealtimeSettings | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
        rate_action_dims: Sequence[int] = (),
        act: Callable[[np.ndarray], None] | None = None,
    ):
        """`dims`: the chunk layout (n_obs_steps, n_action_steps, horizon); `settings`: how
        the loop runs (default RealtimeSettings()); `clock` / `sleep`: the time source (a fake
        one makes the simulated clock deterministic); `rate_action_dims`: the action dims
        zeroed while holding; `act`: called with each tick's action at that tick."""
        settings = RealtimeSettings() if settings is None else settings
        if not isinstance(settings, RealtimeSettings):
            raise TypeError(f"settings must be a RealtimeSettings; got {type(settings).__name__}")
        self.dims = ChunkDims(*dims)
        self.settings = settings
        self.chunk_fn = chunk_fn
        self.n_obs_steps, self.n_action_steps, self.horizon = self.dims
        self.lead_steps = settings.resolved_lead_steps(self.dims)
        self.deadline_s = settings.deadline_s(self.lead_steps)
        self.budget_s = settings.budget_s(self.lead_steps)
        self.rate_action_dims = list(rate_action_dims)
        self.clock = clock
        self.sleep = sleep
        self.act = act
        self.requests: list[ChunkRequest] = []
        self.episodes: list[tuple[np.ndarray, np.ndarray]] = []
        self._executor: ThreadPoolExecutor | None = None
        self._expected_latency_s = 0.0  # the last request's latency: the inpaint prefix's d
        self._start_episode()

    # ------------------------------------------------------------------------- episode state
    def _start_episode(self) -> None:
        self.tick = 0
        self._t0: float | None = None  # wall clock of tick 0
        self._current: _Request | None = None  # the chunk being executed
        self._pending: _Request | None = None  # the chunk being computed
        self._covering: list[_Request] = []  # ensemble: delivered chunks, oldest first
        self._last_action: np.ndarray | None = None
        self._executed: list[np.ndarray] = []  # (B, Da) per tick
        self._sources: list[int] = []  # per tick: index of the driving request, or HOLD_SOURCE

    def on_reset(self, env_index: int, seed: int | None) -> None:
        """rollout's hook: a new episode (or idling) restarts the clock. In-flight work is
        awaited and dropped so nothing leaks into the next episode; if its due tick had passed,
        it is recorded as a miss that was never delivered. A request whose chunk function
        raised (already raised to the caller, e.g. a lost episode) is dropped."""
        pending = self._pending
        if pending is not None and pending.future is not None:
            if pending.future.exception() is not None:
                pending = None
            else:
                self._finish(pending, *pending.future.result())
        if pending is not None and self.tick > pending.tick + self.lead_steps:
            record = pending.record
            record.late, record.anytime, record.delivered = True, False, False
            record.ready_tick = None
            self.requests.append(record)
        if self._executed:
            self.episodes.append((np.stack(self._executed), np.array(self._sources)))
        self._start_episode()

    # ------------------------------------------------------------------------------ chunks
    def _run_chunk(
        self, obs: Any, budget_s: float | None, prefix: Prefix | None = None, delay_s: float = 0.0
    ) -> tuple[np.ndarray, Any, float]:
        start = self.clock()
        args = (obs, budget_s) if prefix is None else (obs, budget_s, prefix)
        chunks, info = self.chunk_fn(*args)
        if delay_s and self.settings.clock == "wall":
            self.sleep(delay_s)
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
        prefix = self._prefix() if self.settings.handoff == "inpaint" else None
        if prefix is not None:
            request.record.frozen_steps = prefix.frozen
            request.prefix = prefix
        if self.settings.clock == "wall":
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk")
            request.future = self._executor.submit(
                self._run_chunk, obs, self.budget_s, prefix, self.settings.delay_s)
        else:
            self._finish(request, *self._run_chunk(obs, self.budget_s, prefix))
            request.record.ready_tick = request.tick + self._ticks_for(request.record.latency_ms)
        return request

    def _ticks_for(self, latency_ms: float) -> int:
        """Ticks a chunk of this latency takes to be ready (at least the next tick)."""
        return max(1, math.ceil(latency_ms / 1e3 * self.settings.control_hz - 1e-9))

    def _finish(self, request: _Request, chunks: np.ndarray, info: Any, latency_s: float) -> None:
        request.chunks = chunks
        record = request.record
        if request.prefix is not None:
            committed = request.prefix.weights >= 1
            record.prefix_err = float(np.abs(
                chunks[:, committed] - request.prefix.actions[:, committed]).max(initial=0.0))
        record.chunk = info
        record.latency_ms = float(_info_field(info, "latency_ms", latency_s * 1e3))
        modelled_s = self.settings.model_latency_s
        if modelled_s is not None and not record.startup:
            record.latency_ms = modelled_s * 1e3  # the modelled, not the measured
        if not record.startup:  # the injected delay (already slept on the wall clock)
            record.latency_ms += self.settings.delay_s * 1e3
        # the next prefix expects what this request took (with the delay it will get)
        self._expected_latency_s = record.latency_ms / 1e3 + record.startup * self.settings.delay_s
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
        request.index = len(self.requests) - 1
        self._covering = [r for r in self._covering if self._index(r, self.tick) < self.horizon]
        self._covering.append(request)
        return record

    def _index(self, request: _Request, tick: int) -> int:
        """The index of `request`'s chunk that is meant for tick `tick`."""
        return tick - request.tick + self.n_obs_steps - 1

    # ---------------------------------------------------------------------------- prefixes
    def _planned(self, tick: int) -> np.ndarray:
        """The action the robot will execute at a future tick if no new chunk arrives."""
        index = self._index(self._current, tick)
        if index < self.horizon:
            return self._current.chunks[:, index]
        return self._current.chunks[:, -1]

    def _prefix(self) -> Prefix:
        """The committed actions of a request asked now: the executed past, then the current
        chunk's actions for the ticks the request is expected to take (weight 1), then (with
        soft_mask > 0) the rest of the current chunk with decaying weights, scaled by it."""
        n, start = self.tick, self.tick - (self.n_obs_steps - 1)
        delay = min(self._ticks_for(self._expected_latency_s * 1e3), self.lead_steps)
        b, da = self._current.chunks.shape[0], self._current.chunks.shape[2]
        actions = np.zeros((b, self.horizon, da), dtype=self._current.chunks.dtype)
        weights = np.zeros(self.horizon)
        for i in range(self.horizon):
            tick = start + i
            if 0 <= tick < n and tick < len(self._executed):
                actions[:, i], weights[i] = self._executed[tick], 1.0
            elif n <= tick < n + delay:
                actions[:, i], weights[i] = self._planned(tick), 1.0
        covered = [i for i in range(self.horizon)
                   if start + i >= n + delay
                   and self._index(self._current, start + i) < self.horizon]
        if self.settings.soft_mask and covered:
            actions[:, covered] = np.stack([self._planned(start + i) for i in covered], axis=1)
            weights[covered] = self.settings.soft_mask * soft_mask_weights(len(covered))
        return Prefix(actions, weights)

    # ------------------------------------------------------------------------------- ticks
    def _wait_for_tick(self, tick: int) -> None:
        if self.settings.clock != "wall":
            return
        delay = self._t0 + tick / self.settings.control_hz - self.clock()
        if delay > 0:
            self.sleep(delay)

    def _action_at(self, tick: int) -> tuple[np.ndarray, int]:
        """The action executed at `tick` and its source (request index or HOLD_SOURCE)."""
        if self.settings.handoff == "ensemble":
            live = [r for r in self._covering if self._index(r, tick) < self.horizon]
            if live:
                weights = np.exp(-self.settings.ensemble_decay * np.arange(len(live)))
                planned = np.stack([r.chunks[:, self._index(r, tick)] for r in live])
                action = np.tensordot(weights / weights.sum(), planned, axes=1)
                return action.astype(planned.dtype), live[-1].index
            return self._held(), HOLD_SOURCE
        index = self._index(self._current, tick)
        if index < self.horizon:
            return self._current.chunks[:, index], self._current.index
        return self._held(), HOLD_SOURCE

    def _held(self) -> np.ndarray:
        """What the robot sends while it holds: its last action with the rate dims (an env's
        `rate_action_dims`, e.g. delta-pose commands) set to 0, so holding is standing still."""
        if not self.rate_action_dims:
            return self._last_action
        held = self._last_action.copy()
        held[..., self.rate_action_dims] = 0
        return held

    def _execute(self, action: np.ndarray, source: int) -> np.ndarray:
        self._last_action = action
        self._executed.append(action)
        self._sources.append(source)
        if self.act is not None:  # a real robot: command this tick's action now
            self.act(action)
        return action

    def _start(self, obs: Any, record: ControlStep) -> None:
        """Episode start: await the first chunk, then start the clock."""
        first = _Request(ChunkRequest(request_tick=self.tick, startup=True))
        self._finish(first, *self._run_chunk(obs, None))
        first.record.ready_tick = self.tick
        record.delivered = self._deliver(first)
        self._t0 = self.clock() - self.tick / self.settings.control_hz

    def __call__(self, obs: Any) -> tuple[np.ndarray, ControlStep]:
        """Actions (B, ticks, Da) for the next ticks from the observation at the current tick:
        Ta ticks, or with the ``hold`` hand-off the held ticks of the request plus Ta."""
        record = ControlStep(ticks=self.n_action_steps)
        if self.settings.handoff == "hold":
            return self._call_synchronous(obs, record)
        if self._current is None:
            self._start(obs, record)
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
            action, source = self._action_at(tick)
            held += source == HOLD_SOURCE
            actions.append(self._execute(action, source))
        self.tick += self.n_action_steps
        record.held_steps = held
        return np.stack(actions, axis=1), record

    def _call_synchronous(self, obs: Any, record: ControlStep) -> tuple[np.ndarray, ControlStep]:
        """The ``hold`` hand-off: hold while the chunk is computed, then execute Ta of it."""
        actions = []
        if self._current is None:
            self._start(obs, record)
        else:
            request = self._submit(obs)
            tick = self.tick
            while True:
                self._wait_for_tick(tick)
                if self._ready_at(request, tick):
                    break
                actions.append(self._execute(self._held(), HOLD_SOURCE))
                tick += 1
            record.held_steps = len(actions)
            record.delivered = self._deliver(request)
            self.tick = tick
        first = self.n_obs_steps - 1  # the action meant for the request tick
        for k in range(self.n_action_steps):
            self._wait_for_tick(self.tick + k)
            actions.append(self._execute(self._current.chunks[:, first + k], self._current.index))
        self.tick += self.n_action_steps
        record.ticks = len(actions)
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


def jerk_metrics(episodes: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Boundary against within-chunk jerk of executed actions (docs/design.md §5): the mean
    norm of the second difference a[k+1] - 2 a[k] + a[k-1] (env action units, mean over the
    batch) over the ticks k whose three sources are not all the same (a chunk boundary, or a
    hold starting or ending: `boundary_jerk`) and over those driven by one chunk throughout
    (`within_chunk_jerk`); runs of held ticks count in neither. None when there were none."""
    boundary: list[np.ndarray] = []
    within: list[np.ndarray] = []
    for actions, sources in episodes:
        if len(actions) < 3:
            continue
        second = np.linalg.norm(actions[2:] - 2 * actions[1:-1] + actions[:-2], axis=-1)
        second = second.mean(axis=-1)
        triples = np.stack([sources[:-2], sources[1:-1], sources[2:]])
        same = (triples == triples[0]).all(axis=0)
        boundary.append(second[~same])
        within.append(second[same & (triples[0] != HOLD_SOURCE)])
    boundary_all = np.concatenate(boundary) if boundary else np.zeros(0)
    within_all = np.concatenate(within) if within else np.zeros(0)
    return {
        "boundary_jerk": float(boundary_all.mean()) if boundary_all.size else None,
        "within_chunk_jerk": float(within_all.mean()) if within_all.size else None,
        "n_boundary_ticks": int(boundary_all.size),
    }


def summarize_realtime(steps: list[ControlStep], requests: list[ChunkRequest],
                       episodes: list[tuple[np.ndarray, np.ndarray]] | None = None) -> dict:
    """The real-time metrics of docs/design.md §5: deadline_miss_rate (late or never delivered)
    and anytime_rate (on time but unconverged) over timed requests; held_step_rate (held ticks /
    ticks) over the controller's steps; skipped_requests; with the controller's `episodes`, the
    boundary and within-chunk jerk (jerk_metrics); with inpaint prefixes, prefix_err_max /
    prefix_err_mean (ChunkRequest.prefix_err) over the requests that carried one."""
    timed = timed_requests(requests)
    ticks = sum(s.ticks for s in steps)
    jerk = jerk_metrics(episodes or [])
    prefix_errs = [r.prefix_err for r in requests if r.prefix_err is not None]
    return {
        **jerk,
        "prefix_err_max": max(prefix_errs) if prefix_errs else None,
        "prefix_err_mean": float(np.mean(prefix_errs)) if prefix_errs else None,
        "deadline_miss_rate": float(np.mean([r.late for r in timed])) if timed else None,
        "anytime_rate": float(np.mean([r.anytime for r in timed])) if timed else None,
        "held_step_rate": sum(s.held_steps for s in steps) / ticks if ticks else None,
        "skipped_requests": sum(s.skipped_request for s in steps),
        "n_timed_requests": len(timed),
    }
