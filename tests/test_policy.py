"""The Diffusion Policy backbone: UNet, encoders, normalizer, EMA, policy, checkpoints."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from picard_sampler import DDIMSchedule, DDPMSchedule, Sampler
from policy.checkpoint import (
    export_policy,
    load_checkpoint,
    load_policy_checkpoint,
    save_checkpoint,
    write_config_yaml,
)
from policy.diffusion_policy import DiffusionPolicy
from policy.ema import EMA
from policy.encoders import ImageObsEncoder, LowDimObsEncoder, crop_images
from policy.normalizer import LinearNormalizer
from policy.unet import ConditionalUnet1D

To, H, Ta, Do, Da = 2, 16, 8, 20, 2
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_policy(seed: int = 0, obs_dim: int = Do, **kwargs) -> DiffusionPolicy:
    """A 2-level, 16-channel policy with a normalizer fitted on PushT-like ranges."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    normalizer = LinearNormalizer().fit({
        "obs": rng.uniform(0, 512, size=(200, obs_dim)),
        "action": rng.uniform(0, 512, size=(200, Da)),
    })
    model = functools.partial(
        ConditionalUnet1D, down_dims=(16, 32), n_groups=4, diffusion_step_embed_dim=16
    )
    kwargs.setdefault("train_schedule", DDPMSchedule())
    return DiffusionPolicy(model, LowDimObsEncoder(obs_dim), normalizer, action_dim=Da, **kwargs)


def pusht_obs(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).uniform(0, 512, (batch, To, Do))).float()


# ----------------------------------------------------------------------------------- UNet
def test_unet_maps_chunk_to_same_shape() -> None:
    unet = ConditionalUnet1D(Da, To * Do, down_dims=(16, 32, 64), n_groups=4,
                             diffusion_step_embed_dim=16)
    x = torch.randn(3, H, Da)
    eps = unet(x, torch.tensor([0, 50, 99]), torch.randn(3, To * Do))
    assert eps.shape == x.shape
    assert unet.horizon_multiple == 4


def test_unet_rejects_channels_not_divisible_by_groups() -> None:
    with pytest.raises(ValueError, match="multiples of n_groups"):
        ConditionalUnet1D(Da, 4, down_dims=(12, 24), n_groups=8)


# ----------------------------------------------------------------------------- normalizer
def test_normalizer_round_trip_and_range_with_constant_dimension() -> None:
    data = np.random.default_rng(0).uniform(-3, 7, size=(500, 3)).astype(np.float32)
    data[:, 1] = 4.0  # a constant dimension must neither divide by 0 nor lose its value
    norm = LinearNormalizer().fit({"x": data})
    x = torch.from_numpy(data)
    nx = norm.normalize("x", x)
    assert torch.allclose(nx.amin(0)[[0, 2]], torch.tensor(-1.0)) and nx.amax() <= 1.0 + 1e-6
    assert torch.all(nx[:, 1] == 0)
    torch.testing.assert_close(norm.unnormalize("x", nx), x)


def test_normalizer_statistics_load_into_an_unfitted_normalizer() -> None:
    norm = LinearNormalizer().fit({"obs": np.arange(12.0).reshape(4, 3), "action": np.eye(2)})
    restored = LinearNormalizer()
    restored.load_state_dict(norm.state_dict())
    x = torch.randn(5, 3)
    torch.testing.assert_close(restored.normalize("obs", x), norm.normalize("obs", x))
    assert restored.keys == ["obs", "action"]


def test_normalizer_errors_name_the_key() -> None:
    norm = LinearNormalizer().fit({"obs": np.zeros((4, 3))})
    with pytest.raises(KeyError, match="'action'"):
        norm.normalize("action", torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"normalizer\['obs'\]: last dim must be 3"):
        norm.normalize("obs", torch.zeros(1, 2))


# ------------------------------------------------------------------------------------ EMA
def test_ema_decay_follows_dp_warmup_and_cap() -> None:
    ema = EMA(torch.nn.Linear(1, 1), power=0.75, max_decay=0.9999)
    decays = []
    for _ in range(4):
        decays.append(ema.decay())
        ema.num_updates += 1
    assert decays[:2] == [0.0, 0.0]
    assert decays[2:] == pytest.approx([1 - 2**-0.75, 1 - 3**-0.75])
    ema.num_updates = 10**9
    assert ema.decay() == 0.9999


