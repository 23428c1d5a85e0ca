"""envs/realtime.py and eval_policy's real-time mode: deadlines, holds, anytime chunks, cleanup.

Every timing here comes from a controllable clock (a fake denoiser or chunk function advances
it), so misses and anytime deliveries happen deterministically; the wall-clock tests only use
latencies far from the deadline.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from picard_client.realtime import (
    RealtimeController,
    RealtimeSettings,
    max_lead_steps,
    summarize_realtime,
)

from app import builder, evaluation
from app.command_line import CONF_DIR
from envs.rollout import EpisodeSpec, rollout
from picard_sampler import DDIMSchedule, Sampler
from policy.checkpoint import load_policy_checkpoint

H, TO, TA = 12, 2, 4  # lead = H - To + 1 - Ta = 7 ticks


class FakeClock:
    """A clock that only moves when told: `advance(dt)`, or `sleep(dt)` as time.sleep."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    sleep = advance


def tick_chunks(latency_s: float, clock: FakeClock | None, converged: bool = True):
    """A chunk_fn whose action i of a chunk asked at tick n is the number n - (To-1) + i (the
    tick it is meant for), taking `latency_s` on `clock` (or sleeping on the wall clock)."""

    def chunk_fn(obs: np.ndarray, budget_s: float | None) -> tuple[np.ndarray, dict[str, Any]]:
        if clock is None:
            time.sleep(latency_s)
        else:
            clock.advance(latency_s)
        tick = obs[:, -1, 0]
        chunks = tick[:, None] - (TO - 1) + np.arange(H)[None, :]
        return chunks[..., None], {"converged": converged, "budget_s": budget_s}

    return chunk_fn


def run_ticks(controller: RealtimeController, n_calls: int) -> tuple[list[float], list[dict]]:
    """Call the controller as the rollout would, with observations that carry the tick."""
    executed, records = [], []
    for _ in range(n_calls):
        obs = np.full((1, TO, 1), float(controller.tick))
        actions, record = controller(obs)
        executed += actions[0, :, 0].tolist()
        records.append(record)
    return executed, records


def test_lead_is_what_the_horizon_leaves_after_the_executed_steps() -> None:
    assert max_lead_steps(16, 2, 8) == 7
    with pytest.raises(ValueError, match="lead_steps must be in"):
        RealtimeController(tick_chunks(0, None), (TO, TA, H), RealtimeSettings(lead_steps=8))
    with pytest.raises(ValueError, match="horizon - n_obs_steps"):
        RealtimeController(tick_chunks(0, None), (2, 8, 8))


def test_on_time_chunks_execute_each_action_at_its_own_tick() -> None:
    clock = FakeClock()
    controller = RealtimeController(
        tick_chunks(0.25, clock), (TO, TA, H), RealtimeSettings(control_hz=10), clock=clock,
    )
    executed, records = run_ticks(controller, 6)
    assert executed == list(range(6 * TA))  # no hold, nothing stale: action for tick t at t
    timed = [r for r in controller.requests if not r.startup]
    assert len(timed) == 5
    assert all(r.ready_tick == r.request_tick + 3 for r in timed)  # 0.25 s = 3 ticks
    assert controller.budget_s == pytest.approx(0.7 - 0.005)
    metrics = summarize_realtime(records, controller.requests)
    assert metrics["deadline_miss_rate"] == 0 and metrics["held_step_rate"] == 0


def test_late_chunk_holds_the_last_action_and_counts_the_miss() -> None:
    """A 0.95 s chunk at 10 Hz arrives 10 ticks after its request, 3 ticks past its due tick."""
    clock = FakeClock()
    controller = RealtimeController(tick_chunks(0.95, clock), (TO, TA, H), clock=clock)
    executed, records = run_ticks(controller, 5)
    # Tick 0-10: the awaited first chunk (asked at 0, covers ticks -1..10); 11-13 held; tick 14:
    # the chunk asked at 4 arrives (covers 3..14); 15 held; 16: asked again, nothing until 26.
    expected = [*range(11), 10, 10, 10, 14, 14, 14, 14, 14, 14]
    assert executed == expected
    assert [r.held_steps for r in records] == [0, 0, 1, 3, 4]
    assert [r.skipped_request for r in records] == [False, False, True, True, False]
    late = controller.requests[1]
    assert (late.request_tick, late.ready_tick, late.late) == (4, 14, True)
    metrics = summarize_realtime(records, controller.requests)
    assert metrics["deadline_miss_rate"] == 1.0 and metrics["anytime_rate"] == 0.0
    assert metrics["held_step_rate"] == 8 / 20 and metrics["skipped_requests"] == 2


def test_unconverged_chunks_on_time_count_as_anytime_deliveries() -> None:
    clock = FakeClock()
    controller = RealtimeController(
        tick_chunks(0.1, clock, converged=False), (TO, TA, H), clock=clock
    )
    _, records = run_ticks(controller, 4)
    metrics = summarize_realtime(records, controller.requests)
    assert metrics["anytime_rate"] == 1.0 and metrics["deadline_miss_rate"] == 0.0
    assert {r.chunk["budget_s"] for r in controller.requests[1:]} == {controller.budget_s}


