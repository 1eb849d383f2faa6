"""Noise schedules: betas -> alphas_cumprod, as pure functions in float64.

Cosine: Nichol & Dhariwal 2021 ("Improved DDPM"), eq. 17. Linear: Ho et al. 2020, scaled so that any number
of steps covers the same noise range as their 1000-step schedule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

SCHEDULES = ("cosine", "linear", "betas")


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2); β_t = 1 - ᾱ(t+1)/ᾱ(t), clipped at max_beta (IDDPM eq. 17)."""
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Linearly spaced betas; the endpoints are for 1000 steps and scale as 1000/T (IDDPM's convention)."""
    scale = 1000 / timesteps
    return torch.linspace(beta_start * scale, beta_end * scale, timesteps, dtype=torch.float64)


def make_betas(schedule: str, timesteps: int = 1000, betas: Sequence[float] | None = None) -> Tensor:
    """Betas (T,) in float64 for a named schedule, or the explicit `betas` for schedule="betas"."""
    if schedule == "cosine":
        out = cosine_betas(timesteps)
    elif schedule == "linear":
        out = linear_betas(timesteps)
    elif schedule == "betas":
        if betas is None or len(betas) == 0:
            raise ValueError("schedule 'betas' needs an explicit, non-empty list of betas")
        out = torch.as_tensor(betas, dtype=torch.float64)
    else:
        raise ValueError(f"unknown noise schedule {schedule!r}; valid schedules: {list(SCHEDULES)}")
    if out.ndim != 1 or not bool(((out > 0) & (out < 1)).all()):
        raise ValueError("betas must be a 1-D sequence of values in (0, 1)")
    return out


def alphas_cumprod_from_betas(betas: Tensor) -> Tensor:
    """ᾱ_t = Π_{s<=t} (1 - β_s), (T,), decreasing."""
    return torch.cumprod(1 - betas.double(), dim=0)
