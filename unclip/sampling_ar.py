"""Sampling the autoregressive prior (unclip/nets/ar_prior.py): its settings, and code-by-code sampling with
temperature, nucleus (top-p) truncation and classifier-free guidance.

    image_embed = sample_ar_prior(prior, text, tokens, mask, temperature=1.0, top_p=0.9, guidance_scale=2.0)

The pipeline calls it in place of `unclip.sampling.sample_prior` when its prior folder holds an `ARPrior`; its
settings (`ARPriorSettings`) then replace `PriorSettings` as the prior stage's defaults and overrides.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from unclip.diffusion.samplers import Generators
from unclip.nets.ar_prior import ARPrior
from unclip.sampling import (
    SettingError,
    StageSettings,
    check_count,
    check_scale,
    closest_to_text,
    repeat_cond,
    text_cond,
)


@dataclasses.dataclass(frozen=True)
class ARPriorSettings(StageSettings):
    """The autoregressive prior's sampling: `candidates` embeddings per prompt, keeping the one closest to the
    text. temperature 0 takes the most likely code at each step; top_p 1 samples from every code."""

    guidance_scale: float = 2.0
    temperature: float = 1.0
    top_p: float = 1.0
    candidates: int = 2

    def check(self) -> None:  # no sampler and no steps: one step per code
        check_scale("guidance_scale", self.guidance_scale)
        check_scale("temperature", self.temperature)
        top_p = self.top_p
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not (0 < top_p <= 1):
            raise SettingError("top_p", f"must be a number in (0, 1], got {top_p!r}")
        check_count("candidates", self.candidates)


AR_PRIOR_DEFAULTS = ARPriorSettings()


def is_autoregressive(prior) -> bool:
    return isinstance(prior, ARPrior)


def guide(logits: Tensor, guidance_scale: float) -> Tensor:
    """Log-probabilities of the next code, (B, buckets), from the logits of the conditional rows (B, buckets) at
    guidance 1, else of the conditional rows followed by the unconditional ones (2B, buckets):
    log p_u + s·(log p_c - log p_u), renormalised (s = 0 is the unconditional model)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    if guidance_scale == 1.0:
        return logp
    cond_logp, uncond_logp = logp.chunk(2)
    return F.log_softmax(uncond_logp + guidance_scale * (cond_logp - uncond_logp), dim=-1)


def nucleus(logp: Tensor, temperature: float, top_p: float) -> Tensor:
    """(B, N) log-probabilities -> (B, N) sampling probabilities at `temperature`, truncated to the smallest set of
    codes whose probability reaches `top_p` (the most likely code is always kept)."""
    if temperature == 0:
        return F.one_hot(logp.argmax(-1), logp.shape[-1]).float()
    probs = F.softmax(logp / temperature, dim=-1)
    if top_p >= 1:
        return probs
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # the mass of the more likely codes
    keep_sorted = before < top_p
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    probs = probs * keep
    return probs / probs.sum(-1, keepdim=True)


def uniforms(n: int, generator: Generators, device) -> Tensor:
    """n uniforms in [0, 1); with k generators, n/k consecutive ones from each (as `randn` splits its rows)."""
    if isinstance(generator, Sequence):
        k = len(generator)
        if k == 0 or n % k:
            raise ValueError(f"{k} generators cannot split a batch of {n} rows into equal blocks")
        return torch.cat([torch.rand(n // k, generator=g) for g in generator]).to(device)
    return torch.rand(n, generator=generator).to(device)


def draw(probs: Tensor, u: Tensor) -> Tensor:
    """One code per row by inverse-CDF sampling with the row's uniform: (B, N), (B,) -> (B,)."""
    cdf = probs.cumsum(-1)
    index = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1).contiguous(), right=True).squeeze(-1)
    return index.clamp_max(probs.shape[-1] - 1)


@torch.no_grad()
def sample_ar_prior(
    prior: ARPrior,
    text_embed: Tensor,
    text_tokens: Tensor | None = None,
    text_mask: Tensor | None = None,
    *,
    guidance_scale: float = AR_PRIOR_DEFAULTS.guidance_scale,
    temperature: float = AR_PRIOR_DEFAULTS.temperature,
    top_p: float = AR_PRIOR_DEFAULTS.top_p,
    candidates: int = 1,
    generator: Generators = None,
    callback=None,
) -> Tensor:
    """CLIP text embeddings -> CLIP image embeddings, code by code (DALL·E 2 §2.1, the autoregressive prior).

    Args:
        prior: an ARPrior with its PCA fitted.
        text_embed: (B, D) L2-normalised pooled text embeddings.
        candidates: draw this many embeddings per prompt and keep the one with the highest cosine similarity to
            the text embedding.
        generator: one for the batch, or one per prompt (that prompt's candidates draw from it, so its embedding
            does not depend on the batch).

    Returns:
        (B, D) L2-normalised image embeddings.
    """
    prior.require_codes()
    ARPriorSettings(guidance_scale=guidance_scale, temperature=temperature, top_p=top_p, candidates=candidates)
    B, D = text_embed.shape
    K = prior.config.pca_dims
    cond = repeat_cond(text_cond(text_embed, text_tokens, text_mask), candidates)
    device = text_embed.device
    rows = B * candidates
    guided = guidance_scale != 1.0  # then the rows are read twice, with the text and without
    if guided:
        cond = {k: torch.cat([v, v]) if isinstance(v, Tensor) else v for k, v in cond.items()}
        cond["cond_drop"] = torch.arange(2 * rows, device=device) >= rows
    logits, cache = prior.start(**cond)
    codes = []
    for i in range(K):
        if i:
            logits = prior.extend(torch.cat([codes[-1], codes[-1]]) if guided else codes[-1], cache)
        probs = nucleus(guide(logits, guidance_scale), temperature, top_p)
        codes.append(draw(probs, uniforms(rows, generator, device)))
        if callback is not None:
            callback({"i": i, "steps": K})
    codes = torch.stack(codes, dim=1)
    return closest_to_text(prior.decode(codes).to(text_embed.dtype).view(B, candidates, D), text_embed)
