"""Scripted experts for robomimic's Lift and PickPlaceCan, reading privileged state from the sim.

Both drive the grip site with OSC pose deltas (7-D actions of `envs.robomimic.RobomimicEnv`):
a proportional step toward a phase's target position (capped at ``speed`` x 5 cm per step) and
toward a gripper-down orientation, yawed so that the fingers close across two faces of Lift's
cube. Phases::

    approach -> descend -> grasp -> lift                                   (Lift: success)
    approach -> descend -> grasp -> lift -> carry -> lower -> release -> retreat   (Can)

Lift succeeds once the cube is 4 cm above the table; Can once it rests in its own quadrant of
the target bin with the gripper more than ~4 cm away. A phase that runs past its step budget
moves on anyway, and a lost grasp (the object more than 5 cm from the grip site) starts again
from ``approach``. Per episode the expert draws its hover, grasp, carry and release heights, a
grasp offset, a drop point within the target quadrant, its speed and how long it closes the
gripper, scaled by ``diversity`` (0: the same motion every episode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import robosuite.utils.transform_utils as transforms

from envs.robomimic import RobomimicEnv

POSITION_SCALE = 0.05
"""Metres per unit of the OSC position action (the controller's output_max)."""
ROTATION_SCALE = 0.5
"""Radians per unit of the OSC rotation action."""
GRIPPER_DOWN = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
"""Grip-site orientation pointing straight down, fingers closing along world x."""
LOST_GRASP_DISTANCE = 0.05
PLACE_FROM_CORNER = np.array([0.06, 0.07])
"""Can's drop point from its quadrant's corner nearest the robot: the quadrant's centre is at
the edge of the Panda's reach with the gripper pointing down."""
PHASE_BUDGETS = {
    "approach": 80,
    "descend": 40,
    "lift": 60,
    "carry": 80,
    "lower": 30,
    "retreat": 40,
}
"""Steps after which a phase moves on even if its target was not reached."""


@dataclass(frozen=True)
class _Style:
    """One episode's randomised motion parameters (metres, steps, fraction of full speed)."""

    hover_height: float
    grasp_offset: np.ndarray
    speed: float
    close_steps: int
    lift_height: float
    carry_height: float
    place_offset: np.ndarray
    release_height: float
    open_steps: int

    @classmethod
    def draw(cls, rng: np.random.Generator, diversity: float) -> _Style:
        """Nominal values jittered uniformly by ``diversity`` x each parameter's half-range."""

        def jitter(nominal: float, half_range: float) -> float:
            return nominal + diversity * rng.uniform(-half_range, half_range)

        return cls(
            hover_height=jitter(0.08, 0.03),
            grasp_offset=np.array([jitter(0.0, 0.004), jitter(0.0, 0.004), jitter(0.0, 0.005)]),
            speed=jitter(0.8, 0.2),
            close_steps=round(jitter(8, 3)),
            lift_height=jitter(0.12, 0.04),
            carry_height=jitter(0.26, 0.03),
            place_offset=np.array([jitter(0.0, 0.02), jitter(0.0, 0.02)]),
            release_height=jitter(0.15, 0.02),
            open_steps=round(jitter(6, 2)),
        )


@dataclass(frozen=True)
class _Scene:
    """Privileged state the expert acts on: grip site and object poses, world frame."""

    eef_pos: np.ndarray
    eef_mat: np.ndarray
    object_pos: np.ndarray
    object_mat: np.ndarray


def _yaw_to_faces(object_mat: np.ndarray) -> float:
    """Yaw (rad, in [-pi/4, pi/4]) that turns the fingers' closing axis (world x) onto the
    nearest face normal of a box with rotation ``object_mat``."""
    yaw = np.arctan2(object_mat[1, 0], object_mat[0, 0])
    return float((yaw + np.pi / 4) % (np.pi / 2) - np.pi / 4)


def _rotation_about_z(angle: float) -> np.ndarray:
    cos, sin = np.cos(angle), np.sin(angle)
    return np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])


