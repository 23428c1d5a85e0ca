"""Samplers over a denoiser and a schedule: sequential, Picard (ParaDiGMS / scan) and PCM.

Every sampler is a deterministic function of ``(denoiser, schedule, noise, cond)``: all noise is
drawn up front, ``noise`` of shape ``(T+1, B, H, D)`` with ``noise[0] = x_T`` and ``noise[i+1]``
the noise of step ``i`` (docs/design.md §4.1). So sequential, Picard and PCM can be compared
sample for sample, and Picard's fixed point IS the sequential sample.

``denoiser(x[N, H, D], t[N] long, cond[N, ...] | None) -> model_out[N, H, D]`` where ``t`` holds
training timesteps (the values diffusers passes). Samplers return ``(x, stats)``: ``x`` the
``(B, H, D)`` sample (``X[T]``) and ``stats`` a ``SampleStats`` record (rounds, NFE, convergence
per sample, wall time and the final ``trajectory`` ``(T+1, B, H, D)``, reusable as a warm start
``init``). The maths is in docs/design.md §4.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from picard_sampler.anderson import Anderson
from picard_sampler.inpaint import Inpaint
from picard_sampler.parareal import check_propagator
from picard_sampler.schedules import Schedule
from picard_sampler.settings import UPDATES, Callback, CallInputs, SamplerSettings
from picard_sampler.tensors import check_noise, clone_cond, take_cond

Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
Update = Literal["scan", "drift", "parareal"]
__all__ = ["UPDATES", "CallInputs", "SampleStats", "Sampler", "SamplerSettings",
           "noise_path", "pcm_sample", "picard_sample", "sequential_sample", "switch_weight"]


@dataclass
class SampleStats:
    """What one sampler call did, for a batch of B samples (the one record every layer uses).

    ``rounds``: sequential batched denoiser calls (T for the sequential sampler); ``nfe_total``:
    denoiser evaluations summed over samples and slots; ``rounds_per_sample`` /
    ``converged_per_sample``: per sample (an anytime stop leaves some unconverged);
    ``wall_s``: wall time of the call; ``trajectory``: the final ``(T+1, B, H, D)`` iterate.
    """

    rounds: int
    nfe_total: int
    rounds_per_sample: list[int]
    converged_per_sample: list[bool]
    wall_s: float
    trajectory: torch.Tensor

    @property
    def batch(self) -> int:
        """Number of samples B."""
        return len(self.converged_per_sample)

    @property
    def nfe(self) -> float:
        """Denoiser evaluations per sample."""
        return self.nfe_total / self.batch if self.batch else 0.0

    @property
    def n_converged(self) -> int:
        """Samples that passed the stopping rule (all of them for the sequential sampler)."""
        return sum(self.converged_per_sample)

    @property
    def converged(self) -> bool:
        """Whether every sample converged: the result is then the sequential sample."""
        return all(self.converged_per_sample)

    @property
    def sample(self) -> torch.Tensor:
        """The returned sample ``X[T]``, shape ``(B, H, D)``."""
        return self.trajectory[-1]


def _prepare_inpaint(inpaint: Inpaint | None, noise: torch.Tensor) -> Inpaint | None:
    """``inpaint`` checked against the noise's batch and moved to its device and dtype."""
    if inpaint is None:
        return None
    if not isinstance(inpaint, Inpaint):
        raise TypeError(f"inpaint must be a picard_sampler.Inpaint; got {type(inpaint).__name__}")
    inpaint.check_batch(noise)
    return inpaint.to(noise)


class _FiniteGuard:
    """Where the denoiser's outputs are checked for NaN/inf: at once on the CPU (cheap), once
    per sampler call on an accelerator (a check per call would sync the host every call);
    either way the error names the training timesteps that produced them."""

    def __init__(self) -> None:
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(self, out: torch.Tensor, t: torch.Tensor) -> None:
        finite = torch.isfinite(out).flatten(1).all(1)
        if out.device.type == "cpu":
            self._raise_if_bad(finite, t)
        else:
            self.pending.append((finite, t))

    def check(self) -> None:
        """Raise for any deferred output that was not finite (one host sync)."""
        if not self.pending:
            return
        finite = torch.cat([f for f, _ in self.pending])
        t = torch.cat([t for _, t in self.pending])
        self.pending.clear()
        self._raise_if_bad(finite, t)

    @staticmethod
    def _raise_if_bad(finite: torch.Tensor, t: torch.Tensor) -> None:
        if not bool(finite.all()):
            bad = torch.unique(t[~finite]).tolist()
            raise ValueError(f"denoiser returned NaN or inf at training timesteps {bad}")


