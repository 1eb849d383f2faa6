"""The pieces of DALL·E 2's image manipulations (Ramesh et al. 2022, §3) that `UnCLIPPipeline` composes.

    slerp              spherical interpolation of embeddings and of DDIM latents (§3.2, §3.3)
    null_text          "no caption" for a text-conditioned decoder, keeping the image embedding
    invert_decoder     the decoder's DDIM latent x_T of an image: the bipartite latent (z_i, x_T) of §3.1
    ddim_decode        decode (z_i, x_T) with DDIM at a chosen eta: eta = 0 reconstructs, eta > 0 varies
    repaint_sample     training-free inpainting (Lugmayr et al. 2022, "RePaint", algorithm 1)
    prepare_mask       a user's mask (white = repaint) -> the decoder's (1, 1, s, s) {0, 1} mask
    Inversion          how an inverted latent is decoded (steps, refinements, eta, guidance)

They work on networks, diffusions and tensors; `UnCLIPPipeline`'s variations, inpaint and interpolate
(unclip.pipeline_edits) compose them with the pipeline's stages.

The decoder's conditioning for everything that starts from an image rather than a caption is the image's CLIP
embedding and the *null text*: the learned null token alone, which is exactly what the decoder saw for the
captions it dropped in training (`cond_drop_text`), while the image embedding stays in use. The UNet's
`cond_drop` would drop both. An empty caption "" is another choice (diffusers' UnCLIPImageVariationPipeline
encodes ""), but its start/end tokens are a caption the decoder never saw in training.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from unclip.clip import TextEmbedding
from unclip.data.images import to_rgb
from unclip.diffusion import GaussianDiffusion, classifier_free_guidance, ddim_invert, ddim_sample, respace_timesteps
from unclip.diffusion.samplers import denoise, randn
from unclip.imageio import center_square, open_image
from unclip.sampling import DecoderSettings, check_count, check_scale, decoder_cond

INVERSION_STEPS = 50
# The timesteps of inversion and of decoding an inverted latent. Not "trailing" (the samplers' default), which
# visits t = T-1: there the cosine schedule's clipped last β leaves ᾱ ≈ 2e-9, so the x_0 that an unthresholded
# DDIM step (which the round trip needs) reads from x_T is the network's eps error divided by sqrt(ᾱ) ≈ 5e-5.
# "leading" stops at T - T/steps (ᾱ ≈ 9e-4 at 50 steps), as guided-diffusion's "ddim50" does. On the random
# tiny test decoder, 10 steps with refine 3 reconstruct to an MSE of 0.05 with "leading" and blow up (1e7)
# with "trailing".
INVERSION_SPACING = "leading"
# Fixed-point refinements per inversion step: ddim_invert measures 5x smaller round-trip errors with 3 than
# with 0 on its Gaussian test problem, for 4x the inversion's network evaluations.
INVERSION_REFINE = 3
# DDIM eta of variations from an inverted latent. The paper (§3.1) gives only the range: eta = 0 reconstructs
# the input; larger eta injects fresh noise at every step, and eta = 1 is ancestral (DDPM) sampling, which
# forgets most of x_T. 0.5 draws a quarter of the DDPM noise variance per step: the layout carried by x_T
# survives, the details change. Not tuned on a trained model.
VARIATION_ETA = 0.5
# Decodings per variation, the one whose CLIP image embedding is closest to the source's kept. On the shapes
# model's variations eval (models/shapes/MODEL_CARD.md) 4 took single objects from 84% to 97% and two related
# objects from 35% to 69%, for about twice the time of one decoding (the inversion is shared).
VARIATION_CANDIDATES = 4
REPAINT_RESAMPLE = 4  # RePaint's r - 1: jumps back up per step (Lugmayr et al. use 9 at 250 steps)


def slerp(a: Tensor, b: Tensor, t: float) -> Tensor:
    """Spherical interpolation between a and b along the great circle of their directions, per row.

    The norms are interpolated as the formula implies (unit vectors stay unit vectors). Exact at t = 0 and 1;
    linear interpolation where a and b are (nearly) parallel.

    Args:
        a, b: (B, ...) tensors of the same shape; each row is flattened into one vector.
        t: 0 gives a, 1 gives b.
    """
    if a.shape != b.shape:
        raise ValueError(f"slerp needs tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    fa, fb = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    cos = (F.normalize(fa, dim=-1) * F.normalize(fb, dim=-1)).sum(-1, keepdim=True).clamp(-1, 1)
    omega = torch.arccos(cos)
    sin = torch.sin(omega)
    parallel = sin.abs() < 1e-6
    wa = torch.where(parallel, 1.0 - t, torch.sin((1.0 - t) * omega) / sin.where(~parallel, 1.0))
    wb = torch.where(parallel, torch.full_like(sin, t), torch.sin(t * omega) / sin.where(~parallel, 1.0))
    return (wa * fa + wb * fb).reshape(a.shape).to(a.dtype)


def null_text(B: int, decoder: nn.Module, device) -> TextEmbedding:
    """No caption, for B rows: one masked-out token, so the decoder reads only its learned null text token
    (the text it was trained with when the caption was dropped); `embed` is None (there is no text)."""
    tokens = torch.zeros(B, 1, decoder.config.text_width or 1, device=device)
    return TextEmbedding(None, tokens, torch.zeros(B, 1, dtype=torch.bool, device=device), tokens)


def invert_decoder(
    decoder: nn.Module,
    diffusion: GaussianDiffusion,
    images: Tensor,
    image_embed: Tensor,
    text: TextEmbedding,
    *,
    steps: int = INVERSION_STEPS,
    refine: int = INVERSION_REFINE,
) -> Tensor:
    """The decoder's DDIM latent x_T of `images` (DALL·E 2 §3.1): DDIM inversion of the conditional model.

    Inversion uses guidance scale 1, the conditional model itself: DDIM inversion assumes the ODE's drift
    changes little between neighbouring steps, and guidance scales >1 amplify its errors (Mokady et al.
    2022, §3). `ddim_decode(..., eta=0)` with the same conditioning, steps and guidance 1 reconstructs `images`.

    Args:
        images: (B, 3, s, s) in [-1, 1] at the decoder's size s.
        image_embed: (B, D) L2-normalised CLIP image embeddings.
        text: the caption encodings, or `null_text` for none.

    Returns:
        x_T, (B, 3, s, s).
    """
    cond = decoder_cond(image_embed, text.tokens, text.mask, decoder.config, text_words=text.words)
    return ddim_invert(
        decoder, diffusion, images.float(), steps=steps, cond=cond, refine=refine, spacing=INVERSION_SPACING
    )


def ddim_decode(
    decoder: nn.Module,
    diffusion: GaussianDiffusion,
    image_embed: Tensor,
    text: TextEmbedding,
    x_T: Tensor,
    *,
    steps: int = INVERSION_STEPS,
    eta: float = 0.0,
    guidance_scale: float = 1.0,
    generator: torch.Generator | None = None,
    spacing: str = INVERSION_SPACING,
) -> Tensor:
    """Decode the bipartite latent (z_i, x_T) with DDIM (Song et al. 2021, eq. 12).

    Without x_0 thresholding, unlike `sample_decoder`: the inversion does not threshold either, and at eta 0
    the two must follow the same ODE for x_T to decode back to its image.

    Returns:
        (B, 3, s, s) images in [-1, 1].
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    cond = decoder_cond(image_embed, text.tokens, text.mask, decoder.config, text_words=text.words)
    model = classifier_free_guidance(decoder, guidance_scale)
    x = ddim_sample(
        model, diffusion, x_T.shape, steps=steps, eta=eta, cond=cond, generator=generator, x_T=x_T, spacing=spacing
    )
    return x.clamp(-1, 1)


