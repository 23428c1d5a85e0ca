"""`sampler=auto`: the exact sampler configuration with the lowest measured chunk latency here.

Every candidate converges to the same sequential chunk (Picard and PCM, scan or Parareal walk,
any window), so choosing among them is pure speed, and speed depends on the model, the batch,
the device, the thread count and the runtime: a many-row call costs little more than a one-row
call on a GPU and nearly proportionally more on a small CPU. So it is measured, not assumed
(docs/design.md §4.11):

1. the call cost of the denoiser is timed at every row count a candidate uses (window x
   batch); at one robot sequential samples one chunk (the baseline and first budget), at a
   batch its latency is predicted as T x the cost of a call of B rows (exact but for noise);
2. every other candidate (Picard / PCM over each window, scan and, with a fitted propagator,
   Parareal) samples one chunk of the FIRST observation only, the likely fastest first (a
   prior: ~T / window + 6 rounds x the cost of a call of its rows), for its rounds: at one
   robot that chunk is the measurement itself, under an anytime budget of 1.5x the fastest so
   far; at a batch its latency there is predicted as (rounds + 1) x the cost of a call of its
   rows at the batch (a batch waits for its slowest sample), and the chunk is capped at the
   rounds that keep it within 1.5x the best so far;
3. at one robot the fastest two sample `chunks - 1` more chunks (sequential only if it is the
   fastest: it is the baseline, not a contender there); at a batch the two predicted
   fastest (sequential among them if it is) sample `chunks` chunks of the whole batch, in
   turn (A, B, A, B: a drift in the machine's speed hits both alike); when every finalist
   measures slower than sequential's prediction (the predictions were off: a busy machine),
   sequential samples the batch too. A candidate's latency is its median, and the choice is
   the fastest measured;
4. for each other runtime (e.g. onnxruntime, fast at few rows per call), the denoiser's cost
   per call is timed at the row counts the finalists use, and a finalist's latency there is
   predicted as its measured latency plus rounds x (that runtime's call cost - the first's);
   the winner, if predicted on another runtime, is then timed there, and kept only if it is
   faster in fact.

Exploring on one observation instead of the batch is what keeps calibration short at a batch:
a chunk of one observation costs a tenth of a chunk of ten on a CPU, and the candidates' call
costs differ only by their rows.

The choice is cached on disk, keyed by the weights (PCM and propagators included), device,
threads, batch, schedule and knobs, runtimes and package versions: a later run on the same
machine reuses it in no time; `recalibrate=True` redoes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from picard_sampler import Sampler
from policy.diffusion_policy import DiffusionPolicy, Obs

CACHE_VERSION = 2
"""Bump when the calibration procedure changes: older cached choices are then redone (2: a
batch explored on one observation, its finalists timed in turn on the whole batch)."""
KEEP = 2
"""Candidates (the fastest on their first chunk) that get the further timed chunks."""
PRUNE_FACTOR = 1.5
"""A candidate whose first chunk takes longer than this times the fastest so far is stopped
(an anytime budget) and dropped: it cannot win, and calibration stays short."""


@dataclass(frozen=True)
class Candidate:
    """One exact configuration: method (sequential, picard, pcm), window (None: all T steps),
    walk (scan or parareal) and the denoiser's runtime."""

    method: str
    window: int | None = None
    update: str = "scan"
    runtime: str = "eager"

    def sampler(self, base: Sampler) -> Sampler:
        """`base` (schedule, tol, max_rounds, budget_s) with this method, window and walk."""
        if self.method == "sequential":
            return dataclasses.replace(base, method="sequential", window=None, update="scan")
        return dataclasses.replace(base, method=self.method, window=self.window,
                                   update=self.update)

    @property
    def short(self) -> str:
        """'picard w8 parareal', 'sequential', with '+onnxruntime' off the eager runtime."""
        name = self.method if self.method == "sequential" else (
            f"{self.method} w{self.window or 'full'} {self.update}")
        return name if self.runtime == "eager" else f"{name} +{self.runtime}"


