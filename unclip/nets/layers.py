"""Layers shared by the networks: timestep embeddings and attention (PyTorch SDPA)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in the Transformer and ADM.

    Args:
        t: timesteps, (B,), integer or float.
        dim: embedding width.

    Returns:
        (B, dim) float32 embedding: [cos(t·f_i), sin(t·f_i)] with geometric frequencies f_i.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def group_norm(channels: int, max_groups: int = 32, min_group_channels: int = 4) -> torch.nn.GroupNorm:
    """GroupNorm with 32 groups (ADM), fewer for narrow layers so that each group keeps >= 4 channels.

    The group count is the largest divisor of `channels` that is at most `max_groups` and leaves at least
    `min_group_channels` channels per group (1 group for layers narrower than that).
    """
    groups = max(
        (g for g in range(1, max_groups + 1) if channels % g == 0 and channels // g >= min_group_channels),
        default=1,
    )
    return torch.nn.GroupNorm(groups, channels)