@dataclasses.dataclass(frozen=True)
class Inversion:
    """How an inverted latent is decoded: DDIM on the inversion's own timesteps (at eta 0, any other sampler or
    step count leaves the path back to the image), at `eta`, with the decoder's guidance scale."""

    steps: int = INVERSION_STEPS
    refine: int = INVERSION_REFINE
    eta: float = VARIATION_ETA
    guidance_scale: float = 1.0

    def __post_init__(self):
        check_count("inversion steps", self.steps)
        check_count("refine", self.refine, 0)
        check_scale("eta", self.eta)
        check_scale("decoder.guidance_scale", self.guidance_scale)

    def metadata(self) -> dict[str, Any]:
        inversion = {"steps": self.steps, "refine": self.refine, "guidance_scale": 1.0, "text": "null"}
        return {
            "sampler": "ddim",
            "steps": self.steps,
            "spacing": INVERSION_SPACING,
            "eta": self.eta,
            "guidance_scale": self.guidance_scale,
            "threshold": None,
            "inversion": inversion,
        }


def inversion_settings(decoder: dict[str, Any] | None, *, steps: int, eta: float, refine: int) -> Inversion:
    """The `Inversion` for decoder overrides `decoder`, of which only the guidance scale may be set."""
    given = {k: v for k, v in (decoder or {}).items() if v is not None}
    extra = sorted(set(given) - {"guidance_scale"})
    if extra:
        raise ValueError(
            f"an inverted latent is decoded with DDIM on the inversion's timesteps, so decoder {extra} cannot be "
            "set: set inversion_steps, or decode fresh noise (invert=False)"
        )
    return Inversion(steps, refine, eta, given.get("guidance_scale", 1.0))


