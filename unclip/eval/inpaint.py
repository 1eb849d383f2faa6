"""The `inpaint` suite of `python -m unclip.eval`: edit one object of an exact `shapes` render through the
pipeline's inpainting, and check the result as text-to-image is checked.

Each case is a random scene rendered exactly; one of its objects is masked (its box grown by a margin) and the
prompt asks for the scene with that object changed: another colour, another shape, both, or removed (from a
two-object scene). The shapes checker judges the result against the caption of the edited scene, and the pixels
outside the mask are compared with the source at the decoder's size and at the output size.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from unclip.data.shapes import Scene, allowed_pairs, box_mask, caption_scene, render_scene, sample_scene
from unclip.eval.metrics import summarize_checks
from unclip.eval.resume import RowLog
from unclip.eval.shapes_checker import CheckResult, check
from unclip.imageio import square_tensor

EDITS = ("colour", "shape", "both", "remove")
PHRASINGS = ("whole", "region")  # the caption of the whole edited image; the masked region's new content only
MARGIN = 0.05  # canvas units added to each side of the masked object's box


@dataclass(frozen=True)
class InpaintCase:
    """One edit: `source` with object `index` masked becomes `target`, described by `caption`."""

    source: Scene
    target: Scene
    index: int
    edit: str
    caption: str  # the whole edited scene, what the checker reads
    region: str | None  # the masked region's new content ("a green diamond"); None for a removal

    def prompt(self, phrasing: str) -> str | None:
        return self.caption if phrasing == "whole" else self.region

    def mask(self, size: int) -> np.ndarray:
        """(size, size) bool, True = repaint: the edited object's box grown by MARGIN."""
        return box_mask(self.source.objects[self.index].box, size, MARGIN)


def _changed(obj, edit: str, rng: random.Random):
    """`obj` with another colour ("colour"), shape ("shape") or both, among the pairs training data holds."""
    new_color, new_shape = edit in ("colour", "both"), edit in ("shape", "both")
    pairs = [(c, s) for c, s in allowed_pairs() if (c != obj.color) == new_color and (s != obj.shape) == new_shape]
    color, shape = rng.choice(pairs)
    return replace(obj, color=color, shape=shape)


def inpaint_cases(n: int, seed: int = 0) -> list[InpaintCase]:
    """n edits, the kinds in turn (colour, shape, both, remove); case i depends only on (seed, i)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    cases = []
    for i in range(n):
        rng = random.Random(f"inpaint/{seed}/{i}")
        edit = EDITS[i % len(EDITS)]
        source = sample_scene(rng, two_object_prob=1.0 if edit == "remove" else 0.5)
        index = rng.randrange(len(source.objects))
        if edit == "remove":
            target, region = Scene(source.objects[:index] + source.objects[index + 1 :]), None
        else:
            new = _changed(source.objects[index], edit, rng)
            objects = list(source.objects)
            objects[index] = new
            target, region = Scene(tuple(objects), source.relation), f"a {new.color} {new.shape}"
        cases.append(InpaintCase(source, target, index, edit, caption_scene(target, rng), region))
    return cases


def _outside_error(image: torch.Tensor, source: Image.Image, mask: np.ndarray) -> float:
    """Largest |difference| (in 0-255 levels) between `image` and `source` outside `mask`, at the image's size."""
    size = image.shape[-1]
    known = square_tensor(source, size)[0]
    keep = ~torch.from_numpy(mask if mask.shape[0] == size else _resized(mask, size))
    diff = (image.float().cpu() - known).abs()[:, keep]
    return float(diff.max()) * 127.5 if diff.numel() else 0.0


def _resized(mask: np.ndarray, size: int) -> np.ndarray:
    """A mask at another size, as `edits.prepare_mask` reduces it: a pixel is repainted if any it covers is."""
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return torch.nn.functional.adaptive_max_pool2d(t, size)[0, 0].numpy() > 0