def test_ema_averages_parameters_and_copies_buffers() -> None:
    model = torch.nn.BatchNorm1d(1)
    ema = EMA(model)
    for value in (1.0, 2.0, 3.0):
        model.weight.data.fill_(value)
        model.running_mean.fill_(value)
        ema.update(model)
    d = 1 - 2**-0.75  # third update; the first two copy
    assert ema.model.weight.item() == pytest.approx(d * 2.0 + (1 - d) * 3.0)
    assert ema.model.running_mean.item() == 3.0


# ------------------------------------------------------------------------------- encoders
@pytest.mark.parametrize("cameras", [["image"], ["left", "right"]])
def test_image_encoder_feature_shape_with_one_and_two_cameras(cameras: list[str]) -> None:
    encoder = ImageObsEncoder(
        {key: (96, 96, 3) for key in cameras}, {"agent_pos": (2,)}, width=8
    )
    obs = {key: torch.randint(0, 256, (2, To, 96, 96, 3)).float() for key in cameras}
    obs["agent_pos"] = torch.randn(2, To, 2)
    features = encoder(obs)
    assert features.shape == (2, To, 64 * len(cameras) + 2) == (2, To, encoder.feature_dim)
    encoder.eval()  # centre crop: deterministic
    torch.testing.assert_close(encoder(obs), encoder(obs))


def test_resnet18_trunk_has_resnet18_size() -> None:
    encoder = ImageObsEncoder({"image": (96, 96, 3)})
    trunk = encoder.cameras["image"].trunk
    assert sum(p.numel() for p in trunk.parameters()) == pytest.approx(11.17e6, rel=1e-3)


def test_random_crop_takes_a_window_per_image_and_eval_crop_is_centred() -> None:
    images = torch.arange(2 * 10 * 10, dtype=torch.float32).reshape(2, 1, 10, 10)
    centre = crop_images(images, (6, 6), random=False)
    torch.testing.assert_close(centre, images[:, :, 2:8, 2:8])
    crops = crop_images(images, (6, 6), random=True)
    for img, crop in zip(images, crops, strict=True):
        top, left = divmod(int(crop[0, 0, 0] - img[0, 0, 0]), 10)
        torch.testing.assert_close(crop, img[:, top : top + 6, left : left + 6])


# --------------------------------------------------------------------------------- policy
def test_config_errors_name_the_key_and_allowed_values() -> None:
    with pytest.raises(ValueError, match=r"policy.n_action_steps must be <= horizon"):
        tiny_policy(n_action_steps=16)
    with pytest.raises(ValueError, match=r"policy.horizon must be a multiple of 2"):
        tiny_policy(horizon=15)


