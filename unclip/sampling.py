"""Sampling one stage of the cascade: each stage's settings, and the functions the pipeline and the training
tasks share.

    image_embed = sample_prior(prior, diffusion, text, guidance_scale=2.0, candidates=2)
    images = sample_decoder(decoder, diffusion, image_embed, text, **DecoderSettings(guidance_scale=5.0).kwargs())

Each function runs classifier-free guidance, a named sampler from unclip.diffusion and the stage's own pre-
and post-processing (the prior's embedding normalisation, the decoder's clipping of x_0 to [-1, 1]).

The settings classes (`PriorSettings`, `DecoderSettings`, `UpsamplerSettings`) are frozen dataclasses whose
constructors check every value; `settings.replace({"steps": 10})` returns a copy with the given (non-None)
values, so user input is checked exactly where it enters.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unclip.diffusion import SAMPLERS, GaussianDiffusion, classifier_free_guidance, classifier_guidance, sample
from unclip.diffusion.samplers import Generators


class SettingError(ValueError):
    """A sampling setting out of range. `name` is its dotted name, e.g. "decoder.steps"."""

    def __init__(self, name: str, problem: str):
        self.name, self.problem = name, problem
        super().__init__(f"{name} {problem}")


def check_count(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SettingError(name, f"must be a whole number >= {minimum}, got {value!r}")
    return value


def check_pruning(value: Any) -> tuple[tuple[int, int], ...]:
    """A candidate pruning schedule: "8:8,16:2" (after decoder step 8 keep each prompt's best 8 candidates,
    after step 16 the best 2) or its pairs -> ((8, 8), (16, 2)); "", "none" or None -> () (no pruning)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "0")):
        return ()
    try:
        if isinstance(value, str):
            pairs = tuple(tuple(int(v) for v in part.split(":")) for part in value.replace(" ", "").split(","))
        else:
            pairs = tuple(tuple(int(v) for v in pair) for pair in value)
        ok = all(len(p) == 2 and p[0] >= 1 and p[1] >= 1 for p in pairs)
        ok = ok and all(a[0] < b[0] and a[1] > b[1] for a, b in itertools.pairwise(pairs))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise SettingError(
            "pruning",
            f'must be STEP:KEEP pairs with rising steps and falling counts, e.g. "5:8,10:4,15:2", or "none"; '
            f"got {value!r}",
        )
    return pairs


def format_pruning(pairs: tuple[tuple[int, int], ...]) -> str:
    return ",".join(f"{step}:{keep}" for step, keep in pairs)