_GUARD: contextvars.ContextVar[_FiniteGuard | None] = contextvars.ContextVar("guard",
                                                                              default=None)


@contextlib.contextmanager
def _finite_outputs() -> Iterator[_FiniteGuard]:
    """A sampler call's scope: the denoiser outputs inside it are checked by one guard, which
    settles its deferred checks when the call ends normally."""
    guard = _FiniteGuard()
    token = _GUARD.set(guard)
    try:
        yield guard
        guard.check()
    finally:
        _GUARD.reset(token)


def _checks_finite_outputs(sampler: Callable[..., Any]) -> Callable[..., Any]:
    """Run a sampler function inside one `_finite_outputs` scope."""
    @functools.wraps(sampler)
    def checked(*args: Any, **kwargs: Any) -> Any:
        with _finite_outputs():
            return sampler(*args, **kwargs)

    return checked


def _call_denoiser(
    denoiser: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, cond: Any, *extra: Any
) -> torch.Tensor:
    """Call the denoiser and check what it returns: same shape as ``x`` and finite (checked
    by the current sampler call's guard; see _FiniteGuard)."""
    out = denoiser(x, t, cond, *extra)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"denoiser returned shape {got}; expected {tuple(x.shape)} (same as x)")
    guard = _GUARD.get()
    (guard or _FiniteGuard()).record(out, t)
    return out


@_checks_finite_outputs
def sequential_sample(
    denoiser: Denoiser,
    schedule: Schedule,
    noise: torch.Tensor,
    cond: Any = None,
    callback: Callback | None = None,
    inpaint: Inpaint | None = None,
) -> tuple[torch.Tensor, SampleStats]:
    """Plain reverse diffusion: T denoiser calls one after another (DDPM / DDIM step loop);
    with ``inpaint`` every step is followed by its constraint (picard_sampler.inpaint)."""
    check_noise(schedule, noise)
    inpaint = _prepare_inpaint(inpaint, noise)
    start = time.perf_counter()
    T, B = schedule.num_inference_steps, noise.shape[1]
    trajectory = torch.empty_like(noise)
    trajectory[0] = noise[0]
    timesteps = schedule.timesteps.to(noise.device)
    noise_std = schedule.table("noise_std", noise)
    samples = torch.arange(B, device=noise.device)
    evaluate = _guided(_base_evaluator(denoiser), schedule, inpaint)
    for i in range(T):
        idx = torch.full((B,), i, device=noise.device, dtype=torch.long)
        x = trajectory[i]
        out, _ = evaluate(x, timesteps[idx], cond, idx, samples, idx)
        x_next = schedule.step_mean(out, x, idx) + noise_std[i] * noise[i + 1]
        if inpaint is not None:
            x_next = inpaint.apply(schedule, x_next, idx, samples, noise)
        trajectory[i + 1] = x_next
        if callback is not None:
            callback({"round": i + 1, "x": trajectory[i + 1], "trajectory": trajectory})
    stats = SampleStats(
        rounds=T, nfe_total=T * B, rounds_per_sample=[T] * B, converged_per_sample=[True] * B,
        wall_s=time.perf_counter() - start, trajectory=trajectory,
    )
    return trajectory[T], stats


# ------------------------------------------------------------------------------------- Picard
# A round evaluates the model on each active sample's window of slots [b, e) in ONE call. The
# model output at slot j (old value X[j]) fixes the "rest" of step j; the update then walks the
# window once with the new values for the affine part:
#     Xnew[j+1] = a_j * Xnew[j] + (step_mean_j(X[j]) - a_j * X[j]) + s_j z[j+1]
# a_j = 1 gives ParaDiGMS's drift update (Xnew[j+1] = Xnew[b] + sum of drifts); a_j = the step's
# x_t coefficient gives the linear-exact scan update. Both have the sequential sample as their
# unique fixed point. The window start b slides past every slot whose output stopped changing.

