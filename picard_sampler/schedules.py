"""DDPM and DDIM schedules: the per-step coefficients every sampler shares.

Notation (docs/design.md §4.1): ``T`` inference steps, slots ``X[0..T]``, ``X[0] = x_T``. Step ``i``
maps slot ``i`` to slot ``i + 1`` at training timestep ``timesteps[i]``:

    X[i+1] = step_mean(model_out, X[i], i) + noise_std[i] * z[i+1]

``step_mean`` is written once and vectorised over a tensor of step indices, so the sequential
sampler (one index at a time) and Picard (a window of indices) run the same maths. The
numbered comments tie each line to diffusers' ``DDPMScheduler.step`` / ``DDIMScheduler.step``
with ``timestep_spacing="leading"``, which these schedules reproduce to float tolerance.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

BetaSchedule = Literal["linear", "squaredcos_cap_v2"]
PredictionType = Literal["epsilon", "sample"]

_BETA_SCHEDULES = ("linear", "squaredcos_cap_v2")
_PREDICTION_TYPES = ("epsilon", "sample")


def make_betas(
    num_train_timesteps: int,
    beta_schedule: str,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> torch.Tensor:
    """Training betas ``(num_train_timesteps,)`` in float64, as diffusers builds them."""
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    if beta_schedule == "squaredcos_cap_v2":
        # Nichol & Dhariwal's cosine schedule, betas capped at 0.999.
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        n = num_train_timesteps
        betas = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f"beta_schedule must be one of {list(_BETA_SCHEDULES)}; got {beta_schedule!r}")


TRAINING_SETTINGS = (
    "num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "clip_sample",
    "clip_sample_range", "prediction_type",
)
"""Schedule arguments a trained model fixes; a sampler may choose only the inference steps."""


class Schedule:
    """Shared state of a discrete diffusion schedule: betas, timesteps, noise and error scales.

    Subclasses define ``step_mean`` (the deterministic part of one reverse step), the injected
    noise scale ``noise_std`` and ``scan_coef`` (the coefficient of ``X[i]`` in the step when the
    model's x0 prediction is held fixed; see docs/design.md §4.3, linear-exact Picard).
    """

    name: str = "schedule"

    def __init__(
        self,
        num_train_timesteps: int = 100,
        num_inference_steps: int = 100,
        beta_schedule: BetaSchedule = "squaredcos_cap_v2",
        clip_sample: bool = True,
        prediction_type: PredictionType = "epsilon",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        clip_sample_range: float = 1.0,
    ) -> None:
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(
                f"num_train_timesteps must be an int >= 1; got {num_train_timesteps!r}"
            )
        if (
            not isinstance(num_inference_steps, int)
            or not 1 <= num_inference_steps <= num_train_timesteps
        ):
            raise ValueError(
                f"num_inference_steps must be an int in [1, {num_train_timesteps}] "
                f"(num_train_timesteps); got {num_inference_steps!r}"
            )
        if prediction_type not in _PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type must be one of {list(_PREDICTION_TYPES)}; got {prediction_type!r}"
            )
        self.num_train_timesteps = num_train_timesteps
        self.num_inference_steps = num_inference_steps
        self.beta_schedule = beta_schedule
        self.beta_start = float(beta_start)
        self.beta_end = float(beta_end)
        self.clip_sample = bool(clip_sample)
        self.clip_sample_range = float(clip_sample_range)
        self.prediction_type = prediction_type

        # Coefficients are computed in float32 with diffusers' formulas and order of operations:
        # near t = 0, 1 - abar_t cancels badly in float32, and matching its step loop to float
        # tolerance means making the same rounding. Tables are stored as float64 copies.
        betas32 = make_betas(num_train_timesteps, beta_schedule, beta_start, beta_end).float()
        if beta_schedule == "linear":
            betas32 = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        alphas_cumprod32 = torch.cumprod(1.0 - betas32, 0)
        self.betas = betas32.double()
        self.alphas_cumprod = alphas_cumprod32.double()

        # "leading" spacing: t_i = (T - 1 - i) * (N // T); the step goes t_i -> t_i - N // T.
        step_ratio = num_train_timesteps // num_inference_steps
        self.timesteps = (torch.arange(num_inference_steps - 1, -1, -1) * step_ratio).long()
        self.prev_timesteps = self.timesteps - step_ratio

        ac_t = alphas_cumprod32[self.timesteps]
        ac_prev = torch.where(
            self.prev_timesteps >= 0,
            alphas_cumprod32[self.prev_timesteps.clamp(min=0)],
            torch.ones_like(ac_t),
        )
        self._ac_t32, self._ac_prev32 = ac_t, ac_prev
        self.alpha_prod_t = ac_t.double()
        self.alpha_prod_t_prev = ac_prev.double()
        # DDPM posterior variance of the (t -> prev_t) step ("fixed_small"), used as the error
        # scale s'_i by every sampler (docs/design.md §4.4). The last step's variance is 0; its
        # error scale is clamped to the smallest positive one so the tolerance test stays
        # meaningful there.
        current_beta = 1.0 - ac_t / ac_prev
        self.posterior_variance = ((1.0 - ac_prev) / (1.0 - ac_t) * current_beta).double()
        positive = self.posterior_variance[self.posterior_variance > 0]
        floor = positive.min() if positive.numel() else torch.tensor(1.0, dtype=torch.float64)
        self.error_std = self.posterior_variance.clamp(min=float(floor)).sqrt()
        self._table_cache: dict[tuple[torch.device, torch.dtype], dict[str, torch.Tensor]] = {}

    # ----------------------------------------------------------------------------- helpers
    def _tables(self) -> dict[str, torch.Tensor]:
        """float64 per-step coefficient tables of shape ``(T,)``; subclasses add their own."""
        return {
            "sqrt_ac_t": (self._ac_t32**0.5).double(),
            "sqrt_1m_ac_t": ((1.0 - self._ac_t32) ** 0.5).double(),
            # the noise level a step lands on (slot i + 1; 1 and 0 after the last step)
            "sqrt_ac_prev": (self._ac_prev32**0.5).double(),
            "sqrt_1m_ac_prev": ((1 - self._ac_prev32) ** 0.5).double(),
            "noise_std": self.noise_std,
            "scan_coef": self.scan_coef,
            "error_std": self.error_std,
        }

    def table(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """Coefficient table ``name`` (shape ``(T,)``) on ``like``'s device and dtype, cached."""
        key = (like.device, like.dtype)
        if key not in self._table_cache:
            self._table_cache[key] = {
                k: v.to(device=like.device, dtype=like.dtype) for k, v in self._tables().items()
            }
        return self._table_cache[key][name]

    def _coef(self, name: str, idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Per-row coefficient ``name[idx]`` shaped to broadcast against ``like`` ``(N, ...)``."""
        values = self.table(name, like)[idx]
        return values.view(-1, *([1] * (like.dim() - 1)))

    def predict_x0(
        self, model_out: torch.Tensor, x: torch.Tensor, idx: torch.Tensor
    ) -> torch.Tensor:
        """Unclipped x0 estimate from the model output at step indices ``idx`` (shape ``(N,)``)."""
        if self.prediction_type == "sample":
            return model_out
        # (1) x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
        sqrt_1m_ac_t, sqrt_ac_t = (
            self._coef("sqrt_1m_ac_t", idx, x),
            self._coef("sqrt_ac_t", idx, x),
        )
        return (x - sqrt_1m_ac_t * model_out) / sqrt_ac_t

    def clip(self, x0: torch.Tensor) -> torch.Tensor:
        """(2) Clip the x0 estimate to ``[-clip_sample_range, clip_sample_range]`` if enabled."""
        if not self.clip_sample:
            return x0
        return x0.clamp(-self.clip_sample_range, self.clip_sample_range)

    def step_indices(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """All step indices ``0..T-1`` as a long tensor."""
        return torch.arange(self.num_inference_steps, device=device)

    def add_noise(
        self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """Forward process at training timesteps: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        ac = self.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[timesteps]
        ac = ac.view(-1, *([1] * (x0.dim() - 1)))
        return ac.sqrt() * x0 + (1.0 - ac).sqrt() * noise

    # ----------------------------------------------------------------------- per subclass
    noise_std: torch.Tensor
    scan_coef: torch.Tensor

    def step_mean(
        self, model_out: torch.Tensor, x: torch.Tensor, idx: torch.Tensor
    ) -> torch.Tensor:
        """Deterministic part of the reverse step at indices ``idx``: ``(N, ...) -> (N, ...)``."""
        raise NotImplementedError

    @property
    def config(self) -> dict:
        """Every constructor argument: ``type(s)(**s.config)`` rebuilds an equal schedule (it
        keys caches and is logged with every result, so nothing may be left out)."""
        return {"num_inference_steps": self.num_inference_steps, **self.training_settings}

    @property
    def training_settings(self) -> dict:
        """The settings fixed by training (TRAINING_SETTINGS): everything but the step count."""
        return {key: getattr(self, key) for key in TRAINING_SETTINGS}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args})"