@pytest.mark.parametrize(
    ("obs", "match"),
    [
        (torch.zeros(4, To, Do + 1), r"'obs': expected shape \(B, 2, 20\), got \(4, 2, 21\)"),
        (torch.zeros(4, To + 1, Do), r"expected shape \(B, 2, 20\), got \(4, 3, 20\)"),
        (torch.zeros(To, Do), r"expected shape \(B, 2, 20\), got \(2, 20\)"),
        ({"state": torch.zeros(4, To, Do)}, r"missing keys \['obs'\]"),
    ],
)
def test_wrong_observation_shape_is_a_clear_error(obs: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_policy().predict_action(obs, Sampler(DDIMSchedule(num_inference_steps=4)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_observation_is_a_clear_error(bad: float) -> None:
    obs = pusht_obs(2)
    obs[1, 0, 3] = bad
    with pytest.raises(ValueError, match="observation 'obs' contains NaN or inf"):
        tiny_policy().predict_action(obs, Sampler(DDIMSchedule(num_inference_steps=4)))


def test_predict_action_returns_the_executed_slice_of_the_chunk() -> None:
    policy = tiny_policy().eval()
    sampler = Sampler(DDPMSchedule(num_inference_steps=10), method="sequential")
    actions, stats = policy.predict_action(
        pusht_obs(3).numpy(), sampler, generator=torch.Generator().manual_seed(0)
    )
    assert actions.shape == (3, Ta, Da)
    assert stats.sample.shape == (3, H, Da)
    assert stats.trajectory.shape == (11, 3, H, Da)
    full = policy.normalizer.unnormalize("action", stats.sample)
    torch.testing.assert_close(actions, full[:, To - 1 : To - 1 + Ta])


def test_picard_and_sequential_sampling_give_the_same_actions_for_the_same_noise() -> None:
    policy = tiny_policy().eval()
    schedule = DDIMSchedule(num_inference_steps=8)
    sequential = Sampler(schedule, method="sequential")
    picard = Sampler(schedule, method="picard", tol=1e-4)
    noise = torch.randn(sequential.noise_shape(2, H, Da))
    obs = pusht_obs(2)
    a_seq, _ = policy.predict_action(obs, sequential, noise=noise)
    a_pic, stats = policy.predict_action(obs, picard, noise=noise)
    assert stats.converged
    torch.testing.assert_close(a_pic, a_seq, atol=1e-3, rtol=0)


def test_make_sampler_uses_the_policys_own_training_settings() -> None:
    """make_sampler builds its schedule from the policy's train schedule, whatever the class
    and steps; the one-line speed-up equals sequential sampling on the same noise."""
    trained = DDPMSchedule(num_train_timesteps=50, beta_schedule="linear", beta_start=2e-4,
                           beta_end=0.03, clip_sample=False, num_inference_steps=50)
    policy = tiny_policy(train_schedule=trained).eval()
    assert policy.make_sampler("sequential").schedule.config == trained.config
    picard = policy.make_sampler("picard", "ddim", 10, tol=0.0)
    assert type(picard.schedule) is DDIMSchedule and picard.num_steps == 10
    assert picard.schedule.training_settings == trained.training_settings
    assert (picard.method, picard.tol) == ("picard", 0.0)
    noise = torch.randn(picard.noise_shape(2, H, Da))
    a_seq, _ = policy.predict_action(pusht_obs(2), policy.make_sampler("sequential", "ddim", 10),
                                     noise=noise)
    a_pic, stats = policy.predict_action(pusht_obs(2), picard, noise=noise)
    assert stats.converged
    torch.testing.assert_close(a_pic, a_seq, atol=1e-3, rtol=0)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        ({"method": "picard", "schedule": {"num_inference_steps": 8, "beta_end": 0.1}},
         r"sampler.schedule.beta_end cannot be set: it comes from the policy's train_schedule"),
        ({"method": "picard", "schedule": {"num_inference_steps": 8, "eta": 1}},
         r"sampler.schedule.eta is not a schedule setting"),
        ({"method": "picard", "windw": 4, "schedule": {"num_inference_steps": 8}},
         r"sampler: .*windw"),
        ({"method": "fast", "schedule": {"num_inference_steps": 8}},
         r"sampler: sampler method must be one of"),
        ({"method": "picard", "schedule": {"_target_": "nowhere.Schedule"}},
         r"sampler.schedule._target_ 'nowhere.Schedule' is not importable"),
    ],
    ids=["training-setting", "unknown-schedule-key", "unknown-knob", "method", "target"],
)
def test_sampler_config_errors_name_the_key(config: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_policy().sampler_from_config(config)


def test_sampler_config_takes_class_and_steps_from_the_config() -> None:
    policy = tiny_policy()
    sampler = policy.sampler_from_config({
        "_target_": "picard_sampler.Sampler", "method": "picard", "window": 4,
        "schedule": {"_target_": "picard_sampler.DDIMSchedule", "num_inference_steps": 8},
    })
    assert type(sampler.schedule) is DDIMSchedule and sampler.num_steps == 8
    assert sampler.window == 4
    assert sampler.schedule.training_settings == policy.train_schedule.training_settings


def test_same_generator_seed_gives_the_same_actions() -> None:
    policy, sampler = tiny_policy().eval(), Sampler(DDIMSchedule(num_inference_steps=4))
    a1, _ = policy.predict_action(pusht_obs(2), sampler, generator=torch.Generator().manual_seed(3))
    a2, _ = policy.predict_action(pusht_obs(2), sampler, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a1, a2, rtol=0, atol=0)


@pytest.mark.slow
def test_tiny_policy_overfits_a_tiny_dataset() -> None:
    """Loss (fixed evaluation noise) falls >= 10x on 4 windows; DP's recipe, larger lr."""
    policy = tiny_policy()
    rng = np.random.default_rng(1)
    windows = {
        "obs": torch.from_numpy(rng.uniform(0, 512, (4, To, Do))).float(),
        "action": torch.from_numpy(rng.uniform(0, 512, (4, 1, Da))).float().repeat(1, H, 1),
    }
    batch = {k: v.repeat(8, 1, 1) for k, v in windows.items()}  # 8 noise draws per window
    evaluation = {k: v.repeat(16, 1, 1) for k, v in windows.items()}

    def loss_now() -> float:
        with torch.no_grad():
            return policy.compute_loss(evaluation, torch.Generator().manual_seed(0)).item()

    before = loss_now()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    for _ in range(120):
        loss = policy.compute_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss_now() < before / 10


# ---------------------------------------------------------------------------- checkpoints
def test_checkpoint_missing_or_corrupt_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.ckpt")
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        load_checkpoint(bad)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(1)}, foreign)
    with pytest.raises(ValueError, match="not a picard-policy checkpoint"):
        load_checkpoint(foreign)


