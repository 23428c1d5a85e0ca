"""picard_sampler.Inpaint: the constrained sample honours its frozen prefix, and Picard / PCM
with the constraint converge to sequential sampling with the same constraint."""

from __future__ import annotations

import pytest
import torch

from picard_sampler import (
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


def rtc_like(batch: int, frozen: int = 5, overlap: int = 10, seed: int = 3) -> Inpaint:
    """Known values on the first `overlap` steps: weight 1 on the first `frozen`, then a
    decaying soft mask, 0 after (the shape of a real-time hand-off)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(batch, H, D, generator=g) * 1.6 - 0.8
    weight = torch.zeros(batch, H, 1)
    weight[:, :frozen] = 1.0
    weight[:, frozen:overlap] = torch.linspace(0.8, 0.1, overlap - frozen)[:, None]
    return Inpaint(target, weight)


@pytest.mark.parametrize("kind,steps", [("ddpm", 100), ("ddim", 16)])
def test_frozen_prefix_is_the_target_to_float_precision(kind, steps):
    schedule = SCHEDULES[kind](num_inference_steps=steps)
    noise, cond = make_noise(steps, 4), torch.randn(4, 3)
    inpaint = rtc_like(4)
    free, _ = sequential_sample(SmallNet(), schedule, noise, cond)
    x, _ = sequential_sample(SmallNet(), schedule, noise, cond, inpaint=inpaint)
    assert torch.equal(x[:, :5], inpaint.target[:, :5])
    # the unconstrained tail moved too (the constraint is seen by the model), but stays a sample
    assert not torch.allclose(x[:, 10:], free[:, 10:])
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("kind,steps", [("ddpm", 100), ("ddim", 16)])
@pytest.mark.parametrize("update", ["scan", "drift"])
@pytest.mark.parametrize("denoiser", ["net", "gaussian"])
def test_picard_with_constraint_equals_sequential_with_it(kind, steps, update, denoiser):
    schedule = SCHEDULES[kind](num_inference_steps=steps)
    net = SmallNet() if denoiser == "net" else GaussianEps(schedule)
    noise, cond = make_noise(steps, 3), torch.randn(3, 3)
    inpaint = rtc_like(3)
    reference, _ = sequential_sample(net, schedule, noise, cond, inpaint=inpaint)
    for window in sorted({4, 16, steps}):
        x, stats = picard_sample(net, schedule, noise, cond, window=window, tol=1e-6,
                                 update=update, inpaint=inpaint)
        assert stats.converged
        assert (x - reference).abs().max() <= 1e-5, (window, (x - reference).abs().max())
        assert torch.equal(x[:, :5], inpaint.target[:, :5])


@pytest.mark.parametrize("update", ["scan", "drift"])
def test_pcm_with_constraint_equals_sequential_with_it(update):
    schedule = DDIMSchedule(num_inference_steps=16)
    base, pcm = SmallNet(seed=0), SmallNet(seed=7)
    noise, cond = make_noise(16, 2), torch.randn(2, 3)
    inpaint = rtc_like(2)
    reference, _ = sequential_sample(base, schedule, noise, cond, inpaint=inpaint)
    x, stats = pcm_sample(base, pcm, schedule, noise, cond, tol=1e-6, update=update,
                          inpaint=inpaint)
    assert stats.converged
    assert (x - reference).abs().max() <= 1e-5


def test_constraint_with_warm_start_and_budget_through_the_sampler():
    schedule = DDIMSchedule(num_inference_steps=16)
    net, noise = SmallNet(), make_noise(16, 2)
    cond = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    inpaint = rtc_like(2)
    reference, ref_stats = Sampler(schedule, "sequential")(net, noise, cond, inpaint=inpaint)
    picard = Sampler(schedule, "picard", tol=1e-4)  # above float rounding: one round
    x, stats = picard(net, noise, cond, init=ref_stats.trajectory, inpaint=inpaint)
    assert stats.rounds == 1 and (x - reference).abs().max() <= 1e-5
    x, stats = picard(net, noise, cond, inpaint=inpaint, max_rounds=2)
    assert not stats.converged and torch.isfinite(x).all()


def test_zero_weights_change_nothing():
    schedule = DDPMSchedule(num_inference_steps=100)
    net, noise, cond = SmallNet(), make_noise(100, 2), torch.randn(2, 3)
    none = Inpaint(torch.zeros(2, H, D), torch.zeros(2, H, 1))
    free, _ = sequential_sample(net, schedule, noise, cond)
    x, _ = sequential_sample(net, schedule, noise, cond, inpaint=none)
    assert torch.equal(x, free)


def test_bad_constraints_are_named():
    with pytest.raises(ValueError, match="lie in"):
        Inpaint(torch.zeros(2, H, D), torch.full((2, H, 1), 1.5))
    with pytest.raises(ValueError, match="NaN"):
        Inpaint(torch.full((2, H, D), float("nan")), torch.zeros(2, H, 1))
    with pytest.raises(ValueError, match="broadcast"):
        Inpaint(torch.zeros(2, H, D), torch.zeros(3, H, 1))
    schedule = DDIMSchedule(num_inference_steps=16)
    with pytest.raises(ValueError, match="target must have shape"):
        sequential_sample(SmallNet(), schedule, make_noise(16, 2), torch.randn(2, 3),
                          inpaint=Inpaint(torch.zeros(3, H, D), torch.zeros(3, H, 1)))
