"""Metrics for generated images, and the evaluation suites that `python -m unclip.eval` runs.

CLIP metrics use an *evaluator* CLIP, trained separately from the CLIP that conditions the pipeline, so that
the generator is not scored by the judge its prior and decoder were fitted to (DALL·E 2 reports CLIP scores
and FID as well, Ramesh et al. 2022 §5.3; they are meaningful only with an independent judge). An evaluator
is anything with `embed_text(prompts, normalize=True).embed` (N, D) and `embed_image(images, normalize=True)`
(N, D), such as a `ClipAdapter`.

    clip_score                 100 x mean cosine between each image and its prompt (no clamp at 0)
    retrieval_accuracy         top-1 retrieval of each image's prompt among the set's prompts, and back
    embedding_frechet_distance Fréchet distance between Gaussians fitted to two sets of CLIP image
                               embeddings, reported as `clip_frechet_distance`: Heusel et al.'s FID formula
                               in CLIP image-embedding space, *not* Inception FID
    shapes_accuracy            the `shapes` checker's verdicts (unclip.eval.shapes_checker), no network
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Container, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from unclip.checkpoint import atomic_write_bytes
from unclip.data.openmoji import OpenMojiDataset
from unclip.data.shapes import PromptSets, ShapesDataset, prompt_sets, render_scene
from unclip.eval.shapes_checker import CheckResult, check, mismatched_captions, render_prompt
from unclip.imageio import from_pil
from unclip.sampling import decoder_cond

logger = logging.getLogger(__name__)

Images = Tensor | Sequence[Image.Image]  # (N, 3, H, W) in [-1, 1], or N RGB PIL images
FRECHET_NOTE = "Fréchet distance in CLIP image-embedding space (evaluator CLIP), not Inception FID"
CURVE_NOTE = (
    "checker verdicts on the candidate the pipeline's CLIP ranks first among each prompt's first k, judged at the "
    "decoder's size; any_correct: one of the first k is right"
)

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
    _check_pairs(images, prompts)
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
    _check_pairs(images, prompts)
    image_embeds = embed_images(evaluator, images, batch_size=batch_size)
    return retrieval_top1(image_embeds, embed_prompts(evaluator, prompts), prompts)


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
    _check_pairs(images, prompts)
    pairs = tqdm(zip(images, prompts, strict=True), total=len(prompts), desc="checking", disable=not progress)
    return summarize_checks([check(image, prompt) for image, prompt in pairs])


def _check_pairs(images: Images, prompts: Sequence[str]) -> None:
    if len(images) != len(prompts) or not prompts:
        raise ValueError(f"need one prompt per image and at least one of each, got {len(images)} and {len(prompts)}")


# ---- suites ----


def default_candidates(pipe, decoder: dict | None = None) -> int:
    """The reranking a pipeline's call makes by default: its decoder's "candidates" setting (1 for pipelines
    without one)."""
    stage = getattr(pipe, "decoder", None)
    return stage.settings(decoder).get("candidates", 1) if hasattr(stage, "settings") else 1


def resolve_candidates(pipe, decoder: dict | None, candidates: int | None) -> int:
    """`candidates`, or the pipeline's default when None; a ValueError when it is below 1."""
    candidates = default_candidates(pipe, decoder) if candidates is None else candidates
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
    """Images for `prompts` from a pipeline, yielded `batch_size` at a time as (b, 3, size, size) in [-1, 1]
    (with the candidates, where the pipeline returns them); image i uses seed seed + i, as one pipeline call
    would give it. `prior` and `decoder` override the pipeline's sampler settings ({"sampler", "steps",
    "guidance_scale"}), as in its call; `image_embeds` (one per prompt) are decoded instead of the prior's;
    `candidates` > 1 keeps the best of that many images by the pipeline's CLIP (its reranking; default the
    pipeline's decoder.candidates). Batches whose first index is in `skip` are not made (a resumed run)."""
    stages = {k: v for k, v in (("prior", prior), ("decoder", decoder)) if v}  # a plain call where none is given
    default = default_candidates(pipe, decoder)
    candidates = default if candidates is None else candidates
    if candidates != default:
        stages["candidates"] = candidates
    starts = range(0, len(prompts), batch_size)
    todo = [start for start in starts if start not in skip]
    bar = tqdm(todo, desc=desc, unit="batch", total=len(starts), initial=len(starts) - len(todo), disable=not progress)
    for start in bar:
        chunk = prompts[start : start + batch_size]
        if image_embeds is not None:
            stages["image_embeds"] = image_embeds[start : start + batch_size]
        # seeds as one call gives them: prompt i's candidates have seeds seed + i·candidates + j
        out = pipe(
            chunk,
            size=size,
            seed=seed + start * candidates,
            use_prior=use_prior,
            batch_size=batch_size * candidates,
            **stages,
        )
        candidates_out = getattr(out, "candidate_images", None)
        scores = getattr(out, "candidate_scores", None)
        yield Generated(
            out.images.float(),
            None if candidates_out is None else candidates_out.float().cpu(),
            None if scores is None else scores.float().cpu(),
            start,
        )


