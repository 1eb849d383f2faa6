"""The evaluation suites of `python -m unclip.eval`: `shapes` (compositional accuracy and CLIP metrics),
`variations` (do variations keep what a render shows) and `openmoji` (CLIP metrics against held-out emoji)."""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Subset
from tqdm.auto import tqdm

from unclip.data.openmoji import OpenMojiDataset
from unclip.data.shapes import PromptSets, ShapesDataset, prompt_sets, single_object_prompts
from unclip.edits import VARIATION_CANDIDATES
from unclip.eval.generation import Generated, clip_image_embeds, generate, oracle_image_embeds, resolve_candidates
from unclip.eval.metrics import (
    candidate_curve,
    cosine_score,
    embed_images,
    embed_prompts,
    embedding_frechet_distance,
    input_size,
    retrieval_top1,
    summarize_checks,
)
from unclip.eval.resume import ResumeLog, RowLog
from unclip.eval.shapes_checker import CheckResult, check, render_prompt

logger = logging.getLogger(__name__)

FRECHET_NOTE = "Fréchet distance in CLIP image-embedding space (evaluator CLIP), not Inception FID"
CURVE_NOTE = (
    "checker verdicts on the candidate the pipeline's CLIP ranks first among each prompt's first k, judged at the "
    "decoder's size; any_correct: one of the first k is right"
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
    new_colors: Sequence[str] = (),
    resume: str | Path | None = None,
    resume_settings: dict | None = None,
    progress: bool = False,
) -> dict:
    """The `shapes` suite: compositional accuracy, CLIP score and retrieval, Fréchet distance in CLIP space.

    Prompts come from `prompt_sets(n, seed)`: single objects, two objects with a relation, and held-out
    (colour, shape) pairs. Set k is made by the pipeline's `batches` with seed seed + k·n·c (c candidates per
    prompt), so that the three sets get the seeds of one call of their 3n prompts. Each set is scored by the
    checker and the evaluator (retrieval among the set's own prompts); "all" pools the three. "real" scores 2n
    ground-truth val renders with their captions, a reference for both (the checker should give ~100%).
    The Fréchet distance compares the single and relational images (2n, no held-out pairs, half one and
    half two objects, like the val split) with those 2n val renders.

    Args:
        pipe: an UnCLIPPipeline, or anything with its `batches` and `candidates`.
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
            default the pipeline's (`pipe.candidates`). Above 1, every candidate is checked as well, and
            "candidate_curve" gives the accuracy reranking reaches among each prompt's first 1, 2, 4, ...
            of them (`candidate_curve`): one run measures every smaller count too.
        sets: evaluate only these of "single", "relational", "held_out" (default all), with the prompts and
            seeds a full run gives them, so a set's numbers equal the full run's. The Fréchet distance needs
            both single and relational.
        new_colors: colours the data draw only when asked (shapes' EXTRA_COLORS, e.g. ["orange"]): adds the set
            "new_colors", n single objects in them (`single_object_prompts`), made after the other three with
            the seeds that follow theirs, for a model taught them (LoRA); "all" still pools the three.
        resume: a `ResumeLog` file: each scored batch is added to it, and the batches it already holds (from
            a run with the same settings, and `resume_settings`, that was killed) are not made again.

    Returns:
        {"suite", "settings", "sets": {name: {"n", "accuracy", ..., "clip_score", "retrieval_*"}},
        "clip_frechet_distance", "clip_frechet_distance_note"} (+ "candidate_curve": {name: {k: {...}}});
        JSON-serialisable.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got {n} and {batch_size}")
    if oracle and not use_prior:
        raise ValueError("oracle decodes true image embeddings instead of the prior's; it excludes use_prior=False")
    prompt_lists = prompt_sets(n, seed)._asdict()
    if new_colors:
        prompt_lists["new_colors"] = single_object_prompts(new_colors, n, seed)
    names = list(prompt_lists)
    if sets is not None:
        _check_sets(sets, names)
    candidates = resolve_candidates(pipe, candidates)
    log = None
    if resume is not None:
        run = dict(n=n, seed=seed, size=size, use_prior=use_prior, oracle=oracle, prior=prior, decoder=decoder)
        run.update(candidates=candidates, batch_size=batch_size, evaluator=evaluator is not None)
        if new_colors:
            run["new_colors"] = list(new_colors)
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
    for k, (name, prompts) in enumerate(prompt_lists.items()):
        if sets is not None and name not in sets:
            continue
        if oracle:
            options["image_embeds"] = oracle_image_embeds(pipe.clip, prompts, seed=seed + k * n)
        skip = log.batches(name) if log is not None else ()
        first = seed + k * n * candidates  # the seed of the set's first image in one call of all the sets
        batches = generate(pipe, prompts, seed=first, desc=name, skip=skip, **options)
        scored[name] = _score(evaluator, batches, prompts, shapes=True, batch_size=batch_size, log=log, name=name)
    base = [s for name, s in scored.items() if name in PromptSets._fields]
    if base:
        scored["all"] = _pool(base)
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
            **({"new_colors": list(new_colors)} if new_colors else {}),
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


def _check_sets(sets: Sequence[str], names: Sequence[str] = PromptSets._fields) -> None:
    if "new_colors" in sets and "new_colors" not in names:
        raise ValueError("the set new_colors needs the colours it is made of: pass new_colors (--new-colors orange)")
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
    candidates: int = VARIATION_CANDIDATES,
    resume: str | Path | None = None,
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
        candidates: decodings per variation, the one closest to the render by the pipeline's CLIP kept; variation
            seeds then start at seed + i·per_image·candidates.
        resume: a JSON-lines file that keeps the verdicts on each render's variations as they are made: a run
            killed half-way and started again with the same settings and file makes only the missing ones.

    Returns:
        {"suite", "settings", "sets": {name: summarize_checks of its n·per_image variations}}; JSON-serialisable.
    """
    if n < 1 or per_image < 1:
        raise ValueError(f"n and per_image must be >= 1, got {n} and {per_image}")
    _check_sets(sets)
    size = pipe.sizes[0]
    prompts = prompt_sets(n, seed)
    results = {"suite": "variations", "settings": {}, "sets": {}}
    fingerprint = pipe.fingerprint() if hasattr(pipe, "fingerprint") else None
    header = dict(n=n, seed=seed, per_image=per_image, invert=invert, decoder=decoder, candidates=candidates)
    log = RowLog(resume, {**header, "pipeline_fingerprint": fingerprint}) if resume else None
    for name in sets:
        checks = []
        for i, prompt in enumerate(tqdm(getattr(prompts, name), desc=name, disable=not progress)):
            row = log.get(f"{name}/{i}") if log is not None else None
            if row is None:
                source = render_prompt(prompt, size, random.Random(seed + i))
                out = pipe.variations(
                    source,
                    n=per_image,
                    seed=seed + i * per_image * candidates,
                    invert=invert,
                    size=size,
                    decoder=decoder,
                    candidates=candidates,
                )
                row = {
                    "checks": [check(image, prompt).to_dict() for image in out.images],
                    "decoder": out.metadata[0]["settings"]["decoder"],
                }
                if log is not None:
                    log.add(f"{name}/{i}", row)
            checks += [CheckResult.from_dict(c) for c in row["checks"]]
            used = row["decoder"]
        results["sets"][name] = summarize_checks(checks)
    results["settings"] = dict(n=n, seed=seed, per_image=per_image, invert=invert, size=size, decoder=used)
    results["settings"]["candidates"] = candidates
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
    split: str = "val",
    dataset=None,
    prior: dict | None = None,
    decoder: dict | None = None,
    candidates: int | None = None,
    oracle: bool = False,
    progress: bool = False,
) -> dict:
    """The `openmoji` suite: CLIP score and retrieval of images made from the names of emoji, and the
    Fréchet distance in CLIP space between them and those emoji; "real" scores the emoji themselves.

    Args:
        n: at most this many emoji are used (all of them when the split holds fewer).
        val_size: the `data.val_size` the pipeline was trained with, or the smallest of its components'.
            The val split is the `val_size` emoji groups with the smallest hashes, so a larger value would
            take in emoji the models were trained on; 64 is DataConfig's default.
        split: "val", the held-out emoji (unseen names), or "train": `n` emoji drawn from those the pipeline
            was trained on, without skin-tone variants, the same ones for every seed (seen names).
        dataset: items {"image": (3, S, S) in [-1, 1], "caption"}; default `openmoji_items(size, split,
            val_size, n)`.
        prior, decoder, candidates: sampler overrides and reranking, as in `evaluate_shapes`.
        oracle: decode the pipeline CLIP's image embeddings of the emoji themselves (at the CLIP's input size)
            instead of the prior's: what the decoder draws under a perfect prior.

    Returns:
        {"suite", "settings", "sets": {"generated", "real"}, "clip_frechet_distance", ...}; JSON-serialisable.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if oracle and not use_prior:
        raise ValueError("oracle decodes true image embeddings instead of the prior's; it excludes use_prior=False")
    candidates = resolve_candidates(pipe, candidates)  # before any work
    given = dataset is not None
    if not given:
        dataset = openmoji_items(size, split, val_size, n)
    items = [dataset[i] for i in tqdm(range(min(n, len(dataset))), desc="emoji", disable=not progress)]
    if len(items) < 2:
        raise ValueError(f"need at least 2 emoji, got {len(items)}")
    prompts = [item["caption"] for item in items]
    options = dict(
        size=size, use_prior=use_prior, batch_size=batch_size, prior=prior, decoder=decoder, candidates=candidates
    )
    extra = {}
    if oracle:
        clip_size = input_size(pipe.clip)
        truth = items if given or clip_size == size else openmoji_items(clip_size, split, val_size, len(items))
        images = torch.stack([truth[i]["image"] for i in range(len(items))])
        options["image_embeds"] = clip_image_embeds(pipe.clip, images)
        extra = {"use_prior": False, "image_embeds": "oracle: the pipeline CLIP's embeddings of the emoji"}
    if given:
        val_size = split = None  # the caller's dataset decides
    batches = generate(pipe, prompts, seed=seed, progress=progress, **options)
    real = torch.stack([item["image"] for item in items])
    scored = {
        "generated": _score(evaluator, batches, prompts, shapes=False, batch_size=batch_size),
        "real": _score(evaluator, [real], prompts, shapes=False, batch_size=batch_size),
    }
    return {
        "suite": "openmoji",
        "settings": _settings(
            pipe,
            evaluator,
            n=len(items),
            seed=seed,
            val_size=val_size,
            split=split,
            **{**{k: v for k, v in options.items() if k != "image_embeds"}, **extra},
        ),
        "sets": {name: {"n": len(items), **_clip_metrics(s)} for name, s in scored.items()},
        "clip_frechet_distance": embedding_frechet_distance(
            scored["real"]["image_embeds"], scored["generated"]["image_embeds"]
        ),
        "clip_frechet_distance_note": f"{FRECHET_NOTE}; {len(items)} generated vs those {len(items)} emoji",
    }


def openmoji_items(size: int, split: str, val_size: int, n: int) -> Subset:
    """The emoji of the `openmoji` suite, captioned with their canonical names: the first `n` of the val split,
    or `n` of the train split's emoji without skin tones, drawn by a fixed seed. An item not yet in the dataset's
    cache is rendered when it is read."""
    if split not in ("val", "train"):
        raise ValueError(f"split must be 'val' or 'train', got {split!r}")
    dataset = OpenMojiDataset(size, split=split, val_size=val_size, canonical_names=True)
    indices = range(min(n, len(dataset)))
    if split == "train":
        indices = sorted(random.Random("openmoji/train-names").sample(range(len(dataset)), len(indices)))
    return Subset(dataset, list(indices))
