"""Picard Consistency Model: the model, its objectives, stage=pcm training and checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import app.training as training
from picard_sampler import (
    DDIMSchedule,
    DDPMSchedule,
    Sampler,
    pcm_sample,
    picard_sample,
    sequential_sample,
)
from policy.checkpoint import export_pcm, load_checkpoint, load_policy_checkpoint
from policy.diffusion_policy import DiffusionPolicy
from policy.encoders import LowDimObsEncoder
from policy.normalizer import LinearNormalizer
from policy.pcm import build_pcm
from policy.pcm_training import PCMObjective, TrajectoryDataset, collect_trajectories
from policy.unet import ConditionalUnet1D

REPO_ROOT = Path(__file__).resolve().parents[1]


def training_stage_policy(cfg):
    """The policy the stage of `cfg` trains (app.training.STAGES)."""
    return training.STAGES[cfg.stage](cfg).build_policy()

pytestmark = pytest.mark.usefixtures("one_thread")

H, DA, DC = 8, 2, 4


class GaussianDenoiser(nn.Module):
    """The exact epsilon of Gaussian data x0 ~ N(mu(c), s^2) per element, mu linear in c: a
    deterministic DDIM problem (x0 clipping included) that a tiny PCM learns in seconds."""

    horizon_multiple = 1

    def __init__(self, alphas_cumprod: torch.Tensor, s: float = 0.3):
        super().__init__()
        self.input_dim, self.global_cond_dim, self.s = DA, DC, s
        self.register_buffer("abar", alphas_cumprod.float())
        w = torch.randn(DC, H * DA, generator=torch.Generator().manual_seed(0))
        self.w = nn.Parameter(w, requires_grad=False)  # a parameter: policy.device needs one

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        abar = self.abar[t].view(-1, 1, 1)
        mu = 0.2 * (cond @ self.w).view(-1, H, DA)
        return (1 - abar).sqrt() * (x - abar.sqrt() * mu) / (abar * self.s**2 + 1 - abar)


def gaussian_policy() -> DiffusionPolicy:
    """A DiffusionPolicy around the analytic denoiser (no trainable weights of its own)."""
    train_schedule = DDIMSchedule(num_train_timesteps=100, num_inference_steps=100)
    model = GaussianDenoiser(train_schedule.alphas_cumprod)
    return DiffusionPolicy(
        model, LowDimObsEncoder(DC // 2), LinearNormalizer(), action_dim=DA,
        train_schedule=train_schedule, horizon=H, n_obs_steps=2, n_action_steps=4,
    ).eval()


def gaussian_chunks(policy: DiffusionPolicy, schedule, n: int, seed: int) -> dict:
    """cond, noise and the sequential (fixed-point) trajectory of `n` seeded chunks."""
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(n, DC, generator=g)
    noise = torch.randn(schedule.num_inference_steps + 1, n, H, DA, generator=g)
    _, stats = sequential_sample(policy.denoiser, schedule, noise, cond)
    return {"cond": cond, "noise": noise.transpose(0, 1),
            "fixed_point": stats.trajectory.transpose(0, 1)}


def anytime_errors(policy, schedule, chunks, rounds, switch_rounds=None) -> list[float]:
    """Mean over chunks of max |X_T - sequential| after each of `rounds` rounds, full window."""
    noise, reference = chunks["noise"].transpose(0, 1), chunks["fixed_point"][:, -1]
    errs: list[float] = []

    def record(info):
        errs.append((info["x"] - reference).abs().flatten(1).amax(1).mean().item())

    knobs = {"window": None, "tol": 0.0, "max_rounds": rounds, "callback": record}
    with torch.no_grad():
        if switch_rounds is None:
            picard_sample(policy.denoiser, schedule, noise, chunks["cond"], **knobs)
        else:
            pcm_sample(policy.denoiser, policy.pcm_denoiser, schedule, noise, chunks["cond"],
                       switch_rounds=switch_rounds, pcm_sees_noise=policy.pcm_sees_noise, **knobs)
    return errs


@pytest.mark.parametrize("finetune", ["none", "lora", "full"])
def test_untrained_pcm_equals_the_base_model(finetune: str) -> None:
    torch.manual_seed(0)
    unet = ConditionalUnet1D(DA, 6, down_dims=(16, 32), n_groups=4, diffusion_step_embed_dim=16)
    policy = DiffusionPolicy(
        unet, LowDimObsEncoder(3), LinearNormalizer(), action_dim=DA,
        train_schedule=DDIMSchedule(), horizon=H, n_obs_steps=2, n_action_steps=4,
    )
    policy.attach_pcm(build_pcm(policy, finetune=finetune, head_down_dims=[8, 16],
                                head_n_groups=4, head_step_embed_dim=8, lora_rank=2))
    x, t, c = torch.randn(5, H, DA), torch.randint(0, 100, (5,)), torch.randn(5, 6)
    torch.testing.assert_close(policy.pcm_denoiser(x, t, c), policy.denoiser(x, t, c),
                               rtol=0, atol=0)
    stored = {k for k in policy.state_dict() if k.startswith("pcm.")}
    assert any(k.startswith("pcm.trunk.") for k in stored) == (finetune == "full")
    assert any(k.startswith("pcm.lora") for k in stored) == (finetune == "lora")


def test_bad_pcm_settings_are_named() -> None:
    policy = gaussian_policy()
    with pytest.raises(ValueError, match=r"pcm.model.finetune must be one of \['none', 'lora'"):
        build_pcm(policy, finetune="qlora")
    with pytest.raises(ValueError, match="pcm.objective must be one of"):
        PCMObjective(DDIMSchedule(num_inference_steps=8), objective="distill")
    with pytest.raises(ValueError, match="pcm.switch_rounds must be an int >= 1"):
        PCMObjective(DDIMSchedule(num_inference_steps=8), switch_rounds=0)
    with pytest.raises(ValueError, match="no PCM attached"):
        policy.pcm_denoiser(torch.zeros(1, H, DA), torch.zeros(1, dtype=torch.long),
                            torch.zeros(1, DC))


def train_pcm_briefly(policy, schedule, objective: str, chunks: int = 512, epochs: int = 4):
    """Adam on the PCM objective over seeded chunks; returns the losses."""
    train = TrajectoryDataset(gaussian_chunks(policy, schedule, chunks, seed=1))
    loss_fn = PCMObjective(schedule, objective=objective, switch_rounds=1)
    optimizer = torch.optim.Adam(policy.pcm.parameters(), lr=1e-2)
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(epochs):
        for batch in loader:
            loss = loss_fn(policy, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses


@pytest.mark.parametrize("objective", ["consistency", "landing"])
def test_trained_pcm_beats_picard_on_a_deterministic_ddim_problem(objective: str) -> None:
    """A few seconds of training: under a budget of 1-2 rounds the PCM's chunk is far closer to
    the sequential one than plain Picard's (it reaches error 0.3 in fewer rounds), and switching
    still converges to the sequential sample. (Later rounds need not be better: docs/design.md
    §4.7.)"""
    torch.manual_seed(0)
    policy = gaussian_policy()
    schedule = DDIMSchedule(num_train_timesteps=100, num_inference_steps=8)
    policy.attach_pcm(build_pcm(policy, head_down_dims=[16, 32], head_n_groups=4,
                                head_step_embed_dim=16))
    losses = train_pcm_briefly(policy, schedule, objective)
    assert sum(losses[-8:]) < 0.5 * sum(losses[:8])
    test = gaussian_chunks(policy, schedule, 64, seed=2)

    picard = anytime_errors(policy, schedule, test, rounds=4)
    pcm = anytime_errors(policy, schedule, test, rounds=4, switch_rounds=1)
    assert pcm[0] < 0.5 * picard[0] and pcm[1] < 0.5 * picard[1], (pcm, picard)
    threshold = 0.3
    assert min(r for r, e in enumerate(pcm, 1) if e <= threshold) < min(
        [r for r, e in enumerate(picard, 1) if e <= threshold] + [len(picard) + 1]
    )
    # Switching: the answer is the base model's sequential sample, whatever the PCM learned.
    noise = test["noise"].transpose(0, 1)
    with torch.no_grad():
        x, stats = pcm_sample(policy.denoiser, policy.pcm_denoiser, schedule, noise,
                              test["cond"], tol=1e-4, switch_rounds=1)
    assert stats.converged
    torch.testing.assert_close(x, test["fixed_point"][:, -1], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_noise_aware_pcm_lands_closer_than_a_naive_one_on_stochastic_ddpm() -> None:
    """docs/design.md §4.7 (c): with DDPM a cold slot's fixed point depends on the noise z[1..j]
    it has not seen; a PCM that sees the noise path lands its rounds closer to the sequential
    sample than the same PCM without it (round 1 a little, rounds 2-3 about 2x), and switching
    still gives the exact sample."""
    schedule = DDPMSchedule(num_train_timesteps=100, num_inference_steps=8)
    test_errors = {}
    for sees_noise in (False, True):
        torch.manual_seed(0)
        policy = gaussian_policy()
        policy.attach_pcm(build_pcm(policy, head_down_dims=[16, 32], head_n_groups=4,
                                    head_step_embed_dim=16, sees_noise=sees_noise))
        train_pcm_briefly(policy, schedule, "landing")
        test = gaussian_chunks(policy, schedule, 64, seed=2)
        test_errors[sees_noise] = anytime_errors(policy, schedule, test, rounds=3,
                                                 switch_rounds=1)
    picard = anytime_errors(policy, schedule, test, rounds=3)
    aware, naive = test_errors[True], test_errors[False]
    # Measured (1 thread): naive 0.81 / 0.66 / 0.35, aware 0.67 / 0.38 / 0.17, Picard 1.54 / 1.27
    # / 0.43 after 1 / 2 / 3 rounds.
    assert naive[0] < 0.6 * picard[0], (naive, picard)
    assert aware[0] < 0.9 * naive[0] and aware[1] < 0.7 * naive[1] and aware[2] < 0.7 * naive[2], (
        aware, naive)
    noise = test["noise"].transpose(0, 1)
    with torch.no_grad():
        x, stats = pcm_sample(policy.denoiser, policy.pcm_denoiser, schedule, noise,
                              test["cond"], tol=1e-4, switch_rounds=1, pcm_sees_noise=True)
    assert stats.converged
    torch.testing.assert_close(x, test["fixed_point"][:, -1], atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="this PCM sees the noise path"):
        policy.pcm_denoiser(noise[0], torch.zeros(64, dtype=torch.long), test["cond"])


@pytest.mark.parametrize("objective", ["consistency", "landing"])
def test_both_objectives_hand_a_noise_aware_pcm_its_path(objective: str) -> None:
    """With sees_noise every PCM call of either loss gets the noise path (a call without it is
    an error), over K_s=2 on-policy rounds, and the gradient reaches the head."""
    policy = gaussian_policy()
    schedule = DDPMSchedule(num_train_timesteps=100, num_inference_steps=6)
    policy.attach_pcm(build_pcm(policy, head_down_dims=[8, 16], head_n_groups=4,
                                head_step_embed_dim=8, sees_noise=True))
    batch = gaussian_chunks(policy, schedule, 4, seed=4)
    PCMObjective(schedule, objective=objective, switch_rounds=2)(policy, batch).backward()
    assert policy.pcm.head.final[-1].weight.grad.abs().sum() > 0


def test_landing_loss_is_zero_when_the_round_lands_on_the_fixed_point() -> None:
    """Objective (a) from the fixed point itself with the base model: Picard's update keeps X*."""
    policy = gaussian_policy()
    schedule = DDIMSchedule(num_train_timesteps=100, num_inference_steps=8)
    chunks = gaussian_chunks(policy, schedule, 4, seed=3)
    objective = PCMObjective(schedule, objective="landing")
    noise, target = chunks["noise"].transpose(0, 1), chunks["fixed_point"].transpose(0, 1)
    new = objective._round(policy, policy.denoiser, noise, chunks["cond"], target, grad=False)
    assert objective.landing_loss(new, target).item() < 1e-6
    assert objective.landing_loss(noise[:1].expand_as(noise), target).item() > 1.0