# An evaluator maps (x, t, cond, slot, sample, age) to (model_out, exact): model outputs for a
# batch of slots (slot j of sample s, evaluated `age` times before), and which of them came from
# the base model alone (only those may count as converged).
Evaluator = Callable[
    [torch.Tensor, torch.Tensor, Any, torch.Tensor, torch.Tensor, torch.Tensor],
    tuple[torch.Tensor, torch.Tensor],
]


def _base_evaluator(denoiser: Denoiser) -> Evaluator:
    """The evaluator of a plain denoiser: every output is the base model's."""
    def evaluate(x, t, c, slot, sample, age):
        return _call_denoiser(denoiser, x, t, c), torch.ones_like(slot, dtype=torch.bool)

    return evaluate


def _guided(evaluate: Evaluator, schedule: Schedule, inpaint: Inpaint | None) -> Evaluator:
    """``evaluate`` with its outputs guided towards ``inpaint``'s target when it guides
    (picard_sampler.inpaint); ``evaluate`` itself otherwise. The gradient is taken outside
    inference mode on copies of the inputs, whatever mode the caller runs in."""
    if inpaint is None or not inpaint.guides:
        return evaluate

    def guided(x, t, c, slot, sample, age):
        with torch.inference_mode(False), torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)
            out, exact = evaluate(x, t.clone(), clone_cond(c), slot, sample, age)
            return inpaint.guided_output(schedule, out, x, slot, sample), exact

    return guided