class DDPMSchedule(Schedule):
    """DDPM ancestral sampling (Ho et al. 2020) with ``fixed_small`` variance, as diffusers."""

    name = "ddpm"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        ac_t, ac_prev = self._ac_t32, self._ac_prev32
        current_alpha = ac_t / ac_prev
        current_beta = 1 - current_alpha
        # (3) posterior mean mu = c_x0 * x0 + c_xt * x_t  (DDPM paper eq. 7)
        self.coef_x0 = (ac_prev**0.5 * current_beta / (1 - ac_t)).double()
        self.coef_xt = (current_alpha**0.5 * (1 - ac_prev) / (1 - ac_t)).double()
        # (4) fixed_small: std = sqrt(max(var, 1e-20)), no noise on the step that lands on t = 0
        variance = ((1 - ac_prev) / (1 - ac_t) * current_beta).clamp(min=1e-20)
        self.noise_std = torch.where(self.timesteps > 0, variance**0.5, 0.0).double()
        self.scan_coef = self.coef_xt

    def _tables(self) -> dict[str, torch.Tensor]:
        return {**super()._tables(), "coef_x0": self.coef_x0, "coef_xt": self.coef_xt}

    def step_mean(
        self, model_out: torch.Tensor, x: torch.Tensor, idx: torch.Tensor
    ) -> torch.Tensor:
        x0 = self.clip(self.predict_x0(model_out, x, idx))
        return self._coef("coef_x0", idx, x) * x0 + self._coef("coef_xt", idx, x) * x


