"""robomimic's simulated tasks (Lift, PickPlaceCan, NutAssemblySquare) as gymnasium envs.

Built on robosuite 1.5.2 from robomimic-style env metadata ``{"env_name", "type": 1,
"env_kwargs"}``: a dataset's ``data.attrs["env_args"]`` or `default_env_meta`. Controller
configs in robomimic's old part format (``{"type": "OSC_POSE", ...}``) are converted to
robosuite 1.5's composite format; their old-only keys (``damping``, ``control_delta``) equal
robosuite 1.5's defaults and are ignored by it.

Observations follow robomimic's (and Diffusion Policy's) conventions, recorded with robosuite
<= 1.4. robosuite 1.5 changed some of them, undone here so that real robomimic datasets and ours
read alike:

- ``object`` of PickPlaceCan / NutAssemblySquare: robosuite 1.5 lists the object's pose in the
  eef frame before its world pose, and computes it from the previous step's object pose (zeros
  right after a reset); rebuilt as [pos, quat, pos in eef frame, quat in eef frame] (14,) from
  the current poses. Lift: robosuite 1.5 flips the sign of ``gripper_to_cube_pos``; rebuilt as
  [cube pos, cube quat, eef pos - cube pos] (10,). Quaternions are xyzw; the eef frame is the
  hand body's (``robot0_eef_quat``), positioned at the grip site (``robot0_eef_pos``).
- images: rendered here from each camera after the step (robosuite's camera observables
  would render them at a physics substep); OpenGL rows are flipped top to bottom, as robomimic
  does.

Every observation is that of the state the step ends in, so ``obs[t]`` is a function of
``states[t]``, as in robomimic's datasets (their observations were extracted from the stored
states). robosuite alone lags by one 2 ms physics substep: it samples its observables a substep
early, and its ``lite_physics`` stepping leaves body positions one substep behind ``qpos``; the
env runs ``mj_forward`` after each step and recomputes the sensors (~0.3 ms).

``obs_type="lowdim"``: ``object``, ``robot0_eef_pos``, ``robot0_eef_quat``,
``robot0_gripper_qpos`` concatenated in that order (DP's low-dim obs), float32 (19,) for Lift,
(23,) for Can and Square. ``obs_type="image"``: a dict of ``agentview_image`` and
``robot0_eye_in_hand_image`` ((84, 84, 3) uint8, HWC) plus the three robot keys (DP's image obs).

Actions (7,): OSC pose deltas (xyz scaled by 0.05 m, axis-angle by 0.5 rad, in the robot base
frame) and the gripper (-1 open, 1 close), in [-1, 1]; values outside are clipped, as robosuite
does. Reward 1.0 on a step where the task is done, else 0.0 (robomimic's sparse reward; DP's
score is its max over the episode). ``terminated`` on success unless
``terminate_on_success=False``; the registered ids add a 400-step TimeLimit (DP's ph limit).

Rendering (``render_mode="rgb_array"`` and image observations) is offscreen: MuJoCo's EGL by
default, OSMesa with ``MUJOCO_GL=osmesa`` set before the import (robosuite forces EGL
otherwise). ``fast_render`` turns off MSAA and reflections (~3x faster on a CPU renderer);
images then differ slightly from robomimic's, which were rendered with both on.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import gymnasium
import mujoco
import numpy as np
import robosuite
import robosuite.utils.transform_utils as transforms
from gymnasium import spaces
from robosuite.controllers import load_composite_controller_config
from robosuite.controllers.composite.composite_controller_factory import (
    is_part_controller_config,
    refactor_composite_controller_config,
)

# robosuite logs an INFO line per env built ("Loading controller configuration ...") through its
# own console handler and, under Hydra, again through the root one: keep its warnings only.
logging.getLogger("robosuite_logs").setLevel(logging.WARNING)
logging.getLogger("robosuite_logs").propagate = False

ROBOSUITE_ENV_TYPE = 1
"""robomimic's ``EnvType.ROBOSUITE_TYPE``, the ``type`` field of its env metadata."""
CONTROL_HZ = 20
ACTION_DIM = 7
LOWDIM_OBS_KEYS = ("object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
"""robomimic / DP low-dim observation keys, in DP's concatenation order."""
CAMERA_NAMES = ("agentview", "robot0_eye_in_hand")
IMAGE_OBS_KEYS = tuple(f"{camera}_image" for camera in CAMERA_NAMES)
IMAGE_LOWDIM_KEYS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
"""Low-dim keys that come with the images in DP's image tasks (no privileged object state)."""
ROBOT_KEY_DIMS = {"robot0_eef_pos": 3, "robot0_eef_quat": 4, "robot0_gripper_qpos": 2}
OBJECT_DIMS = {"Lift": 10, "PickPlaceCan": 14, "NutAssemblySquare": 14}
OBJECT_NAMES = {"PickPlaceCan": "Can", "NutAssemblySquare": "SquareNut"}
"""robosuite object names whose pose makes up ``object`` (Lift's cube is handled apart)."""
OBS_TYPES = ("lowdim", "image")
IMAGE_SIZE = 84


def default_env_meta(env_name: str) -> dict[str, Any]:
    """robomimic-style metadata for ``env_name`` with robomimic's ph settings (Panda, OSC pose,
    20 Hz, sparse reward); ``hard_reset=False`` keeps resets at ~5 ms instead of ~0.4 s. The
    env sets the rendering and observation kwargs itself."""
    if env_name not in OBJECT_DIMS:
        raise ValueError(f"env_name must be one of {sorted(OBJECT_DIMS)}, got {env_name!r}")
    return {
        "env_name": env_name,
        "type": ROBOSUITE_ENV_TYPE,
        "env_version": robosuite.__version__,
        "env_kwargs": {
            "robots": ["Panda"],
            "controller_configs": load_composite_controller_config(robot="Panda"),
            "control_freq": CONTROL_HZ,
            "reward_shaping": False,
            "hard_reset": False,
        },
    }


def composite_controller_config(config: Mapping[str, Any], robots: Any) -> dict[str, Any]:
    """A controller config robosuite 1.5 accepts: old part configs (``{"type": "OSC_POSE"}``,
    robomimic's datasets) become a composite config for the first robot's right arm."""
    config = copy.deepcopy(dict(config))
    if not is_part_controller_config(config):
        return config
    robot = robots if isinstance(robots, str) else robots[0]
    return refactor_composite_controller_config(config, robot, ["right"])


def _seed_robosuite(env: Any, rng: np.random.Generator) -> None:
    """Make robosuite's next reset draw from ``rng``: the env (robot joint noise, objects built
    on a hard reset) and every placement sampler (object poses) share it."""
    env.rng = rng
    samplers = [env.placement_initializer]
    while samplers:
        sampler = samplers.pop()
        sampler.rng = rng
        samplers.extend(getattr(sampler, "samplers", {}).values())


class RobomimicEnv(gymnasium.Env):
    """A robomimic task on robosuite 1.5 with robomimic's observations (see the module doc).

    Give ``env_name`` (robomimic's ph settings, `default_env_meta`) or a full ``env_meta``
    (e.g. a dataset's). ``render_mode="rgb_array"``: `render` returns ``render_size``
    (height, width) frames from ``render_camera``. The robosuite env is `robosuite_env`
    (privileged state for experts).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": CONTROL_HZ}
    rate_action_dims: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    """Action dims that command motion (the OSC pose deltas): a robot that holds still sends 0
    there and keeps the rest (the gripper). Read by envs.realtime's hold."""

    def __init__(
        self,
        env_name: str | None = None,
        env_meta: Mapping[str, Any] | None = None,
        obs_type: str = "lowdim",
        render_mode: str | None = None,
        render_camera: str = "agentview",
        render_size: tuple[int, int] = (256, 256),
        image_size: int = IMAGE_SIZE,
        fast_render: bool = True,
        terminate_on_success: bool = True,
    ) -> None:
        if (env_name is None) == (env_meta is None):
            raise ValueError("give exactly one of env_name and env_meta")
        if obs_type not in OBS_TYPES:
            raise ValueError(f"obs_type must be one of {OBS_TYPES}, got {obs_type!r}")
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.env_meta = copy.deepcopy(dict(env_meta or default_env_meta(env_name)))
        self.env_name: str = self.env_meta["env_name"]
        if self.env_meta.get("type", ROBOSUITE_ENV_TYPE) != ROBOSUITE_ENV_TYPE:
            raise ValueError(
                f"env_meta type {self.env_meta['type']} is not robosuite ({ROBOSUITE_ENV_TYPE})"
            )
        self.obs_type = obs_type
        self.render_mode = render_mode
        self.render_camera = render_camera
        self.render_size = tuple(render_size)
        self.fast_render = fast_render
        self.terminate_on_success = terminate_on_success
        self.image_size = image_size
        self._env = robosuite.make(self.env_name, **self._robosuite_kwargs())
        self._configure_renderer()
        self._object_dim = OBJECT_DIMS.get(self.env_name) or len(
            self._env.reset()["object-state"]
        )
        self.action_space = spaces.Box(-1.0, 1.0, shape=(ACTION_DIM,), dtype=np.float32)
        self.observation_space = self._make_observation_space()
        self._latest: dict[str, np.ndarray] = {}

    def _robosuite_kwargs(self) -> dict[str, Any]:
        """robosuite.make kwargs: the metadata's, with the offscreen renderer if this env draws
        (cameras are rendered by `_observation`, not by robosuite's camera observables)."""
        kwargs = copy.deepcopy(self.env_meta["env_kwargs"])
        kwargs["controller_configs"] = composite_controller_config(
            kwargs["controller_configs"], kwargs["robots"]
        )
        kwargs.update(
            has_renderer=False,
            has_offscreen_renderer=self.obs_type == "image" or self.render_mode is not None,
            use_camera_obs=False,
            use_object_obs=True,
            ignore_done=True,
        )
        kwargs.setdefault("seed", 0)  # the model built now (e.g. Lift's cube size) is fixed
        return kwargs

    def _make_observation_space(self) -> spaces.Space:
        dims = {"object": self._object_dim, **ROBOT_KEY_DIMS}
        if self.obs_type == "lowdim":
            size = sum(dims.values())
            return spaces.Box(-np.inf, np.inf, shape=(size,), dtype=np.float32)
        image = spaces.Box(0, 255, shape=(self.image_size, self.image_size, 3), dtype=np.uint8)
        lowdim = {
            key: spaces.Box(-np.inf, np.inf, shape=(dims[key],), dtype=np.float32)
            for key in IMAGE_LOWDIM_KEYS
        }
        return spaces.Dict({**dict.fromkeys(IMAGE_OBS_KEYS, image), **lowdim})

    @property
    def robosuite_env(self) -> Any:
        """The wrapped robosuite env (``.sim`` for the MuJoCo state)."""
        return self._env

    # ------------------------------------------------------------------------------ episodes

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        """Start an episode drawn from ``seed`` (same seed, same initial state), or restore
        ``options["reset_to_state"]``, a flat MuJoCo state as `get_state` returns."""
        super().reset(seed=seed)
        state = (options or {}).get("reset_to_state")
        if state is not None:
            return self.reset_to_state(state), {"is_success": self.is_success()}
        if seed is None:
            seed = int(self.np_random.integers(0, 2**31))
        _seed_robosuite(self._env, np.random.default_rng(seed))
        self._env.reset()
        self._configure_renderer()
        return self._observation(), {"is_success": self.is_success()}

    def reset_to_state(self, state: np.ndarray) -> Any:
        """Set the flat MuJoCo state (robomimic's ``states`` row) and return its observation."""
        state = np.asarray(state, dtype=np.float64)
        expected = self.get_state().shape
        if state.shape != expected or not np.all(np.isfinite(state)):
            raise ValueError(
                f"reset_to_state needs {expected[0]} finite numbers (this model's flat MuJoCo "
                f"state), got shape {state.shape}"
            )
        self._env.sim.set_state_from_flattened(state)
        self._env.sim.forward()
        return self._observation()

    def step(self, action: np.ndarray) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        """Apply one 7-D OSC pose + gripper action for one 50 ms control step."""
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACTION_DIM,):
            raise ValueError(
                f"action must have shape ({ACTION_DIM},) (OSC dx dy dz, axis-angle, gripper), "
                f"got shape {action.shape}"
            )
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action must be finite, got {action.tolist()}")
        self._env.step(np.clip(action, -1.0, 1.0))
        self._env.sim.forward()  # lite physics leaves positions one substep behind qpos
        success = self.is_success()
        terminated = success and self.terminate_on_success
        return self._observation(), float(success), terminated, False, {"is_success": success}

    def is_success(self) -> bool:
        """Whether the task is done in the current state (robosuite's ``_check_success``)."""
        return bool(self._env._check_success())

    def get_state(self) -> np.ndarray:
        """The flat MuJoCo state [time, qpos, qvel], float64: robomimic's ``states`` row."""
        return np.array(self._env.sim.get_state().flatten())

    def model_xml(self) -> str:
        """The MuJoCo model XML: robomimic's per-demo ``model_file`` attribute."""
        return self._env.sim.model.get_xml()

    def close(self) -> None:
        """Free the MuJoCo simulation and its render context."""
        self._env.close()

    # ------------------------------------------------------------------------- observations

    def observation_dict(self) -> dict[str, np.ndarray]:
        """The latest observation as robomimic keys: the four low-dim keys (float32) and,
        with image observations, the two cameras ((H, W, 3) uint8, rows top to bottom)."""
        return dict(self._latest)

    def _observation(self) -> Any:
        """The current state's observation (robosuite's sensors recomputed, cameras rendered)."""
        raw = self._env._get_observations(force_update=True)
        latest = {"object": self._object_vector(raw).astype(np.float32)}
        latest.update({key: np.asarray(raw[key], dtype=np.float32) for key in ROBOT_KEY_DIMS})
        if self.obs_type == "image":
            size = self.image_size
            for camera in CAMERA_NAMES:
                frame = self._env.sim.render(camera_name=camera, width=size, height=size)
                latest[f"{camera}_image"] = np.ascontiguousarray(frame[::-1])
        self._latest = latest
        if self.obs_type == "lowdim":
            return np.concatenate([latest[key] for key in LOWDIM_OBS_KEYS])
        return {key: latest[key].copy() for key in (*IMAGE_OBS_KEYS, *IMAGE_LOWDIM_KEYS)}

    def _object_vector(self, raw: Mapping[str, np.ndarray]) -> np.ndarray:
        """``object`` in robomimic's (robosuite <= 1.4) layout; other envs: robosuite's."""
        if self.env_name == "Lift":
            cube_pos = raw["cube_pos"]
            return np.concatenate([cube_pos, raw["cube_quat"], raw["robot0_eef_pos"] - cube_pos])
        name = OBJECT_NAMES.get(self.env_name)
        if name is None:
            return np.asarray(raw["object-state"])
        pose = (raw[f"{name}_pos"], raw[f"{name}_quat"])
        world_in_eef = transforms.pose_inv(
            transforms.pose2mat((raw["robot0_eef_pos"], raw["robot0_eef_quat"]))
        )
        pose_in_eef = transforms.pose_in_A_to_pose_in_B(transforms.pose2mat(pose), world_in_eef)
        return np.concatenate([*pose, *transforms.mat2pose(pose_in_eef)])

    # ---------------------------------------------------------------------------- rendering

    def render(self) -> np.ndarray | None:
        """RGB frame (render_size, 3) uint8 from ``render_camera``, rows top to bottom."""
        if self.render_mode is None:
            gymnasium.logger.warn("render() called without render_mode='rgb_array'")
            return None
        height, width = self.render_size
        frame = self._env.sim.render(camera_name=self.render_camera, width=width, height=height)
        return np.ascontiguousarray(frame[::-1])

    def _configure_renderer(self) -> None:
        """With ``fast_render``, turn MSAA and reflections off in the offscreen context (a hard
        reset builds a new one, so this runs after every reset)."""
        context = self._env.sim._render_context_offscreen
        if not self.fast_render or context is None:
            return
        context.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        if self._env.sim.model.vis.quality.offsamples != 0:
            self._env.sim.model.vis.quality.offsamples = 0
            context.con.free()
            context._set_mujoco_context_and_buffers()
