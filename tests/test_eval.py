"""unclip.eval: the shapes checker on ground-truth renders, the metrics on synthetic data, and the suites and
CLI end to end with fake pipelines and evaluators."""

import json
import math
import os
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from unclip.data.shapes import (
    COLORS,
    SHAPES,
    Scene,
    ShapeObject,
    ShapesDataset,
    parse_caption,
    prompt_sets,
    render_scene,
    satisfies,
)
from unclip.eval import __main__ as cli
from unclip.eval import metrics, probes, report, suites
from unclip.eval.shapes_checker import (
    CORRUPTIONS,
    check,
    corrupt_caption,
    detect,
    match,
    render_prompt,
    scene_for_prompt,
    validate_checker,
)
from unclip.imageio import from_pil

DISTINCT_PROMPTS = [  # fully specified and pairwise exclusive: no render of one satisfies another
    "a large red circle",
    "a small blue square",
    "a large green triangle",
    "a small purple diamond",
    "a large cyan square to the left of a small yellow circle",
    "a small red diamond above a large blue triangle",
    "a large purple circle below a small green square",
    "a small yellow triangle to the right of a large cyan diamond",
]


def renders(prompts, size=64, seed=0) -> torch.Tensor:
    return torch.stack([from_pil(render_prompt(p, size, random.Random(seed + i))) for i, p in enumerate(prompts)])


class RenderPipeline:
    """A perfect fake generator: the exact render of a random scene that satisfies each prompt."""

    candidates = 1  # the pipeline's default reranking

    def __init__(self):
        self.calls, self.batch_calls = [], []

    def batches(self, prompts, *, batch_size, skip=frozenset(), seed=0, candidates=None, image_embeds=None, **call):
        """As UnCLIPPipeline.batches: each batch is made by one __call__, with the seeds one whole call gives it."""
        c = self.candidates if candidates is None else candidates
        self.batch_calls.append({"n": len(prompts), "seed": seed, "candidates": c, "batch_size": batch_size})
        for start in range(0, len(prompts), batch_size):
            if start not in skip:
                given = {} if image_embeds is None else {"image_embeds": image_embeds[start : start + batch_size]}
                chunk = prompts[start : start + batch_size]
                yield start, self(chunk, seed=seed + start * c, candidates=c, **given, **call)

    def __call__(self, prompts, *, size=64, seed=0, use_prior=True, candidates=1, prior=None, decoder=None):
        call = {"n": len(prompts), "seed": seed, "use_prior": use_prior, "size": size}
        self.calls.append({**call, "prior": prior, "decoder": decoder})
        return SimpleNamespace(images=renders(prompts, size, seed), image_embeds=torch.zeros(len(prompts), 8))

    def fingerprint(self):  # what the resume log of `unclip.eval shapes --out` keys on
        return type(self).__name__


class WhitePipeline(RenderPipeline):
    def __call__(self, prompts, *, size=64, seed=0, use_prior=True, candidates=1, prior=None, decoder=None):
        return SimpleNamespace(
            images=torch.ones(len(prompts), 3, size, size), image_embeds=torch.zeros(len(prompts), 8)
        )


class CheckerEvaluator:
    """A perfect evaluator for a vocabulary of prompts: text i -> e_i, an image -> the indicator of the
    prompts the checker says it satisfies."""

    def __init__(self, vocab):
        self.vocab = list(vocab)

    def embed_text(self, prompts, *, normalize=False):
        return SimpleNamespace(embed=F.one_hot(torch.tensor([self.vocab.index(p) for p in prompts]), len(self.vocab)))

    def embed_image(self, images, *, normalize=False):
        rows = []
        for image in images:
            objects = detect(image)
            rows.append(
                [float(all(f is not False for f in match(objects, parse_caption(p)).values())) for p in self.vocab]
            )
        return F.normalize(torch.tensor(rows), dim=-1)


class PixelEvaluator:
    """A cheap fake CLIP: images pooled to 4x4 (48 dims), prompts to a seeded random 48-vector."""

    def fingerprint(self):
        return "pixels"

    def embed_text(self, prompts, *, normalize=False):
        embeds = [torch.randn(48, generator=torch.Generator().manual_seed(sum(map(ord, p)))) for p in prompts]
        return SimpleNamespace(embed=F.normalize(torch.stack(embeds), dim=-1))

    def embed_image(self, images, *, normalize=False):
        return F.normalize(F.adaptive_avg_pool2d(images.float(), 4).flatten(1), dim=-1)


# ---- the checker ----


@pytest.fixture(scope="module")
def validation():
    return validate_checker(100, sizes=(32, 64, 256), seed=1, degraded=(0.7, 0.05))


@pytest.mark.parametrize("size", ["32", "64", "256"])
def test_checker_accepts_true_captions_and_rejects_mismatched_ones(validation, size):
    rates = validation[size]
    assert rates["accepted"] >= (0.98 if size == "32" else 0.99)  # 32 px: same-colour objects 0.6 px apart merge
    assert rates["rejected"] >= 0.99 and rates["n_mismatched"] >= 400
    assert set(rates["rejected_by_kind"]) == set(CORRUPTIONS)
    assert min(rates["rejected_by_kind"].values()) >= 0.97


def test_checker_survives_blur_and_noise(validation):
    assert validation["64_degraded"]["accepted"] >= 0.99
    assert validation["64_degraded"]["rejected"] >= 0.99


def test_check_reports_each_attribute():
    scene = Scene(
        (ShapeObject("red", "circle", "large", 0.25, 0.5), ShapeObject("blue", "triangle", "small", 0.75, 0.45)),
        "to the left of",
    )
    image = render_scene(scene, 64)
    result = check(image, "a large red circle to the left of a small blue triangle")
    assert result.correct and result.relation_ok and result.sizes_ok
    assert [(o.color, o.shape, o.size) for o in result.detected] == [
        ("red", "circle", "large"),
        ("blue", "triangle", "small"),
    ]
    assert result.detected[1].cy == pytest.approx(0.45, abs=0.01)  # box centre, not the triangle's centroid

    wrong = check(image, "a red circle to the right of a blue triangle")
    assert not wrong.correct and wrong.relation_ok is False and wrong.colors_ok and wrong.shapes_ok
    assert wrong.sizes_ok is None  # no size word: not asked for
    assert check(image, "a small red circle to the left of a blue triangle").sizes_ok is False
    assert check(image, "a red square to the left of a blue triangle").shapes_ok is False
    binding = check(image, "a blue circle to the left of a red triangle")
    assert binding.colors_ok is False and binding.shapes_ok
    one = check(image, "a red circle")
    assert one.count_ok is False and one.colors_ok and one.relation_ok is None and not one.correct
    missing = check(render_scene(Scene(scene.objects[1:]), 64), "a red circle to the left of a small blue triangle")
    assert missing.count_ok is False and missing.sizes_ok and missing.colors_ok is False
    assert missing.relation_ok is False
    assert json.loads(json.dumps(result.to_dict()))["correct"] is True