class DDIMSchedule(Schedule):
    """Deterministic DDIM (Song et al. 2021, eta = 0), as diffusers with ``set_alpha_to_one``."""

    name = "ddim"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        ac_t, ac_prev = self.alpha_prod_t, self.alpha_prod_t_prev
        self.noise_std = torch.zeros_like(ac_t)
        # Writing eps through x0, eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t), makes the step
        # affine in x_t with this coefficient when the x0 prediction is held fixed.
        self.scan_coef = ((1.0 - ac_prev) / (1.0 - ac_t)).sqrt()

    def step_mean(
        self, model_out: torch.Tensor, x: torch.Tensor, idx: torch.Tensor
    ) -> torch.Tensor:
        x0 = self.predict_x0(model_out, x, idx)
        if self.prediction_type == "epsilon":
            eps = model_out  # diffusers' default use_clipped_model_output=False: eps stays raw
        else:
            eps = (x - self._coef("sqrt_ac_t", idx, x) * x0) / self._coef("sqrt_1m_ac_t", idx, x)
        # (5) x_prev = sqrt(abar_prev) clip(x0) + sqrt(1 - abar_prev) eps
        return (
            self._coef("sqrt_ac_prev", idx, x) * self.clip(x0)
            + self._coef("sqrt_1m_ac_prev", idx, x) * eps
        )


SCHEDULES: dict[str, type[Schedule]] = {"ddpm": DDPMSchedule, "ddim": DDIMSchedule}
"""Schedule classes by name (``Schedule.name``)."""


def schedule_like(
    trained: Schedule, kind: str | type[Schedule] | None = None,
    num_inference_steps: int | None = None,
) -> Schedule:
    """A schedule of class ``kind`` ("ddpm", "ddim", a class; None: ``trained``'s) with
    ``num_inference_steps`` (None: ``trained``'s) and every training setting of ``trained``:
    how a sampler gets a schedule its model was trained for."""
    if kind is None:
        cls = type(trained)
    elif isinstance(kind, str):
        if kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}; got {kind!r}")
        cls = SCHEDULES[kind]
    else:
        cls = kind
    steps = trained.num_inference_steps if num_inference_steps is None else num_inference_steps
    return cls(num_inference_steps=steps, **trained.training_settings)
