"""Chunk hand-offs of envs/realtime.py (skip, hold, ensemble, inpaint), the injected delay and
the boundary / within-chunk jerk; all on a fake clock, so every tick is known."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from picard_client.realtime import (
    HOLD_SOURCE,
    Prefix,
    RealtimeController,
    RealtimeSettings,
    jerk_metrics,
    soft_mask_weights,
    summarize_realtime,
)

from tests.test_realtime import TO, FakeClock

H, TA = 12, 4  # lead = H - To + 1 - Ta = 7 ticks
OFFSET = 100.0  # request k's chunk plans tick t as t + OFFSET * k: boundaries are visible
FLOAT_NOISE = 1e-9
"""Absolute tolerance for a quantity that is exactly 0 in real arithmetic but is a mean of float
second differences of values up to ~1e3 (float64 rounding ~1e-13 at most)."""


def offset_chunks(latency_s: float, clock: FakeClock, seen: list[Any] | None = None):
    """A chunk_fn planning tick t as t + OFFSET * (number of earlier requests); with a prefix
    it keeps the prefix's committed (weight 1) actions, as an exact inpainting sampler does."""
    calls = [0]

    def chunk_fn(obs: np.ndarray, budget_s: float | None, prefix: Prefix | None = None):
        clock.advance(latency_s)
        tick = obs[:, -1, 0]
        chunks = tick[:, None] - (TO - 1) + np.arange(H)[None, :] + OFFSET * calls[0]
        chunks = chunks[..., None]
        if prefix is not None:
            chunks = np.where(prefix.weights[None, :, None] == 1, prefix.actions, chunks)
        if seen is not None:
            seen.append(prefix)
        calls[0] += 1
        return chunks, {"converged": True}

    return chunk_fn


def run(controller: RealtimeController, n_calls: int) -> tuple[list[float], list[Any]]:
    executed, records = [], []
    for _ in range(n_calls):
        actions, record = controller(np.full((1, TO, 1), float(controller.tick)))
        executed += actions[0, :, 0].tolist()
        records.append(record)
    controller.on_reset(0, None)  # episode over: its executed actions are kept
    return executed, records


def controller(handoff: str, latency_s: float, fake_clock: FakeClock, chunk_fn=None,
               **settings: Any) -> RealtimeController:
    """A 10 Hz controller on `fake_clock` with this hand-off and RealtimeSettings `settings`
    (`clock` among them is the clock mode)."""
    chunk_fn = chunk_fn or offset_chunks(latency_s, fake_clock)
    return RealtimeController(chunk_fn, (TO, TA, H),
                              RealtimeSettings(control_hz=10, handoff=handoff, **settings),
                              clock=fake_clock)


def test_skip_switches_at_arrival_and_skips_the_stale_actions() -> None:
    clock = FakeClock()
    executed, _ = run(controller("skip", 0.25, clock), 3)  # ready 3 ticks after each request
    assert executed[:7] == [0, 1, 2, 3, 4, 5, 6]  # ticks 4..6: the first chunk still plays
    assert executed[7:11] == [107, 108, 109, 110]  # tick 7: the request of tick 4 took over


def test_hold_waits_for_every_chunk_then_plays_it_from_the_request_tick() -> None:
    clock = FakeClock()
    ctl = controller("hold", 0.25, clock)
    executed, records = run(ctl, 3)
    # tick 0-3: first chunk; 4-6 held (3 ticks of inference); 7-10: the chunk asked at tick 4,
    # from its action for tick 4 (it was computed from that observation); then 11-13 held.
    assert executed[:11] == [0, 1, 2, 3, 3, 3, 3, 104, 105, 106, 107]
    assert [r.ticks for r in records] == [4, 7, 7]
    assert [r.held_steps for r in records] == [0, 3, 3]
    metrics = summarize_realtime(records, ctl.requests, ctl.episodes)
    assert metrics["held_step_rate"] == 6 / 18