class GraspExpert:
    """Approach, descend, grasp and lift an object; subclasses say what follows the lift."""

    object_is_box = False

    def __init__(self, rng: int | np.random.Generator | None = None, diversity: float = 0.5):
        self.rng = np.random.default_rng(rng)
        self.diversity = float(diversity)
        self.reset()

    def reset(self) -> None:
        """Draw this episode's style and start from ``approach``."""
        self.style = _Style.draw(self.rng, self.diversity)
        self._enter("approach")
        self.grasp_xy: np.ndarray | None = None

    def _enter(self, phase: str) -> None:
        self.phase = phase
        self.phase_steps = 0

    def act(self, env: RobomimicEnv) -> np.ndarray:
        """Next action (7,) float32 for the env's current state (reads its MuJoCo sim)."""
        scene = self._read_scene(env.unwrapped.robosuite_env)
        target, gripper = self._target(env.unwrapped.robosuite_env, scene)
        self.phase_steps += 1
        position = (target - scene.eef_pos) / POSITION_SCALE
        position = np.clip(position, -self.style.speed, self.style.speed)
        yaw = _yaw_to_faces(scene.object_mat) if self.object_is_box else 0.0
        error = _rotation_about_z(yaw) @ GRIPPER_DOWN @ scene.eef_mat.T
        axis_angle = transforms.quat2axisangle(transforms.mat2quat(error))
        rotation = np.clip(axis_angle / ROTATION_SCALE, -1.0, 1.0)
        return np.concatenate([position, rotation, [gripper]]).astype(np.float32)

    def _read_scene(self, robosuite_env: Any) -> _Scene:
        data = robosuite_env.sim.data
        site = robosuite_env.robots[0].eef_site_id["right"]
        body = self._object_body_id(robosuite_env)
        return _Scene(
            eef_pos=np.array(data.site_xpos[site]),
            eef_mat=np.array(data.site_xmat[site]).reshape(3, 3),
            object_pos=np.array(data.body_xpos[body]),
            object_mat=np.array(data.body_xmat[body]).reshape(3, 3),
        )

    def _object_body_id(self, robosuite_env: Any) -> int:
        raise NotImplementedError

    def _done(
        self, target: np.ndarray, scene: _Scene, tolerance: float, xy_tolerance: float = np.inf
    ) -> bool:
        """Within ``tolerance`` of ``target`` (and ``xy_tolerance`` horizontally), or the
        phase's step budget is spent."""
        error = target - scene.eef_pos
        reached = np.linalg.norm(error) < tolerance and np.linalg.norm(error[:2]) < xy_tolerance
        return bool(reached or self.phase_steps >= PHASE_BUDGETS.get(self.phase, np.inf))

    def _target(self, robosuite_env: Any, scene: _Scene) -> tuple[np.ndarray, float]:
        """This step's grip-site target and gripper command; advances the phase."""
        style = self.style
        grasp_point = scene.object_pos + style.grasp_offset
        holding = self.phase in ("lift", "carry", "lower")
        if holding and np.linalg.norm(scene.object_pos - scene.eef_pos) > LOST_GRASP_DISTANCE:
            self._enter("approach")
        if self.phase == "approach":
            target = grasp_point + [0.0, 0.0, style.hover_height]
            if self._done(target, scene, 0.02, xy_tolerance=0.01):
                self._enter("descend")
            return target, -1.0
        if self.phase == "descend":
            if self._done(grasp_point, scene, 0.008):
                self._enter("grasp")
            return grasp_point, -1.0
        if self.phase == "grasp":
            if self.phase_steps >= style.close_steps:
                self.grasp_xy = scene.eef_pos[:2].copy()
                self._enter("lift")
            return grasp_point, 1.0
        return self._after_grasp(robosuite_env, scene)

    def _after_grasp(self, robosuite_env: Any, scene: _Scene) -> tuple[np.ndarray, float]:
        """Lift straight up from where the object was grasped."""
        table_height = robosuite_env.model.mujoco_arena.table_offset[2]
        target = np.array([*self.grasp_xy, table_height + self.style.lift_height])
        return target, 1.0


class LiftExpert(GraspExpert):
    """Lift: grasp the cube across two faces and lift it (success at 4 cm above the table)."""

    object_is_box = True

    def _object_body_id(self, robosuite_env: Any) -> int:
        return robosuite_env.cube_body_id


