import random

import numpy as np
import pytest
import torch
from PIL import Image

from unclip.config import DataConfig
from unclip.data import build_dataset, collate
from unclip.data.shapes import (
    COLORS,
    HELD_OUT_PAIRS,
    MARGIN,
    MIN_SEPARATION,
    RELATIONS,
    Scene,
    ShapeObject,
    ShapesDataset,
    caption_scene,
    hard_negatives,
    parse_caption,
    prompt_sets,
    relation_holds,
    render_scene,
    sample_scene,
    satisfies,
)


@pytest.fixture(scope="module")
def scenes():
    rng = random.Random(0)
    return [sample_scene(rng) for _ in range(500)]


def test_dataset_is_deterministic_and_val_is_separate():
    a, b = ShapesDataset(16, seed=3), ShapesDataset(16, seed=3)
    item = a[7]
    assert item["caption"] == b[7]["caption"] and item["scene"] == b[7]["scene"]
    torch.testing.assert_close(item["image"], b[7]["image"])
    assert ShapesDataset(16, seed=4)[7]["scene"] != item["scene"]
    val = ShapesDataset(16, seed=3, split="val", val_size=5)
    assert len(val) == 5
    assert all(val.scene(i)[0] != a.scene(i)[0] for i in range(5))


def test_item_format_and_low_res():
    item = ShapesDataset(32, low_res_size=8)[1]
    assert item["image"].shape == (3, 32, 32) and item["low_res"].shape == (3, 8, 8)
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    scene = Scene.from_dict(item["scene"])
    expected = torch.from_numpy(np.asarray(render_scene(scene, 8), dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    torch.testing.assert_close(item["low_res"], expected)
    batch = collate([item, ShapesDataset(32, low_res_size=8)[2]])
    assert batch["image"].shape == (2, 3, 32, 32) and isinstance(batch["scene"], list)


def test_exclusion(scenes):
    pairs = {(o.color, o.shape) for s in scenes for o in s.objects}
    assert pairs.isdisjoint(HELD_OUT_PAIRS)
    assert len(pairs) == 24 - len(HELD_OUT_PAIRS)
    rng = random.Random(1)
    only_red = [(c, s) for c in COLORS if c != "red" for s in ("circle", "square", "triangle", "diamond")]
    assert all(o.color == "red" for _ in range(50) for o in sample_scene(rng, exclude=only_red).objects)
    assert any(
        (o.color, o.shape) in HELD_OUT_PAIRS
        for i in range(40)
        for o in ShapesDataset(8, exclude=[]).scene(i)[0].objects
    )


def test_geometry(scenes):
    two = [s for s in scenes if len(s.objects) == 2]
    assert 150 < len(two) < 350
    for scene in scenes:
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            assert min(x0, y0) >= MARGIN - 1e-9 and max(x1, y1) <= 1 - MARGIN + 1e-9
    for scene in two:
        a, b = scene.objects
        ax0, ay0, ax1, ay1 = a.box
        bx0, by0, bx1, by1 = b.box
        assert ax1 + MARGIN <= bx0 or bx1 + MARGIN <= ax0 or ay1 + MARGIN <= by0 or by1 + MARGIN <= ay0
        dx, dy = b.cx - a.cx, b.cy - a.cy
        along, across = {
            "to the left of": (dx, dy),
            "to the right of": (-dx, dy),
            "above": (dy, dx),
            "below": (-dy, dx),
        }[scene.relation]
        assert along >= MIN_SEPARATION and along > abs(across)
    assert {s.relation for s in two} == set(RELATIONS)


def test_relation_holds_is_y_down():
    top, bottom = (
        ShapeObject("red", "circle", "small", 0.5, 0.2),
        ShapeObject("blue", "square", "small", 0.5, 0.8),
    )
    assert relation_holds(top, bottom, "above") and relation_holds(bottom, top, "below")
    assert not relation_holds(top, bottom, "to the left of")


@pytest.mark.parametrize("size", [64, 256])
def test_colours_at_centres_and_white_background(scenes, size):
    for scene in scenes[:10]:
        pixels = np.asarray(render_scene(scene, size))
        assert pixels.shape == (size, size, 3)
        for o in scene.objects:
            assert tuple(pixels[int(o.cy * size), int(o.cx * size)]) == COLORS[o.color]
        assert (pixels[0, 0] == 255).all() and (pixels[-1, -1] == 255).all()


def test_shapes_are_drawn_as_specified():
    scene = Scene((ShapeObject("blue", "triangle", "large", 0.5, 0.5),))
    pixels = np.asarray(render_scene(scene, 100)).astype(int)
    coloured = (pixels != 255).any(-1)
    assert coloured[31:69, 49].all() and not coloured[31, 35]  # apex at the top middle
    assert coloured[68, 31:69].all()  # base along the bottom edge
    diamond = np.asarray(render_scene(Scene((ShapeObject("red", "diamond", "large", 0.5, 0.5),)), 100))
    assert (diamond[50, 31] != 255).any() and (diamond[31, 31] == 255).all()  # vertices at the edge midpoints


def test_low_res_matches_downsampled_high_res(scenes):
    for scene in scenes[:3]:
        low = np.asarray(render_scene(scene, 64), dtype=np.float32)
        high = np.asarray(render_scene(scene, 1024).resize((64, 64), Image.Resampling.BOX), dtype=np.float32)
        assert np.abs(low - high).mean() < 1.0


def test_captions_round_trip(scenes):
    rng = random.Random(0)
    for scene in scenes[:100]:
        caption = caption_scene(scene, rng, size_word_prob=0.5)
        spec = parse_caption(caption)
        assert spec.relation == scene.relation
        for want, got in zip(scene.objects, spec.objects, strict=True):
            assert (got.color, got.shape) == (want.color, want.shape) and got.size in (None, want.size)
    spec = parse_caption("A large yellow triangle above a small cyan diamond.")
    assert [o.size for o in spec.objects] == ["large", "small"] and spec.relation == "above"
    with pytest.raises(ValueError, match="cannot parse"):
        parse_caption("a pink circle")


def test_prompt_sets():
    sets = prompt_sets(20, seed=0)
    assert sets == prompt_sets(20, seed=0) and all(len(s) == 20 for s in sets)
    held = set(HELD_OUT_PAIRS)
    for caption in sets.single + sets.relational:
        assert all((o.color, o.shape) not in held for o in parse_caption(caption).objects)
    assert len({len(parse_caption(c).objects) for c in sets.relational}) == 1
    for caption in sets.held_out:
        assert any((o.color, o.shape) in held for o in parse_caption(caption).objects)
    assert {len(parse_caption(c).objects) for c in sets.held_out} == {1, 2}


def test_bad_options():
    with pytest.raises(ValueError, match="valid colours: red"):
        ShapesDataset(exclude=[("pink", "circle")])
    with pytest.raises(ValueError, match="valid shapes: circle"):
        ShapesDataset(exclude=[["red", "hexagon"]])
    with pytest.raises(ValueError, match="two_object_prob"):
        ShapesDataset(two_object_prob=1.5)
    with pytest.raises(ValueError, match="valid names: shapes"):
        build_dataset(DataConfig(dataset="nope"))
    with pytest.raises(ValueError, match="hard_negatives must be a list of kinds.*relation, swap"):
        ShapesDataset(hard_negatives=["relation", "texture"])
    with pytest.raises(ValueError, match="hard_negatives must be a list"):
        ShapesDataset(hard_negatives="relation")


def test_satisfies():
    a, b = ShapeObject("red", "circle", "small", 0.2, 0.5), ShapeObject("blue", "square", "large", 0.7, 0.5)
    scene = Scene((a, b), "to the left of")
    assert satisfies(scene, parse_caption("a red circle to the left of a large blue square"))
    assert satisfies(scene, parse_caption("a blue square to the right of a small red circle"))  # the other order
    assert not satisfies(scene, parse_caption("a red circle to the right of a blue square"))
    assert not satisfies(scene, parse_caption("a blue square to the left of a red circle"))
    assert not satisfies(scene, parse_caption("a large red circle to the left of a blue square"))
    assert not satisfies(scene, parse_caption("a red circle"))
    assert satisfies(Scene((a,)), parse_caption("a small red circle"))


def test_hard_negatives_are_wrong_only_where_asked(scenes):
    kinds = ["relation", "swap", "binding"]
    rng = random.Random(0)
    seen = {kind: 0 for kind in kinds}
    for scene in scenes[:200]:
        caption = caption_scene(scene, rng)
        negatives = hard_negatives(scene, caption, kinds, rng)
        assert len(negatives) == len(kinds)
        if len(scene.objects) == 1:
            assert negatives == [None, None, None]
            continue
        spec = parse_caption(caption)
        for kind, wrong in zip(kinds, negatives, strict=True):
            if wrong is None:
                continue
            seen[kind] += 1
            assert not satisfies(scene, parse_caption(wrong)), (caption, kind, wrong)
            other = parse_caption(wrong)
            if kind == "relation":
                assert other.objects == spec.objects and other.relation != spec.relation
            elif kind == "swap":
                assert other.objects == spec.objects[::-1] and other.relation == spec.relation
            else:
                assert [o.shape for o in other.objects] == [o.shape for o in spec.objects]
                assert [o.color for o in other.objects] == [o.color for o in spec.objects][::-1]
        same_color = scene.objects[0].color == scene.objects[1].color
        assert (negatives[2] is None) == same_color  # trading equal colours changes nothing
    assert min(seen.values()) > 50, seen


def test_dataset_items_hold_their_hard_negatives():
    dataset = ShapesDataset(image_size=16, two_object_prob=1.0, hard_negatives=["relation", "swap"])
    item = dataset[3]
    scene, caption = dataset.scene(3)
    assert item["caption"] == caption and len(item["negatives"]) == 2
    assert item["negatives"] == dataset[3]["negatives"]  # item i is always the same
    assert all(n is None or not satisfies(scene, parse_caption(n)) for n in item["negatives"])
    batch = collate([dataset[i] for i in range(4)])
    assert len(batch["negatives"]) == 4 and all(len(n) == 2 for n in batch["negatives"])
    assert "negatives" not in ShapesDataset(image_size=16)[0]


def test_build_dataset():
    config = DataConfig(dataset="shapes", image_size=16, options={"exclude": [], "seed": 2}, val_size=3)
    assert len(build_dataset(config, split="val")) == 3
    assert build_dataset(config, low_res_size=8)[0]["low_res"].shape == (3, 8, 8)


def test_sample_scene_for_a_caption_fits_it():
    from unclip.data.shapes import SIZES, parse_caption, sample_scene_for

    rng = random.Random(0)
    sizes = set()
    for caption in ["a red circle", "a small blue square", "a green triangle above a large yellow diamond"] * 20:
        spec = parse_caption(caption)
        scene = sample_scene_for(spec, rng)
        assert scene.relation == spec.relation
        for want, got in zip(spec.objects, scene.objects, strict=True):
            assert (got.color, got.shape) == (want.color, want.shape)
            assert want.size is None or got.size == want.size
        if spec.relation:
            assert relation_holds(*scene.objects, spec.relation)
        if caption == "a red circle":
            sizes.add(scene.objects[0].size)
    assert sizes == set(SIZES)  # a size the caption leaves out is drawn