@dataclass
class AutoChoice:
    """The chosen candidate, its sampler, and the calibration that chose it (for results)."""

    candidate: Candidate
    sampler: Sampler
    calibration: dict[str, Any] = field(default_factory=dict)

    def line(self, device: str, threads: int, batch: int) -> str:
        """The one line a run prints about its choice."""
        cal = self.calibration
        speedup = cal.get("speedup")
        how = ("cached calibration" if cal.get("cached")
               else f"calibrated in {cal.get('seconds', 0):.1f} s")
        # at a batch sequential may be predicted from its call cost, not timed: say so
        about, predicted = (("", "") if cal.get("sequential_measured", True)
                            else ("~", ", sequential predicted from its call cost"))
        return (f"auto: {self.candidate.short} on {device} x{threads}, B={batch}: "
                f"{about}{speedup:.2f}x sequential {self.sampler.schedule.name.upper()}-"
                f"{self.sampler.num_steps} ({cal.get('chosen_ms', 0):.0f} vs {about}"
                f"{cal.get('sequential_ms', 0):.0f} ms per chunk{predicted}), {how}")


def candidates(policy: DiffusionPolicy, base: Sampler, windows: Sequence[int | None],
               runtime: str) -> list[Candidate]:
    """Sequential plus Picard (and PCM with an attached PCM) over `windows` with the scan walk
    and, where a propagator is fitted for the schedule, the Parareal walk."""
    steps = base.num_steps
    sizes = sorted({None if w is None or w >= steps else int(w) for w in windows},
                   key=lambda w: steps if w is None else w)
    updates = ["scan"] + (["parareal"] if policy.has_propagator(base.schedule) else [])
    methods = ["picard"] + (["pcm"] if policy.pcm is not None else [])
    found = [Candidate("sequential", runtime=runtime)]
    found += [Candidate(m, w, u, runtime) for m in methods for w in sizes for u in updates]
    return found