@_checks_finite_outputs
def _picard_iterate(
    evaluate: Evaluator,
    schedule: Schedule,
    noise: torch.Tensor,
    cond: Any,
    settings: SamplerSettings,
    inputs: CallInputs,
) -> tuple[torch.Tensor, SampleStats]:
    """The round machinery shared by ``picard_sample``, ``pcm_sample`` and ``Sampler``, with
    the knobs of ``settings`` and the per-call ``inputs``; the time limit is the smaller of the
    two budgets. ``accel="anderson"`` mixes the last ``accel_memory`` rounds
    (picard_sampler.anderson; full window only). With ``inpaint`` each step is
    ``g_j = lerp(f_j, c_{j+1}, W)`` and its x-coefficient ``(1 - W) a_j``, so the fixed point
    is the constrained sequential sample (design §4.8)."""
    check_noise(schedule, noise)
    inpaint = _prepare_inpaint(inputs.inpaint, noise)
    evaluate = _guided(evaluate, schedule, inpaint)
    p = settings.window_for(schedule.num_inference_steps)
    tol, update, max_rounds = settings.tol, settings.update, settings.max_rounds
    budgets = [b for b in (settings.budget_s, inputs.budget_s) if b is not None]
    budget_s = min(budgets) if budgets else None
    init, callback, propagator = inputs.init, inputs.callback, inputs.propagator
    clock = inputs.clock or time.perf_counter
    anderson = Anderson(settings.accel_memory) if settings.accel == "anderson" else None
    start = clock()
    device = noise.device
    T, B = schedule.num_inference_steps, noise.shape[1]
    elems = noise[0, 0].numel()

    if init is not None:
        if init.shape != noise.shape:
            raise ValueError(
                f"init must have the shape of noise {tuple(noise.shape)}; got {tuple(init.shape)}"
            )
        X = init.detach().clone().to(noise.dtype)
        if not torch.isfinite(X).all():
            raise ValueError("init contains NaN or inf")
    else:
        X = noise[0].unsqueeze(0).repeat(T + 1, *([1] * (noise.dim() - 1)))
    X[0] = noise[0]

    timesteps = schedule.timesteps.to(device)
    a = (
        schedule.table("scan_coef", noise)
        if update in ("scan", "parareal")
        else torch.ones(T, device=device, dtype=noise.dtype)
    )
    noise_std = schedule.table("noise_std", noise)
    if update == "parareal":
        propagator = check_propagator(propagator, schedule, noise)
    elif propagator is not None:
        raise ValueError(f"a propagator is used by update=parareal only; got update={update!r}")

    err_scale = schedule.table("error_std", noise) ** 2 * elems
    tol2 = tol * tol
    trail = [1] * (noise.dim() - 2)

    def coarse_step(j: torch.Tensor, x: torch.Tensor, base_only: torch.Tensor) -> torch.Tensor:
        """G_j(x) for slots j (N,): the propagator's M_j x where the round's map is the base
        model's (`base_only`), else a_j x (a PCM round, whose outputs were trained for it)."""
        scaled = a[j].view(-1, *trail) * x
        if propagator is None:
            return scaled
        linear = (propagator[j] @ x.reshape(x.shape[0], -1, 1)).view_as(x)
        return torch.where(base_only.view(-1, *trail), linear, scaled)

    begin = torch.zeros(B, dtype=torch.long, device=device)  # slots < begin are final
    age = torch.zeros(T, B, dtype=torch.long, device=device)  # rounds each slot was evaluated
    rounds_per_sample = torch.zeros(B, dtype=torch.long, device=device)
    offsets = torch.arange(p, device=device)
    rounds = nfe_total = 0
    round_times: list[float] = []

    while bool((begin < T).any()):
        if max_rounds is not None and rounds >= max_rounds:
            break
        # Anytime: stop before a round that would not finish inside the budget.
        mean_round_s = sum(round_times) / len(round_times) if round_times else 0.0
        if budget_s is not None and round_times and clock() - start + mean_round_s > budget_s:
            break
        round_start = clock()
        active = torch.nonzero(begin < T).flatten()  # (S,)
        slots = begin[active, None] + offsets[None, :]  # (S, p) slot index j of each window entry
        valid = slots < T
        sample_of = active[:, None].expand_as(slots)
        j_flat, s_flat = slots[valid], sample_of[valid]  # (N,)

        x_old = X[j_flat, s_flat]  # (N, H, D)
        out, exact = evaluate(
            x_old, timesteps[j_flat], take_cond(cond, s_flat), j_flat, s_flat,
            age[j_flat, s_flat],
        )
        age[j_flat, s_flat] += 1
        nfe_total += int(j_flat.numel())
        step = (
            schedule.step_mean(out, x_old, j_flat)
            + noise_std[j_flat].view(-1, *trail) * noise[j_flat + 1, s_flat]
        )
        coarse = coarse_step(j_flat, x_old, exact)
        if inpaint is not None:
            step = inpaint.apply(schedule, step, j_flat, s_flat, noise)
            coarse = coarse * inpaint.keep(s_flat)
        rest = step - coarse

        # Walk the windows in order, all active samples at once.
        S = active.numel()
        rest_w = torch.zeros((S, p, *noise.shape[2:]), dtype=noise.dtype, device=device)
        rest_w[valid] = rest
        exact_w = torch.zeros_like(valid)
        exact_w[valid] = exact
        slot_c = slots.clamp(max=T - 1)
        keep = inpaint.keep(active) if inpaint is not None else None
        new_w = torch.empty_like(rest_w)
        current = X[begin[active], active]
        if propagator is None:  # scan / drift: G_j(x) = a_j x, two ops per step
            a_w = a[slot_c].view(S, p, *trail)
            if keep is not None:
                a_w = a_w * keep[:, None]
            for k in range(p):
                current = a_w[:, k] * current + rest_w[:, k]
                new_w[:, k] = current
        elif bool(exact.all()):  # a base-model round: G_j(x) = M_j x, one fused op per step
            flat = current.reshape(S, elems, 1)
            rest_flat = rest_w.reshape(S, p, elems, 1)
            rows = keep.reshape(S, elems, 1) if keep is not None else None
            for k in range(p):
                m = propagator[slot_c[:, k]]
                flat = torch.baddbmm(rest_flat[:, k], m if rows is None else rows * m, flat)
                new_w[:, k] = flat.view_as(current)
        else:  # a PCM round: each slot's own G_j
            for k in range(p):
                current = coarse_step(slot_c[:, k], current, exact_w[:, k])
                if keep is not None:
                    current = current * keep
                current = current + rest_w[:, k]
                new_w[:, k] = current
        old_w = X[(slots + 1).clamp(max=T), sample_of]
        X_old = X.clone() if anderson is not None else None
        X[j_flat + 1, s_flat] = new_w[valid]

        # Tolerance rule: err_j = ||Xnew[j+1] - X[j+1]||^2 / (D s'_j^2), slide past passing slots.
        err = (new_w - old_w).flatten(2).pow(2).sum(-1) / err_scale[slots.clamp(max=T - 1)]
        fails = (err > tol2) & valid
        first_fail = torch.where(fails.any(1), fails.float().argmax(1), valid.sum(1))
        first_inexact = torch.where(
            (~exact_w & valid).any(1), (~exact_w & valid).float().argmax(1), valid.sum(1)
        )
        # ParaDiGMS: the output of the first failing slot is computed from converged inputs, so it
        # is final too (stride = first_fail + 1), provided every slot up to it used the base model.
        stride = torch.minimum(torch.minimum(first_fail + 1, valid.sum(1)), first_inexact)
        begin[active] += stride
        rounds += 1
        rounds_per_sample[active] += 1
        if anderson is not None:
            if not bool(exact.all()):
                anderson.reset()  # a PCM round: another map, no secant information
            else:
                X = anderson.step(X_old, X, begin, active)

        if init is None:
            # Slots beyond the window have never been evaluated: carry the last computed value.
            end = (begin + p).clamp(max=T)
            beyond = torch.arange(T + 1, device=device)[:, None] > end[None, :]
            X = torch.where(
                beyond.view(T + 1, B, *trail), X[end, torch.arange(B, device=device)][None], X
            )

        round_times.append(clock() - round_start)
        if callback is not None:
            callback(
                {
                    "round": rounds,
                    "x": X[T],
                    "trajectory": X,
                    "begin": begin.clone(),
                    "err": err,
                    "active": active,
                }
            )

    stats = SampleStats(
        rounds=rounds, nfe_total=nfe_total, rounds_per_sample=rounds_per_sample.tolist(),
        converged_per_sample=(begin >= T).tolist(), wall_s=clock() - start, trajectory=X,
    )
    return X[T], stats


