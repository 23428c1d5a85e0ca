"""The settings records (issue 32): each checked where it is defined, converted once.

SamplerSettings / CallInputs (picard_sampler), RealtimeSettings (picard_client.realtime, SI
units; the eval config's `realtime` block is in ms), EpisodeSpec (envs.rollout), PcmSettings
(policy.pcm), CameraSettings (policy.encoders, flat keys of an `obs_encoder` config).
"""

from __future__ import annotations

import dataclasses

import pytest
from picard_client.realtime import GUIDANCE_CLIP, INPAINT_METHODS, RealtimeSettings

import picard_sampler
from envs.rollout import EpisodeSpec
from picard_sampler import CallInputs, DDIMSchedule, Sampler, SamplerSettings
from policy.encoders import ImageObsEncoder
from policy.pcm import PcmSettings, complete_config
from policy.safe_config import constructor_parameters

MS_BLOCK = {"enabled": True, "control_hz": 50, "clock": "simulated", "lead_steps": None,
            "budget_margin_ms": 5, "handoff": "skip", "delay_ms": 20, "ensemble_decay": 0.01,
            "soft_mask": 0, "inpaint_method": "replace", "guidance_clip": 5,
            "model_latency_ms": 250}


def test_the_robot_side_names_the_samplers_inpaint_methods() -> None:
    """picard_client cannot import picard_sampler (no torch): its copies must agree."""
    assert INPAINT_METHODS == picard_sampler.INPAINT_METHODS
    assert GUIDANCE_CLIP == picard_sampler.GUIDANCE_CLIP


def test_realtime_settings_are_seconds_inside_and_milliseconds_at_the_edges() -> None:
    settings = RealtimeSettings.from_config(MS_BLOCK)
    assert settings.budget_margin_s == pytest.approx(0.005)
    assert settings.delay_s == pytest.approx(0.02)
    assert settings.model_latency_s == pytest.approx(0.25)
    assert isinstance(settings.control_hz, float) and settings.control_hz == 50
    lead = settings.resolved_lead_steps((2, 8, 16))
    assert lead == 7 and settings.deadline_s(lead) == pytest.approx(0.14)
    assert settings.budget_s(lead) is None  # a modelled latency: no wall-time budget
    report = settings.report(lead)
    assert report["deadline_ms"] == pytest.approx(140) and report["delay_ms"] == pytest.approx(20)
    assert report["model_latency_ms"] == pytest.approx(250) and report["budget_ms"] is None
    assert set(report) == {"control_hz", "clock", "lead_steps", "deadline_ms", "budget_ms",
                           "handoff", "delay_ms", "model_latency_ms"}  # results.json keys
    # a configured ms value reports as configured, not as the ms -> s -> ms float product
    odd = RealtimeSettings.from_config({**MS_BLOCK, "model_latency_ms": 1001, "delay_ms": 63.7})
    assert odd.report(lead)["model_latency_ms"] == 1001.0
    assert odd.report(lead)["delay_ms"] == 63.7


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"delay_ms": -5}, "realtime.delay_ms must be a number >= 0; got -5"),
        ({"clock": "sundial"}, "realtime.clock must be one of ['simulated', 'wall']"),
        ({"lead_steps": 1.5}, "realtime.lead_steps must be null or an int >= 1"),
        ({"clock": "wall"}, "realtime.model_latency_ms must be null with realtime.clock=wall"),
    ],
)
def test_a_bad_realtime_value_names_its_config_key(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        RealtimeSettings.from_config({**MS_BLOCK, **changes})


def test_the_record_names_its_own_fields() -> None:
    with pytest.raises(ValueError, match="delay_s must be a number >= 0"):
        RealtimeSettings(delay_s=-0.1)
    with pytest.raises(ValueError, match="model_latency_s must be None with clock=wall"):
        RealtimeSettings(clock="wall", model_latency_s=0.1)
    with pytest.raises(ValueError, match="lead_steps must be in"):
        RealtimeSettings(lead_steps=8).resolved_lead_steps((2, 8, 16))


def test_a_sampler_owns_one_frozen_settings_record() -> None:
    sampler = Sampler(DDIMSchedule(num_inference_steps=8), "picard", tol=1e-3, window=4)
    assert sampler.settings == SamplerSettings(window=4, tol=1e-3)
    assert (sampler.window, sampler.tol) == (4, 1e-3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sampler.settings.tol = 0.5  # type: ignore[misc]
    wider = dataclasses.replace(sampler, window=None)  # how autotune varies a knob
    assert wider.settings.window is None and wider.settings.tol == sampler.settings.tol
    with pytest.raises(TypeError, match="unknown sampler knobs"):
        Sampler(DDIMSchedule(), "picard", windw=4)
    with pytest.raises(ValueError, match="accel='anderson' needs the full window"):
        Sampler(DDIMSchedule(num_inference_steps=8), "picard", window=4, accel="anderson")
    with pytest.raises(ValueError, match="budget_s must be None or a number of seconds > 0"):
        CallInputs(budget_s=0)
    assert set(sampler.config) == {"method", "schedule", *SamplerSettings.names()}


def test_episode_specs_are_checked_when_built() -> None:
    with pytest.raises(ValueError, match="n_episodes and n_envs must be >= 1"):
        EpisodeSpec(n_episodes=0)
    with pytest.raises(ValueError, match=r"vector must be one of \['sync', 'async'\]"):
        EpisodeSpec(n_episodes=1, vector="threads")


def test_pcm_settings_keep_the_stored_config_keys() -> None:
    config = PcmSettings(head_down_dims=(8, 16)).to_config()
    assert config["head_down_dims"] == [8, 16] and config["sees_noise"] is False
    assert list(config) == ["finetune", "lora_rank", "lora_alpha", "head_down_dims",
                            "head_kernel_size", "head_n_groups", "head_step_embed_dim",
                            "clip_range", "sees_noise"]
    assert complete_config({"finetune": "none"})["sees_noise"] is False
    with pytest.raises(ValueError, match="pcm.model.finetune must be one of"):
        PcmSettings(finetune="qlora")


def test_an_image_encoder_config_accepts_the_same_keys_as_before() -> None:
    """Files from other projects map onto these keys (policy.safe_config reads them from the
    constructor and its CameraSettings): the set must not change."""
    assert set(constructor_parameters(ImageObsEncoder)) == {
        "image_shapes", "lowdim_shapes", "crop_shape", "num_keypoints", "feature_dim", "width",
        "feature_activation", "crop_rounding", "pool", "random_crop", "image_mean",
        "image_std", "order", "shared_encoder", "aliases"}
    with pytest.raises(TypeError, match="unexpected keyword argument 'crop'"):
        ImageObsEncoder({"image": (40, 40, 3)}, crop=(33, 33))