def test_ensemble_averages_every_chunk_still_covering_the_tick() -> None:
    clock = FakeClock()
    executed, _ = run(controller("ensemble", 0.25, clock, ensemble_decay=0.0), 3)
    assert executed[:7] == [0, 1, 2, 3, 4, 5, 6]
    # from tick 7 both chunks cover the tick (the first up to tick 10): their plain mean
    assert executed[7:11] == [57, 58, 59, 60]
    weighted, _ = run(controller("ensemble", 0.25, FakeClock(), ensemble_decay=1.0), 3)
    w = np.exp(-np.arange(2.0))
    assert weighted[7] == pytest.approx((7 * w[0] + 107 * w[1]) / w.sum())


def test_inpaint_prefix_commits_the_executed_past_and_the_ticks_inference_takes() -> None:
    clock, seen = FakeClock(), []
    ctl = controller("inpaint", 0.25, clock, offset_chunks(0.25, clock, seen), soft_mask=0.0)
    executed, _ = run(ctl, 4)
    prefix = seen[1]  # the request of tick 4 (seen[0] is the startup chunk: no prefix)
    assert seen[0] is None
    # its timeline starts at tick 3: tick 3 executed, ticks 4..6 (3 ticks of inference) planned
    assert prefix.weights.tolist() == [1, 1, 1, 1] + [0] * (H - 4)
    assert prefix.actions[0, :4, 0].tolist() == [3, 4, 5, 6]
    assert ctl.requests[1].frozen_steps == 4
    # so the chunk taking over at tick 7 continues what was executed: no jump at the boundary
    assert executed[:7] == [0, 1, 2, 3, 4, 5, 6]
    assert executed[7] == 107  # the unconstrained part is the new chunk's own plan
    assert ctl.requests[0].prefix_err is None and ctl.requests[1].prefix_err == 0.0
    metrics = summarize_realtime([], ctl.requests, ctl.episodes)
    assert metrics["prefix_err_max"] == 0.0
    # a chunk_fn that ignores the prefix: the record says by how much
    loose = controller("inpaint", 0.25, FakeClock(), soft_mask=0.0)
    plan = offset_chunks(0.25, loose.clock)
    loose.chunk_fn = lambda obs, budget_s, prefix=None: plan(obs, budget_s)
    run(loose, 4)
    assert loose.requests[1].prefix_err == OFFSET
    assert summarize_realtime([], loose.requests, loose.episodes)["prefix_err_max"] == OFFSET
    soft = controller("inpaint", 0.25, FakeClock(), soft_mask=1.0)
    soft_seen: list[Any] = []
    soft.chunk_fn = offset_chunks(0.25, soft.clock, soft_seen)
    run(soft, 2)
    weights = soft_seen[1].weights
    # ticks 7..10 are still covered by the first chunk: decaying soft weights, then free
    assert weights[4:8] == pytest.approx(soft_mask_weights(4))
    assert np.all(np.diff(weights[4:8]) < 0) and weights[8:].sum() == 0


def test_injected_delay_adds_ticks_and_shrinks_the_budget() -> None:
    clock = FakeClock()
    ctl = controller("skip", 0.05, clock, delay_s=0.3)
    run(ctl, 3)
    timed = [r for r in ctl.requests if not r.startup]
    assert all(r.ready_tick - r.request_tick == 4 for r in timed)  # 50 ms + 300 ms -> 4 ticks
    assert all(r.latency_ms == pytest.approx(350) for r in timed)
    assert ctl.budget_s == pytest.approx(0.7 - 0.005 - 0.3)
    with pytest.raises(ValueError, match="handoff must be one of"):
        controller("blend", 0.0, FakeClock())


def test_a_modelled_latency_fixes_the_schedule_whatever_inference_took() -> None:
    """model_latency_s: every timed request is ready after the modelled latency (plus the
    injected delay), so two runs whose inference took different times execute the same
    actions; the sampler gets no time budget."""
    runs = []
    for latencies in ([0.05, 0.35, 0.6, 0.01, 0.2, 0.4], [0.3, 0.02, 0.05, 0.5, 0.1, 0.25]):
        clock, budgets, pending = FakeClock(), [], list(latencies)
        plan = offset_chunks(0.0, clock)

        def chunk_fn(obs, budget_s, pending=pending, clock=clock, budgets=budgets, plan=plan):
            clock.advance(pending.pop(0))
            budgets.append(budget_s)
            return plan(obs, budget_s)

        ctl = controller("skip", 0.0, clock, chunk_fn, model_latency_s=0.15, delay_s=0.1)
        executed, _ = run(ctl, 5)
        timed = [r for r in ctl.requests if not r.startup]
        assert all(r.ready_tick - r.request_tick == 3 for r in timed)  # 150 + 100 ms
        assert all(r.latency_ms == pytest.approx(250) for r in timed)
        assert budgets and all(b is None for b in budgets)
        runs.append(executed)
    assert runs[0] == runs[1]
    with pytest.raises(ValueError, match="model_latency_s must be None with clock=wall"):
        controller("skip", 0.0, FakeClock(), clock="wall", model_latency_s=0.1)


