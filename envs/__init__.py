"""Simulated environments and scripted experts; importing this package registers PushT-v0."""

import gymnasium

from envs.pusht import PushTEnv

gymnasium.register("PushT-v0", entry_point="envs.pusht:PushTEnv", max_episode_steps=300)

__all__ = ["PushTEnv"]
