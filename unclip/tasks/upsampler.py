"""Training task for the diffusion upsamplers (64 -> 256 and 256 -> 1024; DALL·E 2 §2.1 and appendix C).

Each step takes a high-resolution image and its low-resolution version, crops both at the same place
(`data.crop_size`, a quarter of the target side as in DALL·E 2, so that the 1024 px stage trains at the cost
of 256 px crops), corrupts the low-res crop (`data.degradation`: Gaussian blur for the first stage, BSR-style
for the second), then diffuses it to a random augmentation level that the network is told (Imagen's noise
conditioning augmentation). The network is convolutional, so it samples at full resolution.

Validation compares EMA samples at full size with the exact targets in PSNR, next to bicubic upscaling.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from unclip.checkpoint import save_model
from unclip.config import RunConfig
from unclip.data import build_dataset, collate
from unclip.data.degrade import degrade, random_crop_pair
from unclip.data.embeddings import encode_batch
from unclip.diffusion import GaussianDiffusion
from unclip.imageio import save_grid
from unclip.nets.upsampler import UpsamplerUNet
from unclip.sampling import augment_low_res, sample_upsampler
from unclip.tasks.conditioning import check_clip_dims, load_clip

VAL_SAMPLES = 4  # validation images upsampled at full size at each evaluation


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB per image, for images in [-1, 1] (peak-to-peak 2)."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-10))


class UpsamplerTask:
    kind = "upsampler"

    def __init__(self, config: RunConfig, clip=None):
        self.config = config
        model_config = config.model
        model_config.gradient_checkpointing = config.train.gradient_checkpointing
        if config.data.image_size != model_config.image_size:
            raise ValueError(
                f"data.image_size ({config.data.image_size}) must equal model.image_size ({model_config.image_size})"
            )
        self.clip = None
        if model_config.clip_dim:
            self.clip = clip if clip is not None else load_clip(config.clip)
            check_clip_dims(self.clip, clip_dim=model_config.clip_dim, text_width=None)
        self.model = UpsamplerUNet(model_config)
        self.diffusion = GaussianDiffusion.from_config(config.diffusion)
        low = model_config.low_res_size
        self.train_dataset = build_dataset(config.data, split="train", low_res_size=low)
        self.val_dataset = build_dataset(config.data, split="val", low_res_size=low)
        self.collate_fn = collate
        self.device = torch.device("cpu")
        degrade(torch.zeros(1, 3, 8, 8), config.data.degradation)  # an unknown name fails now, not mid-run

    def setup(self, device: torch.device) -> None:
        self.device = device
        if self.clip is not None:
            self.clip.to(device)

    def _cond(self, batch, low_res: Tensor, noise_level: Tensor) -> dict[str, Tensor]:
        cond = {"low_res": augment_low_res(self.diffusion, low_res, noise_level)}
        if self.model.config.noise_aug_embed:
            cond["noise_level"] = noise_level
        if self.clip is not None:
            cond["image_embed"] = encode_batch(self.clip, batch, self.device)["image_embed"]
        return cond

    def _noise_levels(self, n: int) -> Tensor:
        return torch.randint(0, self.model.config.train_noise_level_max + 1, (n,), device=self.device)

    def loss(self, model, batch) -> tuple[Tensor, dict[str, float]]:
        image, low_res = batch["image"].to(self.device), batch["low_res"].to(self.device)
        if self.config.data.crop_size:
            image, low_res = random_crop_pair(image, low_res, self.config.data.crop_size)
        low_res = degrade(low_res, self.config.data.degradation)
        cond = self._cond(batch, low_res, self._noise_levels(image.shape[0]))
        return self.diffusion.training_loss(model, self._target(image, low_res), cond=cond)["loss"].mean(), {}

    def _target(self, image: Tensor, low_res: Tensor) -> Tensor:
        """What the diffusion models: the image, or with `residual` its difference from the resized low-res."""
        if not self.model.config.residual:
            return image
        return image - self.model.resize_low_res(low_res, image.shape[-2:])

    def _val_batch(self, n: int):
        n = min(n, len(self.val_dataset))
        return next(iter(DataLoader(Subset(self.val_dataset, range(n)), batch_size=n, collate_fn=collate)))

    @torch.no_grad()
    def evaluate(self, model, ema_model) -> dict[str, float]:
        """Validation loss on full images at fixed timesteps/noise, and PSNR of EMA samples vs bicubic."""
        batch = self._val_batch(self.config.data.val_size)
        image, low_res = batch["image"].to(self.device), batch["low_res"].to(self.device)
        gen = torch.Generator().manual_seed(0)
        t = torch.randint(0, self.diffusion.num_timesteps, (image.shape[0],), generator=gen).to(self.device)
        noise = torch.randn(image.shape, generator=gen).to(self.device)
        level = torch.zeros(image.shape[0], dtype=torch.long, device=self.device)
        state = torch.random.get_rng_state()
        cond = self._cond(batch, low_res, level)
        torch.random.set_rng_state(state)
        metrics, x_0 = {}, self._target(image, low_res)
        for name, net in (("val", model), ("val_ema", ema_model)):
            metrics[f"{name}/loss"] = (
                self.diffusion.training_loss(net, x_0, cond=cond, t=t, noise=noise)["loss"].mean().item()
            )
        samples, bicubic, target = self._samples(ema_model, self._val_batch(VAL_SAMPLES))
        metrics["val_ema/psnr"] = psnr(samples, target).mean().item()
        metrics["val/bicubic_psnr"] = psnr(bicubic, target).mean().item()
        return metrics

    def _samples(self, ema_model, batch) -> tuple[Tensor, Tensor, Tensor]:
        target, low_res = batch["image"].to(self.device), batch["low_res"].to(self.device)
        image_embed = None if self.clip is None else encode_batch(self.clip, batch, self.device)["image_embed"]
        samples = sample_upsampler(
            ema_model,
            self.diffusion,
            low_res,
            image_embed=image_embed,
            noise_level=self.model.config.sample_noise_level,
            generator=torch.Generator().manual_seed(0),
        )
        bicubic = F.interpolate(low_res, size=target.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)
        return samples, bicubic, target

    @torch.no_grad()
    def save_samples(self, ema_model, path: Path) -> None:
        """A grid: bicubic upscaling, the EMA sample and the exact target, a row each."""
        samples, bicubic, target = self._samples(ema_model, self._val_batch(VAL_SAMPLES))
        save_grid(torch.cat([bicubic, samples, target]).cpu(), path, nrow=samples.shape[0])

    def export(self, model, directory: Path) -> None:
        save_model(model, directory, kind="upsampler", diffusion=self.config.diffusion, clip=self.config.clip)