def evaluate_inpaint(
    pipe,
    n: int = 200,
    seed: int = 0,
    *,
    size: int | None = None,
    method: str = "auto",
    phrasing: str = "whole",
    candidates: int | None = None,
    decoder: dict | None = None,
    resume: str | Path | None = None,
    progress: bool = False,
) -> dict:
    """The `inpaint` suite: n edits of exact renders through `pipe.inpaint`, judged by the shapes checker.

    Args:
        n: edits (`inpaint_cases(n, seed)`); edit i's candidates use seeds seed + i·candidates onwards.
            With phrasing "region", removals have no region prompt and are left out.
        size: the source's and the result's size (default the decoder's); larger sizes go through the upsamplers.
        method: "model", "repaint" or "auto", as `pipe.inpaint` takes.
        phrasing: "whole" (the caption of the whole edited image) or "region" (the new object alone).
        candidates: fills per edit, the one the pipeline's CLIP ranks first kept (default: the pipeline's).
        decoder: overrides of the decoder's settings.
        resume: a JSON-lines file that keeps each judged edit as it is made: a run killed half-way and started
            again with the same settings and file makes only the missing edits (another run's file is refused).

    Returns:
        {"suite", "settings", "sets": {"all", and one per edit kind: summarize_checks + "outside_exact"}};
        "outside_exact" is the share of results whose pixels outside the mask equal the source's (within half a
        level) at the decoder's size, and "outside_exact_output" at the output size. JSON-serialisable.
    """
    if phrasing not in PHRASINGS:
        raise ValueError(f"phrasing must be one of {PHRASINGS}, got {phrasing!r}")
    s = pipe.sizes[0]
    size = size or s
    cases = [c for c in inpaint_cases(n, seed) if c.prompt(phrasing) is not None]
    candidates = pipe.candidates if candidates is None else candidates
    fingerprint = pipe.fingerprint() if hasattr(pipe, "fingerprint") else None
    header = dict(n=n, seed=seed, size=size, method=method, phrasing=phrasing, candidates=candidates)
    header.update(decoder=decoder, pipeline_fingerprint=fingerprint)
    log = RowLog(resume, header) if resume else None
    rows = []
    for i, case in enumerate(tqdm(cases, desc=f"inpaint {size}px", disable=not progress)):
        if log is not None and (row := log.get(str(i))) is not None:
            rows.append((row["edit"], CheckResult.from_dict(row["check"]), tuple(row["errors"]), row["settings"]))
            continue
        source = render_scene(case.source, size)
        mask = case.mask(size)
        mask_image = Image.fromarray(mask.astype(np.uint8) * 255)
        prompt = case.prompt(phrasing)
        options = dict(size=size, method=method, candidates=candidates, decoder=decoder)
        out = pipe.inpaint(source, mask_image, prompt, n=1, seed=seed + i * candidates, **options)
        low_res = out.low_res[0] if out.low_res is not None else out.images[0]
        errors = (_outside_error(low_res, source, _resized(mask, s)), _outside_error(out.images[0], source, mask))
        used = {k: out.metadata[0]["settings"][k] for k in ("candidates", "decoder")}
        rows.append((case.edit, check(out.images[0], case.caption), errors, used))
        if log is not None:
            edit, result, errors, used = rows[-1]
            log.add(str(i), {"edit": edit, "check": result.to_dict(), "errors": list(errors), "settings": used})
    sets = {}
    for name in ("all", *EDITS):
        picked = [r for r in rows if name in ("all", r[0])]
        if not picked:
            continue
        summary = summarize_checks([r[1] for r in picked])
        summary["outside_exact"] = sum(r[2][0] <= 0.5 for r in picked) / len(picked)
        summary["outside_exact_output"] = sum(r[2][1] <= 0.5 for r in picked) / len(picked)
        summary["outside_max_error"] = max(max(r[2]) for r in picked)
        sets[name] = summary
    settings = dict(n=n, cases=len(cases), seed=seed, size=size, method=method, phrasing=phrasing, margin=MARGIN)
    settings.update(rows[-1][3])
    return {"suite": "inpaint", "settings": settings, "sets": sets}
