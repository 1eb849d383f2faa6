"""Does the prior matter? DALL·E 2's ablation (§5.1), measured as retrieval among held-out images.

For N held-out (caption, image) pairs, the prior's image embedding for each caption should find the caption's
own image among the N images more often than the raw text embedding does (a diffusion or an autoregressive prior):

    python -m unclip.eval prior --prior runs/prior-shapes/export --clip models/shapes/clip --n 100

Reports top-1 retrieval with the prior and with the raw text embedding, and the paper's cosine metrics. On
`shapes`, `--shapes-reference` adds what an exact sample of p(image | caption) achieves (`shapes_reference`):
a prior can at best reproduce such samples, so this is the bar its retrieval is measured against.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from unclip.checkpoint import load_model
from unclip.clip import ClipAdapter
from unclip.config import DataConfig
from unclip.data import build_dataset, collate
from unclip.data.embeddings import encode_batch
from unclip.data.shapes import parse_caption, render_scene, sample_scene_for
from unclip.diffusion import GaussianDiffusion
from unclip.eval.metrics import prior_metrics
from unclip.sampling import sample_prior
from unclip.sampling_ar import is_autoregressive, sample_ar_prior


@torch.no_grad()
def evaluate_prior(
    prior_dir: str | Path,
    clip: ClipAdapter,
    data: DataConfig,
    *,
    n: int = 100,
    offset: int = 0,
    seed: int = 0,
    **sampling,
) -> dict[str, float]:
    """Prior vs raw-text retrieval of the true image among `n` held-out images (the val split of `data`).

    Returns:
        prior_metrics(...) for the n pairs: retrieval_top1 (prior), text_retrieval_top1 (no prior),
        cos_image, cos_text, cos_unrelated_text, cos_text_image.
    """
    loaded = load_model(prior_dir, device=clip.device)
    prior, diffusion = loaded.model, GaussianDiffusion.from_config(loaded.diffusion)
    if data.dataset == "shapes":  # procedural: a larger val split is still disjoint from training
        data = DataConfig(**{**data.__dict__, "val_size": max(offset + n, data.val_size)})
    elif offset + n > data.val_size:  # elsewhere the val split grows into what the prior was trained on
        raise ValueError(f"--n {n} is more than the {data.val_size} held-out pairs the prior was trained without")
    val = build_dataset(data, split="val")
    if len(val) < offset + n:
        raise ValueError(f"the held-out split has {len(val)} pairs, fewer than --n {n} (from {offset})")
    batch = next(iter(DataLoader(Subset(val, range(offset, offset + n)), batch_size=n, collate_fn=collate)))
    c = encode_batch(clip, batch, clip.device)
    tokens = (c["text_tokens"], c["text_mask"]) if prior.config.text_width else (None, None)
    generator = torch.Generator().manual_seed(seed)
    if is_autoregressive(prior):
        predicted = sample_ar_prior(prior, c["text_embed"], *tokens, generator=generator, **sampling)
    else:
        predicted = sample_prior(prior, diffusion, c["text_embed"], *tokens, generator=generator, **sampling)
    return {"n": n, **prior_metrics(predicted, c["text_embed"], c["image_embed"])}


@torch.no_grad()
def shapes_reference(
    prior_dir: str | Path,
    clip: ClipAdapter,
    *,
    n: int = 100,
    groups: int = 1,
    image_size: int = 64,
    size_word_prob: float = 0.5,
    seed: int = 0,
    **sampling,
) -> dict[str, float]:
    """The prior ablation on rendered held-out shapes scenes, next to an exact posterior sample.

    For each held-out caption, a second scene is drawn from p(scene | caption) (`sample_scene_for`: the
    caption's objects placed anew, the sizes it leaves out redrawn) and rendered; its CLIP image embedding is
    what a perfect prior would produce. All three queries retrieve among the same n true images. With `groups`
    > 1 this is repeated on that many disjoint sets of n scenes and averaged, with the standard error of each
    retrieval rate over the groups (`*_se`). `size_word_prob` is the chance that a caption states an object's
    size (0.5 in training; at 1 every caption fixes everything but the positions).

    Returns:
        evaluate_prior's metrics, plus posterior_retrieval_top1 and posterior_cos_image (the exact sample's
        retrieval and cosine to the true image embedding), averaged over the groups.
    """
    data = DataConfig(
        dataset="shapes", image_size=image_size, val_size=n * groups, options={"size_word_prob": size_word_prob}
    )
    val = build_dataset(data, split="val")
    rng = random.Random(f"posterior/{seed}")
    rows = []
    for g in range(groups):
        row = evaluate_prior(prior_dir, clip, data, n=n, offset=g * n, seed=seed + g, **sampling)
        batch = next(iter(DataLoader(Subset(val, range(g * n, (g + 1) * n)), batch_size=n, collate_fn=collate)))
        true = F.normalize(encode_batch(clip, batch, clip.device)["image_embed"].float(), dim=-1)
        scenes = [sample_scene_for(parse_caption(caption), rng) for caption in batch["caption"]]
        posterior = clip.embed_image([render_scene(scene, image_size) for scene in scenes], normalize=True).float()
        target = torch.arange(n, device=true.device)
        row["posterior_retrieval_top1"] = ((posterior @ true.T).argmax(dim=1) == target).float().mean().item()
        row["posterior_cos_image"] = (posterior * true).sum(-1).mean().item()
        rows.append(row)
    results: dict[str, float] = {"n": n, "groups": groups}
    for key in rows[0]:
        if key == "n":
            continue
        values = torch.tensor([row[key] for row in rows], dtype=torch.float64)
        results[key] = values.mean().item()
        if key.endswith("retrieval_top1") and groups > 1:
            results[f"{key}_se"] = (values.std() / groups**0.5).item()
    return results
