"""Sampling one stage of the cascade: the functions the pipeline and the training tasks share.

    image_embed = sample_prior(prior, diffusion, text, guidance_scale=2.0, candidates=2)
    images = sample_decoder(decoder, diffusion, image_embed, text, guidance_scale=5.0)

Each function runs classifier-free guidance, a named sampler from unclip.diffusion and the stage's own pre-
and post-processing (the prior's embedding normalisation, the decoder's clipping of x_0 to [-1, 1]).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from unclip.diffusion import GaussianDiffusion, classifier_free_guidance, sample

PRIOR_DEFAULTS = {"sampler": "dpm++", "steps": 25, "guidance_scale": 2.0}


def text_cond(text_embed: Tensor, text_tokens: Tensor | None, text_mask: Tensor | None) -> dict[str, Any]:
    cond = {"text_embed": text_embed}
    if text_tokens is not None:
        cond.update(text_tokens=text_tokens, text_mask=text_mask)
    return cond


def _repeat(cond: dict[str, Any], n: int) -> dict[str, Any]:
    return {k: v.repeat_interleave(n, dim=0) if isinstance(v, Tensor) else v for k, v in cond.items()}


@torch.no_grad()
def sample_prior(
    prior: nn.Module,
    diffusion: GaussianDiffusion,
    text_embed: Tensor,
    text_tokens: Tensor | None = None,
    text_mask: Tensor | None = None,
    *,
    sampler: str = PRIOR_DEFAULTS["sampler"],
    steps: int = PRIOR_DEFAULTS["steps"],
    guidance_scale: float = PRIOR_DEFAULTS["guidance_scale"],
    candidates: int = 1,
    generator: torch.Generator | None = None,
    callback=None,
) -> Tensor:
    """CLIP text embeddings -> CLIP image embeddings (DALL·E 2 §2.1).

    Args:
        prior: a PriorTransformer with its normalisation statistics set.
        text_embed: (B, D) L2-normalised pooled text embeddings.
        candidates: draw this many embeddings per prompt and keep the one with the highest cosine
            similarity to the text embedding (the paper draws 2).

    Returns:
        (B, D) L2-normalised image embeddings.
    """
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    B, D = text_embed.shape
    cond = _repeat(text_cond(text_embed, text_tokens, text_mask), candidates)
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
        callback=callback,
    )
    image_embed = F.normalize(prior.denormalize(x), dim=-1).view(B, candidates, D)
    if candidates == 1:
        return image_embed[:, 0]
    scores = (image_embed * F.normalize(text_embed, dim=-1)[:, None]).sum(-1)  # (B, candidates)
    return image_embed[torch.arange(B, device=device), scores.argmax(dim=1)]
