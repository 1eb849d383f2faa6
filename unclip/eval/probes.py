"""Probes of what a CLIP and a decoder read from a caption: how they respond to captions of `shapes` scenes
that are wrong in one thing (`CORRUPTIONS`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from unclip.data.shapes import render_scene
from unclip.eval.metrics import embed_images, embed_prompts, input_size
from unclip.eval.shapes_checker import mismatched_captions
from unclip.imageio import from_pil
from unclip.sampling import decoder_cond


def probe_clip(clip, n: int = 300, seed: int = 0, *, batch_size: int = 64) -> dict:
    """Which differences between captions a CLIP can see: for exact renders of `n` val scenes, how often the
    scene's caption scores higher than a caption wrong in one thing (`CORRUPTIONS`: a colour, a shape, a
    size, the count, the relation, the two objects swapped, their colours swapped, another scene's caption).

    A CLIP that cannot tell "A above B" from "A below B" on exact renders gives its image embeddings no reason
    to hold the relation, and a prior trained on them no way to produce it: such a difference must reach the
    decoder through the caption itself. 50% is chance.

    Returns:
        {"n", "n_mismatched", "preferred": float, "preferred_by_kind": {kind: float}}; JSON-serialisable.
    """
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    scenes, mismatches = mismatched_captions(n, seed)
    size = input_size(clip)
    with torch.no_grad():
        images = embed_images(clip, [render_scene(scene, size) for scene, _ in scenes], batch_size=batch_size)
        right = (images * embed_prompts(clip, [caption for _, caption in scenes])).sum(-1)
        wrong = (images[[i for i, _, _ in mismatches]] * embed_prompts(clip, [w for _, _, w in mismatches])).sum(-1)
    preferred = (right[[i for i, _, _ in mismatches]] > wrong).float()
    return {
        "n": n,
        "n_mismatched": len(mismatches),
        "preferred": preferred.mean().item(),
        "preferred_by_kind": _mean_by_kind(preferred, [kind for _, kind, _ in mismatches]),
    }


@torch.no_grad()
def probe_decoder_caption(
    pipe,
    n: int = 100,
    seed: int = 0,
    timesteps: Sequence[int] = (999, 800, 600),
    *,
    text_only: bool = False,
    batch_size: int = 128,
) -> dict:
    """What a pipeline's decoder reads from its caption: for `n` val scenes and each caption wrong in one thing
    (`CORRUPTIONS`), how far the decoder's prediction of the clean image moves when the wrong caption replaces
    the right one.

    The decoder gets the CLIP image embedding of an exact render of the scene either way, and that render
    noised to timestep t with noise fixed per scene (at t = T-1 nearly pure noise: the layout is still open);
    it runs unguided. With `text_only` the image embedding is replaced by the decoder's null embedding (what
    it learned with the embedding dropped), so only the caption conditions it. A decoder that places objects
    as its caption says moves its prediction when the relation is flipped as it does when a colour is
    changed. The change is the root-mean-square difference per pixel value (images in [-1, 1]).

    Returns:
        {"n", "n_mismatched", "timesteps", "text_only", "prediction_change": {str(t): {kind: float}}};
        JSON-serialisable.
    """
    if n < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    stage = pipe.decoder
    model, diffusion, config = stage.model, stage.diffusion, stage.model.config
    if not config.text_width:
        raise ValueError("this pipeline's decoder is not conditioned on text (model.text_width is unset)")
    bad = [t for t in timesteps if not 0 <= t < diffusion.num_timesteps]
    if bad:
        raise ValueError(f"timesteps must be in [0, {diffusion.num_timesteps - 1}], got {bad}")
    scenes, mismatches = mismatched_captions(n, seed)
    index = [i for i, _, _ in mismatches]
    size = input_size(pipe.clip)
    embeds = embed_images(pipe.clip, [render_scene(scene, size) for scene, _ in scenes], batch_size=batch_size)
    embeds = embeds.to(pipe.device)
    renders = torch.stack([from_pil(render_scene(scene, config.image_size)) for scene, _ in scenes])
    noise = torch.randn(renders.shape, generator=torch.Generator().manual_seed(seed))
    right = pipe.encode_text([scenes[i][1] for i in index])
    wrong = pipe.encode_text([w for _, _, w in mismatches])
    kinds = [kind for _, kind, _ in mismatches]

    def predict_x0(rows: slice, text, t: int) -> Tensor:
        i = index[rows]
        tt = torch.full((len(i),), t, device=pipe.device)
        x_t = diffusion.q_sample(renders[i].to(pipe.device), tt, noise[i].to(pipe.device))
        cond = decoder_cond(embeds[i], text.tokens[rows], text.mask[rows], config, text_words=text.words[rows])
        drop = torch.tensor([[text_only, False]], device=pipe.device).expand(len(i), 2)  # (image, text)
        with pipe.autocast():
            out = model(x_t, tt, **cond, cond_drop=drop).float()
        return diffusion.predict_x0(x_t, tt, diffusion.split_output(out, x_t)[0])

    change = {}
    for t in timesteps:
        rms = []
        for start in range(0, len(index), batch_size):
            rows = slice(start, start + batch_size)
            delta = predict_x0(rows, right, int(t)) - predict_x0(rows, wrong, int(t))
            rms.append(delta.pow(2).flatten(1).mean(1).sqrt().cpu())
        change[str(t)] = _mean_by_kind(torch.cat(rms), kinds)
    return {
        "n": n,
        "n_mismatched": len(mismatches),
        "timesteps": [int(t) for t in timesteps],
        "text_only": text_only,
        "prediction_change": change,
    }


def _mean_by_kind(values: Tensor, kinds: Sequence[str]) -> dict[str, float]:
    by_kind: dict[str, list[float]] = {}
    for kind, value in zip(kinds, values.tolist(), strict=True):
        by_kind.setdefault(kind, []).append(value)
    return {kind: sum(v) / len(v) for kind, v in by_kind.items()}
