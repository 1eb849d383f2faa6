"""Compositional accuracy on `shapes` without a neural network: read the objects of an image by colour and
geometry, and check them against what the prompt asks for (DALL·E 2's CLEVR-style probes, Ramesh et al. 2022
§5.1, scored by a program instead of people).

How an image is read (`detect`):

1. Colour. A pixel of a `shapes` image is a mix of one spec colour c and the white background, so its "ink"
   255 - rgb points along 255 - c whatever the anti-aliasing or blur. A pixel is foreground for the colour
   whose ink direction is nearest (within `MAX_ANGLE` degrees) when its ink is at least half that colour's.
2. Objects are the 4-connected components of same-colour foreground; those under `MIN_AREA` of the canvas
   are specks and ignored. Each object's soft coverage is summed over the component grown by 2 px, so the
   anti-aliased edge counts and the area A is exact for renders and robust to blur.
3. Shape (`_classify`): a triangle's vertical profile is skewed (it widens downwards); a square fills the
   box of its widest row and tallest column (A / (W·H) ~1, against π/4 for a circle and 1/2 for a diamond);
   a diamond's profiles are peaked along the axes and flat along the diagonals, a circle's alike.
4. Size, from the side s = sqrt(A / fill of the shape): small (0.2) or large (0.4) of the canvas, split at 0.3.
5. Relation, by the dataset's own rule (`relation_holds`) between the centres of the bounding boxes.

`check` then picks the assignment of detected objects to the prompt's objects that satisfies most of it.

`validate_checker` (`python -m unclip.eval checker`) measures the checker on ground-truth renders: how often it
accepts their true captions and rejects captions wrong in one thing, at several sizes and blurred and noised;
docs/evaluation.md gives the rates.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from unclip.data.degrade import gaussian_blur
from unclip.data.shapes import (
    ALL_COLORS,
    CORRUPTIONS,
    MAX_TRIES,
    SIZES,
    ObjectSpec,
    Scene,
    SceneSpec,
    ShapesDataset,
    _disjoint,  # the dataset's own placement rules, so that render_prompt draws scenes as training does
    _place,
    corrupt_caption,
    parse_caption,
    relation_holds,
    render_scene,
    satisfies,
)

WORK_SIZE = 128  # larger images are area-downsampled to this side first: faster, and as accurate
MAX_ANGLE = 15.0  # degrees between a pixel's ink and its colour's; the closest two colours (orange and yellow,
# orange and red) are 16° apart, and a pixel takes the nearest
MIN_ALPHA = 0.5  # least ink, as a fraction of the colour's, of a foreground pixel
MIN_AREA = 0.004  # specks below this fraction of the canvas are ignored (the smallest object covers 0.02)
MAX_OBJECTS = 6  # only the largest objects are matched to the prompt
GROW = 2  # px, how far beyond a component its soft coverage is summed
SHAPE_FILL = {"square": 1.0, "circle": math.pi / 4, "triangle": 0.5, "diamond": 0.5}  # area / box area
SQUARE_FILL, TRIANGLE_SKEW, DIAMOND_CORNERS = 0.92, 0.25, 0.2  # decision thresholds (see `_classify`)
LARGE_SIDE = sum(SIZES.values()) / 2  # sides above this fraction of the canvas are "large"

_INK = np.array([[255.0 - v for v in rgb] for rgb in ALL_COLORS.values()])  # (7, 3): the data's colours and orange
_INK_UNIT = _INK / np.linalg.norm(_INK, axis=1, keepdims=True)
_INK_NORM = np.linalg.norm(_INK, axis=1)


@dataclass(frozen=True)
class DetectedObject:
    color: str
    shape: str
    size: str
    cx: float  # centre of the bounding box, canvas units [0, 1], x to the right
    cy: float  # y downwards
    side: float  # side of the bounding box, from the area, canvas units
    fill: float  # area / (widest row x tallest column): ~1 square, ~0.79 circle, ~0.5 triangle and diamond
    skew: float  # skewness of the vertical profile: ~-0.57 for an upright triangle, ~0 otherwise
    corners: float  # kurtosis of the profiles along the axes minus along the diagonals: -0.6 square,
    # 0 circle, +0.6 diamond


@dataclass(frozen=True)
class CheckResult:
    """What a prompt asks, what the image holds, and which parts agree.

    `sizes_ok` is None when the prompt names no size and `relation_ok` is None for one object: they are
    not asked for. `correct` is True when everything asked for holds, the number of objects included.
    """

    prompt: str
    expected: SceneSpec
    detected: tuple[DetectedObject, ...]
    count_ok: bool
    colors_ok: bool
    shapes_ok: bool
    sizes_ok: bool | None
    relation_ok: bool | None

    @property
    def correct(self) -> bool:
        return _all_ok((self.count_ok, self.colors_ok, self.shapes_ok, self.sizes_ok, self.relation_ok))

    def to_dict(self) -> dict:
        return {**asdict(self), "correct": self.correct}

    @classmethod
    def from_dict(cls, d: dict) -> CheckResult:
        """The inverse of `to_dict` (after a JSON round trip: lists where `to_dict` gave tuples)."""
        expected = SceneSpec(tuple(ObjectSpec(**o) for o in d["expected"]["objects"]), d["expected"]["relation"])
        fields = {k: v for k, v in d.items() if k not in ("expected", "detected", "correct")}
        return cls(expected=expected, detected=tuple(DetectedObject(**o) for o in d["detected"]), **fields)


# ---- reading an image ----


def _to_array(image: Image.Image | Tensor) -> np.ndarray:
    """(H, W, 3) float64 in [0, 255], area-downsampled to at most WORK_SIZE."""
    if isinstance(image, Image.Image):
        x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)
    elif isinstance(image, Tensor):
        x = image.detach().float().cpu()
        x = x[0] if x.ndim == 4 and x.shape[0] == 1 else x
        if x.ndim != 3 or x.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) image in [-1, 1], got shape {tuple(image.shape)}")
        x = (x.clamp(-1, 1) + 1) * 127.5
    else:
        raise ValueError(f"expected a PIL image or a (3, H, W) tensor, got {type(image).__name__}")
    if x.shape[1] != x.shape[2]:
        raise ValueError(f"shapes images are square, got {x.shape[2]}x{x.shape[1]}")
    if x.shape[1] > WORK_SIZE:
        x = F.adaptive_avg_pool2d(x[None], WORK_SIZE)[0]  # area average: coverage stays linear
    return x.permute(1, 2, 0).double().numpy()


def _components(labels: np.ndarray) -> list[np.ndarray]:
    """4-connected components of equal labels >= 0, as arrays of flat pixel indices."""
    h, w = labels.shape
    flat = labels.ravel().tolist()
    seen = bytearray(len(flat))
    out = []
    for start in np.flatnonzero(labels.ravel() >= 0).tolist():
        if seen[start]:
            continue
        seen[start], stack, members, label = 1, [start], [], flat[start]
        while stack:
            p = stack.pop()
            members.append(p)
            y, x = divmod(p, w)
            for q, inside in ((p - w, y > 0), (p + w, y < h - 1), (p - 1, x > 0), (p + 1, x < w - 1)):
                if inside and not seen[q] and flat[q] == label:
                    seen[q] = 1
                    stack.append(q)
        out.append(np.array(members))
    return out


def _grow(mask: np.ndarray, r: int) -> np.ndarray:
    """Dilate a boolean (H, W) mask by a (2r + 1)^2 square."""
    h, w = mask.shape
    padded = np.pad(mask, r)
    out = np.zeros_like(mask)
    for dy, dx in itertools.product(range(2 * r + 1), repeat=2):
        out |= padded[dy : dy + h, dx : dx + w]
    return out


def _classify(fill: float, skew: float, corners: float) -> str:
    """Triangles' vertical profiles are skewed (-0.57 upright), the others' symmetric; squares fill their
    box (~1.0, against ~0.79 for circles); diamonds' corners point along the axes, circles have none.

    Measured on renders at 32, 64 and 256 px, and at 64 px blurred by up to 1 px with noise 0.08: squares
    fill >= 0.96 and circles <= 0.83; triangles |skew| >= 0.42 and the rest <= 0.06; diamonds corners >=
    0.33 and circles <= 0.07. Blurred 32 px images are harder: their 6 px triangles and diamonds reach
    skew 0.25 and corners 0.16 at blur 0.7 px.
    """
    if abs(skew) > TRIANGLE_SKEW:
        return "triangle"
    if fill > SQUARE_FILL:
        return "square"
    return "diamond" if corners > DIAMOND_CORNERS else "circle"


def _kurtosis(weights: np.ndarray, p: np.ndarray) -> float:
    """Kurtosis E[p^4] / E[p^2]^2 of the coordinate p (centred) under the weights."""
    m2, m4 = (weights * p**2).sum(), (weights * p**4).sum()
    return float(m4 * weights.sum() / max(m2**2, 1e-12))


def _measure(weights: np.ndarray, color: str, size: int) -> DetectedObject:
    """Describe one object from its soft coverage (H, W) in [0, 1] on a `size` px canvas."""
    area = weights.sum()
    rows, cols = weights.sum(1), weights.sum(0)  # vertical and horizontal profiles
    ys, xs = np.arange(len(rows)) + 0.5, np.arange(len(cols)) + 0.5  # pixel centres
    my, mx = (rows * ys).sum() / area, (cols * xs).sum() / area
    skew = float((rows * (ys - my) ** 3).sum() / area / max((rows * (ys - my) ** 2).sum() / area, 1e-9) ** 1.5)
    fill = float(area / (rows.max() * cols.max()))
    # profiles of a square are flat along the axes and peaked along the diagonals (kurtosis 1.8 and 2.4),
    # a diamond's the other way round, a circle's alike (2.0)
    y, x = np.meshgrid(ys - my, xs - mx, indexing="ij")
    along_axes = (_kurtosis(weights, x) + _kurtosis(weights, y)) / 2
    along_diagonals = (_kurtosis(weights, x + y) + _kurtosis(weights, x - y)) / 2
    corners = along_axes - along_diagonals
    shape = _classify(fill, skew, corners)
    side = math.sqrt(area / SHAPE_FILL[shape])
    if shape == "triangle":  # the centroid of an upright triangle lies side/6 below its box's centre
        my -= math.copysign(side / 6, -skew)
    side /= size
    size_word = "large" if side > LARGE_SIDE else "small"
    return DetectedObject(color, shape, size_word, float(mx / size), float(my / size), side, fill, skew, corners)


def detect(image: Image.Image | Tensor) -> tuple[DetectedObject, ...]:
    """Find the coloured objects of a `shapes` image (see the module docstring).

    Args:
        image: an RGB PIL image or a (3, H, W) tensor in [-1, 1], square, any size.

    Returns:
        the objects, largest first.
    """
    rgb = _to_array(image)
    size = rgb.shape[0]
    ink = np.clip(255.0 - rgb, 0, None)  # (H, W, 3)
    proj = ink @ _INK_UNIT.T  # (H, W, 7)
    cos = proj / np.maximum(np.linalg.norm(ink, axis=-1, keepdims=True), 1e-6)
    alpha = proj / _INK_NORM  # fraction of each colour's full ink
    nearest = cos.argmax(-1)  # (H, W)
    best_cos = np.take_along_axis(cos, nearest[..., None], -1)[..., 0]
    best_alpha = np.take_along_axis(alpha, nearest[..., None], -1)[..., 0]
    foreground = (best_alpha >= MIN_ALPHA) & (best_cos >= math.cos(math.radians(MAX_ANGLE)))
    labels = np.where(foreground, nearest, -1)

    found = []
    for members in _components(labels):
        if len(members) < MIN_AREA * size * size / 2:  # a speck however much edge it has
            continue
        component = np.zeros(size * size, bool)
        component[members] = True
        component = component.reshape(size, size)
        k = int(labels.flat[members[0]])
        region = _grow(component, GROW) & (nearest == k) & ~(foreground & ~component)
        weights = np.where(region, np.clip(alpha[..., k], 0, 1), 0.0)
        if weights.sum() >= MIN_AREA * size * size:
            found.append((weights.sum(), _measure(weights, list(ALL_COLORS)[k], size)))
    return tuple(obj for _, obj in sorted(found, key=lambda f: -f[0]))


# ---- matching a prompt ----


def _all_ok(flags) -> bool:
    """True unless some flag is False (None: not asked for)."""
    return all(f is not False for f in flags)


def _agreement(objects: Sequence, spec: SceneSpec) -> dict[str, bool | None]:
    """Which parts of `spec` hold when spec.objects[i] is objects[i] (None: no object for it)."""
    pairs = list(zip(objects, spec.objects, strict=True))
    sized = [(o, s) for o, s in pairs if s.size is not None]
    relation = None
    if spec.relation is not None:
        relation = None not in objects and relation_holds(objects[0], objects[1], spec.relation)
    return {
        "colors_ok": all(o is not None and o.color == s.color for o, s in pairs),
        "shapes_ok": all(o is not None and o.shape == s.shape for o, s in pairs),
        "sizes_ok": all(o is not None and o.size == s.size for o, s in sized) if sized else None,
        "relation_ok": relation,
    }


def match(objects: Sequence, spec: SceneSpec) -> dict[str, bool | None]:
    """The best assignment of `objects` (anything with color, shape, size, cx, cy: detected objects or a
    Scene's ShapeObjects) to the objects `spec` asks for.

    Returns:
        {"count_ok", "colors_ok", "shapes_ok", "sizes_ok", "relation_ok"} for the assignment that satisfies
        all of them if one does, else most of them.
    """
    objects = list(objects)[:MAX_OBJECTS]
    n = len(spec.objects)
    best, best_key = None, None
    for chosen in itertools.permutations(objects + [None] * max(n - len(objects), 0), n):  # None: missing
        flags = _agreement(chosen, spec)
        key = (_all_ok(flags.values()), sum(f is True for f in flags.values()))
        if best_key is None or key > best_key:
            best, best_key = flags, key
    return {"count_ok": len(objects) == n, **best}


def check(image: Image.Image | Tensor, prompt: str) -> CheckResult:
    """Does `image` show what the shapes caption `prompt` asks for?

    Args:
        image: an RGB PIL image or a (3, H, W) tensor in [-1, 1], square, any size.
        prompt: a caption `parse_caption` reads, e.g. "a large red circle to the left of a blue square".

    Returns:
        a CheckResult; `.correct` when every colour, shape, named size, the relation and the count hold.
    """
    spec = parse_caption(prompt)
    detected = detect(image)
    return CheckResult(prompt, spec, detected, **match(detected, spec))


# ---- prompts <-> scenes, for tests and validation ----


def scene_for_prompt(prompt: str, rng) -> Scene:
    """A random scene that satisfies a shapes caption, placed as `sample_scene` places objects; sizes the
    caption leaves out are drawn uniformly. `rng` is a random.Random or a numpy Generator."""
    spec = parse_caption(prompt)
    kinds = [(o.color, o.shape, o.size or list(SIZES)[int(rng.random() * len(SIZES))]) for o in spec.objects]
    for _ in range(MAX_TRIES):
        objects = tuple(_place(rng, *kind) for kind in kinds)
        if len(objects) == 1 or (_disjoint(*objects) and relation_holds(*objects, spec.relation)):
            return Scene(objects, spec.relation)
    raise RuntimeError(f"could not place {prompt!r} in {MAX_TRIES} tries")


def render_prompt(prompt: str, size: int, rng) -> Image.Image:
    """An exact render of a random scene that satisfies `prompt` (a perfect generator, for tests)."""
    return render_scene(scene_for_prompt(prompt, rng), size)


def degrade(image: Image.Image, sigma: float, noise: float, generator: torch.Generator) -> Tensor:
    """A render blurred by a Gaussian of `sigma` px and noised with std `noise` (in [-1, 1] units)."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    x = gaussian_blur(x, sigma) + noise * torch.randn(x.shape, generator=generator)
    return x[0].clamp(-1, 1)


def mismatched_captions(
    n: int, seed: int = 0, extra_colors: Sequence[str] = ()
) -> tuple[list[tuple[Scene, str]], list[tuple[int, str, str]]]:
    """`n` val scenes with their captions, and for each scene one wrong caption of each kind in CORRUPTIONS
    (where the kind applies): (scene index, kind, caption). A caption the scene happens to satisfy (e.g. another
    scene's "a red circle") is left out. With `extra_colors` (e.g. ["orange"]), each object of the scenes takes
    one of them with chance 1/2."""
    extra = {"extra_colors": list(extra_colors), "extra_color_prob": 0.5} if extra_colors else {}
    dataset = ShapesDataset(split="val", val_size=n, seed=seed, **extra)
    scenes = [dataset.scene(i) for i in range(n)]
    rng = random.Random(seed)
    mismatches = []
    for i, (scene, caption) in enumerate(scenes):
        for kind in CORRUPTIONS:
            if kind == "other":
                wrong = scenes[(i + 1 + rng.randrange(n - 1)) % n][1] if n > 1 else None
            else:
                wrong = corrupt_caption(scene, caption, kind, rng)
            if wrong is not None and not satisfies(scene, parse_caption(wrong)):
                mismatches.append((i, kind, wrong))
    return scenes, mismatches


def validate_checker(
    n: int = 300,
    sizes: Sequence[int] = (32, 64, 256),
    *,
    seed: int = 0,
    degraded: tuple[float, float] | None = (0.7, 0.05),
    extra_colors: Sequence[str] = (),
    progress: bool = False,
) -> dict[str, dict]:
    """Measure the checker on ground-truth renders of `n` val scenes (half of whose objects take one of
    `extra_colors`, when given: `mismatched_captions`).

    For each size (and, with `degraded` = (blur sigma px, noise std), at 64 px degraded): the fraction of
    true (image, caption) pairs accepted, and the fraction of mismatched captions rejected, overall and per
    kind of corruption (CORRUPTIONS). A mismatched caption that the scene happens to satisfy (e.g. another
    scene's "a red circle") is not counted.

    Returns:
        {"64": {"accepted": float, "rejected": float, "rejected_by_kind": {kind: float}, "n": int,
        "n_mismatched": int}, ..., ["64_degraded": ...]}
    """
    if n < 1 or not sizes or min(sizes) < 1:
        raise ValueError(f"need n >= 1 and sizes >= 1, got n={n} and sizes={list(sizes)}")
    scenes, mismatches = mismatched_captions(n, seed, extra_colors)
    settings = [(str(s), s, None) for s in sizes]
    if degraded is not None:
        settings.append(("64_degraded", 64, degraded))
    generator = torch.Generator().manual_seed(seed)
    results = {}
    for name, size, degradation in settings:
        images = []
        for scene, _ in tqdm(scenes, desc=f"checker {name}", disable=not progress):
            image = render_scene(scene, size)
            images.append(image if degradation is None else degrade(image, *degradation, generator))
        detected = [detect(image) for image in images]
        accepted = [_all_ok(match(d, parse_caption(c)).values()) for d, (_, c) in zip(detected, scenes, strict=True)]
        rejected = {kind: [] for kind in CORRUPTIONS}
        for i, kind, wrong in mismatches:
            rejected[kind].append(not _all_ok(match(detected[i], parse_caption(wrong)).values()))
        results[name] = {
            "accepted": float(np.mean(accepted)),
            "rejected": float(np.mean([r for v in rejected.values() for r in v])),
            "rejected_by_kind": {k: float(np.mean(v)) for k, v in rejected.items() if v},
            "n": n,
            "n_mismatched": len(mismatches),
        }
    return results
