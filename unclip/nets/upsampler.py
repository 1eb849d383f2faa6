"""The unCLIP super-resolution U-Nets (64 -> 256 -> 1024; Ramesh et al. 2022, section 2.1 and appendix C).

`UpsamplerUNet` is the decoder's `UNet` with one more input, as GLIDE's `SuperResText2ImUNet`: the low-resolution
image, resized to x_t's size and concatenated as extra input channels. As in DALL·E 2 the upsamplers are
convolutional by default (no attention, no text, no CLIP embedding), so one trained on random crops samples at
full size. With `noise_aug_embed` the network is told how strongly its low-res input was corrupted: Imagen's
noise-conditioning augmentation (Saharia et al. 2022; Ho et al. 2021, "Cascaded Diffusion Models"). The
corruption itself (q_sample of the low-res image at `noise_level`) is the training loop's job: a network does
not import the diffusion code. Written for this project (MIT licence).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unclip.nets.layers import timestep_embedding
from unclip.nets.unet import UNet, UNetConfig


@dataclass
class UpsamplerConfig(UNetConfig):
    image_size: int = 256  # output resolution; x_t may be any multiple of the downsampling factor (crops)
    low_res_size: int = 64  # resolution of the conditioning image at image_size
    model_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    attention_resolutions: tuple[int, ...] = ()  # convolutional: trains on crops, samples at any size
    clip_dim: int | None = None  # optional CLIP image-embedding conditioning
    text_width: int | None = None
    extra_in_channels: int = 3  # the resized low-res image; always in_channels
    noise_aug_embed: bool = True  # embed the augmentation level of the low-res image (Imagen)
    low_res_mode: Literal["bilinear", "bicubic"] = "bicubic"  # how low_res is resized to x_t's size
    # Residual: diffuse x_0 = image - resize(low_res), the detail that resizing misses (as SRDiff, Li et al.
    # 2022), and add the resized low-res image back after sampling. The target is small and mostly zero; with
    # x_0-prediction the untrained network (its output layer starts at zero) already gives bicubic upscaling.
    residual: bool = True
    # Noise-conditioning augmentation of the low-res input (not architecture, but it must travel with the
    # weights): training draws levels in [0, train_noise_level_max]; sampling uses sample_noise_level.
    train_noise_level_max: int = 250
    sample_noise_level: int = 50

    def __post_init__(self):
        super().__post_init__()
        if self.extra_in_channels != self.in_channels:
            raise ValueError(
                f"model.extra_in_channels must equal in_channels ({self.in_channels}) for an upsampler: the extra "
                f"input is the low-res image; got {self.extra_in_channels}"
            )
        if not 1 <= self.low_res_size <= self.image_size:
            raise ValueError(
                f"model.low_res_size must be in [1, image_size={self.image_size}], got {self.low_res_size}"
            )
        if self.train_noise_level_max < 0 or self.sample_noise_level < 0:
            raise ValueError("model.train_noise_level_max and model.sample_noise_level must be >= 0")
        if self.low_res_mode not in ("bilinear", "bicubic"):
            raise ValueError(f"model.low_res_mode must be 'bilinear' or 'bicubic', got {self.low_res_mode!r}")


class UpsamplerUNet(UNet):
    """`model(x_t, t, low_res=..., noise_level=...) -> prediction` at x_t's resolution."""

    def __init__(self, config: UpsamplerConfig):
        super().__init__(config)
        self.noise_embed = None
        if config.noise_aug_embed:
            self.noise_embed = nn.Sequential(
                nn.Linear(config.model_channels, self.emb_dim), nn.SiLU(), nn.Linear(self.emb_dim, self.emb_dim)
            )

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        *,
        low_res: Tensor,
        noise_level: Tensor | None = None,
        image_embed: Tensor | None = None,
        cond_drop: Tensor | None = None,
    ) -> Tensor:
        """Predict for the high-resolution x_t given the (augmented) low-resolution image.

        Args:
            x_t: (B, in_channels, H, W) noised high-res images (or crops of them); H and W multiples of
                2**(len(channel_mult)-1).
            t: timesteps, (B,) or a scalar.
            low_res: (B, in_channels, h, w) in [-1, 1], the low-res image (or the matching crop), with
                h / H = low_res_size / image_size. It is resized to (H, W) with `low_res_mode`.
            noise_level: (B,) integer augmentation timesteps at which low_res was noised; required with
                noise_aug_embed (pass zeros for a clean low-res image).
            image_embed, cond_drop: as for UNet.forward, when the config has clip_dim.

        Returns:
            (B, out_channels, H, W), or 2 * out_channels with learned_variance.
        """
        c = self.config
        self._check_input(x_t, c.in_channels)
        B, _, H, W = x_t.shape
        if low_res.ndim != 4 or low_res.shape[:2] != (B, c.in_channels):
            raise ValueError(f"low_res must have shape ({B}, {c.in_channels}, h, w), got {tuple(low_res.shape)}")
        h, w = low_res.shape[-2:]
        if h * c.image_size != H * c.low_res_size or w * c.image_size != W * c.low_res_size:
            raise ValueError(
                f"low_res is {h}x{w} but x_t is {H}x{W}: this upsampler maps {c.low_res_size} px to "
                f"{c.image_size} px, so low_res should be "
                f"{H * c.low_res_size / c.image_size:g}x{W * c.low_res_size / c.image_size:g}"
            )
        emb = self._embed_timestep(t, B) + self._embed_noise_level(noise_level, B)
        x = torch.cat([x_t, self.resize_low_res(low_res.to(x_t.dtype), (H, W))], dim=1)  # (B, 2 * in_channels, H, W)
        return self._forward(x, emb, image_embed, None, None, cond_drop)

    def resize_low_res(self, low_res: Tensor, size: tuple[int, int]) -> Tensor:
        """The low-res image resized to `size`: the network's extra input and, with `residual`, the base image."""
        return F.interpolate(low_res, size=size, mode=self.config.low_res_mode, align_corners=False)

    def _embed_noise_level(self, noise_level: Tensor | None, B: int) -> Tensor | float:
        if self.noise_embed is None:
            if noise_level is not None:
                raise ValueError("this upsampler has noise_aug_embed=False but was given noise_level")
            return 0.0
        if noise_level is None:
            raise ValueError(
                "this upsampler embeds the low-res augmentation level (noise_aug_embed=True): pass noise_level, "
                "(B,) integer timesteps, zeros for a clean low-res image"
            )
        noise_level = noise_level.expand(B) if noise_level.ndim == 0 else noise_level
        if noise_level.shape != (B,):
            raise ValueError(f"noise_level must have shape ({B},) or be a scalar, got {tuple(noise_level.shape)}")
        dtype = self.input_conv.weight.dtype
        return self.noise_embed(timestep_embedding(noise_level, self.config.model_channels).to(dtype))