def _settings(pipe, evaluator, **settings) -> dict:
    """The run's settings, with a warning (and a flag) when the evaluator is the pipeline's own CLIP."""
    own = getattr(getattr(pipe, "clip", None), "model", None)
    judge = getattr(evaluator, "model", None)
    same = False
    if own is not None and judge is not None:
        a, b = own.state_dict(), judge.state_dict()
        same = a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k].to(a[k])) for k in a)
    if same:
        logger.warning("the evaluator CLIP is the pipeline's own CLIP: its scores favour the pipeline")
    return {**settings, "evaluator_is_pipeline_clip": same}


def _score_batch(evaluator, batch: Tensor | Generated, prompts: Sequence[str], *, shapes: bool, batch_size: int):
    images = batch.images if isinstance(batch, Generated) else batch
    scored = {"checks": [], "candidates": [], "image_embeds": None}
    if evaluator is not None:
        scored["image_embeds"] = embed_images(evaluator, images, batch_size=batch_size)
    if shapes:
        scored["checks"] = [check(x, p) for x, p in zip(images, prompts, strict=True)]
        if isinstance(batch, Generated) and batch.candidate_images is not None:
            for row, scores, p in zip(batch.candidate_images, batch.candidate_scores, prompts, strict=True):
                scored["candidates"].append([(float(c), check(x, p)) for x, c in zip(row, scores, strict=True)])
    return scored


def _score(
    evaluator,
    batches: Iterable[Tensor | Generated],
    prompts: list[str],
    *,
    shapes: bool,
    batch_size: int,
    log: ResumeLog | None = None,
    name: str = "",
) -> dict:
    """Evaluator embeddings and, for `shapes` images, checker verdicts of images that come in batches (so
    that only one batch is held), image i made for prompts[i]. For `shapes` batches that carry their
    candidates, each candidate's verdict and CLIP score too ("candidates": one list of (score, verdict) per
    prompt, in seed order). With a `log`, the batches it holds for set `name` are taken from it (the
    generator skips them) and each new one is added to it as soon as it is scored."""
    done, position = dict(log.batches(name)) if log is not None else {}, 0
    for batch in batches:
        images = batch.images if isinstance(batch, Generated) else batch
        start = batch.start if isinstance(batch, Generated) else position
        position = start + len(images)
        chunk = prompts[start : start + len(images)]
        done[start] = _score_batch(evaluator, batch, chunk, shapes=shapes, batch_size=batch_size)
        if log is not None:
            log.add(name, start, done[start])
    parts = [done[start] for start in sorted(done)]
    checks = [c for part in parts for c in part["checks"]]
    count = len(checks) if shapes else sum(len(part["image_embeds"]) for part in parts)
    assert count == len(prompts), (count, len(prompts))
    scored = {"prompts": prompts, "checks": checks, "candidates": [c for part in parts for c in part["candidates"]]}
    if evaluator is None:  # the shapes checker alone
        return {**scored, "image_embeds": None, "text_embeds": None}
    image_embeds = torch.cat([part["image_embeds"] for part in parts])
    return {**scored, "image_embeds": image_embeds, "text_embeds": embed_prompts(evaluator, prompts)}