def picard_sample(
    denoiser: Denoiser,
    schedule: Schedule,
    noise: torch.Tensor,
    cond: Any = None,
    window: int | None = None,
    tol: float = 0.1,
    update: Update = "scan",
    max_rounds: int | None = None,
    budget_s: float | None = None,
    init: torch.Tensor | None = None,
    callback: Callback | None = None,
    clock: Callable[[], float] = time.perf_counter,
    inpaint: Inpaint | None = None,
    accel: str = "none",
    accel_memory: int = 3,
    propagator: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SampleStats]:
    """Picard iteration (ParaDiGMS, Shih et al. 2023) over a sliding window of denoising steps.

    ``window`` slots per sample (None = all T) go into one batched denoiser call per round,
    for all not-yet-converged samples together. ``update="drift"`` is ParaDiGMS's cumulative
    drift update, ``"scan"`` the linear-exact update (docs/design.md §4.3); both converge to the
    sequential sample. ``max_rounds`` / ``budget_s`` (seconds) stop early and return the anytime
    estimate ``X[T]`` with ``converged=False``; ``init`` ``(T+1, B, H, D)`` warm-starts the
    trajectory (its slot 0 is replaced by ``noise[0]``); ``inpaint`` constrains every step
    (picard_sampler.inpaint) and the fixed point is then the constrained sequential sample.
    ``accel="anderson"`` extrapolates from the last ``accel_memory`` rounds (full window only;
    same fixed point, docs/design.md §4.9). ``update="parareal"`` walks the window with the
    linear coarse steps ``propagator`` (T, E, E) instead of the scan's a_j (same fixed point,
    picard_sampler.parareal, docs/design.md §4.10).
    """
    settings = SamplerSettings(window=window, tol=tol, update=update, max_rounds=max_rounds,
                               budget_s=budget_s, accel=accel, accel_memory=accel_memory)
    inputs = CallInputs(init=init, clock=clock, callback=callback, inpaint=inpaint,
                        propagator=propagator)
    return _picard_iterate(_base_evaluator(denoiser), schedule, noise, cond, settings, inputs)


