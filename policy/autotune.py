"""`sampler=auto`: the exact sampler configuration with the lowest measured chunk latency here.

Every candidate converges to the same sequential chunk (Picard and PCM, scan or Parareal walk,
any window), so choosing among them is pure speed, and speed depends on the model, the batch,
the device, the thread count and the runtime: a many-row call costs little more than a one-row
call on a GPU and nearly proportionally more on a small CPU. So it is measured, not assumed
(docs/design.md §4.11):

1. every candidate (sequential; Picard / PCM over each window, scan and, with a fitted
   propagator, Parareal) samples one chunk of real observations under the first runtime, the
   likely fastest first (a prior: ~T / window + 6 rounds x the measured cost of a call of its
   rows), each under an anytime budget of 1.5x the fastest so far (a slower one is dropped);
2. the fastest two sample `chunks - 1` more; a candidate's latency is its median;
3. for each other runtime (e.g. onnxruntime, fast at few rows per call), the denoiser's cost
   per call is timed at the row counts the candidates use, and a candidate's latency there is
   predicted as its measured latency plus rounds x (that runtime's call cost - the first's);
   the winner, if predicted on another runtime, is then timed there, and kept only if it is
   faster in fact.

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

CACHE_VERSION = 1
"""Bump when the calibration procedure changes: older cached choices are then redone."""
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
        return (f"auto: {self.candidate.short} on {device} x{threads}, B={batch}: "
                f"{speedup:.2f}x sequential {self.sampler.schedule.name.upper()}-"
                f"{self.sampler.num_steps} ({cal.get('chosen_ms', 0):.0f} vs "
                f"{cal.get('sequential_ms', 0):.0f} ms per chunk), {how}")


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

    from policy.checkpoint import weights_fingerprint

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
    seed: int = 0, clock: Callable[[], float] = time.perf_counter,
) -> AutoChoice:
    """The fastest exact configuration for `policy` on observations `obs` (its batch is the
    batch calibrated for), on `base`'s schedule and knobs; leaves the policy on the chosen
    runtime. `runtime_options` go to every runtime but eager (e.g. onnxruntime's cache_dir).
    Cached under `cache_dir` (None: no cache)."""
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
    generator = torch.Generator().manual_seed(seed)
    noises = [torch.randn(base.noise_shape(batch, policy.horizon, policy.action_dim),
                          generator=generator) for _ in range(chunks)]
    timings: dict[Candidate, list[float]] = {}
    rounds: dict[Candidate, list[int]] = {}

    def time_chunks(candidate: Candidate, which: Sequence[int],
                    budget_ms: float | None = None) -> bool:
        """Time `candidate` on the chunks `which`; False (and no timing kept) if a chunk ran
        out of `budget_ms` unconverged: it cannot win."""
        sampler = candidate.sampler(base)
        for i in which:
            timed = time_chunk(policy, cond, sampler, noises[i], clock, budget_ms)
            if timed is None:
                pruned.append(candidate)
                return False
            timings.setdefault(candidate, []).append(timed[0])
            rounds.setdefault(candidate, []).append(timed[1])
        return True

    pruned: list[Candidate] = []
    pool = candidates(policy, base, windows, first)
    sequential = pool[0]
    time_chunks(sequential, [0])  # the baseline, and the slowest that still counts
    # likely fastest first, so the pruning bound is tight early: calls x cost of a call
    costs = _call_costs(policy, sorted({_rows(c, base, batch) for c in pool}), cond)
    expected = {c: _prior_rounds(c, base) * costs[_rows(c, base, batch)] for c in pool[1:]}
    for candidate in sorted(pool[1:], key=expected.get):
        bound = min(timings[c][0] for c in timings)
        time_chunks(candidate, [0], budget_ms=PRUNE_FACTOR * bound)
    ranked = sorted(timings, key=lambda c: timings[c][0])
    for candidate in ranked[:KEEP]:
        if candidate is not sequential or candidate in ranked[:1]:
            time_chunks(candidate, range(1, chunks))
    measured = {c: statistics.median(timings[c]) for c in timings}
    sequential_ms = measured[sequential]
    best = min(measured, key=measured.get)
    predictions: dict[str, float] = {}
    for runtime in runtimes[1:]:
        finalists = sorted(measured, key=measured.get)[:KEEP]
        predicted = _predict_on_runtime(policy, runtime, options, finalists, measured, rounds,
                                        base, cond, batch, costs)
        if predicted is None:
            continue
        predictions.update({c.short: ms for c, ms in predicted.items()})
        fastest = min(predicted, key=predicted.get)
        if predicted[fastest] < measured[best]:
            _use_runtime(policy, runtime, options)
            time_chunks(fastest, range(chunks))
            measured[fastest] = statistics.median(timings[fastest])
            if measured[fastest] < measured[best]:
                best = fastest
        _use_runtime(policy, first, options)
    _use_runtime(policy, best.runtime, options)
    calibration = {
        "seconds": clock() - start, "batch": batch, "chunks": chunks,
        "threads": torch.get_num_threads(), "device": str(policy.device),
        "chosen": best.short, "chosen_ms": measured[best], "sequential_ms": sequential_ms,
        "speedup": sequential_ms / measured[best],
        "candidates": [{"candidate": c.short, "latency_ms": statistics.median(timings[c]),
                        "chunks_timed": len(timings[c]),
                        "rounds_mean": statistics.fmean(rounds[c])} for c in timings],
        "pruned": [c.short for c in pruned], "predicted_ms": predictions, "cached": False,
    }
    if cache is not None:
        _write_cache(cache, best, calibration)
        calibration["cache"] = str(cache)
    return AutoChoice(best, best.sampler(base), calibration)


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


def _call_costs(policy: DiffusionPolicy, row_counts: Sequence[int], cond: torch.Tensor,
                repeats: int = 3) -> dict[int, float]:
    """Median ms of one denoiser call at each row count (after one warm-up call)."""
    costs = {}
    for n in row_counts:
        x = torch.randn(n, policy.horizon, policy.action_dim)
        t = torch.full((n,), 1, dtype=torch.long)
        c = cond.repeat((n + cond.shape[0] - 1) // cond.shape[0], 1)[:n]
        with torch.inference_mode():
            policy.denoiser(x, t, c)
            samples = []
            for _ in range(repeats):
                tick = time.perf_counter()
                policy.denoiser(x, t, c)
                samples.append((time.perf_counter() - tick) * 1e3)
        costs[n] = statistics.median(samples)
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
    from policy.checkpoint import atomic_write

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
