"""Training-time corruption of an upsampler's low-resolution input (conditioning augmentation).

DALL·E 2 (appendix C) corrupts the 64 px input of its first upsampler with Gaussian blur, and the 256 px input
of its second with a more diverse "BSR degradation" (Zhang et al. 2021, "Designing a Practical Degradation
Model for Deep Blind Image Super-Resolution"): blur, resizing, noise and JPEG compression in random order.
Imagen (§2.5) adds Gaussian noise whose level the network is told, which the upsampler task does on top.

All functions take (B, 3, H, W) images in [-1, 1], return the same shape, and draw their randomness from the
global torch RNG, so that a resumed training run makes the same choices.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

DEGRADATIONS = ("blur", "bsr")


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand(()).item()


def gaussian_blur(x: Tensor, sigma_x: float, sigma_y: float | None = None, angle: float = 0.0) -> Tensor:
    """Blur with a (possibly anisotropic, rotated) Gaussian kernel; reflect padding keeps the size."""
    sigma_y = sigma_x if sigma_y is None else sigma_y
    radius = max(1, math.ceil(3 * max(sigma_x, sigma_y)))
    coords = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * xx + s * yy, -s * xx + c * yy
    kernel = torch.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    kernel = (kernel / kernel.sum()).to(x.dtype)
    channels = x.shape[1]
    weight = kernel.expand(channels, 1, *kernel.shape)
    padded = F.pad(x, (radius,) * 4, mode="reflect") if radius < x.shape[-1] else F.pad(x, (radius,) * 4, "replicate")
    return F.conv2d(padded, weight, groups=channels)


def jpeg(x: Tensor, quality: int) -> Tensor:
    """Round-trip every image through JPEG at `quality` (1-95)."""
    out = []
    for image in x:
        array = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=int(quality))
        decoded = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32)
        out.append(torch.from_numpy(decoded).permute(2, 0, 1) / 127.5 - 1)
    return torch.stack(out).to(x.device, x.dtype)


def blur_degradation(x: Tensor, sigma: tuple[float, float] = (0.4, 1.2)) -> Tensor:
    """DALL·E 2's first-stage corruption: an isotropic Gaussian blur of random strength."""
    return gaussian_blur(x, _uniform(*sigma))


def bsr_degradation(x: Tensor) -> Tensor:
    """A light BSR-style degradation: blur, resize, noise and JPEG, each likely, in a random order."""
    H, W = x.shape[-2:]

    def blur(y):
        return gaussian_blur(y, _uniform(0.3, 1.5), _uniform(0.3, 1.5), _uniform(0, math.pi))

    def resize(y):
        scale = _uniform(0.5, 1.0)
        mode = ("bilinear", "bicubic", "area")[int(torch.randint(3, ()))]
        small = (
            F.interpolate(y, scale_factor=scale, mode=mode, antialias=mode != "area")
            if mode != "area"
            else F.interpolate(y, scale_factor=scale, mode="area")
        )
        return F.interpolate(small, size=(H, W), mode="bicubic", align_corners=False)

    def noise(y):
        return y + torch.randn_like(y) * _uniform(1, 10) / 127.5

    def compress(y):
        return jpeg(y, int(_uniform(30, 95)))

    ops = [op for op in (blur, resize, noise, compress) if torch.rand(()).item() < 0.7]
    order = torch.randperm(len(ops)).tolist()
    for i in order:
        x = ops[i](x)
    return x.clamp(-1, 1)


def degrade(x: Tensor, kind: str | None) -> Tensor:
    """Apply the named corruption ("blur", "bsr") or none.

    It runs in fp32 with autocast off: it is data preparation, and under a mixed-precision training step the
    blur's convolution would otherwise return bf16/fp16 (whose antialiased resize CPUs lack, and which would
    round the residual target the upsampler learns).
    """
    if kind is None:
        return x
    if kind not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {kind!r}; valid: {list(DEGRADATIONS)} or null")
    corrupt = blur_degradation if kind == "blur" else bsr_degradation
    with torch.autocast(x.device.type, enabled=False):
        return corrupt(x.float()).to(x.dtype)


def random_crop_pair(image: Tensor, low_res: Tensor, crop: int) -> tuple[Tensor, Tensor]:
    """A random square crop (side `crop` at the image's resolution) of each image and of its low-res version.

    Crops are aligned to the scale factor, so each low-res crop covers exactly its image crop's region.

    Args:
        image: (B, 3, H, H); low_res: (B, 3, h, h) with H / h an integer.
    """
    H = image.shape[-1]
    scale = H // low_res.shape[-1]
    if crop % scale or crop > H:
        raise ValueError(f"data.crop_size {crop} must divide by the upsampling factor {scale} and be <= {H}")
    cells = (H - crop) // scale + 1
    lo = crop // scale
    corners = torch.randint(cells, (image.shape[0], 2)).tolist()
    image_crops = [
        im[:, t * scale : t * scale + crop, l * scale : l * scale + crop]
        for im, (t, l) in zip(image, corners, strict=True)
    ]
    low_crops = [im[:, t : t + lo, l : l + lo] for im, (t, l) in zip(low_res, corners, strict=True)]
    return torch.stack(image_crops), torch.stack(low_crops)