def noise_path(schedule: Schedule, noise: torch.Tensor) -> torch.Tensor:
    """What the pre-drawn noise contributes to each slot: ``N[0] = 0``,
    ``N[i+1] = a_i N[i] + s_i z[i+1]`` (``a_i`` the step's x_t coefficient, ``s_i`` its noise
    scale), shape ``(T+1, B, ...)`` like ``noise``. Zero for DDIM. A noise-aware PCM sees
    ``N[j]`` at slot j: with stochastic DDPM the fixed point of slot j depends on z[1..j], which
    a cold-started slot (still x_T) cannot know otherwise (docs/design.md §4.7, objective (c))."""
    check_noise(schedule, noise)
    a, s = schedule.table("scan_coef", noise), schedule.table("noise_std", noise)
    trail = [1] * (noise.dim() - 2)
    path = torch.zeros_like(noise)
    for i in range(schedule.num_inference_steps):
        path[i + 1] = a[i].view(*trail) * path[i] + s[i].view(*trail) * noise[i + 1]
    return path


def switch_weight(age: torch.Tensor, switch_rounds: int) -> torch.Tensor:
    """PCM weight lam = clip(1 - k / K_s, 0, 1) of a slot evaluated for the (k+1)-th time."""
    if switch_rounds <= 0:
        return torch.zeros_like(age, dtype=torch.float32)
    return (1.0 - age.float() / switch_rounds).clamp(0.0, 1.0)


def pcm_sample(
    denoiser_base: Denoiser,
    denoiser_pcm: Callable[..., torch.Tensor],
    schedule: Schedule,
    noise: torch.Tensor,
    cond: Any = None,
    window: int | None = None,
    tol: float = 0.1,
    switch_rounds: int = 1,
    update: Update = "scan",
    max_rounds: int | None = None,
    budget_s: float | None = None,
    init: torch.Tensor | None = None,
    callback: Callback | None = None,
    clock: Callable[[], float] = time.perf_counter,
    pcm_sees_noise: bool = False,
    inpaint: Inpaint | None = None,
    accel: str = "none",
    accel_memory: int = 3,
    propagator: torch.Tensor | None = None,
) -> tuple[torch.Tensor, SampleStats]:
    """Picard Consistency Model sampling (So et al. 2025) with model switching.

    The k-th evaluation of a slot (k = 0, 1, ...) uses ``lam * pcm + (1 - lam) * base`` with
    ``lam = clip(1 - k / switch_rounds, 0, 1)``. Only slots evaluated with the base model alone
    may pass the convergence test, so the result is the sequential sample of the base model
    whatever the PCM learned; the PCM only moves the early iterates closer to it.
    ``pcm_sees_noise``: call the PCM as ``denoiser_pcm(x, t, cond, noise_path)`` with each
    slot's ``noise_path`` row (a noise-aware PCM for stochastic DDPM). ``update="parareal"``
    walks base-model slots with ``propagator`` and PCM slots with the scan's a_j (the walk the
    PCM was trained for; docs/design.md §4.10).
    """
    settings = SamplerSettings(window=window, tol=tol, update=update, max_rounds=max_rounds,
                               budget_s=budget_s, accel=accel, accel_memory=accel_memory,
                               switch_rounds=switch_rounds)
    inputs = CallInputs(init=init, clock=clock, callback=callback, inpaint=inpaint,
                        propagator=propagator)
    evaluate = _pcm_evaluator(denoiser_base, denoiser_pcm, switch_rounds,
                              noise_path(schedule, noise) if pcm_sees_noise else None)
    return _picard_iterate(evaluate, schedule, noise, cond, settings, inputs)


