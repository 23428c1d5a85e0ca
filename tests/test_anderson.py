"""Anderson acceleration of Picard (picard_sampler.anderson): the same fixed point as plain
Picard (the sequential sample), fewer rounds where the plain iteration is slow, and anytime
budgets, warm starts, PCM switching and inpainting working as before."""

from __future__ import annotations

import pytest
import torch

from picard_sampler import (
    CallInputs,
    DDIMSchedule,
    DDPMSchedule,
    Inpaint,
    Sampler,
    pcm_sample,
    picard_sample,
    sequential_sample,
)
from tests.test_samplers import D, GaussianEps, H, SmallNet, make_noise

SCHEDULES = {"ddpm": DDPMSchedule, "ddim": DDIMSchedule}


@pytest.mark.slow
@pytest.mark.parametrize("kind,steps", [("ddpm", 100), ("ddim", 16)])
@pytest.mark.parametrize("update", ["scan", "drift"])
@pytest.mark.parametrize("denoiser", ["net", "gaussian"])
@pytest.mark.parametrize("memory", [1, 3])
def test_tight_tol_equals_sequential(kind, steps, update, denoiser, memory):
    schedule = SCHEDULES[kind](num_inference_steps=steps)
    net = SmallNet() if denoiser == "net" else GaussianEps(schedule)
    noise = make_noise(steps, 4)
    cond = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    reference, _ = sequential_sample(net, schedule, noise, cond)
    x, stats = picard_sample(net, schedule, noise, cond, tol=1e-6, update=update,
                             accel="anderson", accel_memory=memory)
    assert stats.converged
    assert (x - reference).abs().max() <= 1e-5


def test_fewer_rounds_where_plain_picard_is_slow():
    """The drift update on DDPM-100 needs ~T/4 rounds; the secant steps cut that clearly."""
    schedule = DDPMSchedule(num_inference_steps=100)
    net, noise = GaussianEps(schedule), make_noise(100, 4)
    _, plain = picard_sample(net, schedule, noise, None, tol=0.1, update="drift")
    _, fast = picard_sample(net, schedule, noise, None, tol=0.1, update="drift",
                            accel="anderson", accel_memory=3)
    assert fast.rounds <= 0.8 * plain.rounds, (fast.rounds, plain.rounds)


def test_budgets_warm_starts_pcm_and_inpainting_still_work():
    schedule = DDIMSchedule(num_inference_steps=16)
    net, noise = SmallNet(), make_noise(16, 2)
    cond = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    sampler = Sampler(schedule, "picard", tol=1e-6, accel="anderson")
    reference, ref_stats = sequential_sample(net, schedule, noise, cond)
    x, stats = sampler(net, noise, cond, max_rounds=2)
    assert not stats.converged and stats.rounds == 2 and torch.isfinite(x).all()
    x, stats = sampler(net, noise, cond, CallInputs(init=ref_stats.trajectory), tol=1e-4)
    assert stats.rounds == 1 and (x - reference).abs().max() <= 1e-5
    x, stats = pcm_sample(net, SmallNet(seed=7), schedule, noise, cond, tol=1e-6,
                          accel="anderson")
    assert stats.converged and (x - reference).abs().max() <= 1e-5
    inpaint = Inpaint(torch.full((2, H, D), 0.3), torch.cat(
        [torch.ones(2, 4, 1), torch.zeros(2, H - 4, 1)], 1))
    constrained, _ = sequential_sample(net, schedule, noise, cond, inpaint=inpaint)
    x, stats = sampler(net, noise, cond, CallInputs(inpaint=inpaint))
    assert stats.converged and (x - constrained).abs().max() <= 1e-5


def test_acceleration_needs_the_full_window_and_valid_knobs():
    schedule = DDPMSchedule(num_inference_steps=100)
    with pytest.raises(ValueError, match="full window"):
        Sampler(schedule, "picard", window=16, accel="anderson")
    with pytest.raises(ValueError, match="accel must be one of"):
        Sampler(schedule, "picard", accel="nesterov")
    with pytest.raises(ValueError, match="accel_memory"):
        Sampler(schedule, "picard", accel="anderson", accel_memory=0)
    label = Sampler(schedule, "picard", accel="anderson", accel_memory=2).label
    assert "anderson m2" in label
