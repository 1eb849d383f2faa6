"""Procedural compositional scenes: one or two coloured shapes on white, with captions such as
"a large yellow triangle above a small cyan diamond".

Scenes are vector drawings rendered exactly (anti-aliased, by resvg) at any resolution, so one scene gives
matching 64, 256 and 1024 px targets for the whole cascade, and generated on demand from a seed, so item i
of a dataset is always the same scene. A few (colour, shape) pairs, `HELD_OUT_PAIRS`, never appear in
training; prompts that use them (`prompt_sets`) test compositional generalisation, as in the CLEVR-style
probes of Ramesh et al. 2022 (DALL·E 2, section 5.1). `parse_caption` inverts `caption_scene`, so an
evaluator can read from a prompt what it asks for.

Geometry, in canvas units (the canvas is [0, 1]^2, y downwards): an object is a square bounding box of side
`SIZES[size]` centred at (cx, cy). Boxes lie inside the canvas and at least `MARGIN` from its edges and from
each other; in a two-object scene, "A above B" means A's centre is at least `MIN_SEPARATION` higher than B's
and their vertical distance exceeds their horizontal one.
"""

from __future__ import annotations

import io
import itertools
import random
import re
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import numpy as np
import resvg_py
from PIL import Image
from torch.utils.data import Dataset

from unclip.data.images import check_split, image_item, to_tensor

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 180),
    "cyan": (20, 190, 200),
}
# colours the data know (captions, renders, the checker) but draw only when asked (ShapesDataset's
# extra_colors): a colour a trained model has never seen, to teach it by fine-tuning
EXTRA_COLORS = {"orange": (245, 130, 30)}
ALL_COLORS = {**COLORS, **EXTRA_COLORS}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.2, "large": 0.4}  # side of the bounding box, as a fraction of the canvas side
RELATIONS = ("to the left of", "to the right of", "above", "below")
HELD_OUT_PAIRS = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"), ("green", "diamond"))
BACKGROUND = (255, 255, 255)
MARGIN = 0.02  # least gap between two boxes, and between a box and the canvas edge
MIN_SEPARATION = 0.15  # least distance between centres along the axis of the relation
MAX_TRIES = 10_000


