"""picard_sampler: schedules match diffusers, Picard/PCM converge to the sequential sample."""

from __future__ import annotations

import math

import pytest
import torch

from picard_sampler import (
    CallInputs,
    DDIMSchedule,
    DDPMSchedule,
    Sampler,
    noise_path,
    pcm_sample,
    picard_sample,
    schedule_like,
    sequential_sample,
    switch_weight,
)

H, D = 16, 2
SCHEDULES = {"ddpm": DDPMSchedule, "ddim": DDIMSchedule}


class SmallNet(torch.nn.Module):
    """A random conditional MLP denoiser with the sampler's signature.

    Shaped like a trained epsilon model (a residual in x, bounded, gently x-dependent): a plain
    random MLP makes the DDIM ODE chaotic, amplifying float32 rounding by 1e6 over 100 steps,
    so no two step orders could agree to 1e-5.
    """

    def __init__(self, cond_dim: int = 3, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(H * D + 1 + cond_dim, 64), torch.nn.Mish(), torch.nn.Linear(64, H * D)
        )
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3
        self.net[0].weight.data[:, : H * D] *= 0.3

    @torch.no_grad()
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        c = torch.zeros(x.shape[0], 3) if cond is None else cond
        h = torch.cat([x.flatten(1), t.float()[:, None] / 100.0, c], 1)
        return 0.5 * x + torch.tanh(self.net(h)).view_as(x)


class GaussianEps:
    """Exact epsilon for data x0 ~ N(mu, s^2 I): eps*(x_t) in closed form (analytic denoiser)."""

    def __init__(self, schedule: DDPMSchedule, mu: float = 0.3, s: float = 0.4) -> None:
        self.ac = schedule.alphas_cumprod.float()
        self.mu, self.s = mu, s

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        ac = self.ac[t].view(-1, 1, 1)
        var = ac * self.s**2 + (1 - ac)
        # E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / var
        return (1 - ac).sqrt() * (x - ac.sqrt() * self.mu) / var