def check_scale(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise SettingError(name, f"must be a finite number >= 0, got {value!r}")
    return float(value)


@dataclasses.dataclass(frozen=True)
class StageSettings:
    """Base of the per-stage sampling settings: checked on construction, replaced by name."""

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        if getattr(self, "sampler", SAMPLERS[0]) not in SAMPLERS:
            raise SettingError("sampler", f"must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        check_count("steps", self.steps)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def replace(self, overrides: Mapping[str, Any] | StageSettings | None, stage: str = ""):
        """A copy with the non-None values of `overrides` (a mapping, or settings of this class, taken whole).
        A SettingError names the setting as `stage.name`."""
        if overrides is None:
            return self
        if isinstance(overrides, type(self)):
            return overrides
        if not isinstance(overrides, Mapping):
            raise TypeError(f"{stage or 'stage'} settings must be a dict or {type(self).__name__}, got {overrides!r}")
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = sorted(set(given) - set(self.names()))
        prefix = f"{stage}." if stage else ""
        if unknown:
            raise SettingError(f"{stage or 'stage'}", f"has no setting {unknown}; valid: {self.names()}")
        try:
            return dataclasses.replace(self, **given)
        except SettingError as e:
            raise SettingError(prefix + e.name, e.problem) from None

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments of this stage's sample_* function (and the PNG metadata's record)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class PriorSettings(StageSettings):
    """The prior's sampling: `candidates` embeddings per prompt, keeping the one closest to the text."""

    sampler: str = "dpm++"
    steps: int = 25
    guidance_scale: float = 2.0
    candidates: int = 2

    def check(self) -> None:
        super().check()
        check_scale("guidance_scale", self.guidance_scale)
        check_count("candidates", self.candidates)


@dataclasses.dataclass(frozen=True)
class DecoderSettings(StageSettings):
    """The decoder's sampling (and the inpainting decoder's)."""

    sampler: str = "dpm++"
    steps: int = 25
    guidance_scale: float = 5.0
    text_guidance_scale: float = 0.0
    clip_guidance_scale: float = 0.0  # GLIDE's CLIP guidance, with the pipeline's noise-aware CLIP; 0 = none

    def check(self) -> None:
        super().check()
        check_scale("guidance_scale", self.guidance_scale)
        check_scale("text_guidance_scale", self.text_guidance_scale)
        check_scale("clip_guidance_scale", self.clip_guidance_scale)


@dataclasses.dataclass(frozen=True)
class UpsamplerSettings(StageSettings):
    """An upsampler's sampling; `noise_level` is the augmentation timestep of its low-res input (the pipeline
    takes the default from the model's config, `sample_noise_level`)."""

    sampler: str = "ddim"
    steps: int = 8
    noise_level: int = 50

    def check(self) -> None:
        super().check()
        check_count("noise_level", self.noise_level, 0)


PRIOR_DEFAULTS = PriorSettings()
DECODER_DEFAULTS = DecoderSettings()
UPSAMPLER_DEFAULTS = UpsamplerSettings()


def text_cond(text_embed: Tensor, text_tokens: Tensor | None, text_mask: Tensor | None) -> dict[str, Any]:
    cond = {"text_embed": text_embed}
    if text_tokens is not None:
        cond.update(text_tokens=text_tokens, text_mask=text_mask)
    return cond


def repeat_cond(cond: dict[str, Any], n: int) -> dict[str, Any]:
    """Each row of the tensors in `cond` n times in a row (a prompt's candidates side by side)."""
    return {k: v.repeat_interleave(n, dim=0) if isinstance(v, Tensor) else v for k, v in cond.items()}


def closest_to_text(image_embed: Tensor, text_embed: Tensor) -> Tensor:
    """(B, candidates, D) image embeddings -> (B, D): each prompt's candidate whose direction is closest to its
    (B, D) text embedding (a prior's reranking)."""
    if image_embed.shape[1] == 1:
        return image_embed[:, 0]
    scores = (F.normalize(image_embed.float(), dim=-1) * F.normalize(text_embed.float(), dim=-1)[:, None]).sum(-1)
    return image_embed[torch.arange(len(image_embed), device=image_embed.device), scores.argmax(dim=1)]


@torch.no_grad()
def sample_prior(
    prior: nn.Module,
    diffusion: GaussianDiffusion,
    text_embed: Tensor,
    text_tokens: Tensor | None = None,
    text_mask: Tensor | None = None,
    *,
    sampler: str = PRIOR_DEFAULTS.sampler,
    steps: int = PRIOR_DEFAULTS.steps,
    guidance_scale: float = PRIOR_DEFAULTS.guidance_scale,
    candidates: int = 1,
    generator: Generators = None,
    callback=None,
) -> Tensor:
    """CLIP text embeddings -> CLIP image embeddings (DALL·E 2 §2.1).

    Args:
        prior: a PriorTransformer with its normalisation statistics set.
        text_embed: (B, D) L2-normalised pooled text embeddings.
        candidates: draw this many embeddings per prompt and keep the one with the highest cosine
            similarity to the text embedding (the paper draws 2).
        generator: one for the batch, or one per prompt (that prompt's candidates draw from it, so its
            embedding does not depend on the batch).

    A prior may carry, on its config, a `threshold` for its x_0 (see unclip.diffusion.samplers; default none),
    and `unit_embeddings = False` when its decoder reads CLIP's raw image embeddings (Karlo's): the embeddings
    are then returned as the prior makes them, and only the candidates' scores use their directions.

    Returns:
        (B, D) L2-normalised image embeddings.
    """
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    B, D = text_embed.shape
    cond = repeat_cond(text_cond(text_embed, text_tokens, text_mask), candidates)
    model = classifier_free_guidance(prior, guidance_scale)
    device = text_embed.device
    x = sample(
        sampler,
        model,
        diffusion,
        (B * candidates, D),
        steps=steps,
        cond=cond,
        generator=generator,
        device=device,
        threshold=getattr(prior.config, "threshold", None),
        callback=callback,
    )
    image_embed = prior.denormalize(x)
    if getattr(prior.config, "unit_embeddings", True):
        image_embed = F.normalize(image_embed, dim=-1)
    return closest_to_text(image_embed.view(B, candidates, D), text_embed)


def decoder_cond(image_embed, text_tokens=None, text_mask=None, config=None, *, text_words=None) -> dict[str, Any]:
    """The decoder's keyword arguments, leaving out what its config does not use."""
    cond: dict[str, Any] = {}
    if config is None or config.clip_dim:
        cond["image_embed"] = image_embed
    if text_tokens is not None and (config is None or config.text_width):
        cond.update(text_tokens=text_tokens, text_mask=text_mask)
        if getattr(config, "text_words", False):
            if text_words is None:
                raise ValueError(
                    "this decoder also reads the caption's CLIP word embeddings (model.text_words), but none "
                    "were given: encode captions with ClipAdapter.embed_text (precomputed embedding shards do "
                    "not store them; train such a decoder on image-caption data)"
                )
            cond["text_words"] = text_words
    return cond


@torch.no_grad()
def sample_decoder(
    decoder: nn.Module,
    diffusion: GaussianDiffusion,
    image_embed: Tensor,
    text_tokens: Tensor | None = None,
    text_mask: Tensor | None = None,
    *,
    text_words: Tensor | None = None,
    size: int | None = None,
    sampler: str = DECODER_DEFAULTS.sampler,
    steps: int = DECODER_DEFAULTS.steps,
    guidance_scale: float = DECODER_DEFAULTS.guidance_scale,
    text_guidance_scale: float = DECODER_DEFAULTS.text_guidance_scale,
    clip_guidance_scale: float = DECODER_DEFAULTS.clip_guidance_scale,
    clip_guide: Callable[[Tensor, Tensor], Tensor] | None = None,
    threshold: str | None = "dynamic",
    generator: Generators = None,
    x_T: Tensor | None = None,
    inpaint: dict[str, Tensor] | None = None,
    callback=None,
    prune=None,
) -> Tensor:
    """CLIP image embeddings (+ caption tokens) -> images in [-1, 1] (DALL·E 2's decoder, GLIDE-style CFG).

    Args:
        decoder: a UNet (or InpaintUNet, then `inpaint` = {"image": (B,3,H,W), "mask": (B,1,H,W), 1 = repaint}).
        image_embed: (B, D) L2-normalised CLIP image embeddings.
        text_words: (B, L, W) the caption's CLIP word embeddings, for a decoder with model.text_words.
        size: output side, default the decoder's training size.
        text_guidance_scale: extra guidance along what the caption adds to the image embedding
            (unclip.diffusion.guidance); needs caption tokens.
        clip_guidance_scale: GLIDE's CLIP guidance, s in eps - sqrt(1-ᾱ_t)·s·∇ log p(caption | x_t)
            (unclip.diffusion.guidance.classifier_guidance), with or without classifier-free guidance; 0 = none.
        clip_guide: clip_guide(x_t, t) -> ∇ log p(caption_i | x_t) per row, e.g. `NoisedClip.guide(prompts)`.
        threshold: x_0 clipping: "dynamic" (Imagen), "static" ([-1, 1]) or None; a decoder whose config names a
            `threshold` (one that was trained with another, as Karlo's static clipping) uses its own.
        generator: one for the batch, or one per image (so that an image does not depend on its batch).
        prune: prune(i, x0) after step i -> the rows to go on with, or None (unclip.diffusion.samplers); with
            CLIP guidance, it must also restrict `clip_guide` to those rows.

    Returns:
        (B, 3, size, size) images in [-1, 1], or the rows `prune` kept.
    """
    config = decoder.config
    threshold = getattr(config, "threshold", threshold)
    size = size or config.image_size
    B = image_embed.shape[0]
    cond = decoder_cond(image_embed, text_tokens, text_mask, config, text_words=text_words)
    replace = None
    if inpaint is not None:
        if getattr(config, "extra_in_channels", 0):  # a trained inpainting model sees the known region
            cond.update(inpaint_image=inpaint["image"], inpaint_mask=inpaint["mask"])
        replace = (inpaint["image"], inpaint["mask"])  # and the known region is kept exactly
    if text_guidance_scale and "text_tokens" not in cond:
        raise ValueError("text_guidance_scale needs a decoder conditioned on text and the caption's tokens")
    model = classifier_free_guidance(decoder, guidance_scale, text_guidance_scale)
    if clip_guidance_scale:
        if clip_guide is None:
            raise ValueError(
                "clip_guidance_scale > 0 needs clip_guide, the gradient of a noise-aware CLIP (NoisedClip.guide)"
            )
        model = classifier_guidance(model, diffusion, clip_guide, clip_guidance_scale)
    x = sample(
        sampler,
        model,
        diffusion,
        (B, config.out_channels, size, size),
        steps=steps,
        cond=cond,
        generator=generator,
        x_T=x_T,
        threshold=threshold,
        inpaint=replace,
        device=image_embed.device,
        callback=callback,
        prune=prune,
    )
    return x.clamp(-1, 1)


def augment_low_res(diffusion: GaussianDiffusion, low_res: Tensor, noise_level: Tensor, generator=None) -> Tensor:
    """Noise-conditioning augmentation (Imagen §2.5): the low-res image diffused to `noise_level`."""
    noise = torch.randn(low_res.shape, generator=generator, device=generator.device if generator else None)
    return diffusion.q_sample(low_res, noise_level, noise.to(low_res.device, low_res.dtype))


@torch.no_grad()
def sample_upsampler(
    upsampler: nn.Module,
    diffusion: GaussianDiffusion,
    low_res: Tensor,
    *,
    image_embed: Tensor | None = None,
    sampler: str = UPSAMPLER_DEFAULTS.sampler,
    steps: int = UPSAMPLER_DEFAULTS.steps,
    noise_level: int = UPSAMPLER_DEFAULTS.noise_level,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    inpaint: dict[str, Tensor] | None = None,
    callback=None,
) -> Tensor:
    """Low-res images -> high-res images in [-1, 1] (DALL·E 2's 64->256 and 256->1024 stages).

    The network is convolutional, so it samples at full size whatever crop size it was trained on.

    Args:
        low_res: (B, 3, h, w) in [-1, 1].
        noise_level: the augmentation timestep applied to low_res (a small value; 0 = clean).
        inpaint: {"image": (B, 3, H, W) the known image at the output size, "mask": (B, 1, H, W), 1 = repaint}:
            after every step the known region is replaced by the known image diffused to the step's noise level,
            and the result equals the known image there exactly (an edit keeps what it was told to keep).
    """
    config = upsampler.config
    B, C, h, w = low_res.shape
    scale = config.image_size // config.low_res_size
    level = torch.full((B,), int(noise_level), device=low_res.device, dtype=torch.long)
    cond: dict[str, Any] = {
        "low_res": augment_low_res(diffusion, low_res, level, generator) if noise_level else low_res
    }
    if config.noise_aug_embed:
        cond["noise_level"] = level
    if config.clip_dim:
        cond["image_embed"] = image_embed
    model = classifier_free_guidance(upsampler, guidance_scale)
    shape = (B, C, h * scale, w * scale)
    base, threshold = 0.0, "static"
    if config.residual:  # x_0 is the detail over the resized low-res image; keep base + x_0 in [-1, 1]
        base = upsampler.resize_low_res(low_res, shape[-2:])
        threshold = lambda x0: torch.maximum(torch.minimum(x0, 1 - base), -1 - base)  # noqa: E731
    replace = None
    if inpaint is not None:
        known, mask = inpaint["image"].to(low_res), inpaint["mask"].to(low_res)
        if known.shape != shape or mask.shape != (B, 1, *shape[-2:]):
            raise ValueError(
                f"inpaint needs an image of shape {shape} and a mask of shape {(B, 1, *shape[-2:])}, "
                f"got {tuple(known.shape)} and {tuple(mask.shape)}"
            )
        replace = (known - base, mask)  # in the sampler's space: the detail over the base when residual
    x = sample(
        sampler,
        model,
        diffusion,
        shape,
        steps=steps,
        cond=cond,
        generator=generator,
        threshold=threshold,
        inpaint=replace,
        device=low_res.device,
        callback=callback,
    )
    x = (base + x).clamp(-1, 1)
    if replace is not None:  # exactly the known pixels, not base + (known - base) rounded
        x = torch.where(mask > 0, x, known)
    return x