@dataclass(frozen=True)
class ShapeObject:
    color: str
    shape: str
    size: str
    cx: float  # centre, in canvas units [0, 1], x to the right
    cy: float  # y downwards

    @property
    def box(self) -> tuple[float, float, float, float]:
        """Bounding box (x0, y0, x1, y1) in canvas units."""
        half = SIZES[self.size] / 2
        return self.cx - half, self.cy - half, self.cx + half, self.cy + half


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    relation: str | None = None  # objects[0] <relation> objects[1]; None for one object

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects], "relation": self.relation}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(tuple(ShapeObject(**o) for o in d["objects"]), d.get("relation"))


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption asks of one object; `size` is None when the caption leaves it out."""

    color: str
    shape: str
    size: str | None = None


@dataclass(frozen=True)
class SceneSpec:
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None


def check_pairs(pairs) -> frozenset[tuple[str, str]]:
    """Validate a list of (colour, shape) pairs, e.g. from a YAML `exclude: [[red, triangle]]`."""
    out = set()
    for pair in pairs:
        if isinstance(pair, str) or len(pair) != 2:
            raise ValueError(f"exclude items must be (colour, shape) pairs, got {pair!r}")
        color, shape = pair
        if color not in ALL_COLORS:
            raise ValueError(f"unknown colour {color!r}; valid colours: {', '.join(ALL_COLORS)}")
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; valid shapes: {', '.join(SHAPES)}")
        out.add((color, shape))
    return frozenset(out)


def allowed_pairs(exclude=HELD_OUT_PAIRS, colors=tuple(COLORS)) -> list[tuple[str, str]]:
    """All (colour, shape) pairs of `colors` not in `exclude`, in a fixed order."""
    excluded = check_pairs(exclude)
    pairs = [p for p in itertools.product(colors, SHAPES) if p not in excluded]
    if not pairs:
        raise ValueError("exclude leaves no (colour, shape) pair to draw")
    return pairs


def _choice(rng, items):
    """rng.random()-based choice, the same for random.Random and numpy Generators."""
    return items[min(int(rng.random() * len(items)), len(items) - 1)]


def _uniform(rng, low: float, high: float) -> float:
    return low + (high - low) * float(rng.random())


def _disjoint(a: ShapeObject, b: ShapeObject) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return ax1 + MARGIN <= bx0 or bx1 + MARGIN <= ax0 or ay1 + MARGIN <= by0 or by1 + MARGIN <= ay0


def relation_holds(a: ShapeObject, b: ShapeObject, relation: str) -> bool:
    """Whether "a <relation> b" holds: the signed distance along the relation's axis is at least
    MIN_SEPARATION and larger than the distance along the other axis."""
    dx, dy = b.cx - a.cx, b.cy - a.cy  # a is left of b when dx > 0; a is above b when dy > 0 (y down)
    along, across = {
        "to the left of": (dx, dy),
        "to the right of": (-dx, dy),
        "above": (dy, dx),
        "below": (-dy, dx),
    }[relation]
    return along >= MIN_SEPARATION and along > abs(across)


def _place(rng, color: str, shape: str, size: str) -> ShapeObject:
    half = SIZES[size] / 2
    low, high = MARGIN + half, 1 - MARGIN - half
    return ShapeObject(color, shape, size, _uniform(rng, low, high), _uniform(rng, low, high))


def _pick_pair(rng, pairs, extra_pairs, extra_prob: float | None) -> tuple[str, str]:
    """A (colour, shape) pair: uniform over both lists, or from `extra_pairs` with chance `extra_prob`."""
    if not extra_pairs:
        return _choice(rng, pairs)  # one draw, as the data without extra colours always made
    if extra_prob is None:
        return _choice(rng, pairs + extra_pairs)
    return _choice(rng, extra_pairs if rng.random() < extra_prob else pairs)


def sample_scene(
    rng, exclude=HELD_OUT_PAIRS, two_object_prob: float = 0.5, extra_colors=(), extra_color_prob=None
) -> Scene:
    """Draw a random scene of one or two objects.

    Colour–shape pairs are uniform over `allowed_pairs(exclude)`, sizes and relations uniform; positions
    are uniform over the placements that satisfy the constraints (rejection sampling).

    Args:
        rng: a random.Random or a numpy Generator.
        exclude: (colour, shape) pairs that never appear.
        two_object_prob: chance of a two-object scene.
        extra_colors: colours of EXTRA_COLORS drawn too (none by default: the scenes are then exactly those
            drawn without this argument).
        extra_color_prob: the chance that an object takes one of `extra_colors`; None: each pair is as
            likely as any other.

    Returns:
        a Scene.
    """
    pairs = allowed_pairs(exclude)
    extra_pairs = allowed_pairs(exclude, extra_colors) if extra_colors else []
    kinds = [(*_pick_pair(rng, pairs, extra_pairs, extra_color_prob), _choice(rng, list(SIZES))) for _ in range(2)]
    if rng.random() >= two_object_prob:
        return Scene((_place(rng, *kinds[0]),))
    relation = _choice(rng, RELATIONS)
    for _ in range(MAX_TRIES):  # about 3% of the draws succeed for two large objects
        a, b = _place(rng, *kinds[0]), _place(rng, *kinds[1])
        if _disjoint(a, b) and relation_holds(a, b, relation):
            return Scene((a, b), relation)
    raise RuntimeError(f"could not place {kinds} {relation!r} in {MAX_TRIES} tries")


def sample_scene_for(spec: SceneSpec, rng) -> Scene:
    """Draw a scene that fits a caption's spec as the dataset draws scenes: positions uniform over the valid
    placements, and each size the caption leaves out uniform. An exact sample of p(scene | caption), the
    reference a diffusion prior's image embedding can at best reproduce (`python -m unclip.eval prior`)."""
    kinds = [(o.color, o.shape, o.size or _choice(rng, list(SIZES))) for o in spec.objects]
    if spec.relation is None:
        return Scene((_place(rng, *kinds[0]),))
    for _ in range(MAX_TRIES):
        a, b = _place(rng, *kinds[0]), _place(rng, *kinds[1])
        if _disjoint(a, b) and relation_holds(a, b, spec.relation):
            return Scene((a, b), spec.relation)
    raise RuntimeError(f"could not place {kinds} {spec.relation!r} in {MAX_TRIES} tries")