class ResumeLog:
    """The scored batches of a `shapes` run, one JSON line each, so that a run killed half-way (or ended with
    its session) resumes where it stopped: `python -m unclip.eval shapes ... --out F` keeps them in
    `F.partial.jsonl` until F is written. The first line holds the run's settings; a log written under other
    settings is refused rather than mixed in. Verdicts and embeddings round-trip exactly (floats as JSON
    reprs), so a resumed run's results equal an uninterrupted one's."""

    def __init__(self, path: str | Path, settings: dict):
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings))  # as it reads back
        self.records: dict[str, dict[int, dict]] = {}
        if not self.path.exists():
            self._rewrite([])
            return
        lines = self.path.read_text().splitlines()
        try:
            header = json.loads(lines[0])["settings"] if lines else None
        except (json.JSONDecodeError, KeyError, TypeError):
            header = None
        if header != self.settings:
            header = header if isinstance(header, dict) else {}
            differ = ", ".join(sorted(k for k in {*header, *self.settings} if header.get(k) != self.settings.get(k)))
            raise ValueError(
                f"{self.path} holds the batches of a run with other settings ({differ or 'unreadable'}); delete it to "
                "start over, or pass another --out"
            )
        kept = []
        for line in lines[1:]:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the last line of a run killed while writing it
                continue
            self.records.setdefault(record["set"], {})[record["start"]] = self._load(record)
            kept.append(line)
        if len(kept) != len(lines) - 1:
            self._rewrite(kept)

    def batches(self, name: str) -> dict[int, dict]:
        return self.records.get(name, {})

    def __len__(self) -> int:
        return sum(len(v) for v in self.records.values())

    def add(self, name: str, start: int, scored: dict) -> None:
        record = {
            "set": name,
            "start": start,
            "checks": [c.to_dict() for c in scored["checks"]],
            "candidates": [[[score, c.to_dict()] for score, c in row] for row in scored["candidates"]],
            "image_embeds": None if scored["image_embeds"] is None else scored["image_embeds"].tolist(),
        }
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.setdefault(name, {})[start] = scored

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def _rewrite(self, lines: list[str]) -> None:
        header = json.dumps({"settings": self.settings})
        atomic_write_bytes(self.path, "".join(line + "\n" for line in [header, *lines]).encode())

    @staticmethod
    def _load(record: dict) -> dict:
        embeds = record["image_embeds"]
        return {
            "checks": [CheckResult.from_dict(c) for c in record["checks"]],
            "candidates": [[(score, CheckResult.from_dict(c)) for score, c in row] for row in record["candidates"]],
            "image_embeds": None if embeds is None else torch.tensor(embeds, dtype=torch.float32),
        }


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


def _pool(scored: Iterable[dict]) -> dict:
    scored = list(scored)
    embedded = scored[0]["image_embeds"] is not None
    return {
        "prompts": [p for s in scored for p in s["prompts"]],
        "checks": [c for s in scored for c in s["checks"]],
        "candidates": [c for s in scored for c in s["candidates"]],
        "image_embeds": torch.cat([s["image_embeds"] for s in scored]) if embedded else None,
        "text_embeds": torch.cat([s["text_embeds"] for s in scored]) if embedded else None,
    }


def _clip_metrics(scored: dict) -> dict[str, float]:
    if scored["image_embeds"] is None:
        return {}
    retrieval = retrieval_top1(scored["image_embeds"], scored["text_embeds"], scored["prompts"])
    return {
        "clip_score": cosine_score(scored["image_embeds"], scored["text_embeds"]),
        "retrieval_image_to_text": retrieval["image_to_text"],
        "retrieval_text_to_image": retrieval["text_to_image"],
    }


