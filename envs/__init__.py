"""Simulated environments and scripted experts; importing this package registers PushT-v0,
PushTGymPusht-v0 (gym-pusht's observations, reset and unclipped actions: what LeRobot's PushT
policies were trained on) and the robomimic tasks Lift-v0, PickPlaceCan-v0,
NutAssemblySquare-v0.

The robomimic entry points are strings, so robosuite is imported only when one is made.
"""

import gymnasium

from envs.pusht import PushTEnv, gym_pusht_kwargs

gymnasium.register("PushT-v0", entry_point="envs.pusht:PushTEnv", max_episode_steps=300)
gymnasium.register(
    "PushTGymPusht-v0",
    entry_point="envs.pusht:PushTEnv",
    kwargs=gym_pusht_kwargs("environment_state_agent_pos"),
    max_episode_steps=300,
)

ROBOMIMIC_TASKS = {"lift": "Lift", "can": "PickPlaceCan", "square": "NutAssemblySquare"}
"""Short task names (scripts' --task, Diffusion Policy's) -> robomimic env names."""
ROBOMIMIC_ENV_NAMES = tuple(ROBOMIMIC_TASKS.values())
ROBOMIMIC_MAX_STEPS = 400
"""Diffusion Policy's episode limit for robomimic's ph tasks."""
for _env_name in ROBOMIMIC_ENV_NAMES:
    gymnasium.register(
        f"{_env_name}-v0",
        entry_point="envs.robomimic:RobomimicEnv",
        kwargs={"env_name": _env_name},
        max_episode_steps=ROBOMIMIC_MAX_STEPS,
    )

__all__ = ["ROBOMIMIC_ENV_NAMES", "ROBOMIMIC_MAX_STEPS", "ROBOMIMIC_TASKS", "PushTEnv"]
