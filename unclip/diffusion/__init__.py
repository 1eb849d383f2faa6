"""The diffusion core shared by every stage: schedules, the Gaussian process and its loss, samplers, guidance.

Nothing here imports a network: a network is any callable `model(x_t, t, **cond) -> prediction`.

Vocabulary used across the repository:

| name | meaning |
| --- | --- |
| `x_0`, `x_t`, `t`, `eps`, `v` | clean sample, noised sample, integer timestep (B,), noise, velocity |
| `alphas_cumprod` (ᾱ) | cumulative product of 1 - β |
| `text_embed` (B, D) | pooled CLIP text embedding |
| `text_tokens` (B, L, W) | per-token CLIP text encodings |
| `text_mask` (B, L) | True for real tokens of `text_tokens`, False for padding |
| `image_embed` (B, D) | CLIP image embedding |
| `cond_drop` (B,) | True where a row uses the null (unconditional) conditioning |
| `guidance_scale` | classifier-free guidance strength |
"""

from unclip.diffusion.gaussian import GaussianDiffusion
from unclip.diffusion.guidance import classifier_free_guidance, classifier_guidance
from unclip.diffusion.respace import SPACINGS, respace_timesteps
from unclip.diffusion.samplers import (
    DEFAULT_STEPS,
    SAMPLERS,
    ddim_invert,
    ddim_sample,
    ddpm_sample,
    dpm_solver_sample,
    sample,
)
from unclip.diffusion.schedules import SCHEDULES, make_betas

__all__ = [
    "DEFAULT_STEPS",
    "SAMPLERS",
    "SCHEDULES",
    "SPACINGS",
    "GaussianDiffusion",
    "classifier_free_guidance",
    "classifier_guidance",
    "ddim_invert",
    "ddim_sample",
    "ddpm_sample",
    "dpm_solver_sample",
    "make_betas",
    "respace_timesteps",
    "sample",
]