def cache_key(policy: DiffusionPolicy, base: Sampler, batch: int, windows: Sequence[Any],
              runtimes: Sequence[str], runtime_options: Mapping[str, Any]) -> str:
    """What the choice depends on, hashed: weights (PCM included) and propagators, device,
    threads, batch, schedule and knobs, candidate windows, runtimes, versions."""
    from importlib.metadata import PackageNotFoundError, version

    from policy.file_io import weights_fingerprint

    try:
        package = version("picard-policy")
    except PackageNotFoundError:
        package = "source"
    propagators = policy.__dict__.get("_propagators", {})
    parts = {
        "cache_version": CACHE_VERSION, "weights": weights_fingerprint(policy.state_dict()),
        "propagators": weights_fingerprint({k: v.cpu() for k, v in propagators.items()}),
        "device": str(policy.device), "threads": torch.get_num_threads(), "batch": batch,
        "sampler": base.config, "windows": [None if w is None else int(w) for w in windows],
        "runtimes": list(runtimes), "runtime_options": dict(runtime_options),
        "torch": torch.__version__, "package": package,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def choose_sampler(
    policy: DiffusionPolicy, obs: Obs, base: Sampler, *, windows: Sequence[int | None],
    runtimes: Sequence[str] = ("eager",), runtime_options: Mapping[str, Any] | None = None,
    chunks: int = 2, cache_dir: str | Path | None = None, recalibrate: bool = False,
    clock: Callable[[], float] = time.perf_counter,
) -> AutoChoice:
    """The fastest exact configuration for `policy` on observations `obs` (its batch is the
    batch calibrated for), on `base`'s schedule and knobs; leaves the policy on the chosen
    runtime. `runtime_options` go to every runtime but eager (e.g. onnxruntime's cache_dir).
    Cached under `cache_dir` (None: no cache). The procedure: module docstring and
    docs/design.md §4.11."""
    if chunks < 1:
        raise ValueError(f"calibration chunks must be >= 1; got {chunks}")
    options = dict(runtime_options or {})
    cond = policy.encode(obs)
    batch = cond.shape[0]
    cache = None
    if cache_dir is not None:
        key = cache_key(policy, base, batch, windows, runtimes, options)
        cache = Path(cache_dir).expanduser() / "auto" / f"{key[:32]}.json"
        if cache.is_file() and not recalibrate:
            cached = _read_cache(cache)
            if cached is not None:
                candidate = Candidate(**cached["candidate"])
                _use_runtime(policy, candidate.runtime, options)
                calibration = {**cached["calibration"], "cached": True, "cache": str(cache)}
                return AutoChoice(candidate, candidate.sampler(base), calibration)
    start = clock()
    first = runtimes[0]
    _use_runtime(policy, first, options)
    generator = torch.Generator().manual_seed(0)
    noises = [torch.randn(base.noise_shape(batch, policy.horizon, policy.action_dim),
                          generator=generator) for _ in range(chunks)]
    pool = candidates(policy, base, windows, first)
    sequential = pool[0]
    phases = {}
    costs = _call_costs(policy, sorted({_rows(c, base, batch) for c in pool}), cond)
    phases["call_costs"] = clock() - start
    run = _Calibration(policy, base, cond, noises, clock, costs)
    if batch == 1:  # the baseline and the first anytime budget
        run.time_at_batch(sequential, [0])
    else:  # T calls of B rows: predicted as closely as measured, and timed if a finalist
        run.predicted[sequential] = base.num_steps * run.call_cost(sequential)
        run.rounds[sequential] = [base.num_steps]
    phases["sequential"] = clock() - start - sum(phases.values())
    run.explore(pool[1:])
    phases["explore"] = clock() - start - sum(phases.values())
    if batch == 1:  # explored on the batch itself: the fastest get the further chunks
        ranked = sorted(run.timings, key=lambda c: run.timings[c][0])[:KEEP]
        run.time_interleaved([c for c in ranked if c is not sequential or c is ranked[0]],
                             range(1, chunks))
    else:  # the KEEP predicted fastest (sequential too), timed on the batch
        run.time_interleaved(run.finalists(), range(chunks))
        if sequential not in run.timings and all(
                statistics.median(ms) > run.predicted[sequential] for ms in run.timings.values()):
            # the finalists' predictions were too low (a busy machine, or calls that cost more
            # on the batch than alone): sequential's prediction is no measurement, time it too
            run.time_at_batch(sequential, range(chunks))
    if not run.timings:  # every finalist stopped by a max_rounds / budget_s set by the user
        run.time_at_batch(sequential, range(chunks))
    phases["finalists"] = clock() - start - sum(phases.values())
    measured = {c: statistics.median(ms) for c, ms in run.timings.items()}
    best = min(measured, key=measured.get)
    predictions: dict[str, float] = {}
    for runtime in runtimes[1:]:
        ranked = sorted(measured, key=measured.get)[:KEEP]
        predicted = _predict_on_runtime(policy, runtime, options, ranked, measured,
                                        run.rounds, base, cond, batch, costs)
        if predicted is None:
            continue
        predictions.update({c.short: ms for c, ms in predicted.items()})
        fastest = min(predicted, key=predicted.get)
        if predicted[fastest] < measured[best]:
            _use_runtime(policy, runtime, options)
            run.time_at_batch(fastest, range(chunks))
            if fastest in run.timings:  # else a max_rounds / budget_s stopped it there
                measured[fastest] = statistics.median(run.timings[fastest])
                if measured[fastest] < measured[best]:
                    best = fastest
        _use_runtime(policy, first, options)
    _use_runtime(policy, best.runtime, options)
    phases["other_runtimes"] = clock() - start - sum(phases.values())
    sequential_measured = sequential in measured
    sequential_ms = measured[sequential] if sequential_measured else run.predicted[sequential]
    calibration = {
        "seconds": clock() - start, "batch": batch, "chunks": chunks,
        "threads": torch.get_num_threads(), "device": str(policy.device),
        "chosen": best.short, "chosen_ms": measured[best], "sequential_ms": sequential_ms,
        "sequential_measured": sequential_measured, "speedup": sequential_ms / measured[best],
        "candidates": [run.summary(c) for c in pool if c in run.rounds],
        "pruned": [c.short for c in run.pruned], "predicted_ms": predictions,
        "phases_s": phases, "cached": False,
    }
    _use_runtime(policy, first, options)
    calibration.update(_steadiness(policy, cond, costs, run, sequential))
    _use_runtime(policy, best.runtime, options)
    if calibration["busy"]:
        import warnings

        warnings.warn(
            f"sampler=auto: the machine's speed changed while calibrating (a busy machine? "
            f"call cost drift {calibration['call_cost_drift']:.1f}x, sequential chunk "
            f"{calibration['sequential_vs_call_costs'] or 0:.1f}x its calls): the choice is used "
            f"for this run but not cached", stacklevel=2)
    elif cache is not None:
        _write_cache(cache, best, calibration)
        calibration["cache"] = str(cache)
    return AutoChoice(best, best.sampler(base), calibration)


BUSY_RATIO = 2.0
"""A calibration is not cached (the run still uses its choice) when the machine's speed
changed under it, so that its choice may not hold tomorrow (another job, a busy core): the
cost of a call of the batch's rows, timed again at the end, differs from the first timing by
more than this factor either way, or the timed sequential chunk took more than this times T
such calls (on the quiet VM sequential chunks took 0.8-1.0x, docs/results/auto.md)."""


def _steadiness(policy: DiffusionPolicy, cond: torch.Tensor, costs: Mapping[int, float],
                run: _Calibration, sequential: Candidate) -> dict[str, Any]:
    """Whether the machine kept its speed while calibrating (BUSY_RATIO): the drift of the
    call cost at the batch's rows, start to end, and the timed sequential chunk against T of
    those calls (None when sequential was not timed)."""
    batch = cond.shape[0]
    again = _call_costs(policy, [batch], cond)[batch]
    drift = max(again / costs[batch], costs[batch] / again)
    timed = run.timings.get(sequential)
    ratio = (statistics.median(timed) / (run.base.num_steps * costs[batch]) if timed
             else None)
    return {"call_cost_drift": drift, "sequential_vs_call_costs": ratio,
            "busy": drift > BUSY_RATIO or (ratio is not None and ratio > BUSY_RATIO)}


ROUNDS_MARGIN = 1
"""Rounds added to a candidate's one-robot round count to predict it for a batch: a batched
chunk runs until its slowest sample converges (measured on PushT DDPM-100: 0-1 rounds more at
B=10 than on the first observation alone)."""


class _Calibration:
    """The measurements of one calibration: each candidate's rounds on the first observation
    (a one-row-per-slot chunk, cheap), its latency predicted for the batch from them and the
    measured cost of a call of its rows, and the finalists timed on the whole batch."""

    def __init__(self, policy: DiffusionPolicy, base: Sampler, cond: torch.Tensor,
                 noises: Sequence[torch.Tensor], clock: Callable[[], float],
                 costs: Mapping[int, float]) -> None:
        self.policy, self.base, self.cond, self.noises, self.clock = (
            policy, base, cond, noises, clock)
        self.batch = cond.shape[0]
        self.costs = costs
        self.timings: dict[Candidate, list[float]] = {}  # ms per chunk of the whole batch
        self.rounds: dict[Candidate, list[int]] = {}
        self.predicted: dict[Candidate, float] = {}  # at a batch: ms per chunk, predicted
        self.pruned: list[Candidate] = []

    def call_cost(self, candidate: Candidate) -> float:
        """ms of one denoiser call of `candidate`'s rows at the calibrated batch."""
        return self.costs[_rows(candidate, self.base, self.batch)]

    def explore(self, pool: Sequence[Candidate]) -> None:
        """Rounds (and, at one robot, latency) of every candidate of `pool` on the first
        observation, the likely fastest first; one that cannot come within PRUNE_FACTOR of the
        best so far (the sequential baseline included) is stopped early and dropped: by an
        anytime budget at one robot, by a round cap at a batch, where a round's cost is known
        from the call costs."""
        expected = {c: _prior_rounds(c, self.base) * self.call_cost(c) for c in pool}
        for candidate in sorted(pool, key=expected.get):
            bound = PRUNE_FACTOR * min([*self.predicted.values(),
                                        *(ms[0] for ms in self.timings.values())])
            sampler = candidate.sampler(self.base)
            if self.batch == 1:
                timed = time_chunk(self.policy, self.cond, sampler, self.noises[0], self.clock,
                                   budget_ms=bound)
            else:
                cap = int(bound // self.call_cost(candidate)) - ROUNDS_MARGIN
                if cap < 1:
                    self.pruned.append(candidate)
                    continue
                if sampler.max_rounds is not None:
                    cap = min(cap, sampler.max_rounds)
                sampler = dataclasses.replace(sampler, max_rounds=cap)
                timed = time_chunk(self.policy, self.cond[:1], sampler, self.noises[0][:, :1],
                                   self.clock)
            if timed is None:
                self.pruned.append(candidate)
                continue
            ms, rounds = timed
            self.rounds[candidate] = [rounds]
            if self.batch == 1:
                self.timings[candidate] = [ms]
            else:
                self.predicted[candidate] = (rounds + ROUNDS_MARGIN) * self.call_cost(candidate)

    def finalists(self) -> list[Candidate]:
        """The KEEP candidates predicted fastest for the batch (sequential included)."""
        return sorted(self.predicted, key=self.predicted.get)[:KEEP]

    def time_at_batch(self, candidate: Candidate, which: Sequence[int]) -> None:
        """Time `candidate` on the whole batch, on the calibration chunks `which`."""
        sampler = candidate.sampler(self.base)
        if self.batch > 1 and candidate not in self.timings:
            self.rounds[candidate] = []  # the batch's own rounds replace the first sample's
        for i in which:
            timed = time_chunk(self.policy, self.cond, sampler, self.noises[i], self.clock)
            if timed is None:  # a max_rounds / budget_s the user set: it cannot converge
                self.pruned.append(candidate)
                self.timings.pop(candidate, None)
                return
            self.timings.setdefault(candidate, []).append(timed[0])
            self.rounds.setdefault(candidate, []).append(timed[1])

    def time_interleaved(self, finalists: Sequence[Candidate], which: Sequence[int]) -> None:
        """Time the finalists on the chunks `which` in turn (A, B, A, B ...), so a drift in the
        machine's speed while calibrating hits them alike."""
        for i in which:
            for candidate in finalists:
                if candidate not in self.pruned:
                    self.time_at_batch(candidate, [i])

    def summary(self, candidate: Candidate) -> dict[str, Any]:
        """What results.json records of one candidate."""
        timed = self.timings.get(candidate)
        return {"candidate": candidate.short,
                "latency_ms": statistics.median(timed) if timed else None,
                "predicted_ms": self.predicted.get(candidate),
                "chunks_timed": len(timed or []),
                "rounds_mean": statistics.fmean(self.rounds[candidate])
                if self.rounds.get(candidate) else None}


def time_chunk(policy: DiffusionPolicy, cond: torch.Tensor, sampler: Sampler,
               noise: torch.Tensor, clock: Callable[[], float] = time.perf_counter,
               budget_ms: float | None = None) -> tuple[float, int] | None:
    """(ms, rounds) of one chunk sampled from the encoded condition `cond`; None when it ran
    out of `budget_ms` unconverged (the anytime stop of Picard / PCM samplers)."""
    tick = clock()
    _, stats = policy.sample_chunk(cond, sampler, noise=noise, clock=clock,
                                   budget_s=None if budget_ms is None else budget_ms / 1e3)
    elapsed = (clock() - tick) * 1e3
    return (elapsed, int(stats.rounds)) if all(stats.converged_per_sample) else None


def _predict_on_runtime(policy: DiffusionPolicy, runtime: str, options: Mapping[str, Any],
                        finalists: Sequence[Candidate], measured: Mapping[Candidate, float],
                        rounds: Mapping[Candidate, Sequence[int]], base: Sampler,
                        cond: torch.Tensor, batch: int, first_cost: Mapping[int, float],
                        ) -> dict[Candidate, float] | None:
    """Each finalist's latency predicted on `runtime`: measured + rounds x (its call cost at
    the candidate's rows - the first runtime's, `first_cost` by row count, measured when the
    candidates were ordered); None when the runtime cannot run here."""
    rows = {c: _rows(c, base, batch) for c in finalists}
    try:
        _use_runtime(policy, runtime, options)
    except (ValueError, RuntimeError):
        return None
    cost = _call_costs(policy, sorted(set(rows.values())), cond)
    predicted = {}
    for c in finalists:
        calls = statistics.fmean(rounds[c])
        shifted = measured[c] + calls * (cost[rows[c]] - first_cost[rows[c]])
        # never faster than its denoiser calls alone (timing noise can push the shift below)
        predicted[dataclasses.replace(c, runtime=runtime)] = max(shifted, calls * cost[rows[c]])
    return predicted


def _rows(candidate: Candidate, base: Sampler, batch: int) -> int:
    """Rows of one denoiser call of `candidate`: window x batch (sequential: the batch)."""
    if candidate.method == "sequential":
        return batch
    return batch * (candidate.window or base.num_steps)


def _prior_rounds(candidate: Candidate, base: Sampler) -> float:
    """A rough round count before anything is measured (only to order the candidates): about
    T / window rounds to sweep the window along the steps, plus a few to converge (measured on
    PushT DDPM-100: 46, 29, 19, 13 and 8 rounds at windows 4, 8, 16, 32 and 100)."""
    steps = base.num_steps
    return steps / (candidate.window or steps) + 6


CHEAP_ROWS = 64
"""Calls of up to this many rows are timed three times (median); bigger ones, which cost
tens to hundreds of ms on a CPU and vary less, once."""


def _call_costs(policy: DiffusionPolicy, row_counts: Sequence[int], cond: torch.Tensor,
                ) -> dict[int, float]:
    """ms of one denoiser call at each row count, after one warm-up call at the smallest."""
    costs: dict[int, float] = {}

    def call(n: int) -> float:
        x = torch.randn(n, policy.horizon, policy.action_dim)
        t = torch.full((n,), 1, dtype=torch.long)
        c = cond.repeat((n + cond.shape[0] - 1) // cond.shape[0], 1)[:n]
        tick = time.perf_counter()
        policy.denoiser(x, t, c)
        return (time.perf_counter() - tick) * 1e3

    with torch.inference_mode():
        call(min(row_counts))
        for n in row_counts:
            costs[n] = statistics.median(call(n) for _ in range(3 if n <= CHEAP_ROWS else 1))
    return costs


def _use_runtime(policy: DiffusionPolicy, runtime: str, options: Mapping[str, Any]) -> None:
    """Put `runtime` under the policy's denoiser (options for non-eager runtimes only)."""
    policy.use_runtime(runtime, **({} if runtime == "eager" else dict(options)))


def _read_cache(path: Path) -> dict[str, Any] | None:
    """A cached choice, or None when the file is unreadable or not one of ours (redone)."""
    try:
        data = json.loads(path.read_text())
        Candidate(**data["candidate"])
        return data if isinstance(data.get("calibration"), dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(path: Path, candidate: Candidate, calibration: Mapping[str, Any]) -> None:
    """The choice as JSON, written atomically."""
    from policy.file_io import atomic_write

    text = json.dumps({"candidate": dataclasses.asdict(candidate),
                       "calibration": dict(calibration)}, indent=1)
    try:
        atomic_write(path, lambda f: f.write(text.encode()))
    except OSError as e:  # a read-only cache only costs the next run a calibration
        import warnings

        warnings.warn(f"sampler=auto: could not cache the choice in {path} ({e.strerror})",
                      stacklevel=2)


def default_cache_dir() -> Path:
    """Where choices are cached unless told: $PICARD_CACHE or ~/.cache/picard-policy."""
    return Path(os.environ.get("PICARD_CACHE", "~/.cache/picard-policy")).expanduser()
