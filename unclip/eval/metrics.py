"""Metrics for generated images.

CLIP metrics use an *evaluator* CLIP, trained separately from the CLIP that conditions the pipeline, so that
the generator is not scored by the judge its prior and decoder were fitted to (DALL·E 2 reports CLIP scores
and FID as well, Ramesh et al. 2022 §5.3; they are meaningful only with an independent judge). An evaluator
is anything with `embed_text(prompts, normalize=True).embed` (N, D) and `embed_image(images, normalize=True)`
(N, D), such as a `ClipAdapter`.

    clip_score                 100 x mean cosine between each image and its prompt (no clamp at 0)
    retrieval_accuracy         top-1 retrieval of each image's prompt among the set's prompts, and back
    prior_metrics              the prior's cosines and retrieval (DALL·E 2 §5.1), on embeddings
    embedding_frechet_distance Fréchet distance between Gaussians fitted to two sets of CLIP image
                               embeddings, reported as `clip_frechet_distance`: Heusel et al.'s FID formula
                               in CLIP image-embedding space, *not* Inception FID
    shapes_accuracy            the `shapes` checker's verdicts (unclip.eval.shapes_checker), no network
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from unclip.eval.shapes_checker import CheckResult, check

Images = Tensor | Sequence[Image.Image]  # (N, 3, H, W) in [-1, 1], or N RGB PIL images

# ---- CLIP metrics ----


def embed_images(evaluator, images: Images, *, batch_size: int = 64) -> Tensor:
    """(N, D) L2-normalised evaluator image embeddings, float32 on the CPU."""
    out = [
        evaluator.embed_image(images[i : i + batch_size], normalize=True) for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out).float().cpu()


def embed_prompts(evaluator, prompts: Sequence[str], *, batch_size: int = 256) -> Tensor:
    """(N, D) L2-normalised evaluator text embeddings, float32 on the CPU."""
    out = [
        evaluator.embed_text(list(prompts[i : i + batch_size]), normalize=True).embed
        for i in range(0, len(prompts), batch_size)
    ]
    return torch.cat(out).float().cpu()


def input_size(clip) -> int:
    """The side of the square images a CLIP takes."""
    return clip.image_size if isinstance(clip.image_size, int) else clip.image_size[0]


def cosine_score(image_embeds: Tensor, text_embeds: Tensor) -> float:
    """100 x the mean cosine similarity of matching rows of (N, D) image and text embeddings."""
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(f"need one text per image, got {tuple(image_embeds.shape)} and {tuple(text_embeds.shape)}")
    return 100 * F.cosine_similarity(image_embeds.float(), text_embeds.float(), dim=-1).mean().item()


def clip_score(evaluator, images: Images, prompts: Sequence[str], *, batch_size: int = 64) -> float:
    """CLIP score: 100 x the mean cosine similarity between each image's and its prompt's evaluator embeddings.

    The x100 scale is the customary one (as torchmetrics' CLIPScore; Hessel et al. 2021 weight by 2.5
    instead); unlike those, negative cosines are not clamped to 0, so the score is a plain mean in
    [-100, 100]. Scores from different evaluator CLIPs are not comparable.
    """
    check_pairs(images, prompts)
    return cosine_score(embed_images(evaluator, images, batch_size=batch_size), embed_prompts(evaluator, prompts))


def retrieval_top1(image_embeds: Tensor, text_embeds: Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """Top-1 retrieval between N images and their N prompts, by cosine similarity.

    Repeated prompts count once as candidates: an image is right when its nearest distinct prompt is its
    own (image_to_text); a distinct prompt is right when its nearest image is one made from it
    (text_to_image, averaged over the distinct prompts). Chance is 1 / (number of distinct prompts).
    """
    first = {}  # distinct prompt -> the row of its first occurrence
    for i, p in enumerate(prompts):
        first.setdefault(p, i)
    index = {p: j for j, p in enumerate(first)}
    own = torch.tensor([index[p] for p in prompts])
    sims = (
        F.normalize(image_embeds.float(), dim=-1) @ F.normalize(text_embeds.float()[list(first.values())], dim=-1).T
    )  # (N, P)
    image_to_text = (sims.argmax(dim=1) == own).float().mean().item()
    text_to_image = (own[sims.argmax(dim=0)] == torch.arange(len(first))).float().mean().item()
    return {"image_to_text": image_to_text, "text_to_image": text_to_image}


def retrieval_accuracy(evaluator, images: Images, prompts: Sequence[str], *, batch_size: int = 64) -> dict[str, float]:
    """Top-1 retrieval accuracy with the evaluator CLIP: {"image_to_text", "text_to_image"}, see `retrieval_top1`."""
    check_pairs(images, prompts)
    image_embeds = embed_images(evaluator, images, batch_size=batch_size)
    return retrieval_top1(image_embeds, embed_prompts(evaluator, prompts), prompts)


def prior_metrics(predicted: Tensor, text_embed: Tensor, image_embed: Tensor) -> dict[str, float]:
    """DALL·E 2-style cosine metrics and retrieval, for (N, D) predicted, text and true image embeddings.

    Returns:
        cos_image (predicted vs true image), cos_text (predicted vs its caption), cos_unrelated_text
        (predicted vs another caption), retrieval_top1 (the true image is the nearest of the N images to
        the prediction) and text_retrieval_top1 (the same with the raw text embedding instead: the baseline
        without a prior), cos_text_image (raw text vs true image).
    """
    predicted, text, image = (F.normalize(x.float(), dim=-1) for x in (predicted, text_embed, image_embed))
    n = len(predicted)
    target = torch.arange(n, device=predicted.device)
    return {
        "cos_image": (predicted * image).sum(-1).mean().item(),
        "cos_text": (predicted * text).sum(-1).mean().item(),
        "cos_unrelated_text": (predicted * text.roll(1, dims=0)).sum(-1).mean().item(),
        "cos_text_image": (text * image).sum(-1).mean().item(),
        "retrieval_top1": ((predicted @ image.T).argmax(dim=1) == target).float().mean().item(),
        "text_retrieval_top1": ((text @ image.T).argmax(dim=1) == target).float().mean().item(),
    }


def _sqrtm_psd(matrix: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix, by eigendecomposition."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def embedding_frechet_distance(real_embeds: Tensor, fake_embeds: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two sets of embeddings (Dowson & Landau 1982):

        d² = |mu_r - mu_f|² + Tr(S_r + S_f - 2 (S_r S_f)^½)

    the formula of FID (Heusel et al. 2017, eq. 6), here over CLIP image embeddings: call it
    `clip_frechet_distance`, never FID. Computed in float64 with Tr((S_r S_f)^½) = Tr((S_r^½ S_f S_r^½)^½),
    whose argument is symmetric PSD, so two symmetric eigendecompositions replace scipy's general `sqrtm`
    (scipy is not a dependency). Like FID it is biased upwards at small N, so compare values at equal N.

    Args:
        real_embeds: (N, D) embeddings of real images; N >= 2.
        fake_embeds: (M, D) embeddings of generated images; M >= 2.

    Returns:
        d², >= 0 (0 for identical sets).
    """
    if real_embeds.ndim != 2 or fake_embeds.ndim != 2 or real_embeds.shape[1] != fake_embeds.shape[1]:
        raise ValueError(
            f"need (N, D) and (M, D) embeddings, got {tuple(real_embeds.shape)}, {tuple(fake_embeds.shape)}"
        )
    if min(len(real_embeds), len(fake_embeds)) < 2:
        raise ValueError("need at least 2 embeddings in each set to fit a covariance")
    real, fake = real_embeds.double().cpu(), fake_embeds.double().cpu()
    cov_r, cov_f = torch.cov(real.T, correction=1), torch.cov(fake.T, correction=1)
    sqrt_r = _sqrtm_psd(cov_r)
    cross = torch.linalg.eigvalsh(sqrt_r @ cov_f @ sqrt_r).clamp(min=0).sqrt().sum()
    d2 = (real.mean(0) - fake.mean(0)).square().sum() + cov_r.trace() + cov_f.trace() - 2 * cross
    return max(d2.item(), 0.0)