def evaluate_shapes(
    pipe,
    evaluator,
    n: int = 200,
    seed: int = 0,
    *,
    size: int = 64,
    use_prior: bool = True,
    batch_size: int = 16,
    prior: dict | None = None,
    decoder: dict | None = None,
    oracle: bool = False,
    candidates: int | None = None,
    sets: Sequence[str] | None = None,
    resume: str | Path | None = None,
    resume_settings: dict | None = None,
    progress: bool = False,
) -> dict:
    """The `shapes` suite: compositional accuracy, CLIP score and retrieval, Fréchet distance in CLIP space.

    Prompts come from `prompt_sets(n, seed)`: single objects, two objects with a relation, and held-out
    (colour, shape) pairs; set k is generated with seeds seed + k·n + i (seed + (k·n + i)·c + j for
    candidate j of c). Each set is scored by the checker and the evaluator (retrieval among the set's own
    prompts); "all" pools the three. "real" scores 2n
    ground-truth val renders with their captions, a reference for both (the checker should give ~100%).
    The Fréchet distance compares the single and relational images (2n, no held-out pairs, half one and
    half two objects, like the val split) with those 2n val renders.

    Args:
        pipe: an UnCLIPPipeline, or anything with its call signature.
        evaluator: a CLIP independent of the pipeline's (see the module docstring), or None for the
            checker's compositional accuracy alone (no CLIP score, retrieval or Fréchet distance).
        n: prompts per set.
        use_prior: False decodes the raw text embeddings (DALL·E 2's ablation, §5.1).
        prior, decoder: sampler overrides for those stages ({"sampler", "steps", "guidance_scale"}); default
            the pipeline's own settings.
        oracle: decode the pipeline CLIP's image embedding of an exact render of each prompt (a random scene
            that satisfies it) instead of the prior's sample: the decoder's accuracy under a perfect prior,
            which tells the two stages' errors apart.
        candidates: keep the best of this many images per prompt by the pipeline's CLIP (its reranking);
            default the pipeline's decoder.candidates. Above 1, every candidate is checked as well, and
            "candidate_curve" gives the accuracy reranking reaches among each prompt's first 1, 2, 4, ...
            of them (`candidate_curve`): one run measures every smaller count too.
        sets: evaluate only these of "single", "relational", "held_out" (default all), with the prompts and
            seeds a full run gives them, so a set's numbers equal the full run's. The Fréchet distance needs
            both single and relational.
        resume: a `ResumeLog` file: each scored batch is added to it, and the batches it already holds (from
            a run with the same settings, and `resume_settings`, that was killed) are not made again.

    Returns:
        {"suite", "settings", "sets": {name: {"n", "accuracy", ..., "clip_score", "retrieval_*"}},
        "clip_frechet_distance", "clip_frechet_distance_note"} (+ "candidate_curve": {name: {k: {...}}});
        JSON-serialisable.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if oracle and not use_prior:
        raise ValueError("oracle decodes true image embeddings instead of the prior's; it excludes use_prior=False")
    names = list(PromptSets._fields)
    if sets is not None:
        _check_sets(sets)
    candidates = resolve_candidates(pipe, decoder, candidates)
    log = None
    if resume is not None:
        run = dict(n=n, seed=seed, size=size, use_prior=use_prior, oracle=oracle, prior=prior, decoder=decoder)
        run.update(candidates=candidates, batch_size=batch_size, evaluator=evaluator is not None)
        log = ResumeLog(resume, {**run, **(resume_settings or {})})
        if len(log) and progress:
            logger.info("resuming from %s: %d batches already scored", resume, len(log))
    options = dict(
        size=size,
        use_prior=use_prior,
        batch_size=batch_size,
        prior=prior,
        decoder=decoder,
        progress=progress,
        candidates=candidates,
    )
    scored = {}
    for k, (name, prompts) in enumerate(prompt_sets(n, seed)._asdict().items()):
        if sets is not None and name not in sets:
            continue
        if oracle:
            options["image_embeds"] = oracle_image_embeds(pipe.clip, prompts, seed=seed + k * n)
        skip = log.batches(name) if log is not None else ()
        batches = generate(pipe, prompts, seed=seed + k * n * candidates, desc=name, skip=skip, **options)
        scored[name] = _score(evaluator, batches, prompts, shapes=True, batch_size=batch_size, log=log, name=name)
    scored["all"] = _pool(scored.values())
    real = ShapesDataset(size, split="val", val_size=2 * n)
    renders = (
        torch.stack([real[i]["image"] for i in range(start, min(start + batch_size, len(real)))])
        for start in tqdm(range(0, len(real), batch_size), desc="real", unit="batch", disable=not progress)
    )
    real_captions = [real.scene(i)[1] for i in range(len(real))]
    scored["real"] = _score(evaluator, renders, real_captions, shapes=True, batch_size=batch_size)
    results = {
        "suite": "shapes",
        "settings": _settings(
            pipe,
            evaluator,
            n=n,
            seed=seed,
            size=size,
            use_prior=use_prior and not oracle,
            prior=prior,
            decoder=decoder,
            candidates=candidates,
            **({"sets": [name for name in names if name in sets]} if sets is not None else {}),
            **({"image_embeds": "oracle: the pipeline CLIP's embeddings of exact renders"} if oracle else {}),
        ),
        "sets": {name: {**summarize_checks(s["checks"]), **_clip_metrics(s)} for name, s in scored.items()},
    }
    curves = {name: candidate_curve(s["candidates"]) for name, s in scored.items() if s["candidates"]}
    if curves:
        results["candidate_curve"] = curves
        results["candidate_curve_note"] = CURVE_NOTE
    if evaluator is not None and {"single", "relational"} <= set(scored):
        fake = torch.cat([scored["single"]["image_embeds"], scored["relational"]["image_embeds"]])
        results["clip_frechet_distance"] = embedding_frechet_distance(scored["real"]["image_embeds"], fake)
        results["clip_frechet_distance_note"] = (
            f"{FRECHET_NOTE}; {len(fake)} generated (single + relational) vs {len(real)} val renders"
        )
    return results


def oracle_image_embeds(clip, prompts: Sequence[str], *, seed: int, batch_size: int = 64) -> Tensor:
    """(B, D) normalised CLIP image embeddings of exact renders of shapes prompts (scene i drawn by
    random.Random(f"oracle/{seed}/{i}")), at the CLIP's input size: what a perfect prior would sample."""
    size = _input_size(clip)
    renders = [render_prompt(p, size, random.Random(f"oracle/{seed}/{i}")) for i, p in enumerate(prompts)]
    with torch.no_grad():
        return torch.cat(
            [clip.embed_image(renders[i : i + batch_size], normalize=True) for i in range(0, len(renders), batch_size)]
        ).float()