def make_noise(T: int, B: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(T + 1, B, H, D, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------ diffusers oracle
@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
@pytest.mark.parametrize("steps", [100, 16])
def test_sequential_matches_diffusers(kind, beta_schedule, prediction_type, steps, monkeypatch):
    diffusers = pytest.importorskip("diffusers")
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    schedule = SCHEDULES[kind](
        num_inference_steps=steps, beta_schedule=beta_schedule, prediction_type=prediction_type
    )
    net, B = SmallNet(), 4
    cond = torch.randn(B, 3, generator=torch.Generator().manual_seed(5))
    noise = make_noise(steps, B)
    ours, stats = sequential_sample(net, schedule, noise, cond)
    assert stats.rounds == steps and stats.converged

    kwargs = dict(
        num_train_timesteps=100,
        beta_schedule=beta_schedule,
        clip_sample=True,
        prediction_type=prediction_type,
    )
    if kind == "ddpm":
        reference = diffusers.DDPMScheduler(variance_type="fixed_small", **kwargs)
    else:
        reference = diffusers.DDIMScheduler(**kwargs)
    reference.set_timesteps(steps)
    assert torch.equal(reference.timesteps.long(), schedule.timesteps)
    x = noise[0].clone()
    for i, t in enumerate(reference.timesteps):
        # Feed diffusers our pre-drawn noise for step i.
        monkeypatch.setattr(ddpm_module, "randn_tensor", lambda *a, _z=noise[i + 1], **k: _z)
        out = net(x, t.long().repeat(B), cond)
        x = reference.step(out, t, x).prev_sample
    assert torch.allclose(ours, x, atol=1e-5, rtol=0), (ours - x).abs().max()


def test_add_noise_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    schedule = DDPMSchedule()
    reference = diffusers.DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    x0, eps = torch.randn(8, H, D), torch.randn(8, H, D)
    t = torch.randint(0, 100, (8,))
    assert torch.allclose(
        schedule.add_noise(x0, eps, t), reference.add_noise(x0, eps, t), atol=1e-6
    )


def test_step_mean_batched_equals_looped():
    schedule = DDPMSchedule()
    x, out = torch.randn(100, H, D), torch.randn(100, H, D)
    idx = torch.arange(100)
    batched = schedule.step_mean(out, x, idx)
    looped = torch.stack(
        [schedule.step_mean(out[i : i + 1], x[i : i + 1], idx[i : i + 1])[0] for i in range(100)]
    )
    assert torch.equal(batched, looped)


# ------------------------------------------------------------------- Picard == sequential
def _denoisers(schedule):
    return {"net": SmallNet(), "gaussian": GaussianEps(schedule)}


@pytest.mark.parametrize("kind,steps", [("ddpm", 100), ("ddim", 100), ("ddim", 16)])
@pytest.mark.parametrize("update", ["scan", "drift"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("denoiser_name", ["net", "gaussian"])
def test_picard_tight_tol_equals_sequential(kind, steps, update, batch, denoiser_name):
    schedule = SCHEDULES[kind](num_inference_steps=steps)
    denoiser = _denoisers(schedule)[denoiser_name]
    noise = make_noise(steps, batch)
    cond = torch.randn(batch, 3)
    reference, _ = sequential_sample(denoiser, schedule, noise, cond)
    for window in sorted({1, 4, 16, steps}):
        x, stats = picard_sample(
            denoiser, schedule, noise, cond, window=window, tol=1e-6, update=update
        )
        assert stats.converged
        assert (x - reference).abs().max() <= 1e-5, (window, (x - reference).abs().max())


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
@pytest.mark.parametrize("update", ["scan", "drift"])
def test_picard_loose_tol_error_is_bounded_by_criterion(kind, update):
    """At tol 0.1 each accepted slot moved by < tol * s'_j * sqrt(D); the chunk error stays
    within a small multiple of that scale and rounds drop well below T."""
    schedule = SCHEDULES[kind](num_inference_steps=100)
    net, noise, cond = SmallNet(), make_noise(100, 8), torch.randn(8, 3)
    reference, _ = sequential_sample(net, schedule, noise, cond)
    x, stats = picard_sample(net, schedule, noise, cond, window=None, tol=0.1, update=update)
    per_slot_bound = 0.1 * float(schedule.error_std.max())  # rms per element of one slot's move
    err = (x - reference).abs().max().item()
    assert stats.converged and stats.rounds < 100
    assert err <= 10 * per_slot_bound * math.sqrt(H * D), err


def test_window_one_takes_exactly_T_rounds():
    for kind in SCHEDULES:
        schedule = SCHEDULES[kind](num_inference_steps=20)
        _, stats = picard_sample(
            SmallNet(), schedule, make_noise(20, 2), torch.randn(2, 3), window=1, tol=0.1
        )
        assert stats.rounds == 20 and stats.nfe == 20


def test_round_budget_returns_finite_unconverged_estimate():
    schedule = DDPMSchedule()
    x, stats = picard_sample(
        SmallNet(), schedule, make_noise(100, 4), torch.randn(4, 3), tol=1e-6, max_rounds=3
    )
    assert stats.rounds == 3 and not stats.converged
    assert torch.isfinite(x).all() and x.shape == (4, H, D)


def test_time_budget_stops_before_a_round_that_would_overrun():
    """A fake clock that only the denoiser moves, 1 s per call (one call per round): with a
    3.5 s budget rounds end at 1, 2, 3 s and a 4th (3 s + its 1 s mean) would overrun, so
    exactly 3 rounds run; 4.0 s allows exactly 4 (the rule is `elapsed + mean round > budget`)."""
    for budget_s, expected in ((3.5, 3), (4.0, 4), (0.5, 1)):
        now = [0.0]
        net = SmallNet()

        def slow(x, t, cond, net=net, now=now):
            now[0] += 1.0
            return net(x, t, cond)

        _, stats = picard_sample(
            slow, DDPMSchedule(), make_noise(100, 2), torch.randn(2, 3), tol=1e-6,
            budget_s=budget_s, clock=lambda now=now: now[0],
        )
        assert not stats.converged and stats.rounds == expected, (budget_s, stats.rounds)
        assert stats.wall_s == expected


@pytest.mark.parametrize("update", ["scan", "drift"])
def test_init_with_sequential_trajectory_converges_in_one_round(update):
    schedule = DDPMSchedule()
    net, noise, cond = SmallNet(), make_noise(100, 3), torch.randn(3, 3)
    reference, seq_stats = sequential_sample(net, schedule, noise, cond)
    x, stats = picard_sample(
        net, schedule, noise, cond, tol=1e-4, update=update, init=seq_stats.trajectory
    )
    assert stats.rounds == 1 and stats.converged
    assert (x - reference).abs().max() < 1e-5


def test_converged_samples_stop_costing_evaluations():
    """Sample 0 is warm-started at its fixed point, sample 1 cold: sample 0 costs one round."""
    schedule = DDIMSchedule(num_inference_steps=16)
    net, noise, cond = SmallNet(), make_noise(16, 2), torch.randn(2, 3)
    _, seq = sequential_sample(net, schedule, noise, cond)
    init = noise[0].unsqueeze(0).repeat(17, 1, 1, 1)
    init[:, 0] = seq.trajectory[:, 0]
    _, stats = picard_sample(net, schedule, noise, cond, tol=1e-4, init=init)
    assert stats.rounds_per_sample[0] == 1 and stats.rounds_per_sample[1] > 1
    _, alone = picard_sample(net, schedule, noise[:, 1:], cond[1:], tol=1e-4)
    assert stats.nfe_total == 16 + alone.nfe_total


def test_one_denoiser_call_per_round():
    calls = []
    net = SmallNet()

    def counting(x, t, c):
        calls.append(x.shape[0])
        return net(x, t, c)

    _, stats = picard_sample(
        counting, DDPMSchedule(), make_noise(100, 8), torch.randn(8, 3), window=16, tol=0.1
    )
    assert len(calls) == stats.rounds
    assert calls[0] == 8 * 16


# ----------------------------------------------------------------------------- bad input
def test_nan_denoiser_is_named():
    with pytest.raises(ValueError, match="NaN or inf"):
        picard_sample(lambda x, t, c: x * float("nan"), DDPMSchedule(), make_noise(100, 1))


def test_wrong_shape_denoiser_is_named():
    with pytest.raises(ValueError, match=r"denoiser returned shape \(1, 16\)"):
        sequential_sample(lambda x, t, c: x[:, :, 0], DDPMSchedule(), make_noise(100, 1))


def test_bad_noise_and_knobs_are_named():
    with pytest.raises(ValueError, match="noise must have shape"):
        sequential_sample(SmallNet(), DDPMSchedule(), make_noise(16, 1))
    with pytest.raises(ValueError, match="update must be one of"):
        picard_sample(SmallNet(), DDPMSchedule(), make_noise(100, 1), update="newton")
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        DDPMSchedule(beta_schedule="cosine")
    with pytest.raises(ValueError, match="sampler method must be one of"):
        Sampler(DDPMSchedule(), method="fast")


# ---------------------------------------------------------------------------------- PCM
def test_switch_weight_schedule():
    ages = torch.arange(5)
    assert switch_weight(ages, 2).tolist() == [1.0, 0.5, 0.0, 0.0, 0.0]
    assert switch_weight(ages, 0).tolist() == [0.0] * 5


@pytest.mark.parametrize("update", ["scan", "drift"])
@pytest.mark.parametrize("window", [None, 4])
def test_pcm_with_untrained_model_still_exact(update, window):
    schedule = DDIMSchedule(num_inference_steps=16)
    base, pcm = SmallNet(seed=0), SmallNet(seed=7)
    noise, cond = make_noise(16, 4), torch.randn(4, 3)
    reference, _ = sequential_sample(base, schedule, noise, cond)
    for switch_rounds in (1, 2, 3):
        x, stats = pcm_sample(
            base,
            pcm,
            schedule,
            noise,
            cond,
            window=window,
            tol=1e-6,
            switch_rounds=switch_rounds,
            update=update,
        )
        assert stats.converged
        assert (x - reference).abs().max() <= 1e-5


def test_sampler_object_dispatches():
    schedule = DDIMSchedule(num_inference_steps=16)
    net, cond = SmallNet(), torch.randn(2, 3)
    sampler = Sampler(schedule, method="picard", tol=1e-6)
    noise = torch.randn(sampler.noise_shape(2, H, D))
    ref, _ = Sampler(schedule, method="sequential")(net, noise, cond)
    x, stats = sampler(net, noise, cond)
    assert (x - ref).abs().max() < 1e-5
    _, loose = sampler(net, noise, cond, tol=0.1)
    assert loose.rounds < stats.rounds
    with pytest.raises(ValueError, match="needs a PCM denoiser"):
        Sampler(schedule, method="pcm")(net, noise, cond)


def test_noise_path_is_the_trajectory_of_a_model_that_predicts_x0_zero():
    """With x0 = 0 predicted everywhere and x_T = 0, a DDPM step keeps only its x_t term and its
    noise: the sequential trajectory IS the noise path. DDIM adds no noise: the path is 0."""
    schedule = DDPMSchedule(num_inference_steps=20)
    abar = schedule.alphas_cumprod.float()

    def x0_zero(x, t, cond):
        return x / (1 - abar[t]).sqrt().view(-1, 1, 1)

    noise = make_noise(20, 3)
    noise[0] = 0
    _, stats = sequential_sample(x0_zero, schedule, noise)
    torch.testing.assert_close(noise_path(schedule, noise), stats.trajectory)
    assert noise_path(schedule, noise)[10].abs().max() > 0.1  # (X[T] is x0 alone: path 0)
    assert noise_path(DDIMSchedule(num_inference_steps=20), noise).abs().max() == 0


@pytest.mark.parametrize("update", ["scan", "drift"])
def test_noise_aware_pcm_gets_each_slots_noise_path_and_stays_exact(update):
    """pcm_sees_noise: the PCM is called with the noise path row of exactly the slot and sample
    it evaluates (cond carries the sample index, t the slot), and switching keeps the answer."""
    schedule = DDPMSchedule(num_inference_steps=12)
    base, noise, B = SmallNet(seed=0), make_noise(12, 3), 3
    cond = torch.arange(B, dtype=torch.float32)[:, None].repeat(1, 3)
    path = noise_path(schedule, noise)
    slot_of = {int(t): j for j, t in enumerate(schedule.timesteps)}
    calls: list[int] = []

    def pcm(x, t, c, slot_path):
        for row in range(x.shape[0]):
            j, s = slot_of[int(t[row])], int(c[row, 0])
            assert torch.equal(slot_path[row], path[j, s]), (j, s)
        calls.append(x.shape[0])
        return SmallNet(seed=5)(x, t, c) + 0.1 * slot_path

    reference, _ = sequential_sample(base, schedule, noise, cond)
    x, stats = pcm_sample(base, pcm, schedule, noise, cond, window=4, tol=1e-6, update=update,
                          switch_rounds=2, pcm_sees_noise=True)
    assert calls and stats.converged
    assert (x - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_schedule_config_round_trips_every_setting(kind: str) -> None:
    """Schedule.config holds every constructor argument (it keys the PCM trajectory cache):
    rebuilding from it gives the same config and the same coefficient tables."""
    schedule = SCHEDULES[kind](num_train_timesteps=200, num_inference_steps=20,
                               beta_schedule="linear", beta_start=3e-4, beta_end=0.05,
                               clip_sample=True, clip_sample_range=2.5, prediction_type="sample")
    rebuilt = type(schedule)(**schedule.config)
    assert rebuilt.config == schedule.config
    assert schedule.config["clip_sample_range"] == 2.5 and schedule.config["beta_end"] == 0.05
    for name in ("noise_std", "scan_coef", "error_std"):
        torch.testing.assert_close(getattr(rebuilt, name), getattr(schedule, name))
    other = schedule_like(schedule, "ddim" if kind == "ddpm" else "ddpm", 5)
    assert other.training_settings == schedule.training_settings and other.num_inference_steps == 5


def test_sampler_budget_argument_and_knob_overrides() -> None:
    """A call's budget_s tightens the sampler's own; an unknown override is refused."""
    schedule, net = DDPMSchedule(), SmallNet()
    noise, cond = make_noise(100, 2), torch.randn(2, 3)
    now = [0.0]

    def slow(x, t, c):
        now[0] += 1.0
        return net(x, t, c)

    sampler = Sampler(schedule, method="picard", tol=1e-6, budget_s=10.0)
    _, stats = sampler(slow, noise, cond, CallInputs(budget_s=2.5, clock=lambda: now[0]))
    assert stats.rounds == 2
    with pytest.raises(TypeError, match="unknown sampler overrides"):
        sampler(net, noise, cond, windw=4)
