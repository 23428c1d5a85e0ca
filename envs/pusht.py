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

gym-pusht compatibility (the env LeRobot's PushT policies are trained and evaluated in,
huggingface/gym-pusht 0.1.8, whose dynamics are DP's). Options; DP's behaviour is the default:

- ``obs_type="environment_state_agent_pos"``: ``{"environment_state": (16,) float64,
  "agent_pos": (2,) float64}``; the environment state is the T's 8 polygon corners in the world
  (bar (-60, 0), (60, 0), (60, 30), (-60, 30), then stem (-15, 30), (15, 30), (15, 120),
  (-15, 120), block frame), flattened x0, y0, x1, ..., as gym-pusht's ``get_keypoints``;
- ``obs_type="pixels_agent_pos"``: ``{"pixels": (image_size, image_size, 3) uint8, "agent_pos":
  (2,) float64}``; ``obs_type="pixels"``: the bare image. Drawn like gym-pusht's
  ``pymunk_override.DrawOptions`` on a 512 px canvas (coordinates rounded to integers; the walls
  drawn over the block and agent; chipmunk's contact points of the last physics step drawn as
  red anti-aliased segments) and shrunk with ``resize_like_cv2_linear``, a numpy copy of
  ``cv2.resize``'s default bilinear interpolation, bit-exact on uint8 (``render_gym_pusht``);
- ``reset_rule="gym_pusht"``: the seeded initial state is drawn from gymnasium's
  ``self.np_random`` (``integers(50, 450)`` twice for the agent, ``integers(100, 400)`` twice for
  the block, angle ``uniform(-pi, pi)``), not DP's ``RandomState(seed)`` with angle
  ``randn() * 2 pi - pi``; ``reset_to_state`` is then placed like gym-pusht (and DP) place it:
  legacy order and one physics step, so the state read back differs from the one given;
- ``action_clip=False``: targets outside [0, 512]^2 are used as given (gym-pusht never clips).

``gym_pusht_kwargs()`` returns all three settings; rewards and termination are the same in both
modes (gym-pusht's coverage agrees to ~1e-15). ``info`` keeps our keys (gym-pusht's reset info
has no ``coverage``; its ``vel_agent``, ``goal_pose`` and ``n_contacts`` are not reproduced), and
``render()`` keeps our frame (gym-pusht's is 680 px with an OpenCV marker). Pinned against
gym-pusht's own rollouts by tests/test_pusht_gym_compat.py (fixture tests/fixtures/gym_pusht).
"""

from __future__ import annotations

import math
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
"""Diffusion Policy's observation types."""
GYM_PUSHT_OBS_TYPES = ("environment_state_agent_pos", "pixels_agent_pos", "pixels")
"""gym-pusht's observation types (dict keys and dtypes as gym-pusht 0.1.8 returns them)."""
RESET_RULES = ("dp", "gym_pusht")

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

GYM_PUSHT_KEYPOINTS = np.array(
    [[-60, 0], [60, 0], [60, 30], [-60, 30], [-15, 30], [15, 30], [15, 120], [-15, 120]],
    dtype=np.float64,
)
"""gym-pusht's ``environment_state`` points in the block frame: the bar's then the stem's
corners, in the order pymunk stores the two polygons' vertices."""

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
_CONTACT_COLOR = (231, 76, 60)  # pymunk's SpaceDebugDrawOptions.collision_point_color


def _lighter(color: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(min(int(1.2 * c), 255) for c in color)


def _gym_pusht_lighter(color: tuple[int, int, int]) -> tuple[int, int, int]:
    # gym-pusht's light_color: 1.2 * c in float32, then pymunk 6's SpaceDebugColor.as_int()
    # ROUNDS (our DP drawing truncates): LightSlateGray's fill is (143, 163, 184), not 142/183.
    scaled = np.minimum(np.float32(1.2) * np.float32(color), np.float32(255))
    return tuple(round(float(c)) for c in scaled)


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


def gym_pusht_keypoints(block_pose: np.ndarray) -> np.ndarray:
    """gym-pusht's ``environment_state``: the T's 8 corners in the world, (16,) float64.

    ``block_pose`` must carry pymunk's unwrapped angle (``PushTSim.block_pose``): the rotation
    uses ``math.cos``/``math.sin`` of it, as pymunk's ``Vec2d.rotated`` does, so the corners
    match gym-pusht's bit for bit.
    """
    x, y, angle = (float(v) for v in block_pose)
    cos, sin = math.cos(angle), math.sin(angle)
    local_x, local_y = GYM_PUSHT_KEYPOINTS.T
    world = np.stack([local_x * cos - local_y * sin + x, local_x * sin + local_y * cos + y], -1)
    return world.ravel()


_RESIZE_COEF_BITS = 11  # cv2's INTER_RESIZE_COEF_BITS


def _linear_taps(dst: int, src: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cv2's INTER_LINEAR source index and 11-bit fixed-point weights for each output index."""
    scale = 1.0 / (dst / src)  # cv2: scale_x = 1. / inv_scale_x, inv_scale_x = dst / src
    pos = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)
    index = np.floor(pos)
    frac = (pos - index).astype(np.float32)
    one = np.float32(1 << _RESIZE_COEF_BITS)
    weight1 = np.rint(frac * one).astype(np.int32)
    weight0 = np.rint((np.float32(1.0) - frac) * one).astype(np.int32)
    return index.astype(np.intp), weight0, weight1


def resize_like_cv2_linear(image: np.ndarray, size: int) -> np.ndarray:
    """Shrink an (H, W, C) uint8 image to (size, size, C) exactly as ``cv2.resize(image,
    (size, size))`` does (default INTER_LINEAR), without OpenCV.

    cv2 (4.x, uint8): half-pixel-centred bilinear taps with 11-bit weights; the horizontal pass is
    exact in int32, the vertical one is its SIMD path: each row value >> 4, times the weight,
    >> 16 (mulhi), summed, then (sum + 2) >> 2. Checked equal to opencv-python 4.14 on random
    images for sizes 64-511 from 512. Downscaling only (size < H, W; size == H == W copies).
    """
    image = np.asarray(image)
    height, width = image.shape[:2]
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"expected an (H, W, C) uint8 image, got {image.shape} {image.dtype}")
    if size == height == width:
        return image.copy()
    if not 0 < size < min(height, width):
        raise ValueError(f"size must be in (0, {min(height, width)}) to shrink, got {size}")
    row, beta0, beta1 = _linear_taps(size, height)
    col, alpha0, alpha1 = _linear_taps(size, width)
    alpha0, alpha1 = alpha0[:, None], alpha1[:, None]

    def horizontal(rows: np.ndarray) -> np.ndarray:
        pixels = image[rows].astype(np.int32)
        return pixels[:, col] * alpha0 + pixels[:, col + 1] * alpha1

    top = (horizontal(row) >> 4) * beta0[:, None, None] >> 16
    bottom = (horizontal(row + 1) >> 4) * beta1[:, None, None] >> 16
    return np.clip((top + bottom + 2) >> 2, 0, 255).astype(np.uint8)


def _pygame_point(point: Any) -> tuple[int, int]:
    """pymunk_override.to_pygame: round half to even, to int."""
    return round(float(point[0])), round(float(point[1]))


def _gym_pusht_fat_segment(
    surface: pygame.Surface, a: Any, b: Any, radius: float, color: tuple[int, int, int]
) -> None:
    # gym-pusht's DrawOptions.draw_fat_segment, verbatim in effect (its odd abs() included).
    p1, p2 = _pygame_point(a), _pygame_point(b)
    width = round(max(1, radius * 2))
    pygame.draw.lines(surface, color, False, [p1, p2], width)
    if width <= 2:
        return
    orthog = [abs(p2[1] - p1[1]), abs(p2[0] - p1[0])]
    if orthog[0] == 0 and orthog[1] == 0:
        return
    scale = radius / (orthog[0] * orthog[0] + orthog[1] * orthog[1]) ** 0.5
    orthog = [round(orthog[0] * scale), round(orthog[1] * scale)]
    corners = [
        (p1[0] - orthog[0], p1[1] - orthog[1]),
        (p1[0] + orthog[0], p1[1] + orthog[1]),
        (p2[0] + orthog[0], p2[1] + orthog[1]),
        (p2[0] - orthog[0], p2[1] - orthog[1]),
    ]
    pygame.draw.polygon(surface, color, corners)
    pygame.draw.circle(surface, color, p1, round(radius))
    pygame.draw.circle(surface, color, p2, round(radius))


_SHAPE_ORDER = {pymunk.Circle: 0, pymunk.Segment: 1, pymunk.Poly: 2}
"""chipmunk orders a colliding pair by shape type (circle, segment, poly): shape a is first."""


def contact_segments(sim: PushTSim) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    """The segments pymunk's debug draw marks the last physics step's contact points with.

    chipmunk draws, per contact, (p_a - 2 n, p_b + 2 n) with p_a, p_b the contact point on each
    shape and n the normal from shape a to shape b. Every contact involves the block (the
    kinematic agent and the static walls do not collide), so the block's arbiters hold them all.
    """
    segments = []

    def collect(arbiter: pymunk.Arbiter) -> None:
        shape_a, shape_b = arbiter.shapes
        points = arbiter.contact_point_set
        swapped = _SHAPE_ORDER[type(shape_a)] > _SHAPE_ORDER[type(shape_b)]
        normal = -points.normal if swapped else points.normal
        for point in points.points:
            on_a, on_b = point.point_a, point.point_b
            if swapped:
                on_a, on_b = on_b, on_a
            start = (on_a.x + normal.x * -2.0, on_a.y + normal.y * -2.0)
            end = (on_b.x + normal.x * 2.0, on_b.y + normal.y * 2.0)
            segments.append((start, end))

    sim.block.each_arbiter(collect)
    return segments


def render_gym_pusht(sim: PushTSim, size: int = 96) -> np.ndarray:
    """gym-pusht's ``pixels`` observation of ``sim``, (size, size, 3) uint8.

    gym-pusht 0.1.8 draws with its ``pymunk_override.DrawOptions`` on a 512 px pygame canvas
    (goal; bar, stem, agent; walls; contact points) and ``cv2.resize``s it to ``size`` with the
    default bilinear interpolation. Needs the sim (not just the state) for the contact points.
    """
    canvas = _draw_gym_pusht(sim)
    if size == canvas.get_width():
        return np.ascontiguousarray(pygame.surfarray.array3d(canvas).transpose(1, 0, 2))
    # A view (no copy of the 512 px frame): the resize reads only the rows it needs.
    return resize_like_cv2_linear(pygame.surfarray.pixels3d(canvas).transpose(1, 0, 2), size)


def gym_pusht_canvas(sim: PushTSim) -> np.ndarray:
    """gym-pusht's 512 px drawing of ``sim`` before the resize, (512, 512, 3) uint8."""
    return np.ascontiguousarray(pygame.surfarray.array3d(_draw_gym_pusht(sim)).transpose(1, 0, 2))


def _draw_gym_pusht(sim: PushTSim) -> pygame.Surface:
    canvas = pygame.Surface((int(WORKSPACE_SIZE), int(WORKSPACE_SIZE)))
    canvas.fill((255, 255, 255))
    goal = gym_pusht_keypoints(GOAL_POSE).reshape(8, 2)
    for corners in (goal[:4], goal[4:]):
        points = [_pygame_point(p) for p in corners]
        pygame.draw.polygon(canvas, _GOAL_COLOR, [*points, points[0]])
    world = gym_pusht_keypoints(sim.block_pose).reshape(8, 2)
    for corners in (world[:4], world[4:]):
        points = [_pygame_point(p) for p in corners]
        pygame.draw.polygon(canvas, _gym_pusht_lighter(_BLOCK_COLOR), [*points, points[0]])
        for i in range(4):
            _gym_pusht_fat_segment(canvas, corners[i], corners[(i + 1) % 4], 2, _BLOCK_COLOR)
    agent = _pygame_point(sim.agent.position)
    pygame.draw.circle(canvas, _AGENT_COLOR, agent, round(AGENT_RADIUS))
    pygame.draw.circle(canvas, _gym_pusht_lighter(_AGENT_COLOR), agent, round(AGENT_RADIUS - 4))
    for start, end in WALL_SEGMENTS:
        _gym_pusht_fat_segment(canvas, start, end, WALL_RADIUS, _WALL_COLOR)
    for start, end in contact_segments(sim):
        pygame.draw.aalines(canvas, _CONTACT_COLOR, False, [_pygame_point(start),
                                                            _pygame_point(end)])
    return canvas


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


def gym_pusht_initial_state(rng: np.random.Generator) -> np.ndarray:
    """gym-pusht 0.1.8's initial-state draw from the env's ``np_random``: agent xy, block xy,
    angle ``uniform(-pi, pi)`` (DP: ``randn() * 2 pi - pi``)."""
    return np.array(
        [
            rng.integers(50, 450),
            rng.integers(50, 450),
            rng.integers(100, 400),
            rng.integers(100, 400),
            rng.uniform(-np.pi, np.pi),
        ],
        dtype=np.float64,
    )


def gym_pusht_kwargs(obs_type: str = "pixels_agent_pos") -> dict[str, Any]:
    """``PushTEnv`` keyword arguments that reproduce gym-pusht 0.1.8 (``gym_pusht/PushT-v0``)."""
    if obs_type not in GYM_PUSHT_OBS_TYPES:
        raise ValueError(f"obs_type must be one of {GYM_PUSHT_OBS_TYPES}, got {obs_type!r}")
    return {"obs_type": obs_type, "reset_rule": "gym_pusht", "action_clip": False}


class PushTEnv(gymnasium.Env):
    """PushT with DP's dynamics; observations ``state`` (5,), ``keypoints`` (20,) or ``image``,
    or gym-pusht's ``environment_state_agent_pos``, ``pixels_agent_pos``, ``pixels``.

    Action: the agent's PD target (x, y) in [0, 512]^2 (clipped to it unless
    ``action_clip=False``), held for 10 physics steps of 10 ms. Reward clip(coverage / 0.95, 0, 1);
    terminated once coverage > 0.95; never truncates itself (``gymnasium.make("PushT-v0")`` adds
    a 300-step TimeLimit). ``reset_rule`` picks DP's (``"dp"``) or gym-pusht's (``"gym_pusht"``)
    seeded initial state; see the module docstring for the gym-pusht options.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}

    def __init__(
        self,
        obs_type: str = "state",
        render_mode: str | None = None,
        image_size: int = 96,
        render_size: int = 256,
        reset_rule: str = "dp",
        action_clip: bool = True,
    ) -> None:
        if obs_type not in (*OBS_TYPES, *GYM_PUSHT_OBS_TYPES):
            raise ValueError(
                f"obs_type must be one of {(*OBS_TYPES, *GYM_PUSHT_OBS_TYPES)}, got {obs_type!r}"
            )
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        if reset_rule not in RESET_RULES:
            raise ValueError(f"reset_rule must be one of {RESET_RULES}, got {reset_rule!r}")
        if obs_type in ("pixels_agent_pos", "pixels") and not 0 < image_size <= WORKSPACE_SIZE:
            raise ValueError(f"gym-pusht pixels need 0 < image_size <= 512, got {image_size}")
        self.obs_type = obs_type
        self.render_mode = render_mode
        self.image_size = image_size
        self.render_size = render_size
        self.reset_rule = reset_rule
        self.action_clip = bool(action_clip)
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
        image = spaces.Box(0, 255, (self.image_size, self.image_size, 3), np.uint8)
        if self.obs_type == "image":
            return spaces.Dict(
                {
                    "image": image,
                    "agent_pos": spaces.Box(-OBS_MARGIN, size + OBS_MARGIN, shape=(2,),
                                            dtype=np.float32),
                }
            )
        # gym-pusht's keys and float64 dtypes; its [0, 512] bounds get our margin, and an agent
        # driven by unclipped targets can go anywhere (and push the T through a wall).
        bound = OBS_MARGIN if self.action_clip else np.inf
        agent_pos = spaces.Box(-bound, size + bound, shape=(2,), dtype=np.float64)
        if self.obs_type == "environment_state_agent_pos":
            corners = spaces.Box(-bound, size + bound, shape=(16,), dtype=np.float64)
            return spaces.Dict({"environment_state": corners, "agent_pos": agent_pos})
        if self.obs_type == "pixels_agent_pos":
            return spaces.Dict({"pixels": image, "agent_pos": agent_pos})
        return image

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Start an episode: the seeded initial state of ``reset_rule``, or
        ``options["reset_to_state"]``.

        ``reset_to_state`` = [agent x, agent y, block x, block y, angle] is placed exactly (no
        physics step), so ``get_state()`` returns it; used to re-render stored states. With
        ``reset_rule="gym_pusht"`` it is placed like gym-pusht does (DP's legacy order: block
        position, then angle about the centre of gravity, then one physics step).
        """
        super().reset(seed=seed)
        self.sim = PushTSim()
        self._latest_action = None
        state = (options or {}).get("reset_to_state")
        if state is not None:
            state = np.asarray(state, dtype=np.float64)
            if state.shape != (5,) or not np.all(np.isfinite(state)):
                raise ValueError(f"reset_to_state must be 5 finite numbers, got {state!r}")
            if self.reset_rule == "gym_pusht":
                self.sim.set_state_legacy(state)
            else:
                self.sim.set_state_exact(state)
        elif self.reset_rule == "gym_pusht":
            self.sim.set_state_legacy(gym_pusht_initial_state(self.np_random))
        else:
            if seed is None:
                seed = int(self.np_random.integers(0, 2**31))
            self.sim.set_state_legacy(legacy_initial_state(seed))
        return self._observation(), self._info(coverage(self.sim.block_pose))

    def step(self, action: np.ndarray) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        """Move the PD target to ``action`` (clipped to the workspace unless ``action_clip`` is
        off) for one 0.1 s step."""
        target = np.asarray(action, dtype=np.float64)
        if target.shape != (2,):
            raise ValueError(f"action must have shape (2,), got shape {target.shape}")
        if not np.all(np.isfinite(target)):
            raise ValueError(f"action must be finite, got {target.tolist()}")
        if self.action_clip:
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
        if self.obs_type in GYM_PUSHT_OBS_TYPES:
            return self._gym_pusht_observation()
        agent_pos = self.sim.agent_position.astype(np.float32)
        if self.obs_type == "keypoints":
            return np.concatenate([self.keypoints().ravel().astype(np.float32), agent_pos])
        return {"image": render_state(self.get_state(), self.image_size), "agent_pos": agent_pos}

    def _gym_pusht_observation(self) -> Any:
        agent_pos = self.sim.agent_position  # float64, as gym-pusht's np.array(agent.position)
        if self.obs_type == "environment_state_agent_pos":
            corners = gym_pusht_keypoints(self.sim.block_pose)
            return {"environment_state": corners, "agent_pos": agent_pos}
        pixels = render_gym_pusht(self.sim, self.image_size)
        if self.obs_type == "pixels":
            return pixels
        return {"pixels": pixels, "agent_pos": agent_pos}

    def _info(self, covered: float) -> dict[str, Any]:
        return {
            "coverage": covered,
            "is_success": covered > SUCCESS_COVERAGE,
            "pos_agent": self.sim.agent_position,
            "block_pose": self.sim.block_pose,
        }