def _check_sets(sets: Sequence[str]) -> None:
    names = PromptSets._fields
    if not sets or set(sets) - set(names):
        raise ValueError(f"sets must name some of {', '.join(names)}; got {list(sets)}")


def evaluate_variations(
    pipe,
    n: int = 50,
    seed: int = 0,
    *,
    per_image: int = 4,
    invert: bool = False,
    sets: Sequence[str] = ("single", "relational"),
    decoder: dict | None = None,
    progress: bool = False,
) -> dict:
    """The `variations` suite: how often a variation of an exact render of a `shapes` prompt (DALL·E 2 §3.1: a
    decoding of the render's CLIP image embedding, with no caption) still shows what the prompt says, by the
    checker. The paper's variations keep what the embedding holds and vary the rest.

    Args:
        n: prompts per set (`prompt_sets(n, seed)`); prompt i is rendered by random.Random(seed + i), at the
            decoder's size, and its variations use seeds seed + i·per_image ... (+ per_image - 1).
        invert: decode the render's DDIM-inverted latent (`pipe.variations`' default) instead of fresh noise.
        decoder: overrides of the decoder's settings ({"guidance_scale": 2}, ...), as `pipe.variations` takes.

    Returns:
        {"suite", "settings", "sets": {name: summarize_checks of its n·per_image variations}}; JSON-serialisable.
    """
    if n < 1 or per_image < 1:
        raise ValueError(f"n and per_image must be >= 1, got {n} and {per_image}")
    _check_sets(sets)
    size = pipe.sizes[0]
    prompts = prompt_sets(n, seed)
    results = {"suite": "variations", "settings": {}, "sets": {}}
    for name in sets:
        checks = []
        for i, prompt in enumerate(tqdm(getattr(prompts, name), desc=name, disable=not progress)):
            source = render_prompt(prompt, size, random.Random(seed + i))
            out = pipe.variations(
                source, n=per_image, seed=seed + i * per_image, invert=invert, size=size, decoder=decoder
            )
            checks += [check(image, prompt) for image in out.images]
            used = out.metadata[0]["settings"]["decoder"]
        results["sets"][name] = summarize_checks(checks)
    results["settings"] = dict(n=n, seed=seed, per_image=per_image, invert=invert, size=size, decoder=used)
    return results


