"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around a denoiser.

    guided = classifier_free_guidance(model, scale)
    guided(x_t, t, **cond) == uncond + scale * (cond - uncond)

Both branches run in one batched forward pass: the batch is doubled and the network is told which rows are
unconditional through its `cond_drop` (B,) bool argument, the same switch it uses for conditioning dropout
in training. At scale 1 the wrapper is the conditional model itself: one pass, identical outputs.

With a learned variance the network outputs 2C channels; as in GLIDE, only the first C (the prediction) are
guided and the variance values are taken from the conditional branch.

Text guidance (`text_scale`, for the decoder, whose conditions are an image embedding and a caption) adds a
second direction, what the caption adds to the image embedding, as InstructPix2Pix guides its two conditions
(Brooks et al. 2023):

    guided = uncond + scale * (cond - uncond) + text_scale * (cond - image_only)

where image_only keeps the image embedding and drops the caption. The network is told which condition a row
drops through `cond_drop` of shape (B, 2) (image, text); three branches run in one pass.

Classifier guidance (`classifier_guidance`; Dhariwal & Nichol 2021, §4; GLIDE's CLIP guidance when the
classifier is a noise-aware CLIP, Nichol et al. 2022, §2.3) adds s·∇ log p(y | x_t) to the score, that is, it
shifts the predicted noise:

    eps' = eps - sqrt(1 - ᾱ_t) · s · ∇_{x_t} log p(y | x_t)

and every sampler then steps with eps'. Over small steps (ᾱ of the step's target close to ᾱ_t) this moves a DDPM
step's mean by about s·Σ_t·∇ log p, Σ_t the step's variance: GLIDE's mean form. Over a coarse step from ᾱ_t near
0 (the first step of a respaced cosine schedule, ᾱ_999 = 2.4e-9) it moves the implied x_0 by
(1 - ᾱ_t)/sqrt(ᾱ_t)·s·∇ log p, far more, and the sampler's x_0 thresholding is what bounds it. It wraps any
denoiser, a classifier-free guided one included.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def classifier_free_guidance(
    model: Callable[..., Tensor], scale: float, text_scale: float = 0.0
) -> Callable[..., Tensor]:
    """Wrap `model(x_t, t, **cond, cond_drop=...)` into a guided denoiser `guided(x_t, t, **cond)`.

    Args:
        model: a network that accepts `cond_drop`, (B,) bool, True = unconditional row; with text_scale, also
            (B, 2) bool, (drop the image embedding, drop the text).
        scale: guidance scale w >= 0; 1 returns `model` unchanged, 0 is the unconditional model.
        text_scale: extra guidance along what the text adds to the image embedding (0 = none).
    """
    scale, text_scale = float(scale), float(text_scale)
    if scale < 0 or text_scale < 0:
        raise ValueError(f"guidance scales must be >= 0, got {scale} and text {text_scale}")
    if scale == 1.0 and text_scale == 0.0:
        return model
    branches = 3 if text_scale else 2

    def guided(x_t: Tensor, t: Tensor, **cond) -> Tensor:
        if "cond_drop" in cond:
            raise ValueError("classifier_free_guidance sets cond_drop itself; do not pass it")
        B = x_t.shape[0]
        row = torch.arange(branches * B, device=x_t.device)
        drop = row >= B  # rows B..2B-1 run unconditionally
        if text_scale:  # rows 2B.. keep the image embedding and drop the text
            drop = torch.stack([drop & (row < 2 * B), drop], dim=1)
        repeated = {k: _repeat(v, branches) for k, v in cond.items()}
        out = model(_repeat(x_t, branches), _repeat(t, branches), **repeated, cond_drop=drop)
        channels = x_t.shape[1]
        pred = out[:, :channels]
        cond_pred, uncond_pred = pred[:B], pred[B : 2 * B]
        guided_pred = uncond_pred + scale * (cond_pred - uncond_pred)
        if text_scale:
            guided_pred = guided_pred + text_scale * (cond_pred - pred[2 * B :])
        if out.shape[1] == channels:
            return guided_pred
        return torch.cat([guided_pred, out[:B, channels:]], dim=1)

    guided.scale = scale
    guided.text_scale = text_scale
    guided.model = model
    return guided


def _repeat(value, n: int):
    if isinstance(value, Tensor):
        return torch.cat([value] * n)
    return value


def classifier_guidance(
    model: Callable[..., Tensor],
    diffusion,
    grad_fn: Callable[[Tensor, Tensor], Tensor],
    scale: float,
) -> Callable[..., Tensor]:
    """Wrap a denoiser `model(x_t, t, **cond)` so that its prediction follows eps' = eps - sqrt(1-ᾱ_t)·s·grad.

    Args:
        model: the denoiser (a network, or a classifier_free_guidance wrapper).
        diffusion: its GaussianDiffusion: ᾱ_t and what the network predicts (eps, x0 or v; the shift is made in
            that target, at the same x_t).
        grad_fn: grad_fn(x_t, t) -> ∇_{x_t} log p(y | x_t), same shape as x_t (e.g. NoisedClip.guide(prompts)).
        scale: s >= 0; 0 returns `model` unchanged.
    """
    scale = float(scale)
    if scale < 0:
        raise ValueError(f"the classifier guidance scale must be >= 0, got {scale}")
    if scale == 0.0:
        return model

    def guided(x_t: Tensor, t: Tensor, **cond) -> Tensor:
        out = model(x_t, t, **cond)
        channels = x_t.shape[1]
        pred = out[:, :channels]
        grad = grad_fn(x_t, t).to(device=pred.device, dtype=torch.float32)
        alpha_bar = diffusion.alpha_bar(t, grad)
        d_eps = -(1 - alpha_bar).sqrt() * scale * grad
        if diffusion.prediction == "eps":
            shift = d_eps
        elif diffusion.prediction == "v":  # v = (eps - sqrt(1-ᾱ)·x_t) / sqrt(ᾱ)
            shift = d_eps / alpha_bar.sqrt()
        else:  # x0 = (x_t - sqrt(1-ᾱ)·eps) / sqrt(ᾱ)
            shift = -(1 - alpha_bar).sqrt() / alpha_bar.sqrt() * d_eps
        pred = (pred.float() + shift).to(pred.dtype)
        return pred if out.shape[1] == channels else torch.cat([pred, out[:, channels:]], dim=1)

    guided.scale = scale
    guided.model = model
    return guided