def _pcm_evaluator(denoiser_base: Denoiser, denoiser_pcm: Callable[..., torch.Tensor],
                   switch_rounds: int, path: torch.Tensor | None) -> Evaluator:
    """The evaluator of PCM sampling with model switching: the k-th evaluation of a slot blends
    ``switch_weight(k)`` of the PCM with the base; only pure-base outputs count as exact. With
    a noise ``path`` the PCM is also handed each slot's row of it."""

    def evaluate(x, t, c, slot, sample, age):
        lam = switch_weight(age, switch_rounds).to(x.dtype)
        out = torch.zeros_like(x)
        use_pcm, use_base = lam > 0, lam < 1
        if bool(use_pcm.any()):
            rows = torch.nonzero(use_pcm).flatten()
            w = lam[rows].view(-1, *([1] * (x.dim() - 1)))
            extra = () if path is None else (path[slot[rows], sample[rows]],)
            out[rows] += w * _call_denoiser(
                denoiser_pcm, x[rows], t[rows], take_cond(c, rows), *extra
            )
        if bool(use_base.any()):
            rows = torch.nonzero(use_base).flatten()
            w = (1 - lam[rows]).view(-1, *([1] * (x.dim() - 1)))
            out[rows] += w * _call_denoiser(denoiser_base, x[rows], t[rows], take_cond(c, rows))
        return out, ~use_pcm

    return evaluate


SAMPLER_METHODS = ("sequential", "picard", "pcm")


def _knob(name: str) -> property:
    """A read-only view of one field of ``Sampler.settings`` (``sampler.window`` etc.)."""
    return property(lambda self: getattr(self.settings, name),
                    doc=f"``settings.{name}`` (see SamplerSettings).")


