"""DiffusionPolicy: observations -> a chunk of actions, by reverse diffusion through a sampler.

The policy owns the networks and the normalizer; how the chunk is sampled (sequential DDPM/DDIM,
Picard, PCM) is a `picard_sampler.Sampler` handed to `predict_action`, so one trained policy runs
under every sampler. Shape names (DP's): B batch, To observation steps, H horizon, Ta executed
action steps, Da action dims, Dc global condition dims; an `n` prefix marks normalized tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from picard_sampler import (
    GUIDANCE_CLIP,
    TRAINING_SETTINGS,
    CallInputs,
    Inpaint,
    Sampler,
    SampleStats,
    Schedule,
    check_inpaint_method,
    schedule_like,
)
from policy.normalizer import LinearNormalizer

Obs = torch.Tensor | np.ndarray | Mapping[str, torch.Tensor | np.ndarray]


class NonFiniteChunkError(ValueError):
    """A sampled chunk holds NaN or inf: never returned, let alone as converged."""


class DiffusionPolicy(nn.Module):
    """Diffusion Policy (Chi et al. 2023) with global FiLM conditioning on To observation steps.

    `model` is a ConditionalUnet1D, or a factory called as `model(input_dim=Da, global_cond_dim=
    To * F)` so a config does not have to compute Dc (F = `obs_encoder.feature_dim`).
    `train_schedule` supplies the training timesteps and `add_noise` (epsilon prediction);
    `inference_schedule` (default: `train_schedule`) is what the policy samples with by default
    (an imported policy keeps its source's, e.g. DDIM-16), with the same training settings.
    """

    def __init__(
        self,
        model: nn.Module | Callable[..., nn.Module],
        obs_encoder: nn.Module,
        normalizer: LinearNormalizer,
        action_dim: int,
        train_schedule: Schedule,
        horizon: int = 16,
        n_obs_steps: int = 2,
        n_action_steps: int = 8,
        inference_schedule: Schedule | None = None,
    ):
        super().__init__()
        _check(horizon >= 1, "horizon", horizon, "an int >= 1")
        _check(n_obs_steps >= 1, "n_obs_steps", n_obs_steps, "an int >= 1")
        _check(n_action_steps >= 1, "n_action_steps", n_action_steps, "an int >= 1")
        _check(
            n_obs_steps - 1 + n_action_steps <= horizon,
            "n_action_steps", n_action_steps,
            f"<= horizon - n_obs_steps + 1 = {horizon - n_obs_steps + 1} (executed actions "
            f"[To-1, To-1+Ta) must fit in the horizon)",
        )
        _check(action_dim >= 1, "action_dim", action_dim, "an int >= 1")
        _check(
            train_schedule.prediction_type == "epsilon",
            "train_schedule.prediction_type", train_schedule.prediction_type, "'epsilon'",
        )
        cond_dim = n_obs_steps * obs_encoder.feature_dim
        if not isinstance(model, nn.Module):
            model = model(input_dim=action_dim, global_cond_dim=cond_dim)
        _check(model.input_dim == action_dim, "model.input_dim", model.input_dim,
               f"action_dim = {action_dim}")
        _check(model.global_cond_dim == cond_dim, "model.global_cond_dim", model.global_cond_dim,
               f"n_obs_steps * obs_encoder.feature_dim = {cond_dim}")
        _check(horizon % model.horizon_multiple == 0, "horizon", horizon,
               f"a multiple of {model.horizon_multiple} (2 ** (number of UNet levels - 1))")

        self.model = model
        self.obs_encoder = obs_encoder
        self.normalizer = normalizer
        self.train_schedule = train_schedule
        if inference_schedule is not None:
            _check(inference_schedule.training_settings == train_schedule.training_settings,
                   "inference_schedule", inference_schedule,
                   "a schedule with train_schedule's training settings")
        self._inference_schedule = inference_schedule
        self.action_dim = action_dim
        self.horizon = horizon
        self.n_obs_steps = n_obs_steps
        self.n_action_steps = n_action_steps
        self.pcm: nn.Module | None = None  # a Picard Consistency Model, see attach_pcm

    # ------------------------------------------------------------------ observations
    def check_obs(self, obs: Obs) -> dict[str, torch.Tensor]:
        """Validate raw observations and return them as float tensors {key: (B, To, ...)}.

        A single array is taken as the encoder's only key. Raises ValueError naming the key and
        what is wrong: None or a non-array, a bool / complex / non-numeric dtype, the expected and
        actual shapes (an empty batch included), or NaN/inf.
        """
        shapes = self.obs_encoder.obs_shapes
        if obs is None:
            raise ValueError("observation is None; expected an array (B, To, ...) or a dict")
        if not isinstance(obs, Mapping):
            obs = self._split_stacked(obs, shapes)
        aliases = getattr(self.obs_encoder, "aliases", {})
        obs = {aliases.get(key, key): value for key, value in obs.items()}
        missing = sorted(set(shapes) - set(obs))
        if missing:
            raise ValueError(f"observation is missing keys {missing} (got {sorted(obs)})")
        out = {}
        for key, step_shape in shapes.items():
            x = _real_tensor(obs[key], key).to(device=self.device, dtype=torch.float32)
            expected = (self.n_obs_steps, *step_shape)
            if x.dim() != len(expected) + 1 or tuple(x.shape[1:]) != expected:
                raise ValueError(
                    f"observation '{key}': expected shape (B, {', '.join(map(str, expected))}), "
                    f"got {tuple(x.shape)}"
                )
            if x.shape[0] == 0:
                raise ValueError(f"observation '{key}' is an empty batch (B = 0)")
            if not torch.isfinite(x).all():
                raise ValueError(f"observation '{key}' contains NaN or inf")
            out[key] = x
        return out

    def _split_stacked(self, obs: Any, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        """A single array as the encoder's keys: the only key, or for several 1-D keys the last
        axis split in the encoder's order (our stacked layout of a multi-key policy)."""
        if len(shapes) == 1:
            return {next(iter(shapes)): obs}
        if not all(len(shape) == 1 for shape in shapes.values()):
            raise ValueError(f"observation must be a dict with keys {sorted(shapes)}")
        x = _real_tensor(obs, "observation")
        total = sum(shape[0] for shape in shapes.values())
        if x.shape[-1:] != (total,):
            raise ValueError(f"a stacked observation must end in {total} features (the keys "
                             f"{list(shapes)} in order); got shape {tuple(x.shape)}")
        parts = torch.split(x, [shape[0] for shape in shapes.values()], dim=-1)
        return dict(zip(shapes, parts, strict=True))

    def encode_obs(self, obs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Checked raw obs {key: (B, To, ...)} -> global condition (B, To * F)."""
        nobs = {
            k: self.normalizer.normalize(k, v) if k in self.normalizer else v
            for k, v in obs.items()
        }
        return self.obs_encoder(nobs).flatten(1)

    # ---------------------------------------------------------------------- training
    def compute_loss(
        self, batch: Mapping[str, Any], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Epsilon-prediction MSE on a batch {"obs": (B, To, ...) or dict, "action": (B, H, Da)}.

        Noise and training timesteps come from `generator` (global RNG if None).
        """
        obs = self.check_obs(batch["obs"])
        naction = self.normalizer.normalize("action", batch["action"].to(self.device))
        B = naction.shape[0]
        expected = (B, self.horizon, self.action_dim)
        if tuple(naction.shape) != expected:
            raise ValueError(
                f"batch 'action': expected shape {expected}, got {tuple(naction.shape)}"
            )
        cond = self.encode_obs(obs)
        noise = torch.randn(naction.shape, generator=generator, device=self.device)
        t = torch.randint(
            0, self.train_schedule.num_train_timesteps, (B,), generator=generator,
            device=self.device,
        )
        noisy = self.train_schedule.add_noise(naction, noise, t)
        return F.mse_loss(self.model(noisy, t, cond), noise)

    # --------------------------------------------------------------------- inference
    def denoiser(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """picard_sampler denoiser: noisy chunk (N, H, Da), timesteps (N,), cond (N, Dc) -> eps,
        through the runtime chosen with `use_runtime` (eager PyTorch by default)."""
        runtime = self.__dict__.get("_runtime")
        if runtime is not None:
            return runtime(x, t, cond)
        return self.model(x, t, cond)

    def use_runtime(self, kind: str = "eager", **options: Any) -> None:
        """Run the denoiser with runtime `kind` (policy.runtime.RUNTIMES: eager, onnxruntime,
        compile, cuda_graph; options: precision, cache_dir, max_rows, spinning); "eager" with no
        options restores plain PyTorch. Build it after moving the policy to its device and
        loading its weights: a runtime captures them."""
        from policy.runtime import make_runtime

        self.__dict__["_runtime"] = (
            None if kind == "eager" and not options
            else make_runtime(self.model, kind, horizon=self.horizon, **options)
        )

    @property
    def runtime(self) -> str:
        """The name of the denoiser's runtime."""
        runtime = self.__dict__.get("_runtime")
        return "eager" if runtime is None else runtime.name

    def attach_pcm(self, pcm: nn.Module | None) -> None:
        """Attach (or with None detach) a PCM, called as `pcm(self.model, x, t, cond) -> eps`.

        Its weights then travel in `state_dict()` under `pcm.` (checkpoints store them under the
        key "pcm"), and `predict_action` hands it to `pcm` samplers."""
        self.pcm = pcm

    def pcm_denoiser(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor,
        noise_path: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """picard_sampler denoiser of the attached PCM: (N, H, Da), (N,), (N, Dc) -> eps; a
        noise-aware PCM (`pcm_sees_noise`) also takes the slots' noise path (N, H, Da)."""
        if self.pcm is None:
            raise ValueError("this policy has no PCM attached (attach_pcm, or a PCM checkpoint)")
        return self.pcm(self.model, x, t, cond, noise_path)

    def attach_propagators(self, propagators: Mapping[str, torch.Tensor]) -> None:
        """Use these fitted linear coarse propagators ({policy.propagator.schedule_key: (T, E,
        E)}) for samplers with `update="parareal"`; they are not weights (not in state_dict)."""
        self.__dict__["_propagators"] = dict(propagators)

    def has_propagator(self, schedule: Schedule) -> bool:
        """Whether a propagator for `schedule` is attached (see `propagator_for`)."""
        from policy.propagator import schedule_key

        return schedule_key(schedule) in self.__dict__.get("_propagators", {})

    def propagator_for(self, schedule: Schedule) -> torch.Tensor:
        """The attached propagator of `schedule`, or a ValueError that says how to fit one."""
        from policy.propagator import schedule_key

        key = schedule_key(schedule)
        found = self.__dict__.get("_propagators", {}).get(key)
        if found is None:
            raise ValueError(
                f"sampler.update=parareal needs a linear propagator fitted for this policy and "
                f"{schedule.name.upper()}-{schedule.num_inference_steps}; none is attached. Fit "
                f"one with `python scripts/fit_propagator.py CHECKPOINT --schedules "
                f"{schedule.name}-{schedule.num_inference_steps}` (it writes propagators.pt "
                f"beside the checkpoint, which load_policy attaches), or use update=scan")
        if found.device != self.device:  # moved once, not on every chunk
            found = self.__dict__["_propagators"][key] = found.to(self.device)
        return found

    @property
    def pcm_sees_noise(self) -> bool:
        """Whether the attached PCM takes the noise path (`picard_sampler.pcm_sample`)."""
        return bool(getattr(self.pcm, "sees_noise", False))

    @torch.inference_mode()
    def predict_action(
        self,
        obs: Obs,
        sampler: Sampler,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        init: torch.Tensor | None = None,
        budget_s: float | None = None,
        clock: Callable[[], float] | None = None,
        inpaint: Inpaint | None = None,
    ) -> tuple[torch.Tensor, SampleStats]:
        """Sample an action chunk for the last To observations; return the Ta steps to execute.

        How the steps line up (To=2, H=16, Ta=8; `o` observed, `a` predicted, `x` executed)::

            step:      0  1  2  3  4  5  6  7  8  9 10 11 12 13 14 15
            obs:       o  o                                              (To = n_obs_steps)
            chunk:     a  a  a  a  a  a  a  a  a  a  a  a  a  a  a  a    (H = horizon)
            executed:     x  x  x  x  x  x  x  x                         [To-1 : To-1+Ta]

        obs: (B, To, Do) or {key: (B, To, ...)}; noise: (T+1, B, H, Da) pre-drawn (drawn from
        `generator` if None); init: warm-start trajectory for Picard samplers; budget_s / clock:
        this call's time budget and the clock it is measured on (anytime samplers). A `pcm`
        sampler gets the attached PCM (`attach_pcm`; load_policy attaches a checkpoint's).
        `inpaint` constrains the chunk to known *normalized* actions (`constraint_for` builds
        one from raw actions); every sampler then returns the constrained sequential chunk.
        `update="parareal"` samplers get the attached propagator (`attach_propagators`).
        Returns actions (B, Ta, Da) in raw units and the sampler's SampleStats, whose `sample`
        is the whole normalized chunk (B, H, Da); a chunk with NaN or inf raises
        NonFiniteChunkError instead. The observation encoder runs once (`encode`), whatever
        the sampler: the samplers see only its global condition (`sample_chunk`).
        """
        return self.sample_chunk(self.encode(obs), sampler, noise, generator, init, budget_s,
                                 clock, inpaint)

    @torch.inference_mode()
    def encode(self, obs: Obs) -> torch.Tensor:
        """Checked raw observations -> the UNet's global condition (B, To * F): the one
        observation-encoder call of a chunk (an image encoder costs several UNet calls)."""
        return self.encode_obs(self.check_obs(obs))

    @torch.inference_mode()
    def sample_chunk(
        self,
        cond: torch.Tensor,
        sampler: Sampler,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        init: torch.Tensor | None = None,
        budget_s: float | None = None,
        clock: Callable[[], float] | None = None,
        inpaint: Inpaint | None = None,
    ) -> tuple[torch.Tensor, SampleStats]:
        """`predict_action` for an already encoded condition `cond` (B, To * F) from `encode`:
        a caller that samples one observation twice (the exactness check's sequential
        reference) encodes it once."""
        B = cond.shape[0]
        shape = sampler.noise_shape(B, self.horizon, self.action_dim)
        if noise is None:
            noise = torch.randn(shape, generator=generator, device=self.device)
        else:
            noise = torch.as_tensor(noise, dtype=torch.float32)
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise: expected shape {shape}, got {tuple(noise.shape)}")
        pcm = self.pcm_denoiser if self.pcm is not None else None
        inputs = CallInputs(
            init=init, budget_s=budget_s, clock=clock, inpaint=inpaint,
            propagator=(self.propagator_for(sampler.schedule) if sampler.needs_propagator
                        else None),
        )
        naction, stats = sampler(self.denoiser, noise.to(self.device), cond, inputs,
                                 denoiser_pcm=pcm, pcm_sees_noise=self.pcm_sees_noise)
        start = self.n_obs_steps - 1
        action = self.normalizer.unnormalize("action", naction)
        if not bool(torch.isfinite(action).all()):
            raise NonFiniteChunkError(
                "the policy produced an action chunk with NaN or inf (not returned; its weights "
                "or normaliser statistics are broken, or the sampler diverged)")
        return action[:, start : start + self.n_action_steps], stats

    def check_inpaint_method(self, method: str, guidance_clip: float = GUIDANCE_CLIP) -> None:
        """Raise ValueError unless this policy can inpaint by `method` with `guidance_clip`:
        valid values (picard_sampler.check_inpaint_method), and for guidance a denoiser that
        can be differentiated (runtime eager)."""
        check_inpaint_method(method, guidance_clip)
        if method == "guide" and self.runtime != "eager":
            raise ValueError(f"inpaint_method=guide differentiates the denoiser and needs "
                             f"runtime=eager; got runtime={self.runtime}")

    def constraint_for(self, actions: np.ndarray | torch.Tensor,
                       weights: np.ndarray | torch.Tensor, method: str = "replace",
                       guidance_clip: float = GUIDANCE_CLIP) -> Inpaint:
        """An inpainting constraint from raw-unit actions (B, H, Da) on the chunk's timeline and
        per-step weights in [0, 1] ((H,) for every row, or (B, H)), applied by replacement or
        guidance (`method`; guidance needs runtime eager); see picard_sampler.inpaint."""
        self.check_inpaint_method(method, guidance_clip)
        actions = torch.as_tensor(np.asarray(actions), dtype=torch.float32, device=self.device)
        expected = (self.horizon, self.action_dim)
        if actions.dim() != 3 or tuple(actions.shape[1:]) != expected:
            raise ValueError(f"prefix actions must have shape (B, {expected[0]}, {expected[1]}); "
                             f"got {tuple(actions.shape)}")
        weights = torch.as_tensor(np.asarray(weights), dtype=torch.float32, device=self.device)
        if weights.dim() == 1:
            weights = weights.expand(actions.shape[0], -1)
        if tuple(weights.shape) != tuple(actions.shape[:2]):
            raise ValueError(f"prefix weights must have shape ({self.horizon},) or "
                             f"{tuple(actions.shape[:2])}; got {tuple(weights.shape)}")
        return Inpaint(self.normalizer.normalize("action", actions), weights[..., None], method,
                       guidance_clip)

    # ---------------------------------------------------------------------- samplers
    @property
    def inference_schedule(self) -> Schedule:
        """The schedule this policy samples with by default: its `inference_schedule` if set
        (an imported policy's source schedule), else its training schedule's class and
        inference steps (DP's DDPM-100 for the policies trained here)."""
        return self._inference_schedule or self.train_schedule

    def make_sampler(
        self, method: str = "picard", schedule: str | type[Schedule] | None = None,
        num_inference_steps: int | None = None, **knobs: Any,
    ) -> Sampler:
        """A Sampler on this policy's own schedule: `schedule` ("ddpm", "ddim"; None: the
        policy's inference schedule) with `num_inference_steps` (None: the policy's) and every
        training setting (betas, clipping, ...) taken from the policy, so they cannot disagree;
        `knobs` are the Sampler's (window, tol, update, switch_rounds, max_rounds, budget_s).
        `policy.predict_action(obs, policy.make_sampler("picard"))` is the exact speed-up."""
        steps = num_inference_steps
        return Sampler(schedule_like(self.inference_schedule, schedule, steps), method, **knobs)

    def sampler_from_config(self, config: Mapping[str, Any], key: str = "sampler") -> Sampler:
        """A Sampler from a conf/sampler-style mapping (`method`, knobs and `schedule` with its
        `_target_` class and `num_inference_steps`) on this policy's training settings; setting
        one of them is refused (`schedule_from_config`). Errors are ValueErrors naming `key`."""
        config = {k: v for k, v in config.items() if k != "_target_"}
        schedule = schedule_from_config(self.train_schedule, config.pop("schedule", {}),
                                        f"{key}.schedule")
        try:
            return Sampler(schedule, **config)
        except TypeError as e:
            allowed = [*Sampler.config_keys(), "schedule"]  # then the schedule block
            raise ValueError(f"{key}: {e}; allowed keys: {allowed}") from e
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from e

    @property
    def device(self) -> torch.device:
        """Device of the policy's parameters."""
        return next(self.parameters()).device


def _real_tensor(value: Any, key: str) -> torch.Tensor:
    """`value` as a tensor if it holds real numbers (ints or floats); else a ValueError naming
    the key and what it got (None, bool, complex, strings, objects)."""
    if value is None:
        raise ValueError(f"observation '{key}' is None")
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"observation '{key}' is not a numeric array: {e}") from e
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise ValueError(f"observation '{key}' has dtype {tensor.dtype}; expected real numbers "
                         "(float or int)")
    return tensor


def schedule_from_config(
    trained: Schedule, config: Mapping[str, Any], key: str = "schedule"
) -> Schedule:
    """The schedule of `config` (`_target_`: a schedule class path, default `trained`'s class;
    `num_inference_steps`) with every training setting of `trained`. The one place that refuses
    a config setting what training fixed (eval's sampler and PCM training's schedule alike):
    ValueError naming `key`."""
    config = dict(config)
    target = config.pop("_target_", None)
    clash = sorted(set(config) & set(TRAINING_SETTINGS))
    if clash:
        raise ValueError(
            f"{key}.{clash[0]} cannot be set: it comes from the policy's train_schedule "
            f"({trained.training_settings[clash[0]]!r})"
        )
    unknown = sorted(set(config) - {"num_inference_steps"})
    if unknown:
        raise ValueError(f"{key}.{unknown[0]} is not a schedule setting; a sampler schedule "
                         "sets only _target_ and num_inference_steps")
    if target is None:
        cls: type[Schedule] = type(trained)
    else:
        import hydra

        try:
            cls = hydra.utils.get_class(str(target))
        except Exception as e:  # hydra raises ImportError or ValueError subclasses
            raise ValueError(f"{key}._target_ {target!r} is not importable: {e}") from e
        if not (isinstance(cls, type) and issubclass(cls, Schedule)):
            raise ValueError(f"{key}._target_ {target!r} is not a picard_sampler Schedule")
    try:
        return schedule_like(trained, cls, config.get("num_inference_steps"))
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from e


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise a one-line ValueError naming the config key, its value and what is allowed."""
    if not ok:
        raise ValueError(f"policy.{key} must be {allowed}; got {value!r}")
