"""Images for the suites from a pipeline, in batches, with the seeds one pipeline call gives them."""

from __future__ import annotations

import random
from collections.abc import Container, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from unclip.eval.metrics import input_size
from unclip.eval.shapes_checker import render_prompt


def default_candidates(pipe) -> int:
    """The reranking a pipeline's call makes by default: its `candidates` (1 for a pipeline without one)."""
    return getattr(pipe, "candidates", 1)


def resolve_candidates(pipe, candidates: int | None) -> int:
    """`candidates`, or the pipeline's default when None; a ValueError when it is below 1."""
    candidates = default_candidates(pipe) if candidates is None else candidates
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    return candidates


class Generated(NamedTuple):
    """A batch of generated images; with reranking, every candidate and its score by the pipeline's CLIP."""

    images: Tensor  # (b, 3, size, size) in [-1, 1]
    candidate_images: Tensor | None = None  # (b, candidates, 3, s, s) at the decoder's size
    candidate_scores: Tensor | None = None  # (b, candidates)
    start: int = 0  # index of the batch's first prompt


def generate(
    pipe,
    prompts: list[str],
    *,
    size: int,
    seed: int,
    use_prior: bool,
    batch_size: int,
    prior: dict | None = None,
    decoder: dict | None = None,
    progress: bool = False,
    desc: str = "generating",
    image_embeds: Tensor | None = None,
    candidates: int | None = None,
    skip: Container[int] = (),
) -> Iterator[Generated]:
    """Images for `prompts` from `pipe.batches`, yielded `batch_size` prompts at a time as (b, 3, size, size) in
    [-1, 1] (with the candidates, where the pipeline returns them), each with the seed that one call
    `pipe(prompts, seed=seed, ...)` gives it. `prior` and `decoder` override the pipeline's sampler settings
    ({"sampler", "steps", "guidance_scale"}), as in its call; `image_embeds` (one per prompt) are decoded instead
    of the prior's; `candidates` > 1 keeps the best of that many images by the pipeline's CLIP (its reranking;
    default the pipeline's). Batches whose first index is in `skip` are not made (a resumed run)."""
    starts = range(0, len(prompts), batch_size)
    skip = frozenset(start for start in starts if start in skip)
    bar = tqdm(desc=desc, unit="batch", total=len(starts), initial=len(skip), disable=not progress)
    call = dict(size=size, seed=seed, candidates=candidates, use_prior=use_prior, prior=prior, decoder=decoder)
    for start, out in pipe.batches(prompts, batch_size=batch_size, skip=skip, image_embeds=image_embeds, **call):
        candidates_out = getattr(out, "candidate_images", None)
        scores = getattr(out, "candidate_scores", None)
        bar.update()
        yield Generated(
            out.images.float(),
            None if candidates_out is None else candidates_out.float().cpu(),
            None if scores is None else scores.float().cpu(),
            start,
        )
    bar.close()


def oracle_image_embeds(clip, prompts: Sequence[str], *, seed: int, batch_size: int = 64) -> Tensor:
    """(B, D) normalised CLIP image embeddings of exact renders of shapes prompts (scene i drawn by
    random.Random(f"oracle/{seed}/{i}")), at the CLIP's input size: what a perfect prior would sample."""
    size = input_size(clip)
    renders = [render_prompt(p, size, random.Random(f"oracle/{seed}/{i}")) for i, p in enumerate(prompts)]
    return clip_image_embeds(clip, renders, batch_size=batch_size)


def clip_image_embeds(clip, images, *, batch_size: int = 64) -> Tensor:
    """(B, D) normalised float CLIP image embeddings of `images` (a (B, 3, H, W) tensor or a list of PIL images),
    `batch_size` at a time."""
    with torch.no_grad():
        return torch.cat(
            [clip.embed_image(images[i : i + batch_size], normalize=True) for i in range(0, len(images), batch_size)]
        ).float()
