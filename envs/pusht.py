"""PushT: push a T-shaped block onto a fixed goal pose with a round agent (DP/IBC dynamics).

Reproduces Diffusion Policy's ``PushTEnv`` on pymunk 7, quirks included (docs/design.md §6), because
every published PushT number was measured with them:

- contacts are frictionless: DP sets ``friction = 1`` on the bodies, which pymunk ignores;
- the T's moment of inertia is twice the bar's (``moment_for_poly`` of the bar's vertices for
  both boxes: 3000 instead of ~7875) and its centre of gravity is the plain mean of the two
  boxes' centroids, (0, 45) in the block frame;
- ``space.damping = 0``: the block keeps no velocity from one 100 Hz physics step to the next;
- the seeded reset sets the block's position before its angle (DP's ``legacy`` order), so the
  block rotates about its centre of gravity after being placed, then one physics step runs.

Poses are ``(x, y, angle)`` of the block frame's origin (the middle of the bar's outer edge),
as pymunk's ``Body.position`` reports it. Episode length: ``PushTEnv`` never truncates; the
registered ``PushT-v0`` adds gymnasium's ``TimeLimit`` with ``max_episode_steps=300``.
"""

from __future__ import annotations

import os
from typing import Any

import gymnasium
import numpy as np
import pymunk
import shapely
from gymnasium import spaces

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
import pygame  # noqa: E402  (headless: the SDL_* variables must be set before the import)

WORKSPACE_SIZE = 512.0
OBS_MARGIN = 32.0  # px of slack around the workspace in the observation bounds
SIM_HZ = 100
CONTROL_HZ = 10
SUBSTEPS_PER_ACTION = SIM_HZ // CONTROL_HZ
K_P, K_V = 100.0, 20.0
AGENT_RADIUS = 15.0
GOAL_POSE = np.array([256.0, 256.0, np.pi / 4])
SUCCESS_COVERAGE = 0.95
OBS_TYPES = ("state", "keypoints", "image")

T_BAR_VERTICES = ((-60.0, 30.0), (60.0, 30.0), (60.0, 0.0), (-60.0, 0.0))
T_STEM_VERTICES = ((-15.0, 30.0), (-15.0, 120.0), (15.0, 120.0), (15.0, 30.0))
T_CENTER_OF_GRAVITY = (0.0, 45.0)
"""DP's centre of gravity: the unweighted mean of the bar's (0, 15) and the stem's (0, 75)."""
T_MOMENT = 2 * pymunk.moment_for_poly(1.0, T_BAR_VERTICES)
"""DP's moment of inertia (the bar's vertices used for both boxes): 3000."""
T_OUTLINE = np.array(
    [[-60, 0], [60, 0], [60, 30], [15, 30], [15, 120], [-15, 120], [-15, 30], [-60, 30]],
    dtype=np.float64,
)
"""The T's outline in the block frame, one closed loop (area 6300)."""
BLOCK_KEYPOINTS = np.array(
    [
        [9.269787, 90.040974],
        [-60.983472, -1.18673],
        [60.912756, -1.393364],
        [-0.270503, 25.543625],
        [-14.064928, 122.815854],
        [39.002739, 32.857404],
        [-39.966414, 32.729655],
        [-16.824344, 62.863179],
        [23.541461, -1.700288],
    ]
)
"""DP's 9 block keypoints in the block frame, in DP's order. Recomputed with DP's recipe
(``PymunkKeypointManager.create_from_pusht_env``): farthest-point sampling, rng
``default_rng(0)``, over the pixels of the T drawn at (256, 300) with its 2 px outline, plus a
U(0, 1) shift; they sit up to ~3 px outside the T because the outline is included."""

WALL_SEGMENTS = (
    ((5, 506), (5, 5)),
    ((5, 5), (506, 5)),
    ((506, 5), (506, 506)),
    ((5, 506), (506, 506)),
)
WALL_RADIUS = 2.0

_GOAL_COLOR = (144, 238, 144)  # LightGreen
_BLOCK_COLOR = (119, 136, 153)  # LightSlateGray
_AGENT_COLOR = (65, 105, 225)  # RoyalBlue
_WALL_COLOR = (211, 211, 211)  # LightGray
_ACTION_COLOR = (255, 0, 0)


