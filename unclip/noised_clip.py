"""The noise-aware CLIP of GLIDE's CLIP guidance (Nichol et al. 2022, "GLIDE", §2.3 and §3.1).

CLIP guidance steers every sampling step along the gradient of a CLIP's image-text similarity. A CLIP trained
on clean images says little about a noised x_t, so GLIDE trains its CLIP on noised images, with the timestep
as an input. Ours is a CLIP checkpoint (the pipeline's own, `train.init_from`) whose image tower is fine-tuned
on x_t = sqrt(ᾱ_t)·x_0 + sqrt(1-ᾱ_t)·eps under the noise schedule of the decoder it will guide (the run's
`diffusion:` section): `model.noise_aware: true` in a clip run config (configs/clip/shapes_noised.yaml).

The timestep enters as a sinusoidal embedding through a two-layer MLP, added to every token of the ViT (class
token and patches, after the position embeddings, before the pre-norm). The MLP's output layer starts at zero,
so fine-tuning starts from the CLIP as it was. The text tower stays frozen unless `model.train_text: true`, so
the text embeddings are those of the CLIP the run started from.

The image tower reads images in the decoder's space ([-1, 1], any size; resized bilinearly to the CLIP's
size) through differentiable preprocessing: (x + 1) / 2, then the CLIP's mean and std. Training and guidance
use this same function.

A noised-CLIP folder is a CLIP checkpoint folder (`unclip.clip_models.save_clip`; the CLIP alone, without the
timestep input, still loads from it) and two more files:

    noised_clip.json          # {"format_version": 1, "diffusion": {...}, "time_embed_width": ..., "model": {...}}
    time_embed.safetensors    # the timestep MLP
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unclip.checkpoint import atomic_save_safetensors, atomic_write_bytes, check_safetensors, read_safetensors
from unclip.clip_models import (
    build_clip_model,
    build_tokenizer,
    default_preprocess_cfg,
    read_clip_checkpoint,
    save_clip,
    set_preprocess_cfg,
)
from unclip.config import DiffusionConfig, from_dict
from unclip.nets.layers import timestep_embedding, zero_module

NOISED_CONFIG_NAME = "noised_clip.json"
TIME_WEIGHTS_NAME = "time_embed.safetensors"
FORMAT_VERSION = 1
MAX_LOGIT_SCALE = 100.0  # CLIP's clip of the learned 1/temperature (unclip.tasks.clip)


@dataclasses.dataclass
class ClipModelConfig:
    """The `model:` section of a clip run config; a plain CLIP run needs none."""

    noise_aware: bool = False  # train on noised images x_t with the timestep as an input (GLIDE's noised CLIP)
    train_text: bool = False  # noise-aware runs: also train the text tower (frozen by default)


def clip_model_config(raw: dict[str, Any] | None) -> ClipModelConfig:
    """The checked `model:` section of a clip run (unknown keys are a ValueError that lists the valid ones)."""
    return from_dict(ClipModelConfig, raw or {}, "model")


class NoisedClip(nn.Module):
    """An open_clip CLIP whose image tower also reads the diffusion timestep t.

    Args:
        clip: an open_clip `CLIP` with a ViT image tower pooled by its class token (no attentional pooling).
        model_config: the open_clip model config it was built from.
        diffusion: the noise schedule of the decoder it guides; its timesteps are the ones `t` counts.
        preprocess_cfg: the CLIP's preprocessing (its size, mean and std are used).
    """

    def __init__(
        self,
        clip: nn.Module,
        model_config: dict[str, Any],
        diffusion: DiffusionConfig,
        preprocess_cfg: dict[str, Any] | None = None,
    ):
        super().__init__()
        visual = getattr(clip, "visual", None)
        needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "_pool")
        if visual is None or not all(hasattr(visual, n) for n in needed) or getattr(visual, "attn_pool", None):
            raise ValueError(
                "a noise-aware CLIP needs an open_clip ViT image tower pooled by its class token (vision_cfg with "
                "patch_size and no attentional pooling); this CLIP's image tower is "
                f"{type(visual).__name__ if visual is not None else 'missing'}"
            )
        self.clip = clip
        self.model_config = model_config
        self.diffusion = diffusion
        self.preprocess_cfg = {**default_preprocess_cfg(model_config), **(preprocess_cfg or {})}
        width = visual.conv1.out_channels
        self.time_width = width
        self.time_embed = nn.Sequential(
            nn.Linear(width, 4 * width), nn.SiLU(), zero_module(nn.Linear(4 * width, width))
        )
        mean = torch.tensor(self.preprocess_cfg["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.preprocess_cfg["std"], dtype=torch.float32).view(1, -1, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    @property
    def image_size(self) -> int:
        size = self.preprocess_cfg["size"]
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def num_timesteps(self) -> int:
        return self.diffusion.timesteps

    def pixels(self, images: Tensor) -> Tensor:
        """Differentiable preprocessing of (B, 3, H, W) images in [-1, 1] (noised ones too)."""
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size,) * 2, mode="bilinear", antialias=True)
        return ((images + 1) / 2 - self.pixel_mean) / self.pixel_std

    def encode_image(self, images: Tensor, t: Tensor, normalize: bool = False) -> Tensor:
        """(B, D) image embeddings of noised images x_t (B, 3, H, W) at timesteps t (B,)."""
        visual = self.clip.visual
        x = visual.conv1(self.pixels(images.float()))  # (B, width, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, grid², width)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = x + self.time_embed(timestep_embedding(t, self.time_width))[:, None].to(x.dtype)
        x = visual.ln_pre(visual.patch_dropout(x))
        pooled, _ = visual._pool(visual.transformer(x))
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def encode_text(self, ids: Tensor, normalize: bool = False) -> Tensor:
        return self.clip.encode_text(ids, normalize=normalize)

    def logit_scale(self) -> Tensor:
        return self.clip.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def forward(self, image: Tensor, text: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(image features, text features, exp(logit scale)), the features L2-normalised, as open_clip's CLIP."""
        image_features = self.encode_image(image, t, normalize=True)
        return image_features, self.encode_text(text, normalize=True), self.clip.logit_scale.exp()

    # ---- guidance ----

    @torch.no_grad()
    def embed_text(self, prompts: list[str]) -> Tensor:
        """(B, D) L2-normalised text embeddings of the prompts, with the CLIP's own tokenizer."""
        if not prompts:
            raise ValueError("no prompts to embed: the prompt list is empty")
        ids = build_tokenizer(self.model_config)(list(prompts)).to(self.clip.logit_scale.device)
        return self.encode_text(ids, normalize=True).float()

    def log_prob_grad(self, x_t: Tensor, t: Tensor, text_embed: Tensor) -> Tensor:
        """∇_{x_t} of exp(logit scale)·cos(f(x_t, t), g(caption)) for each row: GLIDE's estimate of
        ∇ log p(caption | x_t), the softmax's normaliser over other captions left out as GLIDE does.

        Args:
            x_t: (B, 3, H, W) noised images in the decoder's space.
            t: (B,) integer timesteps of this CLIP's schedule.
            text_embed: (B, D) L2-normalised text embeddings (`embed_text`).

        Returns:
            (B, 3, H, W) float32 gradients (rows are independent: each is its own caption's gradient).
        """
        with torch.enable_grad():
            x = x_t.detach().float().requires_grad_(True)
            image = self.encode_image(x, t, normalize=True)
            score = self.logit_scale().detach() * (image * text_embed.to(image.dtype)).sum()
            (grad,) = torch.autograd.grad(score, x)
        return grad

    def guide(self, prompts: list[str]) -> ClipGuide:
        """The function CLIP guidance calls at each step: guide(x_t, t) -> ∇ log p(prompt_i | x_t) per row i."""
        return ClipGuide(self, self.embed_text(prompts))


