"""Model-agnostic diffusion samplers: sequential DDPM/DDIM, Picard iteration and PCM.

Knows nothing about robots or configs: a denoiser callable, a schedule and pre-drawn noise in,
a sample and its statistics out.
"""

from picard_sampler.inpaint import GUIDANCE_CLIP, INPAINT_METHODS, Inpaint, check_inpaint_method
from picard_sampler.metrics import EXACT_RULE, exact_errors, is_exact, percentile
from picard_sampler.parareal import fit_linear_propagator
from picard_sampler.samplers import (
    SAMPLER_METHODS,
    UPDATES,
    CallInputs,
    Sampler,
    SamplerSettings,
    SampleStats,
    noise_path,
    pcm_sample,
    picard_sample,
    sequential_sample,
    switch_weight,
)
from picard_sampler.schedules import (
    SCHEDULES,
    TRAINING_SETTINGS,
    DDIMSchedule,
    DDPMSchedule,
    Schedule,
    make_betas,
    schedule_like,
)

__all__ = [
    "CallInputs",
    "DDIMSchedule",
    "EXACT_RULE",
    "GUIDANCE_CLIP",
    "INPAINT_METHODS",
    "Inpaint",
    "check_inpaint_method",
    "DDPMSchedule",
    "SAMPLER_METHODS",
    "SCHEDULES",
    "TRAINING_SETTINGS",
    "UPDATES",
    "SampleStats",
    "Sampler",
    "SamplerSettings",
    "Schedule",
    "exact_errors",
    "fit_linear_propagator",
    "is_exact",
    "make_betas",
    "percentile",
    "schedule_like",
    "noise_path",
    "pcm_sample",
    "picard_sample",
    "sequential_sample",
    "switch_weight",
]