def _object_svg(obj: ShapeObject, size: int) -> str:
    """SVG element for one object, in pixel units of a `size` px canvas."""
    x0, y0, x1, y1 = (v * size for v in obj.box)
    cx, cy = obj.cx * size, obj.cy * size
    fill = "rgb({},{},{})".format(*ALL_COLORS[obj.color])
    if obj.shape == "circle":
        return f'<circle cx="{cx}" cy="{cy}" r="{(x1 - x0) / 2}" fill="{fill}"/>'
    if obj.shape == "square":
        return f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}" fill="{fill}"/>'
    if obj.shape == "triangle":  # upright: apex at the top middle, base along the bottom edge
        points = [(cx, y0), (x1, y1), (x0, y1)]
    else:  # diamond: vertices at the midpoints of the box edges
        points = [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    return f'<polygon points="{" ".join(f"{x},{y}" for x, y in points)}" fill="{fill}"/>'


def render_scene(scene: Scene, size: int) -> Image.Image:
    """Render a scene exactly, anti-aliased, as an RGB `size` x `size` image on white.

    resvg's cost is mostly PNG encoding, so each object is rendered alone over its pixel-aligned bounding
    box and alpha-composited onto the white canvas here: about 3x faster at 1024 px than a full-canvas
    render, and identical up to rounding of the edge pixels.
    """
    canvas = np.full((size, size, 3), 255, dtype=np.uint8)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        px0, py0 = max(int(np.floor(x0 * size)), 0), max(int(np.floor(y0 * size)), 0)
        px1, py1 = min(int(np.ceil(x1 * size)), size), min(int(np.ceil(y1 * size)), size)
        w, h = px1 - px0, py1 - py0
        svg = (
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="{px0} {py0} {w} {h}">'
            f"{_object_svg(obj, size)}</svg>"
        )
        png = resvg_py.svg_to_bytes(svg_string=svg, width=w, height=h, skip_system_fonts=True)
        rgba = np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"), dtype=np.uint16)  # (h, w, 4)
        alpha = rgba[..., 3:]
        patch = canvas[py0:py1, px0:px1].astype(np.uint16)
        canvas[py0:py1, px0:px1] = (rgba[..., :3] * alpha + patch * (255 - alpha) + 127) // 255  # < 2^16
    return Image.fromarray(canvas, "RGB")


def box_mask(box: tuple[float, float, float, float], size: int, margin: float = 0.0) -> np.ndarray:
    """(size, size) bool mask of a box (x0, y0, x1, y1) in canvas units, grown by `margin` on each side.

    A pixel is in the mask when any part of it is inside the grown box, so the mask of an object's box covers
    every pixel `render_scene` draws for it.
    """
    x0, y0, x1, y1 = box
    lo = [max(0, int(np.floor((v - margin) * size))) for v in (x0, y0)]
    hi = [min(size, int(np.ceil((v + margin) * size))) for v in (x1, y1)]
    mask = np.zeros((size, size), dtype=bool)
    mask[lo[1] : hi[1], lo[0] : hi[0]] = True
    return mask


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _describe(obj: ShapeObject, rng, size_word_prob: float) -> str:
    size = f"{obj.size} " if rng.random() < size_word_prob else ""
    return f"{_article(size or obj.color)} {size}{obj.color} {obj.shape}"


def caption_scene(scene: Scene, rng, size_word_prob: float = 0.5) -> str:
    """Caption a scene: "a red circle", "a large yellow triangle above a small cyan diamond".

    Args:
        scene: the scene.
        rng: a random.Random or a numpy Generator; decides for each object whether to say its size.
        size_word_prob: chance of including each object's size word.
    """
    words = [_describe(obj, rng, size_word_prob) for obj in scene.objects]
    return words[0] if len(words) == 1 else f"{words[0]} {scene.relation} {words[1]}"


_OBJECT = rf"an? (?:({'|'.join(SIZES)}) )?({'|'.join(ALL_COLORS)}) ({'|'.join(SHAPES)})"
_CAPTION = re.compile(rf"{_OBJECT}(?: ({'|'.join(RELATIONS)}) {_OBJECT})?")


def parse_caption(text: str) -> SceneSpec:
    """Read what a shapes caption asks for: the inverse of `caption_scene`.

    Args:
        text: "a [size] <colour> <shape>" or "a [size] <colour> <shape> <relation> a [size] <colour> <shape>";
            case, surrounding spaces and a final full stop are ignored.

    Returns:
        a SceneSpec whose objects have size None where the caption leaves it out.
    """
    match = _CAPTION.fullmatch(" ".join(text.lower().strip().rstrip(".").split()))
    if match is None:
        raise ValueError(
            f"cannot parse shapes caption {text!r}; expected 'a [small|large] <colour> <shape>' optionally "
            f"followed by a relation ({', '.join(RELATIONS)}) and a second object; "
            f"colours: {', '.join(ALL_COLORS)}; shapes: {', '.join(SHAPES)}"
        )
    size0, color0, shape0, relation, size1, color1, shape1 = match.groups()
    objects = [ObjectSpec(color0, shape0, size0)]
    if relation:
        objects.append(ObjectSpec(color1, shape1, size1))
    return SceneSpec(tuple(objects), relation)


def _check_extra_colors(colors, prob) -> tuple[list[str], float | None]:
    if isinstance(colors, str) or any(c not in EXTRA_COLORS for c in colors):
        raise ValueError(
            f"extra_colors must be a list of colours from {', '.join(EXTRA_COLORS)} (the base colours are always "
            f"drawn), got {colors!r}"
        )
    if prob is not None and not (colors and 0 <= prob <= 1):
        raise ValueError(f"extra_color_prob needs extra_colors and must be in [0, 1], got {prob!r}")
    return list(colors), prob


def format_spec(spec: SceneSpec) -> str:
    """The caption of a SceneSpec, as `caption_scene` writes it."""
    words = [" ".join(w for w in (_article(o.size or o.color), o.size, o.color, o.shape) if w) for o in spec.objects]
    return words[0] if len(words) == 1 else f"{words[0]} {spec.relation} {words[1]}"


# ways to make a caption wrong (see `corrupt_caption`); "other" is another scene's caption
CORRUPTIONS = ("color", "shape", "size", "count", "relation", "swap", "binding", "other")


def _other(options, current, rng: random.Random):
    return rng.choice([o for o in options if o != current])


def corrupt_caption(scene: Scene, caption: str, kind: str, rng: random.Random) -> str | None:
    """Change one thing in a scene's caption: "color", "shape", "size" (flip or add a size word), "count"
    (add or drop the second object), and for two objects only (None otherwise) "relation" (another one),
    "swap" (the two objects trade places in the caption) or "binding" (they trade colours)."""
    spec = parse_caption(caption)
    objects = list(spec.objects)
    i = rng.randrange(len(objects))
    if kind in ("swap", "binding") and len(objects) == 1:
        return None
    if kind == "swap":
        return format_spec(SceneSpec(tuple(objects[::-1]), spec.relation))
    if kind == "binding":
        a, b = objects
        return format_spec(SceneSpec((replace(a, color=b.color), replace(b, color=a.color)), spec.relation))
    if kind == "color":
        objects[i] = replace(objects[i], color=_other(COLORS, objects[i].color, rng))
    elif kind == "shape":
        objects[i] = replace(objects[i], shape=_other(SHAPES, objects[i].shape, rng))
    elif kind == "size":
        objects[i] = replace(objects[i], size=_other(SIZES, scene.objects[i].size, rng))
    elif kind == "relation":
        if spec.relation is None:
            return None
        return format_spec(SceneSpec(spec.objects, _other(RELATIONS, spec.relation, rng)))
    elif kind == "count":
        if len(objects) == 2:
            return format_spec(SceneSpec(objects[:1]))
        extra = ObjectSpec(rng.choice(list(COLORS)), rng.choice(SHAPES))
        return format_spec(SceneSpec((objects[0], extra), rng.choice(RELATIONS)))
    else:
        raise ValueError(f"unknown corruption {kind!r}; valid: {', '.join(CORRUPTIONS[:-1])}")
    return format_spec(SceneSpec(tuple(objects), spec.relation))


def satisfies(scene: Scene, spec: SceneSpec) -> bool:
    """Whether `scene` is one that `spec` describes: as many objects, in an order whose colours, shapes and
    named sizes are the ones asked for and that holds the relation."""
    if len(scene.objects) != len(spec.objects):
        return False
    for objects in itertools.permutations(scene.objects):
        pairs = zip(objects, spec.objects, strict=True)
        if all(o.color == s.color and o.shape == s.shape and s.size in (None, o.size) for o, s in pairs):
            if spec.relation is None or relation_holds(*objects, spec.relation):
                return True
    return False


def hard_negatives(scene: Scene, caption: str, kinds, rng: random.Random) -> list[str | None]:
    """For each kind in `kinds` (CORRUPTIONS but "other"), the caption made wrong in that one thing, or None
    where the kind does not apply (a relation for one object) or the changed caption still describes the
    scene (a relation that also holds, a swap of two identical objects)."""
    negatives = []
    for kind in kinds:
        wrong = corrupt_caption(scene, caption, kind, rng)
        negatives.append(None if wrong is None or satisfies(scene, parse_caption(wrong)) else wrong)
    return negatives


class PromptSets(NamedTuple):
    single: list[str]  # one object, allowed pairs
    relational: list[str]  # two objects and a relation, allowed pairs
    held_out: list[str]  # single objects and pairs that use at least one HELD_OUT_PAIRS pair


def _phrase(color: str, shape: str, size: str | None) -> str:
    return f"a {size} {color} {shape}" if size else f"{_article(color)} {color} {shape}"


def _take(captions: list[str], n: int, rng: random.Random) -> list[str]:
    """n captions: shuffled passes over all of `captions`, so each appears once before any repeats."""
    out = []
    while len(out) < n:
        shuffled = list(captions)
        rng.shuffle(shuffled)
        out += shuffled[: n - len(out)]
    return out


def prompt_sets(n: int, seed: int = 0) -> PromptSets:
    """Evaluation prompts, n of each kind, deterministic by seed.

    Returns:
        PromptSets(single, relational, held_out); held_out alternates single held-out objects with pairs
        in which at least one object is a held-out pair.
    """
    rng = random.Random(seed)
    held = set(HELD_OUT_PAIRS)
    variants = [(c, s, z) for c, s in itertools.product(COLORS, SHAPES) for z in (*SIZES, None)]
    seen = [v for v in variants if v[:2] not in held]
    unseen = [v for v in variants if v[:2] in held]
    pairs = [
        f"{_phrase(*a)} {relation} {_phrase(*b)}"
        for a, b in itertools.product(variants, repeat=2)
        for relation in RELATIONS
        if a[:2] in held or b[:2] in held
    ]
    relational = [f"{_phrase(*a)} {r} {_phrase(*b)}" for a, b in itertools.product(seen, repeat=2) for r in RELATIONS]
    held_single = _take([_phrase(*v) for v in unseen], (n + 1) // 2, rng)
    held_pairs = _take(pairs, n // 2, rng)
    return PromptSets(
        single=_take([_phrase(*v) for v in seen], n, rng),
        relational=_take(relational, n, rng),
        held_out=[p for two in itertools.zip_longest(held_single, held_pairs) for p in two if p][:n],
    )


def single_object_prompts(colors, n: int, seed: int = 0) -> list[str]:
    """n prompts of one object in one of `colors` ("an orange circle", "a small orange square"): every shape,
    with each size word or none, in shuffled passes, deterministic by seed. The evaluation of a colour taught
    to a trained model (`python -m unclip.eval shapes --new-colors orange`)."""
    if isinstance(colors, str) or not colors:
        raise ValueError(f"colors must be a list of colour names, got {colors!r}")
    check_pairs([(c, SHAPES[0]) for c in colors])
    variants = [(c, s, z) for c, s in itertools.product(colors, SHAPES) for z in (*SIZES, None)]
    return _take([_phrase(*v) for v in variants], n, random.Random(f"single_object_prompts/{seed}"))


class ShapesDataset(Dataset):
    """Map-style dataset of procedural scenes, generated on demand: item i is always the same scene.

    Items: {"image": (3, S, S) in [-1, 1], "caption": str, "scene": Scene.to_dict(), ["low_res": (3, s, s)
    rendered exactly at the low resolution], ["negatives": list of str | None]}. Use `unclip.data.collate` to
    keep "scene" and "negatives" as lists.

    Args:
        image_size: side of the rendered images, in pixels.
        low_res_size: if given, items also hold "low_res", the same scene rendered at this side.
        num_samples: length of the train split.
        seed: seed of the scene stream.
        exclude: (colour, shape) pairs that never appear; HELD_OUT_PAIRS by default, [] for none.
        two_object_prob: chance of a two-object scene.
        size_word_prob: chance of naming each object's size in the caption.
        split: "train", or "val": `val_size` scenes from a separate seed stream.
        hard_negatives: kinds of wrong caption (CORRUPTIONS but "other", e.g. ["relation", "swap"]); items then
            hold "negatives", one caption per kind, None where it does not apply (`hard_negatives`). A CLIP
            trained against them must tell the scene from one that differs only there (`train/clip.py`).
        extra_colors: colours of EXTRA_COLORS (e.g. ["orange"]) that objects take too; none by default, and then
            every item is the one drawn without this option.
        extra_color_prob: the chance that an object takes one of `extra_colors` (None: every colour-shape
            pair is equally likely), to fine-tune a trained model on mostly the new colour.
    """

    def __init__(
        self,
        image_size: int = 64,
        *,
        low_res_size: int | None = None,
        num_samples: int = 1_000_000,
        seed: int = 0,
        exclude=HELD_OUT_PAIRS,
        two_object_prob: float = 0.5,
        size_word_prob: float = 0.5,
        split: str = "train",
        val_size: int = 64,
        hard_negatives=(),
        extra_colors=(),
        extra_color_prob: float | None = None,
    ):
        check_split(split)
        self.extra_colors, self.extra_color_prob = _check_extra_colors(extra_colors, extra_color_prob)
        unknown = [k for k in hard_negatives if k not in CORRUPTIONS[:-1]]
        if isinstance(hard_negatives, str) or unknown:
            raise ValueError(
                f"hard_negatives must be a list of kinds of wrong caption from {', '.join(CORRUPTIONS[:-1])}; "
                f"got {hard_negatives!r}"
            )
        self.hard_negatives = list(hard_negatives)
        for name, p in (("two_object_prob", two_object_prob), ("size_word_prob", size_word_prob)):
            if not 0 <= p <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        if num_samples < 1 or image_size < 1:
            raise ValueError(f"num_samples and image_size must be >= 1, got {num_samples}, {image_size}")
        allowed_pairs(exclude)  # validates the names
        self.exclude = sorted(check_pairs(exclude))
        self.image_size, self.low_res_size = image_size, low_res_size
        self.seed, self.split = seed, split
        self.two_object_prob, self.size_word_prob = two_object_prob, size_word_prob
        self.num_samples = val_size if split == "val" else num_samples

    def __len__(self) -> int:
        return self.num_samples

    def scene(self, index: int) -> tuple[Scene, str]:
        """The scene and caption of item `index`, without rendering."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} scenes")
        rng = random.Random(f"shapes/{self.split}/{self.seed}/{index}")  # str seeds hash stably (SHA-512)
        scene = sample_scene(rng, self.exclude, self.two_object_prob, self.extra_colors, self.extra_color_prob)
        return scene, caption_scene(scene, rng, self.size_word_prob)

    def __getitem__(self, index: int) -> dict:
        scene, caption = self.scene(index)
        item = image_item(render_scene(scene, self.image_size), caption)
        item["scene"] = scene.to_dict()
        if self.low_res_size is not None:
            item["low_res"] = to_tensor(render_scene(scene, self.low_res_size))
        if self.hard_negatives:
            rng = random.Random(f"shapes/{self.split}/{self.seed}/{index}/negatives")
            item["negatives"] = hard_negatives(scene, caption, self.hard_negatives, rng)
        return item