def test_check_takes_pil_images_and_tensors_of_any_size():
    scene = scene_for_prompt("a small green diamond above a large purple square", random.Random(3))
    for size in (48, 100, 512):
        image = render_scene(scene, size)
        for form in (image, from_pil(image), from_pil(image)[None]):
            assert check(form, "a small green diamond above a large purple square").correct, size
    with pytest.raises(ValueError, match="square"):
        check(Image.new("RGB", (64, 32), "white"), "a red circle")
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        check(torch.zeros(4, 64, 64), "a red circle")
    with pytest.raises(ValueError, match="cannot parse"):
        check(image, "a red banana")


def test_blank_images_and_specks_hold_no_objects():
    assert detect(Image.new("RGB", (64, 64), "white")) == ()
    assert check(torch.ones(3, 64, 64), "a red circle").correct is False
    image = render_scene(scene_for_prompt("a large yellow circle", random.Random(0)), 64)
    pixels = image.load()
    for x, y in ((2, 2), (60, 3), (5, 58), (61, 61)):  # single pixels in other colours, off the object
        pixels[x, y] = (30, 70, 220)
    assert check(image, "a large yellow circle").correct
    assert [o.color for o in detect(image)] == ["yellow"]


def test_render_prompt_draws_what_the_prompt_asks():
    for i, prompt in enumerate(DISTINCT_PROMPTS + ["a red triangle below a red triangle"]):
        scene = scene_for_prompt(prompt, random.Random(i))
        assert all(f is not False for f in match(scene.objects, parse_caption(prompt)).values())
        assert check(render_prompt(prompt, 64, random.Random(i)), prompt).correct


def test_corrupt_caption_changes_the_caption():
    scene = Scene((ShapeObject("red", "circle", "large", 0.5, 0.5),))
    rng = random.Random(0)
    for kind in ("color", "shape", "size", "count"):
        wrong = corrupt_caption(scene, "a red circle", kind, rng)
        assert wrong != "a red circle" and parse_caption(wrong)
    assert corrupt_caption(scene, "a red circle", "relation", rng) is None
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt_caption(scene, "a red circle", "texture", rng)


# ---- metrics ----


def test_the_checker_and_satisfies_agree_on_exact_scenes():
    """The training negatives and the probes' wrong captions use `satisfies`; the checker its own `match`."""
    dataset, rng = ShapesDataset(split="val", val_size=100), random.Random(1)
    for i in range(100):
        scene, caption = dataset.scene(i)
        for kind in CORRUPTIONS[:-1]:
            wrong = corrupt_caption(scene, caption, kind, rng)
            if wrong is not None:
                spec = parse_caption(wrong)
                assert satisfies(scene, spec) == all(v is not False for v in match(scene.objects, spec).values())


def test_frechet_distance_is_zero_for_identical_sets_and_grows_with_a_mean_shift():
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert metrics.embedding_frechet_distance(x, x) == pytest.approx(0, abs=1e-8)
    distances = [metrics.embedding_frechet_distance(x, x + shift) for shift in (0.1, 0.5, 1.0)]
    assert distances == sorted(distances)
    assert distances[-1] == pytest.approx(6.0, rel=1e-6)  # |mu_r - mu_f|^2 = 6 x 1^2, covariances equal


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    def exact_points(mean, std):  # 2D points ±a·e_i whose sample mean and covariance are exactly mean, diag(std²)
        d = len(mean)
        a = torch.tensor(std, dtype=torch.float64) * math.sqrt((2 * d - 1) / 2)
        return torch.tensor(mean, dtype=torch.float64) + torch.cat([torch.diag(a), -torch.diag(a)])

    mean_r, std_r, mean_f, std_f = [0.0, 1.0, -1.0], [1.0, 2.0, 0.5], [0.5, 1.0, 0.0], [3.0, 1.0, 0.5]
    # d² = |mu_r - mu_f|² + sum_i (sigma_r,i - sigma_f,i)² when both covariances are diagonal
    expected = (0.5**2 + 0 + 1**2) + (2**2 + 1**2 + 0)
    got = metrics.embedding_frechet_distance(exact_points(mean_r, std_r), exact_points(mean_f, std_f))
    assert got == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="embeddings"):
        metrics.embedding_frechet_distance(torch.randn(5, 4), torch.randn(5, 3))
    with pytest.raises(ValueError, match="at least 2"):
        metrics.embedding_frechet_distance(torch.randn(1, 4), torch.randn(5, 4))


def test_clip_metrics_with_a_perfect_evaluator():
    images = renders(DISTINCT_PROMPTS)
    evaluator = CheckerEvaluator(DISTINCT_PROMPTS)
    assert metrics.retrieval_accuracy(evaluator, images, DISTINCT_PROMPTS) == {
        "image_to_text": 1.0,
        "text_to_image": 1.0,
    }
    assert metrics.clip_score(evaluator, images, DISTINCT_PROMPTS) == pytest.approx(100.0)
    shuffled = images.roll(1, dims=0)
    assert metrics.retrieval_accuracy(evaluator, shuffled, DISTINCT_PROMPTS) == {
        "image_to_text": 0.0,
        "text_to_image": 0.0,
    }
    assert metrics.clip_score(evaluator, shuffled, DISTINCT_PROMPTS) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="one prompt per image"):
        metrics.clip_score(evaluator, images, DISTINCT_PROMPTS[:-1])


def test_retrieval_counts_repeated_prompts_once():
    prompts = ["a", "b", "a", "c"]
    text = torch.eye(3)[[0, 1, 0, 2]]
    images = torch.eye(3)[[0, 1, 0, 1]]  # the "c" image looks like "b"
    got = metrics.retrieval_top1(images, text, prompts)
    assert got["image_to_text"] == pytest.approx(3 / 4)
    assert got["text_to_image"] == pytest.approx(2 / 3)  # "c" retrieves a "b" image


def test_shapes_accuracy():
    prompts = DISTINCT_PROMPTS[:4]
    good = metrics.shapes_accuracy(renders(prompts), prompts)
    assert good["accuracy"] == 1.0 and good["sizes"] == 1.0 and good["relation"] is None and good["n"] == 4
    bad = metrics.shapes_accuracy(torch.ones(4, 3, 64, 64), prompts)
    assert bad["accuracy"] == 0.0 and bad["colors"] == 0.0 and bad["count"] == 0.0


def test_relation_given_objects_counts_only_images_whose_objects_are_right():
    prompts = ["a red circle above a blue square", "a red circle below a blue square"] * 2
    images = renders(prompts[:2] + prompts[:2][::-1])  # image 2 shows the other relation; image 3 is blank
    images[3] = 1.0
    got = metrics.shapes_accuracy(images, prompts)
    # objects right in 3 images, relation right in 2 of them (image 2 has them the wrong way round)
    assert got["relation_given_objects"] == pytest.approx(2 / 3) and got["relation"] == pytest.approx(2 / 4)
    assert metrics.shapes_accuracy(renders(["a red circle"]), ["a red circle"])["relation_given_objects"] is None


# ---- suites and CLI ----


