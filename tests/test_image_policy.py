"""A camera policy through every sampler: the observation encoder runs once per chunk (an image
encoder costs several UNet calls), and Picard, Parareal, PCM and warm starts stay exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from picard_sampler import DDIMSchedule, DDPMSchedule, exact_errors
from policy.chunking import ChunkPolicy, summarize_chunks
from policy.diffusion_policy import DiffusionPolicy
from policy.encoders import ImageObsEncoder
from policy.normalizer import LinearNormalizer
from policy.pcm import build_pcm
from policy.propagator import fit_propagator, schedule_key
from policy.unet import ConditionalUnet1D

pytestmark = pytest.mark.usefixtures("one_thread")
IMAGE = (24, 24, 3)
TOL = 1e-4
"""Picard stopping tolerance of these checks: tight, so the chunk is the sequential one to
float32 rounding amplified over the steps (EXACT below)."""
EXACT = 1e-3
"""Largest |Picard chunk - sequential chunk| (normalized units) accepted: the issue's bar."""


def tiny_image_policy(seed: int = 0) -> DiffusionPolicy:
    """An image + agent_pos policy small enough for the CPU suite, with random weights."""
    torch.manual_seed(seed)
    encoder = ImageObsEncoder({"image": IMAGE}, {"agent_pos": (2,)}, crop_shape=(20, 20),
                              num_keypoints=4, feature_dim=8, width=4)
    model = ConditionalUnet1D(input_dim=2, global_cond_dim=2 * encoder.feature_dim,
                              down_dims=(16, 32), diffusion_step_embed_dim=16, n_groups=4)
    policy = DiffusionPolicy(model, encoder, LinearNormalizer(), action_dim=2,
                             train_schedule=DDPMSchedule(num_train_timesteps=16,
                                                         num_inference_steps=16),
                             horizon=8, n_obs_steps=2, n_action_steps=4)
    rng = np.random.default_rng(seed)
    policy.normalizer.fit({"agent_pos": rng.uniform(0, 512, (100, 2)),
                           "action": rng.uniform(0, 512, (100, 2))})
    return policy.eval()


def observations(batch: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (batch, 2, *IMAGE), dtype=np.uint8),
            "agent_pos": rng.uniform(0, 512, (batch, 2, 2))}


class EncoderCalls:
    """Counts the observation encoder's forward calls."""

    def __init__(self, policy: DiffusionPolicy):
        self.count = 0
        policy.obs_encoder.register_forward_hook(self._seen)

    def _seen(self, *_: object) -> None:
        self.count += 1


def samplers(policy: DiffusionPolicy) -> dict[str, object]:
    """Every sampler kind on the tiny policy (PCM and a fitted propagator attached)."""
    policy.attach_pcm(build_pcm(policy, head_down_dims=(8, 16)).eval())
    ddim = DDIMSchedule(num_train_timesteps=16, num_inference_steps=8)
    cond = policy.encode(observations(4, seed=7))
    policy.attach_propagators({schedule_key(ddim): fit_propagator(policy, ddim, cond)})
    return {
        "sequential": policy.make_sampler("sequential", "ddim", 8),
        "picard": policy.make_sampler("picard", "ddim", 8, tol=TOL),
        "picard_window": policy.make_sampler("picard", "ddim", 8, tol=TOL, window=3),
        "parareal": policy.make_sampler("picard", "ddim", 8, tol=TOL, update="parareal"),
        "pcm": policy.make_sampler("pcm", "ddim", 8, tol=TOL),
    }


def test_the_encoder_runs_once_per_chunk_for_every_sampler() -> None:
    policy = tiny_image_policy()
    kinds = samplers(policy)
    calls = EncoderCalls(policy)
    obs = observations(3)
    sequential = kinds["sequential"]
    noise = torch.randn(sequential.noise_shape(3, policy.horizon, policy.action_dim))
    _, reference = policy.predict_action(obs, sequential, noise=noise)
    for name, sampler in kinds.items():
        before = calls.count
        _, stats = policy.predict_action(obs, sampler, noise=noise)
        assert calls.count - before == 1, name
        assert stats.rounds >= 1
        error = float(exact_errors(stats.sample, reference.sample).max())
        assert error <= EXACT, (name, error)
    for warm_start in ("none", "reuse", "shift"):  # the rollout path: warm starts + exact_err
        chunks = ChunkPolicy(policy, kinds["picard"], noise_seed=0, warm_start=warm_start,
                             exact_err_every=1)
        for env in range(3):
            chunks.on_reset(env, seed=env)
        before = calls.count
        records = [chunks(obs)[1] for _ in range(3)]
        assert calls.count - before == 3, warm_start  # 3 chunks: 3 calls, reference included
        assert all(r.encode_ms is not None and 0 <= r.encode_ms <= r.latency_ms for r in records)
        metrics = summarize_chunks(records)
        assert metrics["encode_ms_p50"] is not None and metrics["exact_err_max"] <= EXACT


def test_an_image_policy_rounds_like_a_low_dim_one() -> None:
    """The encoder changes the condition, not the sampler: Picard's rounds on the image policy
    are those of the same UNet on the same condition fed directly."""
    policy = tiny_image_policy()
    sampler = policy.make_sampler("picard", "ddim", 8, tol=TOL)
    obs = observations(2)
    noise = torch.randn(sampler.noise_shape(2, policy.horizon, policy.action_dim))
    _, stats = policy.predict_action(obs, sampler, noise=noise)
    _, direct = policy.sample_chunk(policy.encode(obs), sampler, noise=noise)
    assert stats.rounds == direct.rounds
    # the same computation twice in one process: deterministic, so bitwise equal
    torch.testing.assert_close(stats.sample, direct.sample, rtol=0, atol=0)