@torch.no_grad()
def repaint_sample(
    model,
    diffusion: GaussianDiffusion,
    known: Tensor,
    mask: Tensor,
    *,
    steps: int,
    resample: int = REPAINT_RESAMPLE,
    cond: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    threshold: str | None = "dynamic",
) -> Tensor:
    """RePaint (Lugmayr et al. 2022, algorithm 1) on `steps` respaced timesteps, with an unconditioned-on-mask
    denoiser: the known region is the image diffused to each noise level, the unknown region the model's step.

    At every step t -> t' (ᾱ_t < ᾱ_t'), `resample` + 1 times:
        1. x_t' (unknown) = an ancestral step: DDIM eq. 12 with eta = 1, i.e. the posterior q(x_t' | x_t, x_0)
           with variance β̃ (Ho et al. eq. 7) on the respaced β' = 1 - ᾱ_t/ᾱ_t'
        2. x_t' (known)   = sqrt(ᾱ_t')·known + sqrt(1-ᾱ_t')·z
        3. x_t' = mask·unknown + (1-mask)·known
        4. except the last time: jump back up, x_t = sqrt(1-β')·x_t' + sqrt(β')·z, so that the next pass
           harmonises the two regions again
    The last step lands on ᾱ = 1, where the known region is `known` exactly; it is not resampled.

    Args:
        model: denoiser model(x_t, t, **cond) (classifier-free guidance already applied).
        known: (B, C, H, W) image in [-1, 1]; mask: (B, 1, H, W), 1 = repaint.
        resample: jumps back per step (RePaint's U - 1); 0 is plain replacement inpainting.

    Returns:
        (B, C, H, W) in [-1, 1], equal to `known` where mask is 0.
    """
    if resample < 0:
        raise ValueError(f"resample must be >= 0, got {resample}")
    timesteps = respace_timesteps(diffusion.num_timesteps, steps, diffusion.spacing)
    alpha_bars = [float(diffusion.alphas_cumprod[t]) for t in timesteps] + [1.0]

    def noise():
        return randn(known.shape, generator=generator, device=known.device, dtype=known.dtype)

    x = noise()
    for i, t in enumerate(timesteps):
        a, a_prev = alpha_bars[i], alpha_bars[i + 1]
        sigma = math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
        for u in range(resample + 1 if a_prev < 1 else 1):
            x0, eps, _ = denoise(model, diffusion, x, t, cond, threshold)
            unknown = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
            if sigma > 0:
                unknown = unknown + sigma * noise()
            known_prev = known if a_prev >= 1 else math.sqrt(a_prev) * known + math.sqrt(1 - a_prev) * noise()
            x_prev = mask * unknown + (1 - mask) * known_prev
            if u < resample and a_prev < 1:
                x = math.sqrt(a / a_prev) * x_prev + math.sqrt(1 - a / a_prev) * noise()
        x = x_prev
    return mask * x.clamp(-1, 1) + (1 - mask) * known


def repaint_decode(
    decoder: nn.Module,
    diffusion: GaussianDiffusion,
    image_embed: Tensor,
    text: TextEmbedding,
    known: Tensor,
    mask: Tensor,
    *,
    settings: DecoderSettings,
    resample: int = REPAINT_RESAMPLE,
    generator: torch.Generator | None = None,
) -> Tensor:
    """`repaint_sample` with a plain (not inpainting) decoder under classifier-free guidance, at the settings'
    steps and guidance scales (RePaint is its own ancestral sampler: `settings.sampler` is not used)."""
    cond = decoder_cond(image_embed, text.tokens, text.mask, decoder.config, text_words=text.words)
    model = classifier_free_guidance(decoder, settings.guidance_scale, settings.text_guidance_scale)
    return repaint_sample(
        model, diffusion, known, mask, steps=settings.steps, resample=resample, cond=cond, generator=generator
    )