def test_evaluate_shapes_end_to_end():
    pipe = RenderPipeline()
    results = suites.evaluate_shapes(pipe, PixelEvaluator(), n=4, seed=2, batch_size=3)
    assert set(results["sets"]) == {"single", "relational", "held_out", "all", "real"}
    assert all(row["accuracy"] == 1.0 for row in results["sets"].values())
    # the CLIP metrics of the images each prompt should get: set k's prompt i is rendered with seed 2 + 4k + i
    evaluator, expected = PixelEvaluator(), {}
    for k, (name, prompts) in enumerate(prompt_sets(4, 2)._asdict().items()):
        expected[name] = (evaluator.embed_image(renders(prompts, 64, 2 + 4 * k)), evaluator.embed_text(prompts).embed)
    real = ShapesDataset(64, split="val", val_size=8)
    expected["real"] = (
        evaluator.embed_image(torch.stack([real[i]["image"] for i in range(8)])),
        evaluator.embed_text([real.scene(i)[1] for i in range(8)]).embed,
    )
    for name, (image_embeds, text_embeds) in expected.items():
        row, sims = results["sets"][name], image_embeds @ text_embeds.T
        assert row["clip_score"] == pytest.approx(100 * sims.diag().mean().item(), rel=1e-5), name
        own = torch.arange(len(sims))  # the prompts within a set are distinct
        assert row["retrieval_image_to_text"] == pytest.approx((sims.argmax(1) == own).float().mean().item())
        assert row["retrieval_text_to_image"] == pytest.approx((sims.argmax(0) == own).float().mean().item())
    pooled = torch.cat([expected[name][0] for name in ("single", "relational", "held_out")])
    assert results["sets"]["all"]["clip_score"] == pytest.approx(
        100 * (pooled * torch.cat([expected[name][1] for name in ("single", "relational", "held_out")])).sum(-1).mean()
    )
    fake = torch.cat([expected["single"][0], expected["relational"][0]])
    assert results["clip_frechet_distance"] == pytest.approx(
        metrics.embedding_frechet_distance(expected["real"][0], fake), rel=1e-6
    )
    assert results["clip_frechet_distance"] > 1e-3 and "not Inception FID" in results["clip_frechet_distance_note"]
    assert results["sets"]["all"]["n"] == 12 and results["sets"]["real"]["n"] == 8
    assert results["sets"]["single"]["relation"] is None and results["sets"]["relational"]["relation"] == 1.0
    assert [c["seed"] for c in pipe.calls] == [2, 5, 6, 9, 10, 13]  # set k: seed + 4k + batch start
    json.dumps(results, allow_nan=False)

    white = suites.evaluate_shapes(WhitePipeline(), PixelEvaluator(), n=4, seed=2)
    assert all(white["sets"][name]["accuracy"] == 0.0 for name in ("single", "relational", "held_out", "all"))
    assert white["sets"]["real"]["accuracy"] == 1.0
    assert white["clip_frechet_distance"] > results["clip_frechet_distance"]


def test_evaluate_shapes_on_some_sets_gives_them_the_full_runs_prompts_and_seeds(monkeypatch, capsys):
    full_pipe, pipe = RenderPipeline(), RenderPipeline()
    full = suites.evaluate_shapes(full_pipe, PixelEvaluator(), n=4, seed=2, batch_size=3)
    part = suites.evaluate_shapes(pipe, PixelEvaluator(), n=4, seed=2, batch_size=3, sets=["relational"])
    assert set(part["sets"]) == {"relational", "all", "real"} and part["settings"]["sets"] == ["relational"]
    assert part["sets"]["relational"] == full["sets"]["relational"]
    assert [c["seed"] for c in pipe.calls] == [c["seed"] for c in full_pipe.calls[2:4]] == [6, 9]  # set 1 of 3
    assert len(pipe.calls) == 2 and "clip_frechet_distance" not in part  # it needs single and relational
    with pytest.raises(ValueError, match="sets must name some of single, relational, held_out"):
        suites.evaluate_shapes(pipe, None, n=2, sets=["double"])
    monkeypatch.setattr(cli, "load_pipeline", lambda path, device, dtype: pipe)
    results = cli.main(["shapes", "--pipeline", "p", "--n", "2", "--sets", "single", "held_out"])
    assert set(results["sets"]) == {"single", "held_out", "all", "real"}
    with pytest.raises(SystemExit):
        cli.main(["shapes", "--pipeline", "p", "--sets", "double"])
    assert "invalid choice: 'double'" in capsys.readouterr().err


class RegistryClip:
    """A fake CLIP whose image embedding is the image's index in a registry of every image it embedded."""

    image_size = 64

    def __init__(self):
        self.images = []

    def embed_image(self, images, *, normalize=False):
        start = len(self.images)
        self.images += [image if isinstance(image, torch.Tensor) else from_pil(image) for image in images]
        return torch.arange(start, len(self.images), dtype=torch.float32)[:, None]


class EmbeddingPipeline(WhitePipeline):
    """Draws white images from the prior, and the registered image an embedding names when it is given one."""

    def __init__(self):
        super().__init__()
        self.clip = RegistryClip()

    def __call__(self, prompts, *, size=64, seed=0, use_prior=True, image_embeds=None, **stages):
        if image_embeds is None:
            return super().__call__(prompts, size=size, seed=seed, use_prior=use_prior)
        assert image_embeds.shape == (len(prompts), 1)
        images = torch.stack([self.clip.images[int(i)] for i in image_embeds[:, 0]])
        return SimpleNamespace(images=images, image_embeds=image_embeds)


def test_evaluate_shapes_oracle_decodes_embeddings_of_exact_renders():
    pipe = EmbeddingPipeline()
    plain = suites.evaluate_shapes(pipe, PixelEvaluator(), n=4, seed=2, batch_size=3)
    assert plain["sets"]["relational"]["accuracy"] == 0.0 and not pipe.clip.images
    oracle = suites.evaluate_shapes(pipe, PixelEvaluator(), n=4, seed=2, batch_size=3, oracle=True)
    # each prompt's decoder call got the embedding of a render of that very prompt, in order
    assert all(oracle["sets"][name]["accuracy"] == 1.0 for name in ("single", "relational", "held_out"))
    assert len(pipe.clip.images) == 12
    assert oracle["settings"]["image_embeds"].startswith("oracle") and oracle["settings"]["use_prior"] is False
    with pytest.raises(ValueError, match="excludes use_prior=False"):
        suites.evaluate_shapes(pipe, None, n=2, oracle=True, use_prior=False)
    with pytest.raises(SystemExit):
        cli.main(["shapes", "--pipeline", "p", "--oracle", "--no-prior"])