def evaluate_openmoji(
    pipe,
    evaluator,
    n: int = 200,
    seed: int = 0,
    *,
    size: int = 64,
    use_prior: bool = True,
    batch_size: int = 16,
    val_size: int = 64,
    dataset=None,
    prior: dict | None = None,
    decoder: dict | None = None,
    candidates: int | None = None,
    progress: bool = False,
) -> dict:
    """The `openmoji` suite: CLIP score and retrieval of images made from the captions of held-out emoji,
    and the Fréchet distance in CLIP space between them and those emoji; "real" scores the emoji themselves.

    Args:
        n: at most this many held-out emoji are used (all of them when the split holds fewer).
        val_size: the `data.val_size` the pipeline was trained with, or the smallest of its components'.
            The val split is the `val_size` emoji groups with the smallest hashes, so a larger value would
            take in emoji the models were trained on; 64 is DataConfig's default.
        dataset: items {"image": (3, S, S) in [-1, 1], "caption"}; default `OpenMojiDataset(size,
            split="val", val_size=val_size)`.
        prior, decoder, candidates: sampler overrides and reranking, as in `evaluate_shapes`.

    Returns:
        {"suite", "settings", "sets": {"generated", "real"}, "clip_frechet_distance", ...}; JSON-serialisable.
    """
    candidates = resolve_candidates(pipe, decoder, candidates)  # before any work
    if dataset is None:
        dataset = OpenMojiDataset(size, split="val", val_size=val_size)  # renders SVGs into a cache on first use
    else:
        val_size = None  # the caller's dataset decides
    items = [dataset[i] for i in tqdm(range(min(n, len(dataset))), desc="emoji", disable=not progress)]
    if len(items) < 2:
        raise ValueError(f"need at least 2 held-out emoji, got {len(items)}")
    prompts = [item["caption"] for item in items]
    options = dict(
        size=size, use_prior=use_prior, batch_size=batch_size, prior=prior, decoder=decoder, candidates=candidates
    )
    batches = generate(pipe, prompts, seed=seed, progress=progress, **options)
    real = torch.stack([item["image"] for item in items])
    scored = {
        "generated": _score(evaluator, batches, prompts, shapes=False, batch_size=batch_size),
        "real": _score(evaluator, [real], prompts, shapes=False, batch_size=batch_size),
    }
    return {
        "suite": "openmoji",
        "settings": _settings(pipe, evaluator, n=len(items), seed=seed, val_size=val_size, **options),
        "sets": {name: {"n": len(items), **_clip_metrics(s)} for name, s in scored.items()},
        "clip_frechet_distance": embedding_frechet_distance(
            scored["real"]["image_embeds"], scored["generated"]["image_embeds"]
        ),
        "clip_frechet_distance_note": f"{FRECHET_NOTE}; {len(items)} generated vs the {len(items)} held-out emoji",
    }


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
    size = _input_size(clip)
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
    size = _input_size(pipe.clip)
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
        with pipe._autocast():
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


def _input_size(clip) -> int:
    """The side of the square images a CLIP takes."""
    return clip.image_size if isinstance(clip.image_size, int) else clip.image_size[0]


def _mean_by_kind(values: Tensor, kinds: Sequence[str]) -> dict[str, float]:
    by_kind: dict[str, list[float]] = {}
    for kind, value in zip(kinds, values.tolist(), strict=True):
        by_kind.setdefault(kind, []).append(value)
    return {kind: sum(v) / len(v) for kind, v in by_kind.items()}