def test_collected_trajectories_hold_the_sequential_sample_and_flag_blown_up_iterates(
    make_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    import policy.pcm_training as pcm_training
    from policy.data import SequenceDataset

    cfg = make_cfg()
    torch.manual_seed(0)
    policy = training_stage_policy(cfg)
    windows = SequenceDataset(cfg.data.path, obs_keys=list(cfg.data.obs_keys), horizon=16)
    policy.normalizer.fit(windows.all_obs_and_actions())
    schedule = DDIMSchedule(num_inference_steps=6)
    data = collect_trajectories(policy, schedule, windows, 5, seed=0, iterate_rounds=2,
                                batch_size=3, progress=False)
    assert data["fixed_point"].shape == (5, 7, 16, 2) and data["iterates"].shape == (5, 2, 7, 16, 2)
    obs = torch.stack([windows[int(i)]["obs"] for i in data["window"]])
    cond = policy.encode_obs(policy.check_obs(obs))
    x, _ = sequential_sample(policy.denoiser, schedule, data["noise"].transpose(0, 1), cond)
    torch.testing.assert_close(data["fixed_point"][:, -1], x)
    assert data["iterate_ok"].all()
    monkeypatch.setattr(pcm_training, "BLOWN_UP", 1e-3)
    flagged = collect_trajectories(policy, schedule, windows, 5, seed=0, iterate_rounds=2,
                                   update="drift", progress=False)
    assert not flagged["iterate_ok"].any()


# ------------------------------------------------------------------------ stage=pcm, files
@pytest.fixture(scope="module")
def base_checkpoint(tiny_demos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A debug=tiny base policy trained for 10 steps (stage dp)."""
    from hydra import compose, initialize_config_dir

    run_dir = tmp_path_factory.mktemp("pcm_base")
    conf_dir = REPO_ROOT / "conf"
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose("train", overrides=[
            "debug=tiny", f"data.path={tiny_demos}", f"run_dir={run_dir}",
            "train.max_steps=10", "val.every=0",
        ])
    threads = torch.get_num_threads()
    training.run_training(cfg)
    torch.set_num_threads(threads)
    return run_dir / "latest.ckpt"


def pcm_overrides(base: Path, tmp_path: Path, *extra: str) -> tuple[str, ...]:
    """stage=pcm on `base`, trajectories cached per test."""
    return ("stage=pcm", f"pcm.base_checkpoint={base}", f"pcm.data.cache={tmp_path}/traj.pt",
            "train.max_steps=10", "val.every=5", "checkpoint.every=5", *extra)


def test_stage_pcm_checkpoint_holds_base_and_pcm_and_samples_exactly(
    make_cfg, base_checkpoint: Path, tmp_path: Path
) -> None:
    summary = training.run_training(make_cfg(*pcm_overrides(base_checkpoint, tmp_path),
                                     "pcm.switch_rounds=2", "pcm.objective=landing",
                                     "pcm.iterates=base"))
    assert summary["step"] == 10 and "val/loss" in summary
    path = tmp_path / "run" / "latest.ckpt"
    ckpt = load_checkpoint(path)
    assert set(ckpt["pcm"]) == {"config", "model", "ema"}
    assert not any(k.startswith("pcm.") for k in ckpt["model"])
    base = load_checkpoint(base_checkpoint)
    for key, value in base["ema"]["model"].items():  # the base is untouched
        torch.testing.assert_close(ckpt["ema"]["model"][key], value, rtol=0, atol=0)

    policy = load_policy_checkpoint(path)
    assert policy.pcm is not None
    obs = torch.randn(3, 2, 20) * 50 + 250
    schedule = DDIMSchedule(num_inference_steps=4)
    noise = torch.randn(5, 3, 16, 2, generator=torch.Generator().manual_seed(0))
    expected, _ = policy.predict_action(obs, Sampler(schedule, method="sequential"), noise=noise)
    actual, stats = policy.predict_action(
        obs, Sampler(schedule, method="pcm", tol=1e-3, switch_rounds=2), noise=noise
    )
    assert stats.converged
    torch.testing.assert_close(actual, expected, atol=1e-3 * 512, rtol=0)

    exported = export_pcm(path, tmp_path / "ship" / "pcm.ckpt", base_checkpoint)
    assert exported.stat().st_size < path.stat().st_size / 4
    shipped = load_policy_checkpoint(exported)
    x, t, c = torch.randn(4, 16, 2), torch.randint(0, 100, (4,)), torch.randn(4, 40)
    torch.testing.assert_close(shipped.pcm_denoiser(x, t, c), policy.pcm_denoiser(x, t, c),
                               atol=5e-2, rtol=1e-2)  # float16 weights
    assert load_checkpoint(exported)["pcm"]["ema"]["head.final.1.weight"].dtype == torch.float16


def test_stage_pcm_trains_a_noise_aware_ddpm_pcm_that_samples_exactly(
    make_cfg, base_checkpoint: Path, tmp_path: Path
) -> None:
    """pcm=ddpm100 (docs/design.md §4.7 (c)): the stored PCM sees the noise path, predict_action
    hands it the path, and switching still returns the sequential DDPM sample, also after export."""
    training.run_training(make_cfg(*pcm_overrides(base_checkpoint, tmp_path), "pcm=ddpm100",
                           "pcm.schedule.num_inference_steps=6", "pcm.objective=landing",
                           "train.max_steps=4"))
    path = tmp_path / "run" / "latest.ckpt"
    assert load_checkpoint(path)["pcm"]["config"]["sees_noise"] is True
    policy = load_policy_checkpoint(path)
    assert policy.pcm_sees_noise
    obs = torch.randn(3, 2, 20) * 50 + 250
    schedule = DDPMSchedule(num_inference_steps=6)
    noise = torch.randn(7, 3, 16, 2, generator=torch.Generator().manual_seed(0))
    expected, _ = policy.predict_action(obs, Sampler(schedule, method="sequential"), noise=noise)
    actual, stats = policy.predict_action(
        obs, Sampler(schedule, method="pcm", tol=1e-3), noise=noise
    )
    assert stats.converged
    torch.testing.assert_close(actual, expected, atol=1e-3 * 512, rtol=0)
    shipped = load_policy_checkpoint(
        export_pcm(path, tmp_path / "ship" / "pcm.ckpt", base_checkpoint))
    assert shipped.pcm_sees_noise


def test_exported_pcm_refuses_a_missing_or_different_base(
    make_cfg, base_checkpoint: Path, tmp_path: Path
) -> None:
    training.run_training(make_cfg(*pcm_overrides(base_checkpoint, tmp_path), "train.max_steps=2"))
    base_copy = tmp_path / "base.ckpt"
    base_copy.write_bytes(base_checkpoint.read_bytes())
    exported = export_pcm(tmp_path / "run" / "latest.ckpt", tmp_path / "pcm.ckpt", base_copy)
    ckpt = torch.load(base_copy, weights_only=True)
    key = next(iter(ckpt["ema"]["model"]))
    ckpt["ema"]["model"][key] = ckpt["ema"]["model"][key] + 1
    torch.save(ckpt, base_copy)
    with pytest.raises(ValueError, match="fingerprint differs"):
        load_policy_checkpoint(exported)
    base_copy.unlink()
    with pytest.raises(FileNotFoundError, match="needs its base checkpoint base.ckpt"):
        load_policy_checkpoint(exported)
    with pytest.raises(ValueError, match="trained on other base weights"):
        export_pcm(tmp_path / "run" / "latest.ckpt", tmp_path / "x.ckpt",
                   _other_base(tmp_path, base_checkpoint))


def _other_base(tmp_path: Path, base_checkpoint: Path) -> Path:
    """A copy of the base checkpoint with one weight changed."""
    ckpt = torch.load(base_checkpoint, weights_only=True)
    key = next(iter(ckpt["ema"]["model"]))
    ckpt["ema"]["model"][key] = ckpt["ema"]["model"][key] * 2 + 1
    path = tmp_path / "other_base.ckpt"
    torch.save(ckpt, path)
    return path


@pytest.mark.slow
def test_stage_pcm_resumes_exactly_and_checks_its_cache(
    make_cfg, base_checkpoint: Path, tmp_path: Path, sigterm_at_train_step
) -> None:
    """SIGTERM at step 4 of 8 -> latest.ckpt -> resume=true equals an uninterrupted run."""
    overrides = pcm_overrides(base_checkpoint, tmp_path, "train.max_steps=8", "val.every=4",
                              "pcm.switch_rounds=2", "checkpoint.every=100")
    straight = training.run_training(make_cfg(*overrides, run_dir=tmp_path / "straight"))
    with sigterm_at_train_step(4):
        first = training.run_training(make_cfg(*overrides, run_dir=tmp_path / "split"))
    assert first["stopped_early"] and first["step"] == 4
    resumed = training.run_training(make_cfg(*overrides, "resume=true", run_dir=tmp_path / "split"))
    assert resumed["step"] == straight["step"] == 8
    a = load_checkpoint(tmp_path / "straight" / "latest.ckpt")
    b = load_checkpoint(tmp_path / "split" / "latest.ckpt")
    for part in ("model", "ema"):
        for key, value in a["pcm"][part].items():
            torch.testing.assert_close(b["pcm"][part][key], value, rtol=0, atol=0, msg=key)
    assert resumed["val/loss"] == straight["val/loss"]

    with pytest.raises(training.ConfigError, match=r"holds another collection .*n_chunks"):
        training.run_training(
            make_cfg(*overrides, "pcm.data.n_chunks=7", run_dir=tmp_path / "other"))
    with pytest.raises(training.ConfigError, match="pcm.base_checkpoint must be an existing"):
        training.run_training(make_cfg("stage=pcm", f"pcm.base_checkpoint={tmp_path}/nothing.ckpt"))


def test_pcm_init_reuses_a_trained_head_for_another_trunk(
    make_cfg, base_checkpoint: Path, tmp_path: Path
) -> None:
    """pcm.init from a head-only PCM starts a LoRA fine-tune from its head; other settings that
    differ are refused by name."""
    training.run_training(make_cfg(*pcm_overrides(base_checkpoint, tmp_path), "train.max_steps=2",
                           run_dir=tmp_path / "head"))
    head_ckpt = tmp_path / "head" / "latest.ckpt"
    trained = load_checkpoint(head_ckpt)["pcm"]["ema"]
    assert trained["head.final.1.weight"].abs().sum() > 0  # the zero-initialised layer moved
    cfg = make_cfg(*pcm_overrides(base_checkpoint, tmp_path), f"pcm.init={head_ckpt}",
                   "pcm.model.finetune=lora", run_dir=tmp_path / "lora")
    policy = training_stage_policy(cfg)
    for key, value in policy.pcm.head.state_dict().items():
        torch.testing.assert_close(value, trained[f"head.{key}"], rtol=0, atol=0, msg=key)
    assert all(b.abs().sum() == 0 for b in policy.pcm.lora.B.values())  # a fresh, zero LoRA
    older = load_checkpoint(head_ckpt)  # a PCM saved before `sees_noise` existed
    del older["pcm"]["config"]["sees_noise"]
    torch.save(older, tmp_path / "older.ckpt")
    training_stage_policy(make_cfg(*pcm_overrides(base_checkpoint, tmp_path),
                                    f"pcm.init={tmp_path}/older.ckpt", "pcm.model.finetune=lora"))
    with pytest.raises(training.ConfigError, match="pcm.init: checkpoint not found"):
        training_stage_policy(make_cfg(*pcm_overrides(base_checkpoint, tmp_path),
                                        f"pcm.init={tmp_path}/missing.ckpt"))
    with pytest.raises(training.ConfigError, match=r"\['head_kernel_size'\] differ"):
        training_stage_policy(make_cfg(*pcm_overrides(base_checkpoint, tmp_path),
                                        f"pcm.init={head_ckpt}", "pcm.model.head_kernel_size=3"))
