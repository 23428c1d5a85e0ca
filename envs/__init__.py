"""Simulated environments and scripted experts; importing this package registers PushT-v0 and
the robomimic tasks Lift-v0, PickPlaceCan-v0, NutAssemblySquare-v0.

The robomimic entry points are strings, so robosuite is imported only when one is made.
"""

import gymnasium

from envs.pusht import PushTEnv

gymnasium.register("PushT-v0", entry_point="envs.pusht:PushTEnv", max_episode_steps=300)

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
