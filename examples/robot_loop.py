"""A fake robot driven by a policy server at a fixed control rate: the robot side of a
deployment, with nothing but picard_client installed (`pip install ./client`: no torch).

    python serve_policy.py &                  # the shipped PushT policy on 127.0.0.1:8765
    python examples/robot_loop.py --server 127.0.0.1:8765 --hz 10 --seconds 10 --handoff inpaint

The robot ticks on the wall clock (`RealtimeController`, clock "wall"): every tick it commands
one action (the controller's `act` hook), every Ta ticks it asks the server for the next chunk
from its newest observations while the current chunk keeps playing, and the chunk hand-off
(hold, skip, ensemble, inpaint) decides how the new chunk takes over. The fake robot is a point
that moves a fraction of the way to each commanded action; its observation has the served
policy's shape (metadata `obs_spec`): the point's position in every key, plus fixed noise.
A dropped connection is reconnected and the episode resumed by the client; an episode the
server no longer has is reported and a new one started explicitly (never silently); a server
that cannot be reached within the client's retry budget stops the robot (exit status 1).
At the end one JSON line: ticks, held ticks, deadline misses, chunk latency p50 / p99 and what
the client saw (reconnects, stale replies dropped, episodes lost).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import deque
from typing import Any

import numpy as np
from picard_client import (
    HANDOFFS,
    ConnectionLost,
    EpisodeLost,
    PolicyClient,
    RealtimeController,
    RealtimeSettings,
    RemoteChunks,
    summarize_realtime,
)


class FakeRobot:
    """A point in action space that moves `gain` of the way to each commanded action; its
    observation {key: (step shape)} is the position tiled over each key plus fixed noise."""

    def __init__(self, obs_spec: dict[str, list[int]], action_dim: int, seed: int = 0,
                 gain: float = 0.3):
        rng = np.random.default_rng(seed)
        self.shapes = {key: tuple(shape[1:]) for key, shape in obs_spec.items()}
        self.noise = {key: rng.normal(0, 1, shape).astype(np.float32)
                      for key, shape in self.shapes.items()}
        self.position = rng.uniform(100, 400, action_dim).astype(np.float32)
        self.gain = gain
        self.commands = 0

    def command(self, action: np.ndarray) -> None:
        """Move towards `action` (B, Da) of robot 0: what an actuator interface would do."""
        self.position += self.gain * (np.asarray(action, np.float32)[0] - self.position)
        self.commands += 1

    def observe(self) -> dict[str, np.ndarray]:
        """One observation step {key: (step shape)}."""
        return {key: (np.resize(self.position, shape) + self.noise[key]).astype(np.float32)
                for key, shape in self.shapes.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Drive the fake robot for `args.seconds`; the run's summary."""
    client = PolicyClient(args.server, timeout_s=args.timeout_s, auth_token=args.token,
                          ssl_cafile=args.cafile)
    try:
        meta = client.metadata()
        to, ta, h = meta["n_obs_steps"], meta["n_action_steps"], meta["horizon"]
        hz = args.hz or meta["control_hz"]
        robot = FakeRobot(meta["obs_spec"], meta["action_dim"], seed=args.seed)
        remote = RemoteChunks(client)
        settings = RealtimeSettings(control_hz=hz, clock="wall", handoff=args.handoff)
        controller = RealtimeController(remote, (to, ta, h), settings, act=robot.command)
        history: deque[dict[str, np.ndarray]] = deque([robot.observe()] * to, maxlen=to)
        episode, lost, steps = args.seed, 0, []
        remote.on_reset(0, episode)
        stop_at = time.monotonic() + args.seconds
        with controller:
            while time.monotonic() < stop_at:
                history.append(robot.observe())
                obs = {key: np.stack([o[key] for o in history])[None] for key in history[0]}
                try:
                    _, step = controller(obs)
                except EpisodeLost as e:  # the server restarted: say so, start anew
                    print(f"episode lost: {e}; starting episode {episode + 1}", file=sys.stderr)
                    lost += 1
                    episode += 1
                    controller.on_reset(0, episode)
                    remote.on_reset(0, episode)
                    continue
                steps.append(step)
            controller.on_reset(0, None)
        remote.on_reset(0, None)  # end the episode on the server
        metrics = summarize_realtime(steps, controller.requests, controller.episodes)
        latencies = [r.latency_ms for r in controller.requests if not r.startup]
        return {
            "server": args.server, "control_hz": hz, "handoff": args.handoff,
            "ticks": sum(s.ticks for s in steps), "commands": robot.commands,
            "held_steps": sum(s.held_steps for s in steps),
            "deadline_miss_rate": metrics["deadline_miss_rate"],
            "latency_ms_p50": float(np.percentile(latencies, 50)) if latencies else None,
            "latency_ms_p99": float(np.percentile(latencies, 99)) if latencies else None,
            "episodes_lost": lost, "client": client.stats.to_dict(),
        }
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="127.0.0.1:8765", help="HOST:PORT or ws(s)://...")
    parser.add_argument("--hz", type=float, default=None, help="control rate (the server's)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--handoff", choices=HANDOFFS, default="skip")
    parser.add_argument("--seed", type=int, default=0, help="the first episode's seed")
    parser.add_argument("--timeout-s", type=float, default=10.0)
    parser.add_argument("--token", default=None, help="default: $PICARD_AUTH_TOKEN")
    parser.add_argument("--cafile", default=None, help="a CA or self-signed cert: TLS")
    args = parser.parse_args(argv)
    try:
        summary = run(args)
    except ConnectionLost as e:
        print(f"error: {e}; the robot stopped", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