def _lighter(color: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(min(int(1.2 * c), 255) for c in color)


def to_world(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """Map block-frame points (n, 2) to world: (n, 2) for a pose (x, y, angle), (N, n, 2) for N."""
    pose = np.asarray(pose, dtype=np.float64)[..., None, :]
    cos, sin = np.cos(pose[..., 2]), np.sin(pose[..., 2])
    x, y = np.asarray(points, dtype=np.float64).T
    world_x = cos * x - sin * y + pose[..., 0]
    world_y = sin * x + cos * y + pose[..., 1]
    return np.stack([world_x, world_y], axis=-1)


def block_keypoints(block_pose: np.ndarray) -> np.ndarray:
    """DP's 9 keypoints of the T in world coordinates, (9, 2) for a pose or (N, 9, 2) for N."""
    return to_world(BLOCK_KEYPOINTS, block_pose)


_GOAL_POLYGON = shapely.Polygon(to_world(T_OUTLINE, GOAL_POSE))
shapely.prepare(_GOAL_POLYGON)


def coverage(block_pose: np.ndarray) -> float | np.ndarray:
    """Fraction of the goal T covered by the block T (shapely), for one pose or an (N, 3) batch."""
    pose = np.asarray(block_pose, dtype=np.float64)
    polygons = shapely.polygons(to_world(T_OUTLINE, pose))
    covered = shapely.area(shapely.intersection(polygons, _GOAL_POLYGON)) / _GOAL_POLYGON.area
    return float(covered) if pose.ndim == 1 else covered


class PushTSim:
    """The pymunk model of PushT (walls, PD-driven kinematic agent, T block) with DP's dynamics.

    The env owns one; the scripted expert builds throwaway copies to simulate candidate pushes.
    """

    def __init__(self) -> None:
        self.space = pymunk.Space()
        self.space.gravity = (0.0, 0.0)
        self.space.damping = 0.0
        for start, end in WALL_SEGMENTS:
            self.space.add(pymunk.Segment(self.space.static_body, start, end, WALL_RADIUS))
        self.agent = pymunk.Body(body_type=pymunk.Body.KINEMATIC)
        self.agent.position = (256.0, 400.0)
        self.space.add(self.agent, pymunk.Circle(self.agent, AGENT_RADIUS))
        self.block = pymunk.Body(1.0, T_MOMENT)
        bar = pymunk.Poly(self.block, T_BAR_VERTICES)
        stem = pymunk.Poly(self.block, T_STEM_VERTICES)
        self.block.center_of_gravity = T_CENTER_OF_GRAVITY
        self.block.position = (256.0, 300.0)
        self.space.add(self.block, bar, stem)

    def set_state_legacy(self, state: np.ndarray) -> None:
        """DP's legacy ``_set_state``: agent, block position, then block angle; one physics step."""
        self.agent.position = (float(state[0]), float(state[1]))
        self.block.position = (float(state[2]), float(state[3]))
        self.block.angle = float(state[4])
        self.space.step(1.0 / SIM_HZ)

    def set_state_exact(self, state: np.ndarray, agent_velocity: np.ndarray = (0.0, 0.0)) -> None:
        """Place agent and block exactly at ``state`` (angle before position), without stepping."""
        self.agent.position = (float(state[0]), float(state[1]))
        self.agent.velocity = (float(agent_velocity[0]), float(agent_velocity[1]))
        self.block.angle = float(state[4])
        self.block.position = (float(state[2]), float(state[3]))

    def step(self, target: tuple[float, float]) -> None:
        """Drive the agent toward ``target`` with DP's PD law for one 10 Hz action (10 substeps)."""
        dt = 1.0 / SIM_HZ
        target_x, target_y = target
        agent, space = self.agent, self.space
        for _ in range(SUBSTEPS_PER_ACTION):
            (pos_x, pos_y), (vel_x, vel_y) = agent.position, agent.velocity
            accel_x = K_P * (target_x - pos_x) + K_V * (0.0 - vel_x)
            accel_y = K_P * (target_y - pos_y) + K_V * (0.0 - vel_y)
            agent.velocity = (vel_x + accel_x * dt, vel_y + accel_y * dt)
            space.step(dt)

    @property
    def agent_position(self) -> np.ndarray:
        """Agent centre (2,)."""
        return np.array(self.agent.position)

    @property
    def agent_velocity(self) -> np.ndarray:
        """Agent velocity in px/s (2,)."""
        return np.array(self.agent.velocity)

    @property
    def block_pose(self) -> np.ndarray:
        """Block pose (x, y, angle) with the angle unwrapped, as pymunk holds it (3,)."""
        position = self.block.position
        return np.array([position.x, position.y, self.block.angle])


def _draw_fat_polyline(
    surface: pygame.Surface, points: np.ndarray, color: tuple[int, int, int], width: int
) -> None:
    pygame.draw.lines(surface, color, True, points.tolist(), width)
    for point in points:
        pygame.draw.circle(surface, color, point.tolist(), width / 2)


def render_state(state: np.ndarray, size: int = 96, action: np.ndarray | None = None) -> np.ndarray:
    """Draw a PushT state (agent xy, block xy, angle) like DP does, as (size, size, 3) uint8.

    Pure function of the state, so stored states can be re-rendered; ``action`` adds DP's red
    target cross. Drawn on a 512 px canvas (DP's look) and smooth-scaled to ``size``.
    """
    state = np.asarray(state, dtype=np.float64)
    canvas = pygame.Surface((int(WORKSPACE_SIZE), int(WORKSPACE_SIZE)))
    canvas.fill((255, 255, 255))
    for bar_or_stem in (T_BAR_VERTICES, T_STEM_VERTICES):
        goal_corners = to_world(np.array(bar_or_stem), GOAL_POSE)
        pygame.draw.polygon(canvas, _GOAL_COLOR, goal_corners.tolist())
    for start, end in WALL_SEGMENTS:
        _draw_fat_polyline(canvas, np.array([start, end], dtype=float), _WALL_COLOR, 4)
    agent_xy = state[:2].tolist()
    pygame.draw.circle(canvas, _AGENT_COLOR, agent_xy, AGENT_RADIUS)
    pygame.draw.circle(canvas, _lighter(_AGENT_COLOR), agent_xy, AGENT_RADIUS - 4)
    for bar_or_stem in (T_BAR_VERTICES, T_STEM_VERTICES):
        corners = to_world(np.array(bar_or_stem), state[2:5])
        pygame.draw.polygon(canvas, _lighter(_BLOCK_COLOR), corners.tolist())
        _draw_fat_polyline(canvas, corners, _BLOCK_COLOR, 4)
    if size != canvas.get_width():
        canvas = pygame.transform.smoothscale(canvas, (size, size))
    if action is not None:
        x, y = np.asarray(action, dtype=np.float64) * size / WORKSPACE_SIZE
        arm, width = max(2.0, 4 * size / 96), max(1, round(size / 96))
        pygame.draw.line(canvas, _ACTION_COLOR, (x - arm, y), (x + arm, y), width)
        pygame.draw.line(canvas, _ACTION_COLOR, (x, y - arm), (x, y + arm), width)
    return np.ascontiguousarray(pygame.surfarray.array3d(canvas).transpose(1, 0, 2))


def legacy_initial_state(seed: int) -> np.ndarray:
    """DP's initial-state draw for a seed: ``RandomState(seed)`` agent xy, block xy, angle."""
    rs = np.random.RandomState(seed=seed)
    return np.array(
        [
            rs.randint(50, 450),
            rs.randint(50, 450),
            rs.randint(100, 400),
            rs.randint(100, 400),
            rs.randn() * 2 * np.pi - np.pi,
        ],
        dtype=np.float64,
    )


class PushTEnv(gymnasium.Env):
    """PushT with DP's dynamics; observations ``state`` (5,), ``keypoints`` (20,) or ``image``.

    Action: the agent's PD target (x, y) in [0, 512]^2, held for 10 physics steps of 10 ms.
    Reward clip(coverage / 0.95, 0, 1); terminated once coverage > 0.95; never truncates itself
    (``gymnasium.make("PushT-v0")`` adds a 300-step TimeLimit).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}

    def __init__(
        self,
        obs_type: str = "state",
        render_mode: str | None = None,
        image_size: int = 96,
        render_size: int = 256,
    ) -> None:
        if obs_type not in OBS_TYPES:
            raise ValueError(f"obs_type must be one of {OBS_TYPES}, got {obs_type!r}")
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.obs_type = obs_type
        self.render_mode = render_mode
        self.image_size = image_size
        self.render_size = render_size
        self.action_space = spaces.Box(0.0, WORKSPACE_SIZE, shape=(2,), dtype=np.float32)
        self.observation_space = self._make_observation_space()
        self.sim = PushTSim()
        self._latest_action: np.ndarray | None = None

    def _make_observation_space(self) -> spaces.Space:
        # The critically damped PD agent never leaves the hull of its targets, so it stays in
        # [0, 512]; the block stays inside the walls.
        size = WORKSPACE_SIZE
        if self.obs_type == "state":
            high = np.array([size, size, size, size, 2 * np.pi], dtype=np.float32)
            return spaces.Box(np.zeros(5, dtype=np.float32), high, dtype=np.float32)
        if self.obs_type == "keypoints":
            # Keypoints of a T that spawned against a wall, and an agent that overshoots its
            # target, can sit a few pixels outside the workspace: bound with a margin.
            return spaces.Box(-OBS_MARGIN, size + OBS_MARGIN,
                              shape=(2 * len(BLOCK_KEYPOINTS) + 2,), dtype=np.float32)
        return spaces.Dict(
            {
                "image": spaces.Box(0, 255, (self.image_size, self.image_size, 3), np.uint8),
                "agent_pos": spaces.Box(-OBS_MARGIN, size + OBS_MARGIN, shape=(2,),
                                        dtype=np.float32),
            }
        )

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Start an episode: DP's legacy seeded initial state, or ``options["reset_to_state"]``.

        ``reset_to_state`` = [agent x, agent y, block x, block y, angle] is placed exactly (no
        physics step), so ``get_state()`` returns it; used to re-render stored states.
        """
        super().reset(seed=seed)
        self.sim = PushTSim()
        self._latest_action = None
        state = (options or {}).get("reset_to_state")
        if state is not None:
            state = np.asarray(state, dtype=np.float64)
            if state.shape != (5,) or not np.all(np.isfinite(state)):
                raise ValueError(f"reset_to_state must be 5 finite numbers, got {state!r}")
            self.sim.set_state_exact(state)
        else:
            if seed is None:
                seed = int(self.np_random.integers(0, 2**31))
            self.sim.set_state_legacy(legacy_initial_state(seed))
        return self._observation(), self._info(coverage(self.sim.block_pose))

    def step(self, action: np.ndarray) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        """Move the PD target to ``action`` (clipped to the workspace) for one 0.1 s step."""
        target = np.asarray(action, dtype=np.float64)
        if target.shape != (2,):
            raise ValueError(f"action must have shape (2,), got shape {target.shape}")
        if not np.all(np.isfinite(target)):
            raise ValueError(f"action must be finite, got {target.tolist()}")
        target = np.clip(target, 0.0, WORKSPACE_SIZE)
        self._latest_action = target
        self.sim.step((float(target[0]), float(target[1])))
        covered = coverage(self.sim.block_pose)
        reward = float(np.clip(covered / SUCCESS_COVERAGE, 0.0, 1.0))
        terminated = covered > SUCCESS_COVERAGE
        return self._observation(), reward, terminated, False, self._info(covered)

    def render(self) -> np.ndarray | None:
        """RGB frame (render_size, render_size, 3) with DP's red cross on the latest target."""
        if self.render_mode is None:
            gymnasium.logger.warn("render() called without render_mode='rgb_array'")
            return None
        return render_state(self.get_state(), self.render_size, self._latest_action)

    def get_state(self) -> np.ndarray:
        """Current state (agent x, agent y, block x, block y, angle mod 2 pi), float64 (5,)."""
        block = self.sim.block_pose
        return np.array([*self.sim.agent_position, block[0], block[1], block[2] % (2 * np.pi)])

    def keypoints(self) -> np.ndarray:
        """DP's 9 block keypoints in world coordinates, (9, 2) float64."""
        return block_keypoints(self.sim.block_pose)

    def _observation(self) -> Any:
        if self.obs_type == "state":
            return self.get_state().astype(np.float32)
        agent_pos = self.sim.agent_position.astype(np.float32)
        if self.obs_type == "keypoints":
            return np.concatenate([self.keypoints().ravel().astype(np.float32), agent_pos])
        return {"image": render_state(self.get_state(), self.image_size), "agent_pos": agent_pos}

    def _info(self, covered: float) -> dict[str, Any]:
        return {
            "coverage": covered,
            "is_success": covered > SUCCESS_COVERAGE,
            "pos_agent": self.sim.agent_position,
            "block_pose": self.sim.block_pose,
        }
