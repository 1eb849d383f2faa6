import json

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_helpers import make_tiny_pipeline

from unclip import edits
from unclip.edits import prepare_mask, slerp
from unclip.imageio import load_image, read_png_metadata
from unclip.pipeline import UnCLIPPipeline

STEPS = 5  # inversion steps: on the random tiny decoder, few "leading" steps invert best (see edits.py)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("edits")
    return {
        "model": make_tiny_pipeline(root / "with_inpaint", inpaint=True),
        "repaint": make_tiny_pipeline(root / "plain", inpaint=False),
    }


@pytest.fixture(scope="module")
def pipe(folders):
    return UnCLIPPipeline.from_pretrained(folders["model"])


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A smooth 40x40 test image and a second, noisy 24x24 one, as files."""
    root = tmp_path_factory.mktemp("images")
    a = np.zeros((40, 40, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, 40)[None]
    a[10:30, 10:30] = (20, 200, 60)
    b = np.random.default_rng(1).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(a).save(root / "a.png")
    Image.fromarray(b).save(root / "b.png")
    mask = np.zeros((40, 40), np.uint8)
    mask[4:20, 6:26] = 255
    Image.fromarray(mask).save(root / "mask.png")
    return root


def _mse(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((x - target) ** 2).mean(dim=(1, 2, 3))


def test_slerp_ends_and_norm():
    a, b = torch.nn.functional.normalize(torch.randn(2, 2, 8), dim=-1)
    assert torch.equal(slerp(a, b, 0.0), a) and torch.equal(slerp(a, b, 1.0), b)
    mid = slerp(a, b, 0.5)
    torch.testing.assert_close(mid.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close((mid * a).sum(-1), (mid * b).sum(-1))  # halfway along the arc
    torch.testing.assert_close(slerp(a, a, 0.3), a)  # parallel: no division by sin(0)


def test_load_image_errors_and_crop(tmp_path, images):
    with pytest.raises(ValueError, match="cannot read image .*no such file"):
        load_image(tmp_path / "missing.png", 16)
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="cannot read image .*bad.png"):
        load_image(tmp_path / "bad.png", 16)
    (tmp_path / "cut.png").write_bytes((images / "a.png").read_bytes()[:60])  # truncated
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(tmp_path / "cut.png", 16)
    with pytest.raises(ValueError, match="positive integer"):
        load_image(images / "a.png", 0)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "wide.png")
    with pytest.warns(UserWarning, match="not square"):
        x = load_image(tmp_path / "wide.png", 16)
    assert x.shape == (1, 3, 16, 16) and x[0, 0].eq(1).all() and x[0, 1:].eq(-1).all()


def test_inverted_variations_reconstruct_and_seeds_reproduce(pipe, images):
    x_0 = load_image(images / "a.png", 16)
    exact = pipe.variations(images / "a.png", n=2, eta=0.0, inversion_steps=STEPS, size=16)
    reconstruction = exact.images[:1]
    # eta 0 is deterministic: one decoding per variation, not the default 4 identical ones
    assert [m["seed"] for m in exact.metadata] == [0, 1] and "candidates" not in exact.metadata[0]["settings"]
    fresh = pipe.variations(images / "a.png", n=3, invert=False, size=16).images
    # on this random decoder: MSE ~0.07 from the inverted latent, ~0.9 from fresh noise
    assert _mse(reconstruction, x_0).item() < 0.3 * _mse(fresh, x_0).min().item()
    varied = pipe.variations(images / "a.png", n=2, seed=3, eta=0.5, inversion_steps=STEPS, size=32)
    assert varied.images.shape == (2, 3, 32, 32) and not torch.equal(varied.images[0], varied.images[1])
    # variation i's decodings use seeds seed + i·candidates ...: variation 1 of seed 3 is variation 0 of seed 3 + 4
    assert varied.metadata[0]["settings"]["candidates"] == edits.VARIATION_CANDIDATES == 4
    alone = pipe.variations(images / "a.png", n=1, seed=7, eta=0.5, inversion_steps=STEPS, size=32)
    torch.testing.assert_close(alone.images[0], varied.images[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(
        varied.image_embeds[0], pipe.clip.embed_image([Image.open(images / "a.png")], normalize=True)[0]
    )
    with pytest.raises(ValueError, match="inversion's timesteps"):
        pipe.variations(images / "a.png", n=1, decoder={"steps": 10})


def test_variations_script(folders, images, tmp_path, capsys):
    from sample.variations import main

    args = ["--image", str(images / "a.png"), "--pipeline", str(folders["model"]), "--steps", str(STEPS)]
    paths = main([*args, "--n", "2", "--seed", "5", "--out", str(tmp_path)])
    # 4 decodings per variation by default: variation 1 keeps one of seeds 9-12, and is named by it
    seed = json.loads(read_png_metadata(paths[1])["seed"])
    assert 9 <= seed <= 12 and 5 <= json.loads(read_png_metadata(paths[0])["seed"]) <= 8
    assert [p.name for p in paths[1:]] == [f"a_variations_{seed:05d}.png", "a_variations_grid.png"]
    assert str(paths[0]) in capsys.readouterr().out
    meta = read_png_metadata(paths[1])
    assert meta["mode"] == "variation" and meta["source"] == str(images / "a.png")
    settings = json.loads(meta["settings"])
    assert settings["size"] == 32 and settings["decoder"]["sampler"] == "ddim" and settings["candidates"] == 4
    assert settings["decoder"]["eta"] == 0.5 and settings["decoder"]["inversion"]["steps"] == STEPS
    assert json.loads(read_png_metadata(paths[2])["per_image"])[1]["seed"] == seed
    # the kept decoding's seed, decoded alone, is the same image
    again = main([*args, "--n", "1", "--seed", meta["seed"], "--candidates", "1", "--out", str(tmp_path / "again")])
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (paths[1], again[0]))
    assert np.abs(a - b).max() <= 1
    fresh = main([*args, "--n", "1", "--fresh-noise", "--size", "16", "--out", str(tmp_path / "fresh")])
    assert json.loads(read_png_metadata(fresh[0])["settings"])["decoder"]["sampler"] == "dpm++"


@pytest.mark.parametrize("method", ["model", "repaint"])
def test_inpaint_keeps_the_known_region_exactly(folders, images, method):
    pipe = UnCLIPPipeline.from_pretrained(folders[method])
    assert (pipe.inpaint_stage is not None) == (method == "model")
    out = pipe.inpaint(images / "a.png", images / "mask.png", "a blue square", n=2, seed=1, size=32)
    assert out.images.shape == (2, 3, 32, 32) and out.low_res.shape == (2, 3, 16, 16)
    assert out.metadata[0]["settings"]["decoder"]["method"] == method
    known = load_image(images / "a.png", 16)
    keep = prepare_mask(Image.open(images / "mask.png"), (40, 40), 16)[0, 0] == 0  # (16, 16)
    assert 0 < keep.sum() < 16 * 16
    assert torch.equal(out.low_res[:, :, keep], known[:, :, keep].expand(2, -1, -1))
    assert (out.low_res[:, :, ~keep] - known[:, :, ~keep]).abs().max() > 0.1  # the rest was repainted
    # the upsampler keeps the known region at its own size too: the input resized to 32, not the upsampled 16
    known_32 = load_image(images / "a.png", 32)
    keep_32 = prepare_mask(Image.open(images / "mask.png"), (40, 40), 32)[0, 0] == 0
    assert torch.equal(out.images[:, :, keep_32], known_32[:, :, keep_32].expand(2, -1, -1))
    assert (out.images[:, :, ~keep_32] - known_32[:, :, ~keep_32]).abs().max() > 0.1
    again = pipe.inpaint(images / "a.png", images / "mask.png", "a blue square", n=1, seed=2, size=32)
    torch.testing.assert_close(again.images[0], out.images[1], rtol=0, atol=1e-5)
    guided = pipe.inpaint(
        images / "a.png",
        images / "mask.png",
        "a blue square",
        n=2,
        seed=1,
        size=32,
        decoder={"text_guidance_scale": 3},
    )
    assert guided.metadata[0]["settings"]["decoder"]["text_guidance_scale"] == 3
    assert torch.equal(guided.low_res[:, :, keep], out.low_res[:, :, keep])
    assert (guided.low_res[:, :, ~keep] - out.low_res[:, :, ~keep]).abs().max() > 1e-3  # the setting was applied
    if method == "repaint":
        with pytest.raises(ValueError, match="no inpainting decoder"):
            pipe.inpaint(images / "a.png", images / "mask.png", "a blue square", method="model")


def test_inpaint_keeps_the_candidate_clip_ranks_first(folders, images, monkeypatch):
    pipe = UnCLIPPipeline.from_pretrained(folders["model"])
    args = (images / "a.png", images / "mask.png", "a blue square")
    single = pipe.inpaint(*args, n=6, seed=10, size=16, candidates=1)  # the fills of seeds 10..15, one each
    scores = pipe.clip_scores(single.images, pipe.encode_text(["a blue square"] * 6).embed).view(2, 3)
    best = (scores.argmax(dim=1) + torch.tensor([0, 3])).tolist()
    out = pipe.inpaint(*args, n=2, seed=10, size=16, candidates=3)
    assert [m["seed"] for m in out.metadata] == [10 + i for i in best]
    assert out.names == [f"a_blue_square_inpaint_{10 + i:05d}" for i in best]
    assert out.metadata[0]["settings"]["candidates"] == 3
    torch.testing.assert_close(out.images, single.images[best], rtol=0, atol=1e-5)
    # the prompt is the whole image's caption: the prior and the decoder read it as given
    seen = []
    encode = pipe.encode_text
    monkeypatch.setattr(pipe, "encode_text", lambda prompts: seen.append(list(prompts)) or encode(prompts))
    pipe.inpaint(*args, n=1, size=16, candidates=2)
    assert seen == [["a blue square"] * 2]


def test_variations_keep_the_candidate_closest_to_the_image(pipe, images):
    plain = pipe.variations(images / "a.png", n=4, seed=3, size=16, invert=False, decoder={"steps": 2}, candidates=1)
    source = pipe.clip.embed_image([Image.open(images / "a.png")], normalize=True)[0]
    scores = (pipe.clip.embed_image(plain.images, normalize=True) @ source).view(2, 2)
    best = (scores.argmax(dim=1) + torch.tensor([0, 2])).tolist()
    out = pipe.variations(images / "a.png", n=2, seed=3, size=16, invert=False, decoder={"steps": 2}, candidates=2)
    assert [m["seed"] for m in out.metadata] == [3 + i for i in best]
    assert out.metadata[0]["settings"]["candidates"] == 2
    torch.testing.assert_close(out.images, plain.images[best], rtol=0, atol=1e-5)


def test_mask_policy(images, tmp_path):
    mask = Image.open(images / "mask.png")
    with pytest.warns(UserWarning, match="resized the mask"):
        small = prepare_mask(mask.resize((20, 20), Image.Resampling.NEAREST), (40, 40), 16)
    torch.testing.assert_close(small, prepare_mask(mask, (40, 40), 16))
    with pytest.raises(ValueError, match="aspect ratios differ"):
        prepare_mask(mask.resize((40, 20)), (40, 40), 16)
    grey = np.asarray(mask).copy()
    grey[0, :7] = [1, 50, 127, 128, 200, 254, 0]
    with pytest.warns(UserWarning, match="6 of 1600 pixels .* thresholded at 50%"):
        thresholded = prepare_mask(Image.fromarray(grey), (40, 40), 40)
    assert thresholded[0, 0, 0, :7].tolist() == [0, 0, 0, 1, 1, 1, 0]
    with pytest.raises(ValueError, match="all black: there is nothing to repaint"), pytest.warns(UserWarning):
        prepare_mask(Image.new("L", (40, 40), 60), (40, 40), 16)  # dark grey: black once thresholded
    one_pixel = np.zeros((400, 400), np.uint8)
    one_pixel[200, 200] = 255  # a pixel of a large mask still repaints the decoder pixel it falls in
    assert prepare_mask(Image.fromarray(one_pixel), (400, 400), 16).sum() == 1


def test_inpaint_script(folders, images, tmp_path, capsys):
    from sample.inpaint import main

    args = ["--image", str(images / "a.png"), "--pipeline", str(folders["repaint"]), "--steps", "2"]
    paths = main(
        [*args, "--mask", str(images / "mask.png"), "--prompt", "a blue square", "--n", "1", "--out", str(tmp_path)]
    )
    assert [p.name for p in paths] == [
        "a_blue_square_inpaint_00000.png",
        "a_blue_square_inpaint_00000_16px.png",
        "a_blue_square_inpaint_grid.png",
    ]
    meta = read_png_metadata(paths[1])
    assert meta["prompt"] == "a blue square" and meta["mask"] == str(images / "mask.png")
    assert json.loads(meta["settings"])["candidates"] == 1  # the tiny pipeline's default
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "caption of the whole desired image" in " ".join(capsys.readouterr().out.split())
    settings = json.loads(meta["settings"])
    assert settings["decoder"]["sampler"] == "repaint" and settings["decoder"]["steps"] == 2
    # the written decoder-size PNG keeps the input's pixels outside the mask, to the bit
    keep = (prepare_mask(Image.open(images / "mask.png"), (40, 40), 16)[0, 0] == 0).numpy()
    written = np.asarray(Image.open(paths[1]))
    expected = np.asarray(Image.open(images / "a.png").resize((16, 16), Image.Resampling.LANCZOS))
    assert np.array_equal(written[keep], expected[keep])
    for bad, error in [
        ([*args, "--mask", str(tmp_path / "none.png"), "--prompt", "x"], "cannot read image"),
        ([*args, "--mask", str(images / "mask.png"), "--prompt", " "], "empty prompt"),
        ([*args, "--mask", str(images / "b.png"), "--prompt", "x", "--size", "24"], "choose one of"),
    ]:
        with pytest.raises(SystemExit, match=error):
            main([*bad, "--out", str(tmp_path)])
    Image.new("L", (40, 40), 0).save(tmp_path / "black.png")
    with pytest.raises(SystemExit, match="error: .*all black"):
        main([*args, "--mask", str(tmp_path / "black.png"), "--prompt", "x", "--out", str(tmp_path)])


def test_interpolations_keep_their_ends(pipe, images):
    z_a, z_b = (pipe.clip.embed_image([Image.open(images / f)], normalize=True) for f in ("a.png", "b.png"))
    out = pipe.interpolate(images / "a.png", image2=images / "b.png", steps=3, inversion_steps=STEPS, size=16)
    assert out.images.shape == (3, 3, 16, 16) and [m["t"] for m in out.metadata] == [0.0, 0.5, 1.0]
    torch.testing.assert_close(out.image_embeds[0], z_a[0], rtol=0, atol=0)
    torch.testing.assert_close(out.image_embeds[-1], z_b[0], rtol=0, atol=0)
    reconstruction = pipe.variations(images / "a.png", n=1, eta=0.0, inversion_steps=STEPS, size=16).images
    torch.testing.assert_close(out.images[0], reconstruction[0], rtol=0, atol=1e-5)
    # text diff at θ = 0 is the image's own reconstruction
    diff = pipe.interpolate(
        images / "a.png", from_caption="a photo", to_caption="a drawing", steps=3, inversion_steps=STEPS, size=16
    )
    assert [m["theta"] for m in diff.metadata] == [0.0, 0.25, 0.5]
    torch.testing.assert_close(diff.images[0], reconstruction[0], rtol=0, atol=1e-5)
    assert not torch.allclose(diff.images[-1], reconstruction[0])
    text = pipe.encode_text(["a photo", "a drawing"]).embed
    z_d = torch.nn.functional.normalize(text[1] - text[0], dim=-1)
    torch.testing.assert_close(diff.image_embeds[-1], slerp(z_a, z_d[None], 0.5)[0])
    with pytest.raises(ValueError, match="exactly one target"):
        pipe.interpolate(images / "a.png", image2=images / "b.png", prompt="a cat")
    with pytest.raises(ValueError, match="both from_caption"):
        pipe.interpolate(images / "a.png", from_caption="a cat")


def test_interpolate_script(folders, images, tmp_path):
    from sample.interpolate import main

    args = ["--image", str(images / "a.png"), "--pipeline", str(folders["model"]), "--inversion-steps", str(STEPS)]
    paths = main([*args, "--prompt", "a blue square", "--steps", "3", "--out", str(tmp_path)])
    assert [p.name for p in paths] == [f"a_prompt_{i:02d}.png" for i in range(3)] + ["a_prompt_grid.png"]
    meta = read_png_metadata(paths[2])
    assert meta["mode"] == "interpolate_prompt" and meta["prompt"] == "a blue square"
    assert json.loads(meta["t"]) == 1.0 and json.loads(meta["frame"]) == 2
    assert json.loads(meta["settings"])["prior"]["steps"] == 3
    assert Image.open(paths[-1]).size == (3 * (32 + 2) + 2, 32 + 4)  # a strip of the frames
    paths = main([*args, "--image2", str(images / "b.png"), "--steps", "2", "--fresh-noise", "--out", str(tmp_path)])
    meta = read_png_metadata(paths[1])
    assert meta["mode"] == "interpolate_images" and meta["image2"] == str(images / "b.png")
    paths = main([*args, "--from-caption", "a", "--to-caption", "b", "--steps", "2", "--out", str(tmp_path)])
    meta = read_png_metadata(paths[1])
    assert meta["mode"] == "text_diff" and json.loads(meta["theta"]) == 0.5 and meta["to_caption"] == "b"
    for bad, error in [
        (["--steps", "3"], "exactly one target"),
        (["--prompt", ""], "empty prompt"),
        (["--prompt", "x", "--steps", "1"], "must be an integer >= 2"),
        (["--image2", str(tmp_path / "a_prompt_grid.txt")], "cannot read image"),
    ]:
        with pytest.raises(SystemExit, match=error):
            main([*args, *bad, "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no pipeline.json"):
        main(["--image", str(images / "a.png"), "--prompt", "x", "--pipeline", str(tmp_path)])
