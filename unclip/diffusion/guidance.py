"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around a denoiser.

    guided = classifier_free_guidance(model, scale)
    guided(x_t, t, **cond) == uncond + scale * (cond - uncond)

Both branches run in one batched forward pass: the batch is doubled and the network is told which rows are
unconditional through its `cond_drop` (B,) bool argument, the same switch it uses for conditioning dropout
in training. At scale 1 the wrapper is the conditional model itself: one pass, identical outputs.

With a learned variance the network outputs 2C channels; as in GLIDE, only the first C (the prediction) are
guided and the variance values are taken from the conditional branch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def classifier_free_guidance(model: Callable[..., Tensor], scale: float) -> Callable[..., Tensor]:
    """Wrap `model(x_t, t, **cond, cond_drop=...)` into a guided denoiser `guided(x_t, t, **cond)`.

    Args:
        model: a network that accepts `cond_drop`, (B,) bool, True = unconditional row.
        scale: guidance scale w >= 0; 1 returns `model` unchanged, 0 is the unconditional model.
    """
    scale = float(scale)
    if scale < 0:
        raise ValueError(f"guidance scale must be >= 0, got {scale}")
    if scale == 1.0:
        return model

    def guided(x_t: Tensor, t: Tensor, **cond) -> Tensor:
        if "cond_drop" in cond:
            raise ValueError("classifier_free_guidance sets cond_drop itself; do not pass it")
        B = x_t.shape[0]
        drop = torch.arange(2 * B, device=x_t.device) >= B  # the second half runs unconditionally
        doubled = {k: _double(v) for k, v in cond.items()}
        out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), **doubled, cond_drop=drop)
        cond_out, uncond_out = out[:B], out[B:]
        channels = x_t.shape[1]
        guided_pred = uncond_out[:, :channels] + scale * (cond_out[:, :channels] - uncond_out[:, :channels])
        if out.shape[1] == channels:
            return guided_pred
        return torch.cat([guided_pred, cond_out[:, channels:]], dim=1)

    guided.scale = scale
    guided.model = model
    return guided


def _double(value):
    if isinstance(value, Tensor):
        return torch.cat([value, value])
    return value
