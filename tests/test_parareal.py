"""Parareal with a linear coarse propagator (picard_sampler.parareal): the sequential sample is
still the fixed point whatever the propagator, the fitted propagator is the step's Jacobian,
it cuts rounds, and budgets, warm starts, PCM switching and inpainting work as before."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from picard_sampler import (
    CallInputs,
    DDIMSchedule,
    DDPMSchedule,
    Inpaint,
    Sampler,
    fit_linear_propagator,
    pcm_sample,
    picard_sample,
    sequential_sample,
)
from policy import load_policy
from policy.propagator import load_propagators, save_propagators, schedule_key
from tests.conftest import run_repo_script
from tests.test_samplers import D, GaussianEps, H, SmallNet, make_noise

SCHEDULES = {"ddpm": DDPMSchedule, "ddim": DDIMSchedule}
E = H * D


def _cond(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind,steps", [("ddpm", 100), ("ddim", 16)])
@pytest.mark.parametrize("denoiser", ["net", "gaussian"])
@pytest.mark.parametrize("propagator", ["fitted", "random"])
@pytest.mark.parametrize("window", [None, 5])
def test_tight_tol_equals_sequential(kind, steps, denoiser, propagator, window):
    schedule = SCHEDULES[kind](num_inference_steps=steps)
    net = SmallNet() if denoiser == "net" else GaussianEps(schedule)
    if propagator == "fitted":  # calibrated on other noise and observations
        matrices = fit_linear_propagator(net, schedule, make_noise(steps, 3, seed=9), _cond(3, 9))
    else:  # a poor propagator (scan's a_j I, perturbed) keeps the fixed point; only the
        # speed depends on it (one that blows up every step would overflow before converging)
        perturbation = 0.01 * torch.randn(steps, E, E, generator=torch.Generator().manual_seed(2))
        scan = schedule.table("scan_coef", torch.zeros(1)).view(-1, 1, 1) * torch.eye(E)
        matrices = scan + perturbation
    noise, cond = make_noise(steps, 4), _cond(4, 0)
    reference, _ = sequential_sample(net, schedule, noise, cond)
    x, stats = picard_sample(net, schedule, noise, cond, window=window, tol=1e-6,
                             update="parareal", propagator=matrices)
    assert stats.converged
    assert (x - reference).abs().max() <= 1e-5


def test_fitted_propagator_is_the_jacobian_of_an_affine_step():
    """The analytic Gaussian denoiser makes each step affine in x: the finite-difference fit is
    its exact Jacobian (to the finite-difference error), and Parareal then needs a round, a
    second for that error and a third that confirms it, where the scan update needs many."""
    schedule = DDIMSchedule(num_inference_steps=16, clip_sample=False)
    net = GaussianEps(schedule)
    matrices = fit_linear_propagator(net, schedule, make_noise(16, 2, seed=3))
    x = torch.randn(1, H, D, generator=torch.Generator().manual_seed(4))

    def step(v: torch.Tensor, j: int) -> torch.Tensor:
        idx = torch.tensor([j])
        v = v.view(1, H, D)
        return schedule.step_mean(net(v, schedule.timesteps[idx], None), v, idx).flatten()

    for j in (0, 7, 15):
        jac = torch.autograd.functional.jacobian(lambda v, j=j: step(v, j), x.flatten())
        assert torch.allclose(matrices[j], jac, atol=2e-3), j
    noise = make_noise(16, 4)
    _, scan = picard_sample(net, schedule, noise, None, tol=1e-4)
    _, parareal = picard_sample(net, schedule, noise, None, tol=1e-4, update="parareal",
                                propagator=matrices)
    assert parareal.rounds <= 3 and scan.rounds >= 2 * parareal.rounds, scan.rounds


def test_scan_and_drift_are_special_cases():
    """G_j(x) = a_j x is the scan update and G_j(x) = x the drift update, iterate for iterate."""
    schedule = DDPMSchedule(num_inference_steps=50)
    net, noise, cond = SmallNet(), make_noise(50, 3), _cond(3, 1)
    eye = torch.eye(E).expand(50, E, E)
    scan_coef = schedule.table("scan_coef", noise)
    for update, matrices in (("scan", scan_coef.view(-1, 1, 1) * eye), ("drift", eye)):
        plain, _ = picard_sample(net, schedule, noise, cond, update=update, max_rounds=4)
        linear, _ = picard_sample(net, schedule, noise, cond, update="parareal",
                                  propagator=matrices.contiguous(), max_rounds=4)
        # drift's a_j = 1 enters its PCM-free rounds only through G: the same iterates
        assert torch.allclose(plain, linear, atol=1e-5), update


def test_budgets_warm_starts_pcm_and_inpainting_still_work():
    schedule = DDIMSchedule(num_inference_steps=16)
    net, noise, cond = SmallNet(), make_noise(16, 2), _cond(2, 1)
    matrices = fit_linear_propagator(net, schedule, make_noise(16, 3, seed=5), _cond(3, 5))
    sampler = Sampler(schedule, "picard", tol=1e-6, update="parareal")
    reference, ref_stats = sequential_sample(net, schedule, noise, cond)
    x, stats = sampler(net, noise, cond, CallInputs(propagator=matrices), max_rounds=2)
    assert not stats.converged and stats.rounds == 2 and torch.isfinite(x).all()
    x, stats = sampler(net, noise, cond,
                       CallInputs(init=ref_stats.trajectory, propagator=matrices), tol=1e-4)
    assert stats.rounds == 1 and (x - reference).abs().max() <= 1e-5
    x, stats = pcm_sample(net, SmallNet(seed=7), schedule, noise, cond, tol=1e-6,
                          update="parareal", propagator=matrices)
    assert stats.converged and (x - reference).abs().max() <= 1e-5
    x, stats = sampler(net, noise, cond, CallInputs(propagator=matrices), accel="anderson")
    assert stats.converged and (x - reference).abs().max() <= 1e-5
    inpaint = Inpaint(torch.full((2, H, D), 0.3), torch.cat(
        [torch.ones(2, 4, 1), 0.5 * torch.ones(2, 3, 1), torch.zeros(2, H - 7, 1)], 1))
    constrained, _ = sequential_sample(net, schedule, noise, cond, inpaint=inpaint)
    x, stats = sampler(net, noise, cond, CallInputs(inpaint=inpaint, propagator=matrices))
    assert stats.converged and (x - constrained).abs().max() <= 1e-5
    # the sequential sampler has no rounds to speed up: it ignores the propagator
    x, _ = Sampler(schedule, "sequential")(net, noise, cond,
                                        CallInputs(propagator=matrices))
    assert torch.equal(x, reference)


def test_bad_propagators_are_named():
    schedule = DDIMSchedule(num_inference_steps=16)
    net, noise = SmallNet(), make_noise(16, 2)
    run = lambda **kw: picard_sample(net, schedule, noise, None, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="update=parareal needs a propagator"):
        run(update="parareal")
    with pytest.raises(ValueError, match=r"shape \(T, E, E\) = \(16, 32, 32\)"):
        run(update="parareal", propagator=torch.zeros(16, 8, 8))
    with pytest.raises(ValueError, match="NaN or inf"):
        run(update="parareal", propagator=torch.full((16, E, E), float("nan")))
    with pytest.raises(ValueError, match="update=parareal only"):
        run(update="scan", propagator=torch.zeros(16, E, E))
    with pytest.raises(ValueError, match="fd_step"):
        fit_linear_propagator(net, schedule, noise, fd_step=0.0)
    with pytest.raises(ValueError, match="update must be one of"):
        Sampler(schedule, "picard", update="newton")


# --------------------------------------------------------------- a policy's fitted propagators
def _copy_checkpoint(tiny_checkpoint: Path, folder: Path) -> Path:
    folder.mkdir()
    return Path(shutil.copy(tiny_checkpoint, folder / "policy.ckpt"))


@pytest.mark.slow
def test_fit_script_writes_propagators_that_load_policy_attaches(tiny_checkpoint, tmp_path):
    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path / "policy")
    done = run_repo_script("scripts/fit_propagator.py", ckpt, "--schedules", "ddim-8",
                           "ddpm-12", "--chunks", "4", "--threads", "1")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "policy" / "propagators.pt").is_file()
    policy = load_policy(ckpt)
    obs = torch.randn(3, policy.n_obs_steps, 20)
    for kind, steps in (("ddim", 8), ("ddpm", 12)):
        sequential = policy.make_sampler("sequential", kind, steps)
        parareal = policy.make_sampler("picard", kind, steps, update="parareal", tol=1e-6)
        noise = torch.randn(sequential.noise_shape(3, policy.horizon, policy.action_dim),
                            generator=torch.Generator().manual_seed(0))
        reference, _ = policy.predict_action(obs, sequential, noise=noise)
        actions, stats = policy.predict_action(obs, parareal, noise=noise)
        assert stats.converged and torch.allclose(actions, reference, atol=1e-3)
    # a second fit merges into the file: both schedules are still there; stored in float16
    # and checked on 3 validation windows (both walks reported, in the entry and printed)
    done = run_repo_script("scripts/fit_propagator.py", ckpt, "--schedules", "ddim-4",
                           "--chunks", "2", "--threads", "1", "--dtype", "float16",
                           "--check", "3")
    assert done.returncode == 0, done.stderr
    assert "check on 3 validation windows" in done.stdout, done.stdout
    assert len(load_propagators(tmp_path / "policy" / "propagators.pt", policy)) == 3
    stored = torch.load(tmp_path / "policy" / "propagators.pt", weights_only=True)["entries"]
    ddim4 = next(entry for key, entry in stored.items() if key.startswith("ddim-4-"))
    assert ddim4["propagator"].dtype == torch.float16
    assert ddim4["check"]["windows"] == 3 and ddim4["check"]["split"] == "val"
    for walk in ("scan", "parareal"):
        report = ddim4["check"][walk]
        assert 1 <= report["rounds"] <= 4 and 0.0 <= report["converged"] <= 1.0
        assert report["rounds_mean"] <= report["rounds"]
    ddim8 = next(entry for key, entry in stored.items() if key.startswith("ddim-8-"))
    assert ddim8["propagator"].dtype == torch.float32  # the default, from the first fit


def test_propagators_of_other_weights_are_refused(tiny_checkpoint, tmp_path):
    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path / "policy")
    policy = load_policy(ckpt)
    sampler = policy.make_sampler("picard", "ddim", 8, update="parareal")
    obs = torch.randn(1, policy.n_obs_steps, 20)
    with pytest.raises(ValueError, match="scripts/fit_propagator.py"):
        policy.predict_action(obs, sampler)  # none fitted yet: says how to fit one
    other = load_policy(ckpt)
    with torch.no_grad():
        next(other.model.parameters()).add_(1.0)
    schedule = sampler.schedule
    save_propagators(tmp_path / "policy" / "propagators.pt", other, {schedule_key(schedule): {
        "propagator": torch.zeros(8, policy.horizon * 2, policy.horizon * 2)}})
    with pytest.warns(UserWarning, match="fitted for other base weights"):
        policy = load_policy(ckpt)
    with pytest.raises(ValueError, match="none is attached"):
        policy.predict_action(obs, sampler)
    (tmp_path / "policy" / "propagators.pt").write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="corrupt or unreadable"):
        load_policy(ckpt)


@pytest.mark.slow
def test_fit_script_errors_are_one_line(tiny_checkpoint, tmp_path):
    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path / "policy")
    for args, message in ((["--schedules", "dpm-10"], "--schedules: 'dpm-10' is not NAME-STEPS"),
                          (["--chunks", "0"], "--chunks must be >= 1"),
                          (["--check", "-1"], "--check must be >= 0")):
        done = run_repo_script("scripts/fit_propagator.py", ckpt, *args)
        assert done.returncode == 1 and done.stderr.strip().startswith("error:"), done.stderr
        assert message in done.stderr and "Traceback" not in done.stderr


@pytest.mark.slow
def test_eval_uses_the_propagator_or_falls_back_to_scan_with_a_warning(
    eval_cfg, tiny_checkpoint, tmp_path
):
    """No propagator: a warning, the run samples (and records) update=scan. Fitted beside the
    checkpoint: the run samples with parareal, exactly (exact_err against sequential)."""
    from omegaconf import open_dict

    from app import evaluation

    cfg = eval_cfg("sampler=picard_ddim16", "sampler.update=parareal", "sampler.tol=1e-5")
    with pytest.warns(UserWarning, match="sampling with update=scan instead"):
        evaluation.run_eval(cfg, tmp_path / "scan")
    assert json.loads((tmp_path / "scan" / "results.json").read_text()
                      )["sampler"]["update"] == "scan"
    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path / "policy")
    done = run_repo_script("scripts/fit_propagator.py", ckpt, "--schedules", "ddim-16",
                           "--chunks", "4", "--threads", "1")
    assert done.returncode == 0, done.stderr
    with open_dict(cfg):
        cfg.checkpoint = str(ckpt)
    evaluation.run_eval(cfg, tmp_path / "parareal")
    results = json.loads((tmp_path / "parareal" / "results.json").read_text())
    assert results["sampler"]["update"] == "parareal"
    assert results["metrics"]["exact_err_max"] < 1e-3
