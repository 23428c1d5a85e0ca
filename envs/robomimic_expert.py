"""Scripted experts for robomimic's Lift, PickPlaceCan and NutAssemblySquare, reading privileged
state from the sim.

All drive the grip site with OSC pose deltas (7-D actions of `envs.robomimic.RobomimicEnv`):
a proportional step toward a phase's target position (capped at ``speed`` x 5 cm per step) and
toward a gripper-down orientation, yawed so that the fingers close across two faces of Lift's
cube or across Square's nut handle. Phases::

    approach -> descend -> grasp -> lift                                   (Lift: success)
    approach -> descend -> grasp -> lift -> carry -> lower -> release -> retreat   (Can, Square)

Lift succeeds once the cube is 4 cm above the table; Can once it rests in its own quadrant of
the target bin with the gripper more than ~4 cm away; Square once the nut is down around its
square peg (its centre within 3 cm of the peg's axis, below 5 cm above the table) with the grip
site more than ~4 cm from the nut's centre, which a grasp on the handle already is: Square's
episodes end during ``lower``. Square grasps the handle, lifts the nut clear of the peg,
carries the nut's centre over the peg while turning it square to the peg (to the nearest of
three peg-fitting yaws the arm reaches well), and lowers it while centred over the peg; from
the grasp on, its targets are the nut's pose, not the gripper's. A phase that runs past its
step budget moves on anyway, and a lost grasp (the grasped point more than 5 cm from the grip
site) starts again from ``approach``. Per episode the expert draws its hover, grasp, carry and
release heights, a grasp offset, a drop point (Can) or the point along the handle (Square),
its speed and how long it closes the gripper, scaled by ``diversity`` (0: the same motion every
episode). Square's discrete choices (grasp side, final yaw) are a fixed function of the nut's
and the gripper's yaws unless ``NutAssemblySquareExpert.choice_jitter`` > 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import robosuite.utils.transform_utils as transforms

from envs.robomimic import RobomimicEnv

POSITION_SCALE = 0.05
"""Metres per unit of the OSC position action (the controller's output_max)."""
ROTATION_SCALE = 0.5
"""Radians per unit of the OSC rotation action."""
GRIPPER_DOWN = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
"""Grip-site orientation pointing straight down, fingers closing along world y (yaw 0)."""
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
SQUARE_PHASE_BUDGETS = {
    "approach": 100,
    "descend": 40,
    "lift": 60,
    "carry": 120,
    "lower": 80,
    "retreat": 40,
}
"""Square's budgets: its approach and carry also turn the gripper (the carry by up to ~135
degrees)."""
NUT_HALF_THICKNESS = 0.01
"""Half thickness of the square nut (robosuite's square-nut.xml)."""
PEG_HALF_HEIGHT = 0.1
"""Half height of NutAssembly's pegs (robosuite's pegs_arena.xml); the body origin is the
peg's centre."""
HANDLE_YAWS = (np.pi, -np.pi / 2, np.pi / 2)
"""Nut yaws Square may end at (the nut's +x axis points along its handle): handle toward the
robot, to its right, to its left. The fourth, handle away from the robot, would put the grip
site beyond the Panda's reach with the gripper pointing down (x ~0.29 m)."""
HANDLE_YAW_PENALTIES = (0.0, 0.3, 0.6)
"""Nominal cost (rad of turning) of each of `HANDLE_YAWS`: the further the grip site is from
the robot at the peg, the less accurately the arm holds it there."""
GRIPPER_YAW_RANGE = (-1.7, 2.7)
"""Grip-site yaws the Panda reaches pointing down without nearing its wrist joint's limits
(joint 7 ~ 0.8 rad - yaw, limits +-2.9 rad)."""
MAX_YAW_STEP = 0.25
"""Largest yaw (rad) Square's expert asks for beyond the current one: large orientation errors
make the OSC swing the whole arm."""


def _jitterer(rng: np.random.Generator, diversity: float) -> Callable[[float, float], float]:
    """``jitter(nominal, half_range)``: nominal plus a uniform draw of ``diversity`` x
    half_range either way (one episode's style parameters)."""

    def jitter(nominal: float, half_range: float) -> float:
        return nominal + diversity * rng.uniform(-half_range, half_range)

    return jitter


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
        jitter = _jitterer(rng, diversity)
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
class _SquareStyle:
    """One Square episode's randomised motion parameters (metres, steps, fraction of full
    speed). ``hover_height`` is the grip site's above the grasp point; ``carry_height`` and
    ``release_height`` are the nut centre's above the table; ``handle_grasp`` is the grasp
    point's distance from the nut's centre along the handle; ``handle_yaw_penalties`` jitter
    `HANDLE_YAW_PENALTIES` (which final yaw an episode prefers)."""

    hover_height: float
    grasp_offset: np.ndarray
    handle_grasp: float
    speed: float
    close_steps: int
    carry_height: float
    peg_offset: np.ndarray
    lower_speed: float
    release_height: float
    open_steps: int
    handle_yaw_penalties: tuple[float, ...]

    @classmethod
    def draw(
        cls, rng: np.random.Generator, diversity: float, choice_jitter: float = 0.0
    ) -> _SquareStyle:
        """Nominal values jittered uniformly by ``diversity`` x each parameter's half-range;
        the ending penalties by ``diversity`` x ``choice_jitter`` (0: the same choice for the
        same nut yaw in every episode)."""
        jitter = _jitterer(rng, diversity)
        return cls(
            hover_height=jitter(0.07, 0.02),
            grasp_offset=np.array([jitter(0.0, 0.003), jitter(0.0, 0.003), jitter(0.003, 0.003)]),
            handle_grasp=jitter(0.062, 0.006),
            speed=jitter(0.8, 0.2),
            close_steps=round(jitter(8, 3)),
            carry_height=jitter(0.19, 0.03),
            peg_offset=np.array([jitter(0.0, 0.002), jitter(0.0, 0.002)]),
            lower_speed=jitter(0.4, 0.1),
            release_height=jitter(0.035, 0.01),
            open_steps=round(jitter(6, 2)),
            handle_yaw_penalties=tuple(jitter(p, choice_jitter) for p in HANDLE_YAW_PENALTIES)
            if choice_jitter > 0
            else HANDLE_YAW_PENALTIES,
        )


@dataclass(frozen=True)
class _Scene:
    """Privileged state the expert acts on: grip site and object poses, world frame."""

    eef_pos: np.ndarray
    eef_mat: np.ndarray
    object_pos: np.ndarray
    object_mat: np.ndarray


def _yaw_to_faces(object_mat: np.ndarray) -> float:
    """Yaw (rad, in [-pi/4, pi/4]) that turns the fingers' closing axis (world y) onto the
    nearest face normal of a box with rotation ``object_mat``."""
    yaw = np.arctan2(object_mat[1, 0], object_mat[0, 0])
    return float((yaw + np.pi / 4) % (np.pi / 2) - np.pi / 4)


def _wrap(angle: float) -> float:
    """``angle`` wrapped into [-pi, pi)."""
    return float((angle + np.pi) % (2 * np.pi) - np.pi)


def _yaw(mat: np.ndarray) -> float:
    """Yaw (rad) of a rotation matrix's x axis about world z."""
    return float(np.arctan2(mat[1, 0], mat[0, 0]))


def _rotation_about_z(angle: float) -> np.ndarray:
    cos, sin = np.cos(angle), np.sin(angle)
    return np.array([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])


class _GraspStyle(Protocol):
    """The style fields `GraspExpert`'s approach, descend and grasp read."""

    hover_height: float
    grasp_offset: np.ndarray
    speed: float
    close_steps: int


class GraspExpert:
    """Approach, descend, grasp and lift an object; subclasses say what follows the lift.

    Hooks for subclasses: `_draw_style` (the episode's style), `_grasp_anchor` (the object point
    grasped), `_gripper_yaw` and `_oriented` (the gripper's yaw target, and whether it is met
    before descending), `_max_speed` (this step's position-action cap).
    """

    object_is_box = False
    phase_budgets: dict[str, int] = PHASE_BUDGETS
    """Steps after which a phase moves on even if its target was not reached."""
    holding_phases: tuple[str, ...] = ("lift", "carry", "lower")
    """Phases in which the object is held: losing it there restarts from ``approach``."""
    approach_xy_tolerance = 0.01
    """Horizontal error (m) over the grasp point at which the approach may end."""

    def __init__(self, rng: int | np.random.Generator | None = None, diversity: float = 0.5):
        self.rng = np.random.default_rng(rng)
        self.diversity = float(diversity)
        self.reset()

    def reset(self) -> None:
        """Draw this episode's style and start from ``approach``."""
        self.style: _GraspStyle = self._draw_style()
        self._enter("approach")
        self.grasp_xy: np.ndarray | None = None

    def _draw_style(self) -> _GraspStyle:
        return _Style.draw(self.rng, self.diversity)

    def _enter(self, phase: str) -> None:
        self.phase = phase
        self.phase_steps = 0

    def act(self, env: RobomimicEnv) -> np.ndarray:
        """Next action (7,) float32 for the env's current state (reads its MuJoCo sim)."""
        scene = self._read_scene(env.unwrapped.robosuite_env)
        target, gripper = self._target(env.unwrapped.robosuite_env, scene)
        self.phase_steps += 1
        position = (target - scene.eef_pos) / POSITION_SCALE
        position = np.clip(position, -self._max_speed(), self._max_speed())
        error = _rotation_about_z(self._gripper_yaw(scene)) @ GRIPPER_DOWN @ scene.eef_mat.T
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

    def _grasp_anchor(self, scene: _Scene) -> np.ndarray:
        """The object point the grip site goes to (before the style's offset) and stays near
        while holding: the object's origin."""
        return scene.object_pos

    def _gripper_yaw(self, scene: _Scene) -> float:
        """Target yaw of the grip site about world z (0: `GRIPPER_DOWN`)."""
        return _yaw_to_faces(scene.object_mat) if self.object_is_box else 0.0

    def _oriented(self, scene: _Scene) -> bool:
        """Whether the gripper is turned well enough to descend onto the object."""
        return True

    def _max_speed(self) -> float:
        """Cap on each position-action component this step (fraction of 5 cm)."""
        return self.style.speed

    def _done(
        self,
        target: np.ndarray,
        scene: _Scene,
        tolerance: float,
        xy_tolerance: float = np.inf,
        ready: bool = True,
    ) -> bool:
        """Within ``tolerance`` of ``target`` (and ``xy_tolerance`` horizontally) with
        ``ready`` true, or the phase's step budget is spent."""
        error = target - scene.eef_pos
        reached = np.linalg.norm(error) < tolerance and np.linalg.norm(error[:2]) < xy_tolerance
        return bool(
            (ready and reached) or self.phase_steps >= self.phase_budgets.get(self.phase, np.inf)
        )

    def _target(self, robosuite_env: Any, scene: _Scene) -> tuple[np.ndarray, float]:
        """This step's grip-site target and gripper command; advances the phase."""
        style = self.style
        anchor = self._grasp_anchor(scene)
        grasp_point = anchor + style.grasp_offset
        holding = self.phase in self.holding_phases
        if holding and np.linalg.norm(anchor - scene.eef_pos) > LOST_GRASP_DISTANCE:
            self._enter("approach")
        if self.phase == "approach":
            target = grasp_point + [0.0, 0.0, style.hover_height]
            xy_tolerance = self.approach_xy_tolerance
            if self._done(target, scene, 0.02, xy_tolerance, ready=self._oriented(scene)):
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


class NutAssemblySquareExpert(GraspExpert):
    """NutAssemblySquare: grasp the square nut by its handle, carry it over the square peg
    turned square to it, lower it down the peg, release, back away.

    The fingers close across the handle (the gripper's yaw equals the nut's, modulo pi). Which
    of the nut's four peg-fitting yaws to end at (`HANDLE_YAWS`) and from which side to grasp
    the handle are planned at the start of each approach: the least turning plus that ending's
    penalty, with the gripper's yaw inside `GRIPPER_YAW_RANGE` at the grasp and at the end.
    Once the nut is held its own pose is the feedback (the grasp may slip or swing it): the grip
    site moves by the nut centre's error from its target and turns by the nut yaw's error,
    the lift and carry keep the nut's bottom clear of the peg's top, and the nut only descends
    onto the peg while centred over it.
    """

    phase_budgets = SQUARE_PHASE_BUDGETS
    choice_jitter = 0.0
    """Half-range of the per-episode jitter of `HANDLE_YAW_PENALTIES` (times ``diversity``). The
    first Square data (data/square_demos.zarr.zip) used 0.3: near the nut yaws where two endings
    cost about the same (~0-17 degrees) the ending was then a coin flip, and the policy trained
    on it failed there by stopping half-way between two turns (checkpoints/square_lowdim/
    README.md). 0 (data/square_demos_300.zarr.zip): the ending is a fixed function of the
    nut's yaw."""
    approach_xy_tolerance = 0.004
    """The pads' clearance along the handle is ~1 cm on each side (a pad is 1.6 cm wide)."""

    def reset(self) -> None:
        """Draw this episode's style and start from ``approach``."""
        self.eef_yaw = 0.0  # the grip site's yaw this step (0: GRIPPER_DOWN)
        # this attempt's (gripper yaw at the grasp, final nut yaw), made on first use
        self.plan: tuple[float, float] | None = None
        super().reset()
        self.hold_yaw = 0.0  # kept through the lift and from the release on
        self.release_pos: np.ndarray | None = None

    def _draw_style(self) -> _SquareStyle:
        return _SquareStyle.draw(self.rng, self.diversity, self.choice_jitter)

    def _enter(self, phase: str) -> None:
        super()._enter(phase)
        if phase == "approach":
            self.plan = None
        if phase in ("lift", "release"):
            self.hold_yaw = self.eef_yaw

    def _object_body_id(self, robosuite_env: Any) -> int:
        return robosuite_env.obj_body_id[robosuite_env.nuts[robosuite_env.nut_id].name]

    def _grasp_anchor(self, scene: _Scene) -> np.ndarray:
        """A point on the handle's centre line, ``handle_grasp`` from the nut's centre (the
        handle sticks out from 4.4 to 7.9 cm along the nut's x axis)."""
        return scene.object_pos + scene.object_mat[:, 0] * self.style.handle_grasp

    def _planned(self, scene: _Scene) -> tuple[float, float]:
        """This attempt's plan, made on its first use after entering ``approach``."""
        if self.plan is None:
            self.plan = self._plan(scene)
        return self.plan

    def _plan(self, scene: _Scene) -> tuple[float, float]:
        """(grasp yaw, final nut yaw) minimising the nut's turn, the ending's penalty and
        (a little) the gripper's turn before the grasp."""
        nut_yaw = _yaw(scene.object_mat)
        low, high = GRIPPER_YAW_RANGE
        best_cost, best = np.inf, (nut_yaw, nut_yaw)
        for final, penalty in zip(HANDLE_YAWS, self.style.handle_yaw_penalties, strict=True):
            turn = _wrap(final - nut_yaw)
            for half_turns in range(-2, 3):
                grasp = nut_yaw + half_turns * np.pi
                if not (low <= grasp <= high and low <= grasp + turn <= high):
                    continue
                cost = abs(turn) + penalty + 0.2 * abs(grasp - self.eef_yaw)
                if cost < best_cost:
                    best_cost, best = cost, (grasp, final)
        return best

    def _grasp_yaw(self, scene: _Scene) -> float:
        """The gripper yaw across the handle nearest the planned one (the nut may have moved)."""
        nut_yaw = _yaw(scene.object_mat)
        return nut_yaw + np.pi * round((self._planned(scene)[0] - nut_yaw) / np.pi)

    def _gripper_yaw(self, scene: _Scene) -> float:
        """Across the handle before the grasp; held through the lift; turning the nut to its
        final yaw while carrying and lowering it; held from the release. At most
        `MAX_YAW_STEP` from the current yaw, so that the OSC turns the wrist the planned way."""
        if self.phase in ("approach", "descend", "grasp"):
            target = self._grasp_yaw(scene)
        elif self.phase in ("carry", "lower"):
            target = self.eef_yaw + _wrap(self._planned(scene)[1] - _yaw(scene.object_mat))
            target = float(np.clip(target, *GRIPPER_YAW_RANGE))
        else:
            target = self.hold_yaw
        return self.eef_yaw + float(np.clip(target - self.eef_yaw, -MAX_YAW_STEP, MAX_YAW_STEP))

    def _oriented(self, scene: _Scene) -> bool:
        """Within ~3.5 degrees of the grasp yaw (the open fingers clear the handle by ~2 cm)."""
        return abs(self._grasp_yaw(scene) - self.eef_yaw) < 0.06

    def _max_speed(self) -> float:
        """The style's speed, capped at ``lower_speed`` while lowering onto the peg."""
        if self.phase == "lower":
            return min(self.style.speed, self.style.lower_speed)
        return self.style.speed

    def _target(self, robosuite_env: Any, scene: _Scene) -> tuple[np.ndarray, float]:
        self.eef_yaw = _yaw(scene.eef_mat @ GRIPPER_DOWN.T)
        return super()._target(robosuite_env, scene)

    def _after_grasp(self, robosuite_env: Any, scene: _Scene) -> tuple[np.ndarray, float]:
        """Lift the nut to ``carry_height`` (its bottom then clears the peg's top by ~3 cm or
        more), carry its centre over the peg while turning it, lower it (back up over the peg
        first if it is off-centre by more than 5 mm of its ~7 mm clearance), open, rise."""
        style = self.style
        table_z = robosuite_env.table_offset[2]
        peg_ids = (robosuite_env.peg1_body_id, robosuite_env.peg2_body_id)
        peg_pos = np.array(robosuite_env.sim.data.body_xpos[peg_ids[robosuite_env.nut_id]])
        peg_top = peg_pos[2] + PEG_HALF_HEIGHT
        nut_pos = scene.object_pos
        carry_z = table_z + style.carry_height
        if self.phase == "lift":
            target = np.array([*self.grasp_xy, scene.eef_pos[2] + carry_z - nut_pos[2]])
            if self._done(target, scene, 0.03):
                self._enter("carry")
            return target, 1.0
        if self.phase == "carry":
            nut_target = np.array([*(peg_pos[:2] + style.peg_offset), carry_z])
            target = scene.eef_pos + nut_target - nut_pos
            turned = abs(_wrap(self._planned(scene)[1] - _yaw(scene.object_mat))) < 0.04
            if self._done(target, scene, 0.02, xy_tolerance=0.004, ready=turned):
                self._enter("lower")
            return target, 1.0
        if self.phase == "lower":
            off_centre = np.linalg.norm(peg_pos[:2] - nut_pos[:2]) > 0.005
            above_peg = nut_pos[2] - NUT_HALF_THICKNESS > peg_top
            nut_z = peg_top + 0.025 if off_centre and above_peg else table_z
            target = scene.eef_pos + np.array([*(peg_pos[:2] - nut_pos[:2]), nut_z - nut_pos[2]])
            low_enough = nut_pos[2] < table_z + style.release_height
            if low_enough or self.phase_steps >= self.phase_budgets["lower"]:
                self.release_pos = scene.eef_pos.copy()
                self._enter("release")
            return target, 1.0
        if self.phase == "release":
            if self.phase_steps >= style.open_steps:
                self._enter("retreat")
            return self.release_pos, -1.0
        return np.array([*self.release_pos[:2], carry_z + 0.05]), -1.0


EXPERTS = {
    "Lift": LiftExpert,
    "PickPlaceCan": PickPlaceCanExpert,
    "NutAssemblySquare": NutAssemblySquareExpert,
}


def make_expert(
    env_name: str, rng: int | np.random.Generator | None = None, diversity: float = 0.5
) -> GraspExpert:
    """The scripted expert for a robomimic env name (a key of `EXPERTS`)."""
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
    "NutAssemblySquareExpert",
    "PickPlaceCanExpert",
    "make_expert",
    "run_expert_episode",
]
