"""Orange, the colour the shapes data draw only when asked: the data option leaves the default data as they were,
and the checker reads orange without confusing it with its neighbours red and yellow."""

import pytest

from tests.test_eval import RenderPipeline, WhitePipeline
from unclip.data.shapes import (
    COLORS,
    EXTRA_COLORS,
    Scene,
    ShapeObject,
    ShapesDataset,
    parse_caption,
    prompt_sets,
    render_scene,
    satisfies,
    single_object_prompts,
)
from unclip.eval import __main__ as cli
from unclip.eval import suites
from unclip.eval.shapes_checker import check, detect, validate_checker


def test_the_default_data_are_unchanged_by_the_option():
    plain = ShapesDataset(64, num_samples=300)
    off = ShapesDataset(64, num_samples=300, extra_colors=[])
    scenes = [plain.scene(i) for i in range(300)]
    assert scenes == [off.scene(i) for i in range(300)]
    assert not any("orange" in caption for _, caption in scenes)
    assert all(o.color in COLORS for scene, _ in scenes for o in scene.objects)
    assert not any("orange" in p for prompts in prompt_sets(50) for p in prompts)


def test_extra_colors_draw_orange_at_the_asked_rate_with_its_article():
    data = ShapesDataset(64, num_samples=2000, extra_colors=["orange"], extra_color_prob=0.5)
    objects, orange = 0, 0
    for i in range(2000):
        scene, caption = data.scene(i)
        assert satisfies(scene, parse_caption(caption))
        assert "a orange" not in caption
        objects += len(scene.objects)
        orange += sum(o.color == "orange" for o in scene.objects)
    assert 0.45 < orange / objects < 0.55
    item = data[next(i for i in range(50) if data.scene(i)[0].objects[0].color == "orange")]
    assert item["image"].shape == (3, 64, 64)
    uniform = ShapesDataset(64, num_samples=2000, extra_colors=["orange"])  # 4 of the 24 colour-shape pairs
    share = sum(o.color == "orange" for i in range(2000) for o in uniform.scene(i)[0].objects)
    assert 0.12 < share / sum(len(uniform.scene(i)[0].objects) for i in range(2000)) < 0.22


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"extra_colors": ["red"]}, "extra_colors must be a list of colours from orange"),
        ({"extra_colors": "orange"}, "extra_colors must be a list"),
        ({"extra_color_prob": 0.5}, "extra_color_prob needs extra_colors"),
        ({"extra_colors": ["orange"], "extra_color_prob": 1.5}, "must be in \\[0, 1\\]"),
    ],
)
def test_bad_extra_colors_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        ShapesDataset(64, **options)


def test_single_object_prompts_cover_every_shape_and_size():
    prompts = single_object_prompts(["orange"], 24, seed=3)
    assert len(set(prompts)) == 12  # 4 shapes x (small, large, no size word), each twice
    assert "an orange circle" in prompts and "a large orange triangle" in prompts
    assert prompts == single_object_prompts(["orange"], 24, seed=3)
    assert all(parse_caption(p).objects[0].color == "orange" for p in prompts)
    with pytest.raises(ValueError, match="unknown colour 'teal'"):
        single_object_prompts(["teal"], 4)


def test_the_checker_tells_orange_from_red_and_yellow():
    scene = Scene(
        (
            ShapeObject("red", "circle", "small", 0.2, 0.2),
            ShapeObject("orange", "circle", "small", 0.5, 0.5),
            ShapeObject("yellow", "circle", "small", 0.8, 0.8),
        )
    )
    image = render_scene(scene, 64)
    assert sorted(o.color for o in detect(image)) == ["orange", "red", "yellow"]
    alone = render_scene(Scene((ShapeObject("orange", "square", "large", 0.5, 0.5),)), 64)
    assert check(alone, "a large orange square").correct
    assert not check(alone, "a large red square").correct
    assert not check(alone, "a large yellow square").correct
    assert EXTRA_COLORS["orange"] == (245, 130, 30)


def test_the_checker_reads_orange_scenes_as_it_reads_the_others():
    """Half of the objects orange, at 32 and 64 px and blurred and noised: the true captions accepted, and
    captions wrong in one thing (among them orange called another colour) rejected, as on the data's colours
    (tests/test_eval.py checks those, with orange in the checker's vocabulary)."""
    results = validate_checker(50, sizes=(32, 64), seed=2, degraded=(0.7, 0.05), extra_colors=["orange"])
    for name, rates in results.items():
        assert rates["accepted"] >= (0.97 if name == "32" else 0.99), name
        assert rates["rejected"] >= 0.99 and rates["rejected_by_kind"]["color"] >= 0.98, name


def test_the_shapes_suite_adds_a_set_of_the_new_colours_after_the_others(monkeypatch):
    pipe = RenderPipeline()
    options = dict(n=4, seed=2, batch_size=4, sets=["single", "new_colors"], new_colors=["orange"])
    results = suites.evaluate_shapes(pipe, None, **options)
    assert set(results["sets"]) == {"single", "new_colors", "all", "real"}
    assert results["sets"]["new_colors"]["accuracy"] == 1.0 and results["sets"]["new_colors"]["n"] == 4
    assert results["sets"]["all"]["n"] == 4  # the data's own sets only
    assert results["settings"]["new_colors"] == ["orange"]
    assert [c["seed"] for c in pipe.calls] == [2, 2 + 3 * 4]  # after single, relational and held_out
    white = suites.evaluate_shapes(WhitePipeline(), None, **options)
    assert white["sets"]["new_colors"]["accuracy"] == 0.0
    plain = suites.evaluate_shapes(RenderPipeline(), None, n=4, seed=2, batch_size=4, sets=["single"])
    assert plain["sets"]["single"] == results["sets"]["single"] and "new_colors" not in plain["settings"]
    with pytest.raises(ValueError, match="the set new_colors needs the colours it is made of"):
        suites.evaluate_shapes(pipe, None, n=2, sets=["new_colors"])

    monkeypatch.setattr(cli, "load_pipeline", lambda path, device, dtype: RenderPipeline())
    got = cli.main(["shapes", "--pipeline", "p", "--n", "2", "--sets", "new_colors", "--new-colors", "orange"])
    assert got["sets"]["new_colors"]["n"] == 2 and "all" not in got["sets"]