def test_evaluate_openmoji_with_a_fake_dataset():
    dataset = [{"image": torch.rand(3, 32, 32) * 2 - 1, "caption": f"emoji {i}"} for i in range(5)]
    results = suites.evaluate_openmoji(WhitePipeline(), PixelEvaluator(), n=4, size=32, dataset=dataset)
    assert set(results["sets"]) == {"generated", "real"} and results["settings"]["n"] == 4
    assert results["clip_frechet_distance"] > 0 and results["settings"]["evaluator_is_pipeline_clip"] is False
    assert "clip_frechet_distance" in report.format_table(results)
    json.dumps(results, allow_nan=False)

    shared = torch.nn.Linear(2, 2)  # an evaluator that is the pipeline's own CLIP is flagged
    pipe, evaluator = WhitePipeline(), PixelEvaluator()
    pipe.clip, evaluator.model = SimpleNamespace(model=shared), shared
    results = suites.evaluate_openmoji(pipe, evaluator, n=4, size=32, dataset=dataset)
    assert results["settings"]["evaluator_is_pipeline_clip"] is True


def test_evaluate_openmoji_oracle_decodes_embeddings_of_the_emoji_themselves():
    dataset = [{"image": torch.rand(3, 32, 32) * 2 - 1, "caption": f"emoji {i}"} for i in range(5)]
    pipe = EmbeddingPipeline()
    plain = suites.evaluate_openmoji(pipe, PixelEvaluator(), n=4, size=32, batch_size=3, dataset=dataset)
    assert plain["clip_frechet_distance"] > 0.1 and not pipe.clip.images
    oracle = suites.evaluate_openmoji(pipe, PixelEvaluator(), n=4, size=32, batch_size=3, dataset=dataset, oracle=True)
    # each prompt's decoder call got the embedding of its own emoji, in order: the fake decoder draws it back
    assert len(pipe.clip.images) == 4
    assert all(torch.equal(a, b["image"]) for a, b in zip(pipe.clip.images, dataset[:4], strict=True))
    assert oracle["clip_frechet_distance"] == pytest.approx(0, abs=1e-4)
    assert oracle["sets"]["generated"] == oracle["sets"]["real"]
    assert oracle["settings"]["image_embeds"].startswith("oracle") and "image_embeds" not in plain["settings"]
    assert oracle["settings"]["use_prior"] is False and plain["settings"]["use_prior"] is True
    with pytest.raises(ValueError, match="excludes use_prior=False"):
        suites.evaluate_openmoji(pipe, None, n=2, dataset=dataset, oracle=True, use_prior=False)
    with pytest.raises(SystemExit):
        cli.main(["openmoji", "--pipeline", "p", "--evaluator-clip", "e", "--oracle", "--no-prior"])


def test_openmoji_items_held_out_and_training_names(tmp_path, monkeypatch):
    monkeypatch.setenv("UNCLIP_CACHE", str(tmp_path))
    val = suites.openmoji_items(8, "val", val_size=6, n=4)
    train = suites.openmoji_items(8, "train", val_size=6, n=5)
    val_codes = {e.code for e in val.dataset.emoji}
    train_codes = [train.dataset.emoji[i].code for i in train.indices]
    assert len(val) == 4 and len(train) == 5 and not val_codes & set(train_codes)
    assert not any(train.dataset.emoji[i].has_skin_tone for i in train.indices)
    assert [item["caption"] for item in train] == [train.dataset.emoji[i].names[0] for i in train.indices]
    assert train.indices != list(range(5)) and train.indices == suites.openmoji_items(8, "train", 6, 5).indices
    assert train[0]["image"].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="split must be 'val' or 'train'"):
        suites.openmoji_items(8, "test", 6, 5)

    calls = []  # the command line's --split reaches the suite
    monkeypatch.setattr(cli, "load_pipeline", lambda *a: WhitePipeline())
    monkeypatch.setattr(cli, "load_evaluator", lambda *a: PixelEvaluator())
    monkeypatch.setitem(cli.SUITES, "openmoji", lambda *a, **k: calls.append(k) or {"settings": {}})
    monkeypatch.setattr(cli, "format_table", lambda results: "")
    cli.main(["openmoji", "--pipeline", "p", "--evaluator-clip", "e", "--split", "train", "--n", "128"])
    cli.main(["openmoji", "--pipeline", "p", "--evaluator-clip", "e"])
    assert [(c["split"], c["val_size"]) for c in calls] == [("train", 64), ("val", 64)]