def worker_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("chunk")]


@pytest.mark.parametrize(("latency_s", "late"), [(0.0, False), (0.3, True)])
def test_wall_clock_runs_inference_in_a_thread_and_leaves_none_behind(
    latency_s: float, late: bool
) -> None:
    """50 Hz: a chunk is due 7 ticks = 140 ms after its request; 0.3 s takes 15."""
    with RealtimeController(
        tick_chunks(latency_s, None), (TO, TA, H), RealtimeSettings(control_hz=50, clock="wall")
    ) as controller:
        start = time.perf_counter()
        run_ticks(controller, 7)
        assert time.perf_counter() - start >= 7 * TA / 50 - 0.03  # the loop kept the clock
        assert worker_threads()
    assert not worker_threads()
    assert {r.late for r in controller.requests[1:]} == {late}


# ---------------------------------------------------------------------- eval_policy real time
@pytest.fixture
def tiny_policy(tiny_checkpoint: Path) -> Any:
    """The tiny PushT policy."""
    return load_policy_checkpoint(tiny_checkpoint)


def slow_denoiser(policy: Any, clock: FakeClock, seconds_per_call: float) -> None:
    """Every denoiser call of `policy` costs `seconds_per_call` on `clock`."""
    policy.model.register_forward_hook(lambda *_: clock.advance(seconds_per_call))


def evaluate_realtime(policy: Any, sampler_name: str, clock: FakeClock, **knobs: Any):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=[f"sampler={sampler_name}"])
    sampler = dataclasses.replace(builder.build_sampler(cfg.sampler, policy), **knobs)
    env = {"id": "envs:PushT-v0", "kwargs": {"obs_type": "keypoints"}, "max_steps": 40}
    return evaluation.evaluate(
        policy, sampler, env, EpisodeSpec(n_episodes=1, seed_start=100000, max_steps=40,
                                          progress=False),
        noise_seed=0, exact_err_every=0, realtime=RealtimeSettings(control_hz=10), clock=clock,
        sleep=clock.sleep,
    )


@pytest.mark.usefixtures("one_thread")
def test_slow_denoiser_makes_sequential_miss_and_picard_deliver_anytime(tiny_policy) -> None:
    """20 ms per denoiser call at 10 Hz: the deadline is 7 ticks = 700 ms. Sequential DDPM-100
    (2 s) misses every chunk; Picard DDPM-100 with the 695 ms budget stops after 34 rounds and
    delivers an unconverged chunk in time; sequential DDIM-16 (320 ms) is on time and exact."""
    clock = FakeClock()
    slow_denoiser(tiny_policy, clock, 0.02)
    sequential = evaluation.summarize(evaluate_realtime(tiny_policy, "sequential", clock))
    assert sequential["deadline_miss_rate"] == 1.0 and sequential["held_step_rate"] > 0
    assert sequential["latency_ms_p50"] == pytest.approx(2000)

    picard = evaluate_realtime(tiny_policy, "picard", clock, tol=0.0)
    metrics = evaluation.summarize(picard)
    assert metrics["deadline_miss_rate"] == 0.0 and metrics["held_step_rate"] == 0.0
    assert metrics["anytime_rate"] == 1.0
    assert {r.chunk.rounds for r in picard.requests[1:]} == {34}  # 34 x 20 ms <= 695 ms < 35 x 20

    ddim = evaluation.summarize(evaluate_realtime(tiny_policy, "ddim", clock))
    assert ddim["deadline_miss_rate"] == 0.0 and ddim["anytime_rate"] == 0.0


@pytest.mark.usefixtures("one_thread")
def test_realtime_rollouts_are_deterministic_with_a_deterministic_clock(tiny_policy) -> None:
    runs = []
    for _ in range(2):
        clock = FakeClock()
        hook = tiny_policy.model.register_forward_hook(lambda *_, c=clock: c.advance(0.02))
        result = evaluate_realtime(tiny_policy, "picard", clock, tol=0.0)
        hook.remove()
        runs.append((result.rollout.episodes, result.requests))
    assert runs[0] == runs[1]