# ---- shapes ----


def summarize_checks(results: Sequence[CheckResult]) -> dict[str, float | int | None]:
    """Accuracy overall and per attribute; "sizes" counts only prompts that name a size and "relation" only
    two-object prompts (None when there are none).

    An attribute is judged on the best assignment of detected objects to the prompt's (see
    `shapes_checker.match`), so when an image holds extra objects its attribute rates are generous; "count"
    and "accuracy" are not. "relation_given_objects" is the relation's rate among the two-object images whose
    objects are right (count, colours and shapes): whether the objects drawn are placed as asked. Objects
    placed at random satisfy a given relation about 25% of the time (`sample_scene`'s placements).
    """

    def rate(flags):
        flags = [f for f in flags if f is not None]
        return sum(flags) / len(flags) if flags else None

    return {
        "n": len(results),
        "accuracy": rate(r.correct for r in results),
        "colors": rate(r.colors_ok for r in results),
        "shapes": rate(r.shapes_ok for r in results),
        "sizes": rate(r.sizes_ok for r in results),
        "relation": rate(r.relation_ok for r in results),
        "count": rate(r.count_ok for r in results),
        "relation_given_objects": rate(
            r.relation_ok for r in results if r.count_ok and r.colors_ok and r.shapes_ok and r.relation_ok is not None
        ),
    }


def shapes_accuracy(
    images: Images, prompts: Sequence[str], *, progress: bool = False
) -> dict[str, float | int | None]:
    """Compositional accuracy of `shapes` images against their prompts, by the checker (no network).

    Returns:
        {"n", "accuracy", "colors", "shapes", "sizes", "relation", "count"}, fractions in [0, 1], see
        `summarize_checks`.
    """
    check_pairs(images, prompts)
    pairs = tqdm(zip(images, prompts, strict=True), total=len(prompts), desc="checking", disable=not progress)
    return summarize_checks([check(image, prompt) for image, prompt in pairs])


def check_pairs(images: Images, prompts: Sequence[str]) -> None:
    if len(images) != len(prompts) or not prompts:
        raise ValueError(f"need one prompt per image and at least one of each, got {len(images)} and {len(prompts)}")


def candidate_curve(candidates: Sequence[Sequence[tuple[float, CheckResult]]]) -> dict[str, dict]:
    """Reranking by how many candidates it sees: for k = 1, 2, 4, ... up to all of them, the checker's
    verdicts on the candidate the pipeline's CLIP scores highest among each prompt's first k
    (`summarize_checks`), and "any_correct", how often one of the first k is right (a perfect reranker's
    accuracy). Keys are k as strings (JSON)."""
    total = min(len(c) for c in candidates)
    ks = sorted({*(2**i for i in range(total.bit_length()) if 2**i <= total), total})
    curve = {}
    for k in ks:
        kept = [max(c[:k], key=lambda pair: pair[0])[1] for c in candidates]
        any_correct = sum(any(r.correct for _, r in c[:k]) for c in candidates) / len(candidates)
        curve[str(k)] = {**summarize_checks(kept), "any_correct": any_correct}
    return curve