def test_cli_writes_json_and_a_table(tmp_path, monkeypatch, capsys):
    pipe, dtypes = RenderPipeline(), []
    monkeypatch.setattr(cli, "load_pipeline", lambda path, device, dtype: dtypes.append(dtype) or pipe)
    monkeypatch.setattr(cli, "load_evaluator", lambda path, device: PixelEvaluator())
    out = tmp_path / "results" / "shapes.json"
    argv = ["shapes", "--pipeline", "p", "--evaluator-clip", "e", "--n", "3", "--no-prior", "--device", "cpu"]
    results = cli.main([*argv, "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    assert results["settings"]["dtype"] == "fp32" and results["settings"]["device"] == "cpu"
    assert results["settings"]["use_prior"] is False and all(c["use_prior"] is False for c in pipe.calls)
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.split()[0] in results["sets"] or line.startswith("set ")]
    assert len(table) == 6 and len({len(line) for line in table}) == 1  # aligned columns
    assert "clip_frechet_distance" in printed and "not Inception FID" in printed
    assert cli.main([*argv, "--dtype", "fp16"])["settings"]["dtype"] == "fp16" and dtypes == ["fp32", "fp16"]


def test_cli_passes_sampler_overrides_to_the_pipeline(monkeypatch):
    pipe = RenderPipeline()
    monkeypatch.setattr(cli, "load_pipeline", lambda path, device, dtype: pipe)
    argv = ["shapes", "--pipeline", "p", "--n", "2", "--device", "cpu"]
    results = cli.main(
        [
            *argv,
            *["--prior-sampler", "ddpm", "--prior-steps", "1000"],
            *["--decoder-steps", "7", "--decoder-guidance", "2", "--decoder-text-guidance", "1.5"],
        ]
    )
    decoder = {"steps": 7, "guidance_scale": 2.0, "text_guidance_scale": 1.5}
    assert all(c["prior"] == {"sampler": "ddpm", "steps": 1000} and c["decoder"] == decoder for c in pipe.calls)
    assert results["settings"]["prior"] == {"sampler": "ddpm", "steps": 1000}
    pipe.calls.clear()
    cli.main(argv)  # none given: the pipeline's own settings
    assert all(c["prior"] is None and c["decoder"] is None for c in pipe.calls)
    for bad in (
        ["--decoder-steps", "0"],
        ["--prior-guidance", "-1"],
        ["--decoder-guidance", "nan"],
        ["--decoder-text-guidance", "-2"],
    ):
        with pytest.raises(SystemExit):
            cli.main([*argv, *bad])


def _exit(argv, capsys) -> tuple[int, str]:
    """The exit status of `python -m unclip.eval ARGV` and its last line on stderr."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    code, err = e.value.code, capsys.readouterr().err
    return (1, code) if isinstance(code, str) else (code, err.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["shapes", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["shapes", "--n", "0"], "argument --n: must be >= 1, got 0"),
        (["shapes", "--n", "-3"], "argument --n: must be >= 1, got -3"),
        (["shapes", "--size", "-64"], "argument --size: must be >= 1, got -64"),
        (["shapes", "--candidates", "-2"], "argument --candidates: must be >= 1, got -2"),
        (
            ["shapes", "--decoder-guidance", "inf"],
            "argument --decoder-guidance: must be a finite number >= 0, got inf",
        ),
        (["shapes", "--prior-steps", "0"], "argument --prior-steps: must be >= 1, got 0"),
        (["shapes", "--n", "many"], "argument --n: invalid int value: 'many'"),
        (["shapes", "--seed", "-1"], "argument --seed: must be >= 0, got -1"),
        (["shapes", "--device", "foo"], "argument --device: foo is not a device; use cpu, cuda, cuda:N or mps"),
        (["openmoji", "--evaluator-clip", "e", "--n", "1"], "argument --n: must be >= 2, got 1"),
        (["variations", "--per-image", "0"], "argument --per-image: must be >= 1, got 0"),
        (
            ["variations", "--decoder-guidance", "-1"],
            "argument --decoder-guidance: must be a finite number >= 0, got -1",
        ),
    ],
)
def test_cli_rejects_bad_numbers_before_loading_anything(argv, message, monkeypatch, capsys):
    loaded = []
    monkeypatch.setattr(cli, "load_pipeline", lambda *a: loaded.append(a) or RenderPipeline())
    assert _exit([*argv[:1], "--pipeline", "p", *argv[1:]], capsys) == (
        2,
        f"python -m unclip.eval {argv[0]}: error: {message}",
    )
    assert loaded == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["checker", "--n", "0"], "argument --n: must be >= 1, got 0"),
        (["checker", "--sizes", "64", "0"], "argument --sizes: must be >= 1, got 0"),
        (["clip", "--clip", "c", "--n", "1"], "argument --n: must be >= 2, got 1"),
        (["prior", "--prior", "p", "--clip", "c", "--groups", "0"], "argument --groups: must be >= 1, got 0"),
        (["prior", "--prior", "p", "--clip", "c", "--size-word-prob", "1.5"], "must be in [0, 1], got 1.5"),
    ],
)
def test_the_other_commands_reject_bad_numbers(argv, message, capsys):
    status, line = _exit(argv, capsys)
    assert status == 2 and line.startswith(f"python -m unclip.eval {argv[0]}: error: ") and line.endswith(message)
    with pytest.raises(ValueError, match="need n >= 1"):
        validate_checker(0, sizes=(64,))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cli_names_a_missing_gpu(capsys):
    status, line = _exit(["shapes", "--pipeline", "p", "--device", "cuda"], capsys)
    assert status == 2 and line.endswith("argument --device: cuda: no such device on this machine; use cpu")


def test_cli_refuses_an_unwritable_out_before_any_sampling(tmp_path, monkeypatch, capsys):
    pipe = RenderPipeline()
    monkeypatch.setattr(cli, "load_pipeline", lambda *a: pipe)
    (tmp_path / "a_file").write_text("")
    argv = ["shapes", "--pipeline", "p", "--n", "2", "--out"]
    status, line = _exit([*argv, str(tmp_path)], capsys)
    assert status == 1 and line == f"error: --out {tmp_path} is a folder; give the name of a JSON file"
    status, line = _exit([*argv, str(tmp_path / "a_file" / "sub" / "r.json")], capsys)
    assert status == 1 and line.endswith(f"cannot be written: {tmp_path / 'a_file'} is a file, not a folder")
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        status, line = _exit([*argv, str(locked / "r.json")], capsys)
        assert status == 1 and line.endswith(f"no permission to write in {locked}")
    assert pipe.calls == [] and not list(tmp_path.glob("**/*.json*"))
    needs = {"clip": ["--clip", "c"], "prior": ["--prior", "p", "--clip", "c"], "checker": []}
    for name in ("clip", "caption", "variations", "checker", "prior"):  # every command checks it first
        assert _exit([name, *needs.get(name, ["--pipeline", "p"]), "--out", str(tmp_path)], capsys)[0] == 1


def test_cli_names_a_broken_pipeline_or_evaluator_folder(tmp_path, capsys):
    import shutil

    from pipeline_helpers import make_tiny_pipeline

    folder = make_tiny_pipeline(tmp_path)
    listed, truncated = (shutil.copytree(folder, tmp_path / name) for name in ("listed", "truncated"))
    (listed / "pipeline.json").write_text("[1, 2]")
    weights = truncated / "decoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    argv = ["shapes", "--n", "1", "--size", "16", "--device", "cpu", "--pipeline"]
    status, line = _exit([*argv, str(tmp_path / "nowhere")], capsys)
    assert status == 1 and line.startswith(f"error: pipeline folder {tmp_path / 'nowhere'} does not exist")
    for broken in (listed, truncated):
        status, line = _exit([*argv, str(broken)], capsys)
        assert status == 1 and line.startswith("error: ") and str(broken) in line, line  # the folder is named
    status, line = _exit([*argv, str(folder), "--evaluator-clip", str(tmp_path / "listed" / "decoder")], capsys)
    assert status == 1 and "is not a CLIP checkpoint" in line
    status, line = _exit(["prior", "--prior", str(truncated / "decoder"), "--clip", str(folder / "clip")], capsys)
    assert status == 1 and line.startswith("error: ") and str(truncated / "decoder") in line


def test_cli_errors_are_one_line_without_a_traceback(tmp_path):
    """In a real process: the exit status and stderr of a bad number and of a missing folder."""
    import subprocess
    import sys

    for argv, status in ((["--batch-size", "0"], 2), (["--pipeline", str(tmp_path / "nowhere")], 1)):
        run = subprocess.run(
            [sys.executable, "-m", "unclip.eval", "shapes", "--pipeline", "p", "--device", "cpu", *argv],
            capture_output=True,
            text=True,
        )
        assert run.returncode == status and "Traceback" not in run.stderr
        assert run.stderr.strip().splitlines()[-1].startswith(("error: ", "python -m unclip.eval shapes: error: "))


def test_candidates_rerank_with_the_seeds_of_one_call(monkeypatch):
    pipe = RenderPipeline()
    monkeypatch.setattr(cli, "load_pipeline", lambda path, device, dtype: pipe)
    argv = ["shapes", "--pipeline", "p", "--n", "4", "--batch-size", "3", "--device", "cpu"]
    results = cli.main([*argv, "--candidates", "5"])
    assert results["settings"]["candidates"] == 5
    # set k is one `batches` run from seed 4k·5: prompt i of set k has the candidates (4k + i)·5 + j, j < 5, the
    # seeds of one call of the three sets, disjoint across sets
    assert [(b["seed"], b["n"], b["candidates"], b["batch_size"]) for b in pipe.batch_calls] == [
        (0, 4, 5, 3), (20, 4, 5, 3), (40, 4, 5, 3)
    ]  # fmt: skip
    assert [(c["seed"], c["n"]) for c in pipe.calls] == [(0, 3), (15, 1), (20, 3), (35, 1), (40, 3), (55, 1)]
    with pytest.raises(SystemExit):
        cli.main([*argv, "--candidates", "0"])
    for evaluate in (suites.evaluate_shapes, suites.evaluate_openmoji):
        with pytest.raises(ValueError, match="candidates must be >= 1"):
            evaluate(pipe, None, n=2, candidates=0)
        with pytest.raises(ValueError, match="batch_size must be >= 1, got (2 and )?0"):
            evaluate(pipe, None, n=2, batch_size=0)
    # a pipeline that reranks by default: evaluated that way unless told otherwise, and the seeds follow
    pipe.batch_calls.clear()
    pipe.candidates = 3
    assert cli.main(argv)["settings"]["candidates"] == 3
    assert [(b["seed"], b["candidates"]) for b in pipe.batch_calls] == [(0, 3), (12, 3), (24, 3)]
    pipe.batch_calls.clear()
    assert cli.main([*argv, "--candidates", "1"])["settings"]["candidates"] == 1
    assert [(b["seed"], b["candidates"]) for b in pipe.batch_calls] == [(0, 1), (4, 1), (8, 1)]  # told: none


class CandidatePipeline(RenderPipeline):
    """Reranks five candidates per prompt: only candidate 2 is drawn right, and the CLIP scores put it first
    only once the first four are seen."""

    scores = torch.tensor([0.1, 0.5, 0.9, 0.2, 0.3])

    def __call__(self, prompts, *, size=64, seed=0, candidates=1, **kwargs):
        assert candidates == 5
        right = renders(prompts, size, seed)
        candidate_images = torch.ones(len(prompts), 5, 3, size, size)  # blank: no object
        candidate_images[:, 2] = right
        scores = self.scores.repeat(len(prompts), 1)
        return SimpleNamespace(images=right, candidate_images=candidate_images, candidate_scores=scores)


def test_candidate_curve_reranks_among_the_first_k_candidates(monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_pipeline", lambda path, device, dtype: CandidatePipeline())
    results = cli.main(["shapes", "--pipeline", "p", "--n", "3", "--candidates", "5", "--device", "cpu"])
    curve = results["candidate_curve"]
    assert set(curve) == {"single", "relational", "held_out", "all"} and list(curve["all"]) == ["1", "2", "4", "5"]
    assert [curve["all"][k]["accuracy"] for k in curve["all"]] == [0.0, 0.0, 1.0, 1.0]  # 0.9 is among the first 4
    assert [curve["all"][k]["any_correct"] for k in curve["all"]] == [0.0, 0.0, 1.0, 1.0]
    assert curve["relational"]["5"]["n"] == 3 and curve["all"]["5"]["n"] == 9
    assert results["sets"]["all"]["accuracy"] == curve["all"]["5"]["accuracy"]  # all 5: the pipeline's choice
    assert "reranking among the first k candidates" in capsys.readouterr().out
    json.dumps(results, allow_nan=False)
    curve = metrics.candidate_curve([[(0.3, _verdict(False)), (0.2, _verdict(True)), (0.1, _verdict(True))]])
    assert {k: (v["accuracy"], v["any_correct"]) for k, v in curve.items()} == {"1": (0, 0), "2": (0, 1), "3": (0, 1)}


def _verdict(correct: bool):
    prompt = "a red circle"
    return check(renders([prompt])[0] if correct else torch.ones(3, 64, 64), prompt)


def test_a_real_pipelines_candidates_give_the_curve(tmp_path):
    from pipeline_helpers import make_tiny_pipeline

    from unclip.pipeline import UnCLIPPipeline

    pipe = UnCLIPPipeline.from_pretrained(make_tiny_pipeline(tmp_path))
    decoder = {"steps": 2}
    results = suites.evaluate_shapes(pipe, None, n=2, size=16, candidates=3, decoder=decoder, sets=["single"])
    kept, curve = results["sets"]["single"], results["candidate_curve"]["single"]
    assert list(curve) == ["1", "2", "3"] and curve["3"]["n"] == 2
    assert {k: v for k, v in curve["3"].items() if k != "any_correct"} == kept  # the kept images, checked again


class DyingPipeline:
    """Delegates to a pipeline, and raises once its batch number `die_at` is made, before the batch is handed on
    (a run killed part-way); counts the batches made."""

    def __init__(self, pipe, die_at=None):
        self.pipe, self.die_at, self.calls = pipe, die_at, 0

    def batches(self, *args, **kwargs):
        for batch in self.pipe.batches(*args, **kwargs):
            self.calls += 1
            if self.calls == self.die_at:
                raise KeyboardInterrupt
            yield batch

    def __getattr__(self, name):
        return getattr(self.pipe, name)


def test_a_killed_shapes_run_resumes_from_its_log_with_the_same_results(tmp_path, monkeypatch):
    from pipeline_helpers import make_tiny_pipeline

    from unclip.pipeline import UnCLIPPipeline

    pipe = UnCLIPPipeline.from_pretrained(make_tiny_pipeline(tmp_path))
    options = dict(n=3, size=16, batch_size=2, candidates=3, decoder={"steps": 2}, sets=["single", "relational"])
    full = suites.evaluate_shapes(pipe, PixelEvaluator(), **options)
    log = tmp_path / "run.partial.jsonl"
    with pytest.raises(KeyboardInterrupt):  # killed while making the third of four batches
        suites.evaluate_shapes(DyingPipeline(pipe, die_at=3), PixelEvaluator(), resume=log, **options)
    lines = log.read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["settings"]["candidates"] == 3  # settings + 2 batches
    log.write_text(log.read_text() + '{"set": "relational", "start": 2, "che')  # killed while writing a line
    rest = DyingPipeline(pipe)
    resumed = suites.evaluate_shapes(rest, PixelEvaluator(), resume=log, **options)
    assert rest.calls == 2 and resumed == full  # verdicts, candidates and embeddings round-trip exactly
    assert len(log.read_text().splitlines()) == 5
    with pytest.raises(ValueError, match=r"other settings \(candidates, seed\); delete it"):
        suites.evaluate_shapes(pipe, PixelEvaluator(), resume=log, **{**options, "candidates": 2}, seed=1)

    # the CLI keeps the log beside --out until the JSON is written, and a rerun of the command resumes
    monkeypatch.setattr(cli, "load_pipeline", lambda path, device, dtype: dying)
    out = tmp_path / "eval" / "shapes.json"
    argv = ["shapes", "--pipeline", "p", "--n", "3", "--size", "16", "--batch-size", "2", "--candidates", "3"]
    argv += ["--decoder-steps", "2", "--sets", "single", "--out", str(out)]
    dying = DyingPipeline(pipe, die_at=2)
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv)
    assert not out.exists() and (tmp_path / "eval" / "shapes.json.partial.jsonl").exists()
    dying = DyingPipeline(pipe)
    results = cli.main(argv)
    checker = {k: full["sets"]["single"][k] for k in results["sets"]["single"]}  # no evaluator: no CLIP metrics
    assert dying.calls == 1 and results["sets"]["single"] == checker
    assert json.loads(out.read_text())["sets"]["single"] == checker
    assert not (tmp_path / "eval" / "shapes.json.partial.jsonl").exists()


def test_a_shapes_log_follows_the_models_not_their_path(tmp_path, monkeypatch):
    """The log's header holds a fingerprint of the pipeline's weights and defaults: a copy of the folder elsewhere
    resumes the run, and the same weights with another default guidance scale are refused (before the
    fingerprint, the header held the path and only the settings given on the command line)."""
    import shutil

    from pipeline_helpers import make_tiny_pipeline

    from unclip.pipeline import UnCLIPPipeline

    folder = make_tiny_pipeline(tmp_path)
    copy = shutil.copytree(folder, tmp_path / "copy")
    changed = shutil.copytree(folder, tmp_path / "changed")
    index = json.loads((changed / "pipeline.json").read_text())
    index.setdefault("defaults", {}).setdefault("decoder", {})["guidance_scale"] = 2.5
    (changed / "pipeline.json").write_text(json.dumps(index))
    fingerprints = [UnCLIPPipeline.from_pretrained(f).fingerprint() for f in (folder, copy, changed)]
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]

    made = []

    def load(path, device, dtype, die_at=None):
        made.append(DyingPipeline(UnCLIPPipeline.from_pretrained(path), die_at=die_at))
        return made[-1]

    out = tmp_path / "eval" / "shapes.json"
    argv = ["shapes", "--n", "3", "--size", "16", "--batch-size", "2", "--candidates", "2", "--decoder-steps", "2"]
    argv += ["--sets", "single", "--out", str(out)]
    monkeypatch.setattr(cli, "load_pipeline", lambda *a: load(*a, die_at=2))
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv + ["--pipeline", str(folder)])
    monkeypatch.setattr(cli, "load_pipeline", load)
    with pytest.raises(SystemExit, match=r"other settings \(pipeline_fingerprint\)"):
        cli.main(argv + ["--pipeline", str(changed)])
    cli.main(argv + ["--pipeline", str(copy)])
    assert made[-1].calls == 1 and out.exists()  # the copy made only the batch the killed run had not logged


class EchoVariations:
    """A perfect variation maker (each variation is the source image itself), or a blank one."""

    sizes = [64]

    def __init__(self, blank=False):
        self.blank, self.calls = blank, []

    def variations(self, source, *, n, seed, invert, size, decoder, candidates):
        assert candidates == 4  # the suite's default, as sample/variations.py's
        self.calls.append((seed, invert, decoder))
        image = torch.ones(3, size, size) if self.blank else from_pil(source)
        settings = {"decoder": {"guidance_scale": (decoder or {}).get("guidance_scale", 1.0)}}
        return SimpleNamespace(images=image.expand(n, -1, -1, -1), metadata=[{"settings": settings}] * n)


def test_variations_suite_checks_every_variation_against_its_sources_caption():
    echo = EchoVariations()
    results = suites.evaluate_variations(echo, n=6, seed=3, per_image=2, decoder={"guidance_scale": 2.0})
    assert results["sets"]["single"]["accuracy"] == 1 and results["sets"]["relational"]["accuracy"] == 1
    assert results["sets"]["relational"]["n"] == 12 and results["sets"]["relational"]["relation"] == 1
    assert [c[0] for c in echo.calls[:6]] == [3, 11, 19, 27, 35, 43]  # seed + i·per_image·candidates
    assert (
        echo.calls[0][1:] == (False, {"guidance_scale": 2.0}) and results["settings"]["decoder"]["guidance_scale"] == 2
    )
    blank = suites.evaluate_variations(EchoVariations(blank=True), n=3, sets=["single"])
    assert list(blank["sets"]) == ["single"] and blank["sets"]["single"]["accuracy"] == 0
    with pytest.raises(ValueError, match="sets must name"):
        suites.evaluate_variations(echo, n=2, sets=["pairs"])


class DyingVariations(EchoVariations):
    """EchoVariations that is killed (KeyboardInterrupt) at its `die_at`-th call."""

    def __init__(self, die_at=None):
        super().__init__()
        self.die_at = die_at

    def variations(self, source, **kwargs):
        if len(self.calls) + 1 == self.die_at:
            raise KeyboardInterrupt
        out = super().variations(source, **kwargs)
        if len(self.calls) % 2:  # some variations fail, so that verdicts must round-trip to give the same rates
            out.images = torch.ones_like(out.images)
        return out


def test_a_killed_variations_run_resumes_from_its_log_with_the_same_results(tmp_path):
    log, options = tmp_path / "variations.json.partial.jsonl", dict(n=3, seed=1, per_image=2)
    full = suites.evaluate_variations(DyingVariations(), **options)
    with pytest.raises(KeyboardInterrupt):
        suites.evaluate_variations(DyingVariations(die_at=5), resume=log, **options)
    rest = DyingVariations()
    rest.calls = [None] * 4  # the same renders fail as in the full run
    resumed = suites.evaluate_variations(rest, resume=log, **options)
    assert len(rest.calls) == 6 and resumed == full  # only renders 5 and 6 of 6 were made again
    with pytest.raises(ValueError, match=r"other settings \(per_image\)"):
        suites.evaluate_variations(DyingVariations(), resume=log, **{**options, "per_image": 3})


def test_variations_cli_runs_a_real_pipeline(tmp_path, capsys):
    from pipeline_helpers import make_tiny_pipeline

    folder = make_tiny_pipeline(tmp_path)
    out = tmp_path / "variations.json"
    argv = ["variations", "--pipeline", str(folder), "--n", "2", "--per-image", "2", "--sets", "single"]
    results = cli.main(argv + ["--fresh-noise", "--decoder-guidance", "2", "--out", str(out)])
    assert results["sets"]["single"]["n"] == 4 and json.loads(out.read_text())["sets"] == results["sets"]
    assert not out.with_name(out.name + ".partial.jsonl").exists()  # the resume log goes once the JSON is written
    assert results["settings"]["decoder"]["guidance_scale"] == 2 and results["settings"]["invert"] is False
    assert results["settings"]["candidates"] == 4
    assert "variations (" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(argv + ["--per-image", "0"])


class BagOfWordsClip:
    """A fake CLIP that sees which colours and shapes there are and how many objects, and nothing else: a
    caption's colour and shape words, an image's detected objects."""

    image_size = 64
    words = [*COLORS, *SHAPES]

    def _bag(self, words: list[str], objects: int) -> list[float]:
        return [float(w in words) for w in self.words] + [float(objects == 1), float(objects == 2)]

    def embed_text(self, prompts, *, normalize=False):
        bags = [self._bag(p.split(), sum(w in SHAPES for w in p.split())) for p in prompts]
        return SimpleNamespace(embed=F.normalize(torch.tensor(bags), dim=-1))

    def embed_image(self, images, *, normalize=False):
        found = [detect(image) for image in images]
        bags = [self._bag([w for o in objects for w in (o.color, o.shape)], len(objects)) for objects in found]
        return F.normalize(torch.tensor(bags), dim=-1)


def test_probe_clip_finds_what_a_clip_can_see(monkeypatch, capsys):
    results = probes.probe_clip(BagOfWordsClip(), n=40, seed=3)
    by_kind = results["preferred_by_kind"]
    assert by_kind["color"] == by_kind["shape"] == by_kind["count"] == 1.0
    # the same bag of words: a tie, so the true caption is not preferred
    assert by_kind["size"] == by_kind["relation"] == by_kind["swap"] == by_kind["binding"] == 0.0
    assert results["n_mismatched"] > 40 and 0 < results["preferred"] < 1
    monkeypatch.setattr(cli, "load_evaluator", lambda path, device: BagOfWordsClip())
    assert cli.main(["clip", "--clip", "c", "--n", "40", "--seed", "3", "--device", "cpu"]) == {"clip": "c", **results}
    assert "relation" in capsys.readouterr().out
    with pytest.raises(ValueError, match="n must be >= 2"):
        probes.probe_clip(BagOfWordsClip(), n=1)


def test_probe_decoder_caption_measures_what_the_decoder_reads(tmp_path, capsys):
    """The probe moves with the caption only through the decoder's text pathway: cut that pathway and every
    wrong caption leaves the prediction where it was."""
    from pipeline_helpers import make_tiny_pipeline

    from unclip.pipeline import UnCLIPPipeline

    folder = make_tiny_pipeline(tmp_path, upsampler=False)
    pipe = UnCLIPPipeline.from_pretrained(folder)
    results = probes.probe_decoder_caption(pipe, n=6, seed=1, timesteps=(999, 500))
    assert results["n"] == 6 and results["timesteps"] == [999, 500] and results["n_mismatched"] > 6
    change = results["prediction_change"]
    assert set(change) == {"999", "500"} and set(change["999"]) <= set(CORRUPTIONS)
    assert all(v > 0 for v in change["999"].values())
    batched = probes.probe_decoder_caption(pipe, n=6, seed=1, timesteps=(999, 500), batch_size=5)
    assert all(batched["prediction_change"][t] == pytest.approx(change[t], rel=1e-4) for t in change)
    decoder, fixed = pipe.decoder.model, pipe.encode_text(["a red circle"])

    def deaf(x_t, t, *, image_embed, text_tokens, text_mask, text_words=None, cond_drop=None):  # one caption, always
        B = x_t.shape[0]
        tokens, mask = fixed.tokens.expand(B, -1, -1), fixed.mask.expand(B, -1)
        return decoder(x_t, t, image_embed=image_embed, text_tokens=tokens, text_mask=mask, cond_drop=cond_drop)

    deaf.config = decoder.config
    pipe.decoder.model = deaf
    cut = probes.probe_decoder_caption(pipe, n=6, seed=1, timesteps=(999,))["prediction_change"]["999"]
    assert set(cut) == set(change["999"]) and max(cut.values()) == 0
    pipe.decoder.model = decoder

    seen = []

    def recording(x_t, t, cond_drop, **cond):
        seen.append(cond_drop)
        return decoder(x_t, t, cond_drop=cond_drop, **cond)

    recording.config = decoder.config
    pipe.decoder.model = recording
    text_only = probes.probe_decoder_caption(pipe, n=6, seed=1, timesteps=(999,), text_only=True)
    assert text_only["text_only"] and text_only["prediction_change"]["999"] != change["999"]
    assert all(bool((drop == torch.tensor([True, False])).all()) for drop in seen)  # (image, text) dropped
    pipe.decoder.model = decoder
    args = ["caption", "--pipeline", str(folder), "--n", "6", "--seed", "1", "--timesteps", "999", "500"]
    again = cli.main(args)["prediction_change"]
    assert all(again[t] == pytest.approx(change[t]) for t in change)
    assert "relation" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"timesteps must be in \[0, 999\], got \[1000\]"):
        probes.probe_decoder_caption(pipe, n=6, timesteps=(1000,))
    with pytest.raises(SystemExit):
        cli.main(["caption", "--pipeline", str(folder), "--n", "1"])
    assert "argument --n: must be >= 2, got 1" in capsys.readouterr().err


def test_cli_checker(capsys):
    results = cli.main(["checker", "--n", "8", "--sizes", "64"])
    assert set(results) == {"64", "64_degraded"}
    assert "accepted%" in capsys.readouterr().out


def test_metrics_take_a_real_clip_adapter():
    from unclip.clip import TINY_CLIP_CONFIG, ClipAdapter

    evaluator = ClipAdapter.from_model_config(TINY_CLIP_CONFIG)
    images, prompts = renders(DISTINCT_PROMPTS[:3]), DISTINCT_PROMPTS[:3]
    with torch.no_grad():
        image_embeds = F.normalize(evaluator.embed_image(images).float(), dim=-1)
        text_embeds = F.normalize(evaluator.embed_text(prompts).embed.float(), dim=-1)
    sims = image_embeds @ text_embeds.T  # (image, prompt)
    for shift in (0, 1):  # each image with its own prompt, then with the next one's
        pairs = sims.diag(shift) if shift == 0 else torch.stack([sims[i, (i + shift) % 3] for i in range(3)])
        got = metrics.clip_score(evaluator, images, prompts[shift:] + prompts[:shift], batch_size=2)
        assert got == pytest.approx(100 * pairs.mean().item(), abs=1e-4)
    own = torch.arange(3)
    assert metrics.retrieval_accuracy(evaluator, images, prompts) == pytest.approx(
        {
            "image_to_text": (sims.argmax(1) == own).float().mean().item(),
            "text_to_image": (sims.argmax(0) == own).float().mean().item(),
        }
    )
    embeds = metrics.embed_images(evaluator, images, batch_size=2)  # two batches, in order
    assert embeds.shape == (3, 32) and torch.allclose(embeds, image_embeds, atol=1e-6)


def test_shapes_without_an_evaluator_scores_the_checker_alone(monkeypatch, capsys):
    pipe = RenderPipeline()
    monkeypatch.setattr(cli, "load_pipeline", lambda path, device, dtype: pipe)
    results = cli.main(["shapes", "--pipeline", "p", "--n", "3", "--device", "cpu"])
    assert results["sets"]["single"]["accuracy"] == 1.0  # exact renders pass the checker
    assert "clip_score" not in results["sets"]["single"] and "clip_frechet_distance" not in results
    printed = capsys.readouterr().out
    assert "\nsingle " in printed and "clip_frechet_distance" not in printed


def test_cli_pruning_sets_the_pipelines_schedule_and_is_recorded(tmp_path, capsys):
    from pipeline_helpers import make_tiny_pipeline

    folder = make_tiny_pipeline(tmp_path)
    argv = ["shapes", "--pipeline", str(folder), "--n", "1", "--size", "16", "--device", "cpu", "--sets", "single"]
    argv += ["--candidates", "4", "--decoder-steps", "3"]
    assert cli.main([*argv, "--pruning", "1:2"])["settings"]["pruning"] == "1:2"
    assert "pruning" not in cli.main([*argv, "--pruning", "none"])["settings"]
    # a stage at or past the last decoder step drops nothing, and is not claimed
    assert "pruning" not in cli.main([*argv, "--pruning", "3:2"])["settings"]
    status, line = _exit([*argv, "--pruning", "2:2,1:1"], capsys)
    assert status == 1 and line.startswith("error: --pruning: pruning must be STEP:KEEP pairs")
