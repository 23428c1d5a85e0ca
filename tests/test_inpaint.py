"""picard_sampler.Inpaint: the constrained sample honours its frozen prefix, and Picard / PCM
with the constraint converge to sequential sampling with the same constraint."""

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
    reference, ref_stats = Sampler(schedule, "sequential")(net, noise, cond,
                                                          CallInputs(inpaint=inpaint))
    picard = Sampler(schedule, "picard", tol=1e-4)  # above float rounding: one round
    x, stats = picard(net, noise, cond, CallInputs(init=ref_stats.trajectory, inpaint=inpaint))
    assert stats.rounds == 1 and (x - reference).abs().max() <= 1e-5
    x, stats = picard(net, noise, cond, CallInputs(inpaint=inpaint), max_rounds=2)
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


# ------------------------------------------------------------------------------ guidance
class GradNet(SmallNet):
    """SmallNet without its no_grad: a denoiser guidance can differentiate."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return SmallNet.forward.__wrapped__(self, x, t, cond)


def guided(inpaint: Inpaint, clip: float = 5.0) -> Inpaint:
    return Inpaint(inpaint.target, inpaint.weight, method="guide", guidance_clip=clip)


@pytest.mark.parametrize("kind,steps", [("ddpm", 100), ("ddim", 16)])
def test_guidance_pulls_the_constrained_entries_only_and_more_with_a_larger_clip(kind, steps):
    """The analytic Gaussian denoiser treats every entry alone, so J is diagonal: guidance moves
    the constrained entries towards the target and leaves the free ones exactly alone."""
    schedule = SCHEDULES[kind](num_inference_steps=steps)
    net = GaussianEps(schedule)
    noise = make_noise(steps, 4)
    inpaint = rtc_like(4)
    free, _ = sequential_sample(net, schedule, noise)
    gaps = []
    for clip in (1.0, 5.0, 1e6):
        x, _ = sequential_sample(net, schedule, noise, inpaint=guided(inpaint, clip))
        torch.testing.assert_close(x[:, 10:], free[:, 10:], rtol=0, atol=1e-6)
        gaps.append(float((x - inpaint.target)[:, :5].abs().mean()))
    before = float((free - inpaint.target)[:, :5].abs().mean())
    assert before > gaps[0] > gaps[1] > gaps[2], (before, gaps)
    assert gaps[2] < 0.25 * before


@pytest.mark.slow
@pytest.mark.parametrize("kind,steps", [("ddpm", 100), ("ddim", 16)])
def test_picard_and_pcm_with_guidance_equal_sequential_with_it(kind, steps):
    """In float64: the guided DDIM-16 ODE of this random net amplifies float32 rounding to
    ~6e-4 between float32 and float64 sequential runs, so float32 cannot pin 1e-5."""
    schedule = SCHEDULES[kind](num_inference_steps=steps)
    net = GradNet().double()
    noise, cond = make_noise(steps, 3).double(), torch.randn(3, 3).double()
    base = rtc_like(3)
    inpaint = Inpaint(base.target.double(), base.weight.double(), method="guide")
    free, _ = sequential_sample(net, schedule, noise, cond)
    reference, _ = sequential_sample(net, schedule, noise, cond, inpaint=inpaint)
    assert (reference - free).abs().max() > 1e-2  # the guidance did something
    for window in sorted({4, steps}):
        x, stats = picard_sample(net, schedule, noise, cond, window=window, tol=1e-9,
                                 inpaint=inpaint)
        assert stats.converged and (x - reference).abs().max() <= 1e-7
    x, stats = pcm_sample(net, GradNet(seed=7).double(), schedule, noise, cond, tol=1e-9,
                          inpaint=inpaint)
    assert stats.converged and (x - reference).abs().max() <= 1e-7


def test_guidance_moves_x0_alike_for_sample_and_epsilon_prediction():
    """The same model written as an x0 predictor under a prediction_type="sample" schedule
    gets the same guided sample as its epsilon form."""
    eps_schedule = DDIMSchedule(num_inference_steps=16)
    x0_schedule = DDIMSchedule(num_inference_steps=16, prediction_type="sample")
    eps_net = GaussianEps(eps_schedule)

    def x0_net(x, t, cond):
        ac = eps_net.ac[t].view(-1, 1, 1)
        return (x - (1 - ac).sqrt() * eps_net(x, t, cond)) / ac.sqrt()

    noise, inpaint = make_noise(16, 3).double(), guided(rtc_like(3))
    inpaint = Inpaint(inpaint.target.double(), inpaint.weight.double(), method="guide")
    eps_net.ac = eps_net.ac.double()
    by_eps, _ = sequential_sample(eps_net, eps_schedule, noise, inpaint=inpaint)
    by_x0, _ = sequential_sample(x0_net, x0_schedule, noise, inpaint=inpaint)
    free, _ = sequential_sample(eps_net, eps_schedule, noise)
    assert (by_eps - free).abs().max() > 1e-2
    assert (by_eps - by_x0).abs().max() < 1e-6  # the tables are float32-derived


def test_guidance_works_inside_inference_mode_and_is_deterministic():
    schedule = DDIMSchedule(num_inference_steps=16)
    net, noise, cond = GradNet(), make_noise(16, 2), torch.randn(2, 3)
    inpaint = guided(rtc_like(2))
    outside, _ = sequential_sample(net, schedule, noise, cond, inpaint=inpaint)
    with torch.inference_mode():
        inside, _ = sequential_sample(net, schedule, noise, cond, inpaint=inpaint)
        again, _ = sequential_sample(net, schedule, noise, cond, inpaint=inpaint)
    assert torch.equal(outside, inside) and torch.equal(inside, again)


def test_guidance_needs_a_differentiable_denoiser_and_valid_settings():
    schedule = DDIMSchedule(num_inference_steps=16)
    with pytest.raises(ValueError, match="needs a differentiable denoiser"):
        sequential_sample(SmallNet(), schedule, make_noise(16, 2), torch.randn(2, 3),
                          inpaint=guided(rtc_like(2)))
    with pytest.raises(ValueError, match=r"method must be one of \['replace', 'guide'\]"):
        Inpaint(torch.zeros(2, H, D), torch.zeros(2, H, 1), method="nudge")
    with pytest.raises(ValueError, match="guidance_clip must be a number > 0"):
        Inpaint(torch.zeros(2, H, D), torch.zeros(2, H, 1), method="guide", guidance_clip=0)