@dataclass(frozen=True, init=False)
class Sampler:
    """A schedule plus a sampling method and its knobs: what a config chooses.

    ``Sampler(schedule, method="picard", settings=None, **knobs)``: the knobs are one
    ``SamplerSettings`` record (``settings``, with any ``knobs`` such as ``window=8`` or
    ``tol=1e-3`` replacing its fields), checked when built; ``sampler.window`` etc. read it.
    ``sampler(denoiser, noise, cond, inputs=None, denoiser_pcm=None, pcm_sees_noise=False,
    **overrides) -> (x, SampleStats)``. Policies draw noise of ``sampler.noise_shape(B, H, D)``
    and call this; they own no sampling loop. What a run needs at call time (a warm start, a
    time budget and its clock, an observer, a constraint) is a ``CallInputs`` record, never a
    field: the same Sampler serves every caller (``pcm_sees_noise``: see ``pcm_sample``).
    """

    schedule: Schedule
    method: str
    settings: SamplerSettings

    def __init__(self, schedule: Schedule, method: str = "picard",
                 settings: SamplerSettings | None = None, **knobs: Any) -> None:
        if method not in SAMPLER_METHODS:
            raise ValueError(f"sampler method must be one of {list(SAMPLER_METHODS)}; "
                             f"got {method!r}")
        settings = SamplerSettings() if settings is None else settings
        if not isinstance(settings, SamplerSettings):
            raise TypeError(f"settings must be a SamplerSettings; got {type(settings).__name__}")
        unknown = sorted(set(knobs) - set(SamplerSettings.names()))
        if unknown:
            raise TypeError(f"unknown sampler knobs {unknown}; allowed: "
                            f"{list(SamplerSettings.names())}")
        settings = dataclasses.replace(settings, **knobs) if knobs else settings
        # the sequential sampler ignores the knobs, but a bad value is still a mistake
        settings.window_for(schedule.num_inference_steps)
        object.__setattr__(self, "schedule", schedule)
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "settings", settings)

    window = _knob("window")
    tol = _knob("tol")
    update = _knob("update")
    switch_rounds = _knob("switch_rounds")
    max_rounds = _knob("max_rounds")
    budget_s = _knob("budget_s")
    accel = _knob("accel")
    accel_memory = _knob("accel_memory")

    @staticmethod
    def config_keys() -> tuple[str, ...]:
        """The keys a sampler config may set besides its schedule: the method and the knobs."""
        return ("method", *SamplerSettings.names())

    @property
    def num_steps(self) -> int:
        """Number of inference steps T."""
        return self.schedule.num_inference_steps

    @property
    def needs_propagator(self) -> bool:
        """Whether a call takes a ``propagator``: a Picard or PCM sampler with
        ``update="parareal"`` (the sequential sampler has no rounds to speed up)."""
        return self.method != "sequential" and self.update == "parareal"

    @property
    def label(self) -> str:
        """A short label for tables, e.g. 'picard DDPM-100 (window 16, tol 0.1, scan)'."""
        label = f"{self.method} {self.schedule.name.upper()}-{self.num_steps}"
        if self.method == "sequential":
            return label
        knobs = [f"window {self.window or self.num_steps}", f"tol {self.tol:g}", self.update]
        if self.method == "pcm":
            knobs.append(f"switch_rounds {self.switch_rounds}")
        if self.accel != "none":
            knobs.append(f"{self.accel} m{self.accel_memory}")
        if self.max_rounds is not None:
            knobs.append(f"max_rounds {self.max_rounds}")
        if self.budget_s is not None:
            knobs.append(f"budget {self.budget_s * 1e3:g} ms")
        return f"{label} ({', '.join(knobs)})"

    @property
    def config(self) -> dict[str, Any]:
        """Method, knobs and the complete schedule (class and constructor arguments)."""
        return {
            "method": self.method,
            "schedule": {"class": type(self.schedule).__name__, **self.schedule.config},
            **{k: getattr(self.settings, k) for k in ("window", "tol", "update", "switch_rounds",
                                                      "max_rounds", "budget_s", "accel",
                                                      "accel_memory")},
        }

    def noise_shape(self, batch: int, *event_shape: int) -> tuple[int, ...]:
        """Shape ``(T+1, B, *event_shape)`` of the up-front noise this sampler consumes."""
        return (self.num_steps + 1, batch, *event_shape)

    def __call__(
        self,
        denoiser: Denoiser,
        noise: torch.Tensor,
        cond: Any = None,
        inputs: CallInputs | None = None,
        denoiser_pcm: Callable[..., torch.Tensor] | None = None,
        pcm_sees_noise: bool = False,
        **overrides: Any,
    ) -> tuple[torch.Tensor, SampleStats]:
        """Sample with this configuration and this call's ``inputs`` (a ``CallInputs``: warm
        start, budget in seconds on its clock (the smaller of it and the sampler's own wins),
        callback, inpainting constraint, Parareal propagator). ``overrides`` replace knobs
        (window, tol, update, max_rounds, switch_rounds, ...) for one call. The sequential
        sampler ignores budgets and warm starts: it always returns the exact sample;
        ``inpaint`` constrains the sample for every method alike."""
        inputs = CallInputs() if inputs is None else inputs
        if not isinstance(inputs, CallInputs):
            raise TypeError(f"inputs must be a CallInputs; got {type(inputs).__name__}")
        if self.method == "sequential":
            return sequential_sample(denoiser, self.schedule, noise, cond,
                                     callback=inputs.callback, inpaint=inputs.inpaint)
        # a call's own budget is `inputs.budget_s`: it tightens the knob, never replaces it
        unknown = sorted(set(overrides) - (set(SamplerSettings.names()) - {"budget_s"}))
        if unknown:
            raise TypeError(f"unknown sampler overrides {unknown}")
        settings = dataclasses.replace(self.settings, **overrides) if overrides else self.settings
        if self.method == "picard":
            return _picard_iterate(_base_evaluator(denoiser), self.schedule, noise, cond,
                                   settings, inputs)
        if denoiser_pcm is None:
            raise ValueError("sampler method 'pcm' needs a PCM denoiser (denoiser_pcm=...)")
        path = noise_path(self.schedule, noise) if pcm_sees_noise else None
        evaluate = _pcm_evaluator(denoiser, denoiser_pcm, settings.switch_rounds, path)
        return _picard_iterate(evaluate, self.schedule, noise, cond, settings, inputs)
