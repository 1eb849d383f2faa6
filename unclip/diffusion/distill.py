"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models").

A student sampled with N deterministic DDIM steps learns to land, in one step, where its teacher lands in two
(at the timesteps the diffusion's spacing gives the samplers):

    for a clean x and noise eps at a student timestep t (one of the N the sampler visits):
        z_t    = α_t·x + σ_t·eps
        z_mid  = DDIM step of the teacher from t to the teacher's timestep between t and the student's next one
        z_next = DDIM step of the teacher from there to the student's next timestep (or to ᾱ = 1 after the last)
        x̃      = (z_next - (σ_next/σ_t)·z_t) / (α_next - (σ_next/σ_t)·α_t)     (algorithm 2)
        loss   = max(SNR_t, 1)·‖x̂_student(z_t) - x̃‖²                            ("truncated SNR" weighting, §4)

x̃ is the clean sample for which one DDIM step from z_t gives z_next exactly. Each round halves the steps: the
teacher of a round samples 2N steps, its student N; the next round's teacher is this student. With the
teacher's x_0 thresholded as the sampler thresholds it (the decoder's dynamic thresholding), the student learns
the sampler the pipeline uses. Only the conditional model is distilled (guidance 1): the caller passes the same
conditioning to both networks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from unclip.diffusion.gaussian import GaussianDiffusion
from unclip.diffusion.respace import respace_timesteps
from unclip.diffusion.samplers import threshold_x0


def step_grid(num_timesteps: int, steps: int, spacing: str = "trailing") -> tuple[list[int], list[int]]:
    """(the student's `steps` timesteps, the teacher's timestep inside each student step), as the samplers space
    them (unclip.diffusion.respace).

    The teacher samples 2·steps timesteps, and every other one must be the student's. With the default trailing
    spacing and 1000 training timesteps that holds for the halvings from a power of two (32, 16, 8, ...) and
    for most other counts; the check names the ones it does not hold for.
    """
    if steps < 1:
        raise ValueError(f"train.distill.steps must be >= 1, got {steps}")
    if 2 * steps > num_timesteps:
        raise ValueError(
            f"a {steps}-step student needs a {2 * steps}-step teacher, more than the {num_timesteps} timesteps"
        )
    student = respace_timesteps(num_timesteps, steps, spacing)
    teacher = respace_timesteps(num_timesteps, 2 * steps, spacing)
    if teacher[0::2] != student:
        raise ValueError(
            f"the {2 * steps}-step teacher's timesteps ({spacing} spacing) do not contain the {steps}-step "
            f"student's for {num_timesteps} training timesteps; try another step count, such as a power of two"
        )
    return student, teacher[1::2]


def _x0(model, diffusion: GaussianDiffusion, z: Tensor, t: Tensor, cond, threshold) -> Tensor:
    prediction, _ = diffusion.split_output(model(z, t, **cond).float(), z)
    return threshold_x0(diffusion.predict_x0(z, t, prediction), threshold)


def _ddim_step(diffusion: GaussianDiffusion, z: Tensor, t: Tensor, x0: Tensor, a_next: Tensor) -> Tensor:
    """Deterministic DDIM from timestep t to noise level ᾱ = a_next (per row, broadcast against z)."""
    eps = diffusion.eps_from_x0(z, t, x0)
    return a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps


@torch.no_grad()
def distillation_target(
    teacher: Callable[..., Tensor],
    diffusion: GaussianDiffusion,
    z_t: Tensor,
    index: Tensor,
    steps: int,
    cond: dict[str, Any] | None = None,
    threshold=None,
) -> Tensor:
    """x̃: the clean sample whose single DDIM step from z_t at the student's step `index` (B,) reaches where two
    of the teacher's reach. `threshold` clips the teacher's x_0 as the sampler does (None, "static", "dynamic")."""
    student, middle = step_grid(diffusion.num_timesteps, steps, diffusion.spacing)
    z_t = z_t.float()
    t = torch.tensor(student, device=z_t.device)[index]
    t_mid = torch.tensor(middle, device=z_t.device)[index]
    a_t, a_mid = diffusion.alpha_bar(t, z_t), diffusion.alpha_bar(t_mid, z_t)
    after_last = torch.tensor(student[1:] + [-1], device=z_t.device)[index]  # -1: the clean sample, ᾱ = 1
    last = (after_last < 0).reshape(a_t.shape)
    a_next = diffusion.alpha_bar(after_last.clamp(min=0), z_t).masked_fill(last, 1.0)
    cond = cond or {}
    z_mid = _ddim_step(diffusion, z_t, t, _x0(teacher, diffusion, z_t, t, cond, threshold), a_mid)
    z_next = _ddim_step(diffusion, z_mid, t_mid, _x0(teacher, diffusion, z_mid, t_mid, cond, threshold), a_next)
    ratio = ((1 - a_next) / (1 - a_t)).sqrt()  # σ_next / σ_t
    return (z_next - ratio * z_t) / (a_next.sqrt() - ratio * a_t.sqrt())


def distillation_loss(
    student: Callable[..., Tensor],
    teacher: Callable[..., Tensor],
    diffusion: GaussianDiffusion,
    x_0: Tensor,
    steps: int,
    *,
    cond: dict[str, Any] | None = None,
    threshold=None,
    index: Tensor | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """max(SNR_t, 1)·‖x̂ - x̃‖² per row (B,), float32, at a student step drawn uniformly (or `index`, (B,))."""
    B = x_0.shape[0]
    student_ts, _ = step_grid(diffusion.num_timesteps, steps, diffusion.spacing)
    if index is None:
        index = torch.randint(0, steps, (B,), device=x_0.device)
    if noise is None:
        noise = torch.randn_like(x_0)
    t = torch.tensor(student_ts, device=x_0.device)[index]
    z_t = diffusion.q_sample(x_0, t, noise)
    target = distillation_target(teacher, diffusion, z_t, index, steps, cond, threshold)
    prediction, _ = diffusion.split_output(student(z_t, t, **(cond or {})).float(), z_t)
    x0 = diffusion.predict_x0(z_t.float(), t, prediction)
    weight = diffusion.snr(t).clamp(min=1.0)
    return weight * ((x0 - target) ** 2).reshape(B, -1).mean(dim=1)