def prepare_mask(mask: Image.Image | str | Path, image_size: tuple[int, int], size: int) -> Tensor:
    """A user's mask (white = repaint, black = keep) -> (1, 1, size, size) float {0, 1}, 1 = repaint.

    Policy:
        - a mask of another size than the image but the same aspect ratio (within a pixel) is resized to the
          image's size (nearest) with a warning; another aspect ratio is an error, as it cannot be aligned;
        - the mask's luminance is thresholded at 50% (>= 128 repaints), with a warning that counts the
          pixels that were neither 0 nor 255 (greyscale or antialiased masks);
        - an all-black mask (nothing to repaint) is an error;
        - the mask then gets the image's centre-square crop and is reduced to `size`: a decoder pixel is
          repainted when any mask pixel it covers is (never keeping a pixel the user asked to repaint).

    Args:
        mask: a PIL image or an image file.
        image_size: (width, height) of the image the mask belongs to.
    """
    name = str(mask) if isinstance(mask, (str, Path)) else "mask"
    mask = open_image(mask) if isinstance(mask, (str, Path)) else mask
    (mw, mh), (iw, ih) = mask.size, image_size
    if (mw, mh) != (iw, ih):
        if abs(mw * ih - mh * iw) > max(mw, iw):
            raise ValueError(
                f"{name} is {mw}x{mh} but the image is {iw}x{ih}: their aspect ratios differ, so the mask cannot "
                "be aligned with the image. Draw the mask at the image's size"
            )
        warnings.warn(
            f"{name} is {mw}x{mh} but the image is {iw}x{ih}: resized the mask to the image (nearest)", stacklevel=3
        )
        mask = mask.resize((iw, ih), Image.Resampling.NEAREST)
    values = np.asarray(mask.convert("L"))
    grey = int(((values != 0) & (values != 255)).sum())
    if grey:
        warnings.warn(
            f"{name} has {grey} of {values.size} pixels that are neither black (0) nor white (255), e.g. "
            "antialiased edges: thresholded at 50% (>= 128 is repainted)",
            stacklevel=3,
        )
    binary = values >= 128
    if not binary.any():
        raise ValueError(f"{name} is all black: there is nothing to repaint. Paint the region to change white")
    square = np.asarray(center_square(Image.fromarray(binary)), dtype=np.float32)
    return F.adaptive_max_pool2d(torch.from_numpy(square)[None, None], size)


def open_source(image: Image.Image | str | Path) -> tuple[Image.Image, str]:
    """(RGB image, name for the metadata) from a PIL image or an image file."""
    if isinstance(image, (str, Path)):
        return open_image(image), str(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image or an image file path, got {type(image).__name__}")
    return to_rgb(image), getattr(image, "filename", "") or "<image>"


def use_inpaint_model(method: str, has_model: bool) -> bool:
    """Whether `method` ("auto", "model" or "repaint") inpaints with the trained inpainting decoder."""
    if method not in ("auto", "model", "repaint"):
        raise ValueError(f"unknown inpainting method {method!r}; valid: ['auto', 'model', 'repaint']")
    if method == "model" and not has_model:
        raise ValueError("this pipeline has no inpainting decoder (no 'inpaint' in pipeline.json); use repaint")
    return has_model and method != "repaint"


def interpolation_mode(image2, prompt, from_caption, to_caption, steps: int) -> str:
    """The interpolation's target: "images" (image2), "prompt" (a prior embedding) or "text_diff" (§3.3)."""
    modes = {"images": image2 is not None, "prompt": prompt is not None}
    modes["text_diff"] = from_caption is not None or to_caption is not None
    if sum(modes.values()) != 1:
        raise ValueError(
            "interpolate needs exactly one target: image2 (a second image), prompt (a caption, through the "
            "prior), or from_caption and to_caption (a text diff)"
        )
    if modes["text_diff"] and (from_caption is None or to_caption is None):
        raise ValueError("a text diff needs both from_caption (describing the image) and to_caption")
    for text in (prompt, from_caption, to_caption):
        if text is not None and not text.strip():
            raise ValueError(f"empty prompt {text!r}: give a caption, e.g. 'a red circle'")
    if not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps (the number of frames) must be an integer >= 2, got {steps!r}")
    return next(mode for mode, given in modes.items() if given)
