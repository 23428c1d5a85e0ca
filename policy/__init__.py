"""Diffusion Policy networks, checkpoints, chunking and training parts.

`from policy import load_policy` loads ours, Diffusion Policy's and LeRobot's checkpoints.
"""

from policy.loading import load_policy

__all__ = ["load_policy"]