class PickPlaceCanExpert(GraspExpert):
    """PickPlaceCan: grasp the can, carry it over its target quadrant, release, back away."""

    def reset(self) -> None:
        """Draw this episode's style and start from ``approach``."""
        super().reset()
        self.release_xy: np.ndarray | None = None

    def _object_body_id(self, robosuite_env: Any) -> int:
        return robosuite_env.obj_body_id[robosuite_env.objects[robosuite_env.object_id].name]

    def _after_grasp(self, robosuite_env: Any, scene: _Scene) -> tuple[np.ndarray, float]:
        style = self.style
        bin_height = robosuite_env.bin2_pos[2]
        carry_z = bin_height + style.carry_height
        quadrant_center = robosuite_env.target_bin_placements[robosuite_env.object_id][:2]
        quadrant_corner = quadrant_center - np.asarray(robosuite_env.bin_size[:2]) / 4
        place_xy = quadrant_corner + PLACE_FROM_CORNER + style.place_offset
        if self.phase == "lift":
            target = np.array([*self.grasp_xy, carry_z])
            if self._done(target, scene, 0.03):
                self._enter("carry")
            return target, 1.0
        if self.phase == "carry":
            target = np.array([*place_xy, carry_z])
            if self._done(target, scene, 0.015):
                self._enter("lower")
            return target, 1.0
        if self.phase == "lower":
            target = np.array([*place_xy, bin_height + style.release_height])
            if self._done(target, scene, 0.015):
                self._enter("release")
            return target, 1.0
        if self.phase == "release":
            if self.phase_steps >= style.open_steps:
                self.release_xy = scene.eef_pos[:2].copy()
                self._enter("retreat")
            return np.array([*place_xy, bin_height + style.release_height]), -1.0
        return np.array([*self.release_xy, carry_z]), -1.0


EXPERTS = {"Lift": LiftExpert, "PickPlaceCan": PickPlaceCanExpert}


def make_expert(
    env_name: str, rng: int | np.random.Generator | None = None, diversity: float = 0.5
) -> GraspExpert:
    """The scripted expert for a robomimic env name (``Lift`` or ``PickPlaceCan``)."""
    if env_name not in EXPERTS:
        raise ValueError(f"no scripted expert for {env_name!r}; have {sorted(EXPERTS)}")
    return EXPERTS[env_name](rng=rng, diversity=diversity)


def run_expert_episode(
    env: RobomimicEnv, expert: GraspExpert, seed: int, max_steps: int = 400
) -> dict[str, Any]:
    """Roll the expert out from ``env.reset(seed=seed)`` until success or ``max_steps``.

    Returns robomimic's per-demo arrays: ``obs`` and ``next_obs`` ({key: (T, ...)}, every key of
    `RobomimicEnv.observation_dict`), ``actions`` (T, 7) float32, ``rewards`` and ``dones``
    (T,) (done on success or at the last step), ``states`` (T, S) float64 (the MuJoCo state
    under obs[t]), plus ``model_file`` (XML), ``success``, ``n_steps``.
    """
    env.reset(seed=seed)
    expert.reset()
    base_env = env.unwrapped
    observations = [base_env.observation_dict()]
    states, actions, rewards, dones = [], [], [], []
    success = False
    for step in range(max_steps):
        states.append(base_env.get_state())
        action = expert.act(env)
        _, reward, terminated, truncated, info = env.step(action)
        observations.append(base_env.observation_dict())
        actions.append(action)
        rewards.append(reward)
        success = success or info["is_success"]
        done = terminated or truncated or info["is_success"] or step == max_steps - 1
        dones.append(done)
        if terminated or truncated:
            break
    keys = observations[0].keys()
    stacked = {key: np.stack([obs[key] for obs in observations]) for key in keys}
    return {
        "obs": {key: value[:-1] for key, value in stacked.items()},
        "next_obs": {key: value[1:] for key, value in stacked.items()},
        "actions": np.array(actions, dtype=np.float32),
        "rewards": np.array(rewards, dtype=np.float64),
        "dones": np.array(dones, dtype=np.int64),
        "states": np.array(states, dtype=np.float64),
        "model_file": base_env.model_xml(),
        "success": bool(success),
        "n_steps": len(actions),
    }


__all__ = [
    "EXPERTS",
    "GraspExpert",
    "LiftExpert",
    "PickPlaceCanExpert",
    "make_expert",
    "run_expert_episode",
]