class ClipGuide:
    """CLIP guidance's gradient toward one caption per row; `select(rows)` keeps those rows' captions when a
    sampler drops the others (candidate pruning)."""

    def __init__(self, clip: NoisedClip, text_embed: Tensor):
        self.clip, self.text_embed = clip, text_embed

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        if len(x_t) != len(self.text_embed):
            raise ValueError(f"CLIP guidance got {len(x_t)} images for {len(self.text_embed)} prompts")
        return self.clip.log_prob_grad(x_t, t, self.text_embed)

    def select(self, rows: Tensor) -> None:
        self.text_embed = self.text_embed[rows.to(self.text_embed.device)]


# ---- the folder ----


def save_noised_clip(model: NoisedClip, directory: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write a noised-CLIP folder (see the module docstring); `dtype` (e.g. torch.float16) for bundling."""
    directory = Path(directory)
    model = getattr(model, "_orig_mod", model)
    save_clip(model.clip, model.model_config, directory, preprocess_cfg=model.preprocess_cfg)
    time_state = {k: v.float() for k, v in model.time_embed.state_dict().items()}
    if dtype is not None:
        clip_state = read_safetensors(directory / "open_clip_model.safetensors")
        cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in clip_state.items()}
        atomic_save_safetensors(cast, directory / "open_clip_model.safetensors")
        time_state = {k: v.to(dtype) for k, v in time_state.items()}
    atomic_save_safetensors(time_state, directory / TIME_WEIGHTS_NAME)
    meta = {
        "format_version": FORMAT_VERSION,
        "diffusion": dataclasses.asdict(model.diffusion),
        "time_embed_width": model.time_width,
    }
    atomic_write_bytes(directory / NOISED_CONFIG_NAME, (json.dumps(meta, indent=2) + "\n").encode())
    return directory


def is_noised_clip(directory: str | Path) -> bool:
    return (Path(directory) / NOISED_CONFIG_NAME).is_file()


def load_noised_clip(directory: str | Path, *, device: str | torch.device = "cpu") -> NoisedClip:
    """A noised-CLIP folder written by `save_noised_clip`, frozen, in eval mode, in float32 on `device`."""
    directory = Path(directory)
    if not is_noised_clip(directory):
        raise ValueError(
            f"{directory} is not a noise-aware CLIP: it has no {NOISED_CONFIG_NAME}. Train one with "
            "train/clip.py and a config with model.noise_aware: true (configs/clip/shapes_noised.yaml)"
        )
    meta = json.loads((directory / NOISED_CONFIG_NAME).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory / NOISED_CONFIG_NAME} has format_version {meta.get('format_version')!r}")
    model_config, weights, preprocess_cfg = read_clip_checkpoint(directory)
    check_safetensors(weights)
    clip = build_clip_model(model_config)
    clip.load_state_dict({k: v.float() for k, v in read_safetensors(weights).items()})
    preprocess_cfg = {**default_preprocess_cfg(model_config), **(preprocess_cfg or {})}
    set_preprocess_cfg(clip, preprocess_cfg)
    diffusion = from_dict(DiffusionConfig, meta["diffusion"], "diffusion")
    model = NoisedClip(clip, model_config, diffusion, preprocess_cfg)
    time_weights = directory / TIME_WEIGHTS_NAME
    check_safetensors(time_weights)
    model.time_embed.load_state_dict({k: v.float() for k, v in read_safetensors(time_weights).items()})
    return model.eval().requires_grad_(False).to(device)