# --------------------------------------------------------------------------------- interrupt
def test_interrupt_ends_the_rollout_with_the_finished_episodes(
    eval_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C in the middle of the second episode: the first is kept and written, the envs and
    the worker thread are closed, and run() re-raises so the script exits non-zero."""
    seeds: list[int | None] = []
    call, reset = evaluation.ChunkPolicy.__call__, evaluation.ChunkPolicy.on_reset

    def on_reset(self, env_index, seed):
        seeds.append(seed)
        return reset(self, env_index, seed)

    def interrupting(self, obs, budget_s=None):
        if seeds[-1] == 100001 and budget_s is not None:  # episode 2's first timed request
            raise KeyboardInterrupt
        return call(self, obs, budget_s)

    monkeypatch.setattr(evaluation.ChunkPolicy, "__call__", interrupting)
    monkeypatch.setattr(evaluation.ChunkPolicy, "on_reset", on_reset)
    cfg = eval_cfg("sampler=ddim", "realtime.enabled=true", "realtime.clock=wall",
                   "realtime.control_hz=200", "seed_start=100000")
    with pytest.raises(KeyboardInterrupt, match="results so far"):
        evaluation.run_eval(cfg, tmp_path)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["interrupted"] and results["n_episodes"] == 1
    assert results["metrics"]["mean_score"] is not None
    assert not worker_threads()


def test_rollout_returns_finished_episodes_on_keyboard_interrupt() -> None:
    from envs.pusht import PushTEnv

    def policy_fn(obs: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        raise KeyboardInterrupt

    result = rollout(policy_fn, lambda: PushTEnv(obs_type="keypoints"),
                     EpisodeSpec(n_episodes=3, progress=False))
    assert result.interrupted and result.episodes == [] and result.metrics["n_episodes"] == 0


# ------------------------------------------------------------------------ warm start variants
@pytest.mark.usefixtures("one_thread")
def test_shifted_noise_moves_with_the_actions(tiny_policy) -> None:
    """`shift`: the noise of each action step stays with that step from chunk to chunk."""
    sampler = Sampler(DDIMSchedule(num_inference_steps=4), method="picard")
    chunk_policy = evaluation.ChunkPolicy(tiny_policy, sampler, noise_seed=0, warm_start="shift")
    chunk_policy.on_reset(0, seed=7)
    first, second = chunk_policy._noise(0), chunk_policy._noise(0)
    ta = tiny_policy.n_action_steps
    torch.testing.assert_close(second[:, :-ta], first[:, ta:])
    assert not torch.equal(second[:, -ta:], first[:, -ta:])
    with pytest.raises(ValueError, match="warm_start must be one of"):
        evaluation.resolve_warm_start("sometimes")


def test_a_chunk_still_missing_when_the_episode_ends_is_a_miss() -> None:
    clock = FakeClock()
    controller = RealtimeController(tick_chunks(2.0, clock), (TO, TA, H), clock=clock)
    _, records = run_ticks(controller, 5)  # asked at tick 4, would arrive at 24; ends at 20
    controller.on_reset(0, None)
    missing = controller.requests[-1]
    assert (missing.request_tick, missing.late, missing.delivered) == (4, True, False)
    assert summarize_realtime(records, controller.requests)["deadline_miss_rate"] == 1.0


# ------------------------------------------------------------------------ guided inpainting
@pytest.mark.usefixtures("one_thread")
def test_guided_inpainting_runs_realtime_exactly_and_refuses_exported_runtimes(
    eval_cfg, tmp_path: Path
) -> None:
    """realtime.inpaint_method=guide: each chunk is guided towards its prefix, Picard still
    gives the guided sequential chunk (exact_err against it), and a runtime that cannot be
    differentiated is a one-line config error."""
    from app.checks import ConfigError

    # a modelled latency: no anytime budget from a measured one, so a loaded machine cannot
    # stop a chunk unconverged (which would show as a large exact_err)
    guide = ("sampler=picard_ddim16", "sampler.tol=0.01", "n_envs=1", "n_episodes=1",
             "realtime.enabled=true", "realtime.handoff=inpaint", "realtime.inpaint_method=guide",
             "realtime.model_latency_ms=250")
    results = evaluation.run_eval(eval_cfg(*guide), tmp_path / "guide")
    timed = [r for r in results["requests"] if not r["startup"]]
    assert timed and all(r["frozen_steps"] >= TO for r in timed)
    assert results["metrics"]["exact_err_max"] < 0.05
    assert results["config"]["realtime"]["inpaint_method"] == "guide"
    with pytest.raises(ConfigError, match="needs runtime=eager; got runtime=onnxruntime") as e:
        evaluation.run_eval(eval_cfg(*guide, "runtime=onnxruntime"), tmp_path / "ort")
    assert "\n" not in str(e.value)


@pytest.mark.usefixtures("one_thread")
def test_a_modelled_latency_reaches_the_controller(eval_cfg, tmp_path: Path) -> None:
    cfg = eval_cfg("sampler=picard_ddim16", "n_envs=1", "n_episodes=1", "realtime.enabled=true",
                   "realtime.model_latency_ms=250")
    results = evaluation.run_eval(cfg, tmp_path / "run")
    timed = [r for r in results["requests"] if not r["startup"]]
    assert timed and all(r["ready_tick"] - r["request_tick"] == 3 for r in timed)
    settings = results["realtime"]
    assert settings["model_latency_ms"] == 250 and settings["budget_ms"] is None
    assert results["metrics"]["anytime_rate"] == 0  # no time budget: every chunk converged