def test_saved_then_loaded_policy_gives_identical_actions(make_cfg, tmp_path: Path) -> None:
    """Rebuild through the real config (hydra.utils.instantiate), EMA and raw weights."""
    import hydra
    from omegaconf import OmegaConf

    cfg = make_cfg()
    policy = hydra.utils.instantiate(cfg.policy, _convert_="all")
    policy.normalizer.fit({"obs": pusht_obs(50).reshape(-1, Do), "action": torch.rand(50, Da)})
    ema = EMA(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for _ in range(3):
        batch = {"obs": pusht_obs(4), "action": torch.rand(4, H, Da)}
        loss = policy.compute_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update(policy)
    path = save_checkpoint(
        tmp_path / "p.ckpt", policy=policy, ema=ema, optimizer=optimizer, lr_scheduler=scheduler,
        step=3, epoch=0, config=OmegaConf.to_container(cfg, resolve=True),
    )
    assert not list(tmp_path.glob("*.tmp"))
    sampler = Sampler(DDIMSchedule(num_inference_steps=4), method="sequential")
    noise = torch.randn(sampler.noise_shape(2, H, Da))
    for use_ema, reference in ((True, ema.model), (False, policy.eval())):
        loaded = load_policy_checkpoint(path, use_ema=use_ema)
        expected, _ = reference.predict_action(pusht_obs(2), sampler, noise=noise)
        actual, _ = loaded.predict_action(pusht_obs(2), sampler, noise=noise)
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


    exported = export_policy(path, tmp_path / "shipped.ckpt")
    assert exported.stat().st_size < path.stat().st_size / 2
    shipped = load_policy_checkpoint(exported)
    expected, _ = ema.model.predict_action(pusht_obs(2), sampler, noise=noise)
    actual, _ = shipped.predict_action(pusht_obs(2), sampler, noise=noise)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0.5)  # float16 weights, env units
    with pytest.raises(ValueError, match="holds only the EMA weights"):
        load_policy_checkpoint(exported, use_ema=False)
    written = write_config_yaml(exported, tmp_path / "config.yaml")
    assert written.read_text().startswith("# Resolved training config of shipped.ckpt")
    assert OmegaConf.to_container(OmegaConf.load(written)) == load_checkpoint(exported)["config"]


# ------------------------------------------------------------------------ shipped configs
@pytest.mark.parametrize(
    ("env", "policy", "million_params"),
    [("pusht_lowdim", "unet_lowdim", 4.56), ("pusht_lowdim", "unet_lowdim_large", 65.78),
     ("pusht_image", "unet_image", 76.07)],
)
def test_shipped_policy_configs_instantiate(make_cfg, env, policy, million_params) -> None:
    """unet_lowdim_large is the DP paper's PushT low-dim UNet: 65.8M parameters."""
    import hydra

    cfg = make_cfg(f"env={env}", f"policy={policy}", tiny=False)
    built = hydra.utils.instantiate(cfg.policy, _convert_="all")
    n_params = sum(p.numel() for p in built.parameters())
    assert n_params / 1e6 == pytest.approx(million_params, abs=0.01)


def test_image_policy_acts_on_pusht_image_observations(make_cfg) -> None:
    """The image path end to end: env dict obs (B, To, 96, 96, 3) uint8 -> actions."""
    import gymnasium as gym
    import hydra

    from envs.rollout import MultiStepWrapper

    cfg = make_cfg("env=pusht_image", "policy=unet_image", "policy.obs_encoder.width=8",
                   "policy.model.down_dims=[16,32]", "policy.model.n_groups=4")
    policy = hydra.utils.instantiate(cfg.policy, _convert_="all")
    rng = np.random.default_rng(0)
    policy.normalizer.fit({"agent_pos": rng.uniform(0, 512, (10, 2)),
                           "action": rng.uniform(0, 512, (10, 2))})
    env = MultiStepWrapper(gym.make("envs:PushT-v0", obs_type="image"), To, Ta, max_steps=10)
    obs, _ = env.reset(seed=0)
    batch = {k: v[None] for k, v in obs.items()}
    actions, _ = policy.eval().predict_action(batch, Sampler(DDIMSchedule(num_inference_steps=2)))
    assert actions.shape == (1, Ta, Da)
    env.step(actions[0].numpy())
