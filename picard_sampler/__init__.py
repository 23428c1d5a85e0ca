"""Model-agnostic diffusion samplers: sequential DDPM/DDIM, Picard iteration and PCM.

Knows nothing about robots or configs: a denoiser callable, a schedule and pre-drawn noise in,
a sample and its statistics out.
"""

from picard_sampler.samplers import (
    SAMPLER_METHODS,
    UPDATES,
    Sampler,
    noise_path,
    pcm_sample,
    picard_sample,
    sequential_sample,
    switch_weight,
)
from picard_sampler.schedules import DDIMSchedule, DDPMSchedule, Schedule, make_betas

__all__ = [
    "DDIMSchedule",
    "DDPMSchedule",
    "SAMPLER_METHODS",
    "UPDATES",
    "Sampler",
    "Schedule",
    "make_betas",
    "noise_path",
    "pcm_sample",
    "picard_sample",
    "sequential_sample",
    "switch_weight",
]