# ---- reporting ----

COLUMNS = {  # result key -> (header, format); fractions are shown as percentages
    "n": ("n", "{:d}"),
    "accuracy": ("acc%", "pct"),
    "colors": ("color%", "pct"),
    "shapes": ("shape%", "pct"),
    "sizes": ("size%", "pct"),
    "relation": ("rel%", "pct"),
    "count": ("count%", "pct"),
    "relation_given_objects": ("rel|obj%", "pct"),
    "clip_score": ("clip", "{:.2f}"),
    "retrieval_image_to_text": ("R@1 i->t%", "pct"),
    "retrieval_text_to_image": ("R@1 t->i%", "pct"),
}


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if fmt == "pct" else fmt.format(value)


def _align(table: list[list[str]]) -> list[str]:
    """Rows of cells as lines: the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return [
        "  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))])
        for row in table
    ]


def format_table(results: dict) -> str:
    """A plain-text table of an `evaluate_*` result: one row per set, then the Fréchet distance."""
    rows = results["sets"]
    keys = [k for k in COLUMNS if any(k in row for row in rows.values())]
    table = [["set", *(COLUMNS[k][0] for k in keys)]]
    table += [[name, *(_cell(row.get(k), COLUMNS[k][1]) for k in keys)] for name, row in rows.items()]
    settings = ", ".join(f"{k}={v}" for k, v in results["settings"].items())
    lines = [f"{results['suite']} ({settings})", *_align(table)]
    if "clip_frechet_distance" in results:
        distance = results["clip_frechet_distance"]
        lines.append(f"clip_frechet_distance {distance:.4f}  ({results['clip_frechet_distance_note']})")
    if "candidate_curve" in results:
        curves = results["candidate_curve"]
        ks = list(next(iter(curves.values())))
        table = [["set", *(f"k={k} acc% (any%)" for k in ks)]]
        table += [
            [name, *(f"{_cell(c[k]['accuracy'], 'pct')} ({_cell(c[k]['any_correct'], 'pct')})" for k in ks)]
            for name, c in curves.items()
        ]
        lines += ["", f"reranking among the first k candidates ({results['candidate_curve_note']})", *_align(table)]
    return "\n".join(lines)


def format_probe(results: dict) -> str:
    """A plain-text table of `probe_clip`'s rates, in percent."""
    kinds = list(results["preferred_by_kind"])
    rows = [
        ["all", *kinds],
        [_cell(results["preferred"], "pct"), *(_cell(results["preferred_by_kind"][k], "pct") for k in kinds)],
    ]
    title = (
        f"true caption preferred over a wrong one, {results['n']} val scenes, {results['n_mismatched']} wrong "
        "captions (50% is chance)"
    )
    return "\n".join([title, *_align(rows)])


def format_caption_probe(results: dict) -> str:
    """A plain-text table of `probe_decoder_caption`: one row per kind of wrong caption."""
    change = results["prediction_change"]
    steps = list(change)
    table = [["wrong caption", *(f"t={t}" for t in steps)]]
    table += [[kind, *(f"{change[t][kind]:.4f}" for t in steps)] for kind in change[steps[0]]]
    title = (
        f"RMS change of the decoder's x0 prediction when its caption is wrong in one thing ({results['n']} val "
        f"scenes, {results['n_mismatched']} wrong captions{', no image embedding' if results['text_only'] else ''})"
    )
    return "\n".join([title, *_align(table)])


def format_validation(results: dict) -> str:
    """A plain-text table of `validate_checker`'s rates, in percent."""
    first = next(iter(results.values()))
    kinds = list(first["rejected_by_kind"])
    table = [["images", "accepted%", "rejected%", *kinds]]
    for name, r in results.items():
        rates = [r["accepted"], r["rejected"], *(r["rejected_by_kind"].get(k) for k in kinds)]
        table.append([name, *(_cell(v, "pct") for v in rates)])
    title = f"checker on {first['n']} val scenes: true captions accepted, {first['n_mismatched']} mismatched rejected"
    return "\n".join([title, *_align(table)])