def test_jerk_separates_boundaries_from_within_chunk_ticks() -> None:
    actions = np.array([0, 1, 2, 3, 10, 11, 12, 12, 12, 13], float)[:, None, None]
    sources = np.array([0, 0, 0, 0, 1, 1, 1, HOLD_SOURCE, HOLD_SOURCE, 2])
    metrics = jerk_metrics([(actions, sources)])
    # second differences at k = 1..8: 0, 0, 6, -6, 0, -1, 0, 1 (abs); k = 3, 4 cross 0 -> 1,
    # k = 6, 7 enter the hold, k = 8 leaves it; within: k = 1, 2 (chunk 0) and 5 (chunk 1)
    assert metrics["n_boundary_ticks"] == 5
    assert metrics["boundary_jerk"] == pytest.approx((6 + 6 + 1 + 0 + 1) / 5)
    # a ramp's second differences are 0 in exact arithmetic; the mean of float differences may
    # carry rounding of order 1e-15 (numpy picks another summation path on another CPU)
    assert metrics["within_chunk_jerk"] == pytest.approx(0.0, abs=FLOAT_NOISE)
    assert jerk_metrics([])["boundary_jerk"] is None


@pytest.mark.parametrize("handoff", ["skip", "hold", "ensemble", "inpaint"])
def test_every_handoff_records_its_episodes_for_the_jerk(handoff: str) -> None:
    clock = FakeClock()
    ctl = controller(handoff, 0.25, clock)
    _, records = run(ctl, 5)
    (actions, sources), = ctl.episodes
    assert len(actions) == len(sources) == sum(r.ticks for r in records)
    metrics = summarize_realtime(records, ctl.requests, ctl.episodes)
    assert metrics["boundary_jerk"] is not None
    # linear chunks have no within-chunk jerk, up to float rounding in the tensordot that forms
    # the second differences (1.3e-15 measured on one CPU, 0.0 on another)
    assert metrics["within_chunk_jerk"] == pytest.approx(0.0, abs=FLOAT_NOISE)


def test_holding_zeroes_the_rate_dims_of_a_delta_action_robot() -> None:
    """A held tick repeats the last action except its rate dims (an env's
    `rate_action_dims`, e.g. OSC pose deltas), which are 0: the robot stands still."""
    clock = FakeClock()

    def two_dim_chunks(obs: np.ndarray, budget_s: float | None):
        clock.advance(0.25)
        return np.ones((1, H, 2)) * [0.5, -1.0], {"converged": True}

    ctl = RealtimeController(two_dim_chunks, (TO, TA, H),
                             RealtimeSettings(control_hz=10, handoff="hold"), clock=clock,
                             rate_action_dims=[0])
    actions, record = ctl(np.zeros((1, TO, 1)))  # the awaited first chunk: no hold
    actions, record = ctl(np.zeros((1, TO, 1)))
    assert record.held_steps == 3
    np.testing.assert_array_equal(actions[0, :3], [[0.0, -1.0]] * 3)  # still, gripper kept
    np.testing.assert_array_equal(actions[0, 3:], [[0.5, -1.0]] * TA)


def test_robomimic_envs_name_their_rate_dims() -> None:
    from app.evaluation import env_class_attribute
    from envs.robomimic import RobomimicEnv

    assert RobomimicEnv.rate_action_dims == (0, 1, 2, 3, 4, 5)  # OSC deltas; gripper is 6
    # what evaluate_realtime reads from an env config, without building the env
    assert env_class_attribute({"id": "envs:Lift-v0"}, "rate_action_dims", ()) == (
        0, 1, 2, 3, 4, 5)
    assert env_class_attribute({"id": "PushT-v0"}, "rate_action_dims", ()) == ()
