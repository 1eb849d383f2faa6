import json

import pytest
import torch

from unclip.checkpoint import load_model
from unclip.config import load_config
from unclip.diffusion import GaussianDiffusion
from unclip.imageio import read_png_metadata
from unclip.nets.inpaint import InpaintUNet
from unclip.nets.unet import UNet
from unclip.sampling import sample_decoder
from unclip.tasks import build_task
from unclip.tasks.decoder import random_inpaint_mask
from unclip.training import Trainer

TINY = "configs/decoder/tiny.yaml"


def test_short_training_lowers_the_loss_and_writes_grids(tmp_path):
    config = load_config(
        TINY,
        [
            f"train.output_dir={tmp_path}",
            "train.max_steps=40",
            "train.lr=2e-3",
            "train.eval_every=40",
            "train.checkpoint_every=40",
            "train.ema_warmup_steps=0",
        ],
    )
    task = build_task(config)
    before = task.evaluate(task.model, task.model)["val/loss"]
    Trainer(task, config).fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    after = [r for r in rows if "val/loss" in r][-1]["val/loss"]
    assert after < 0.7 * before, (before, after)
    grid = tmp_path / "samples" / "step_0000040.png"
    assert grid.is_file() and "captions" in read_png_metadata(grid)
    loaded = load_model(tmp_path / "export").model
    assert type(loaded) is UNet


def test_inpainting_finetunes_from_a_decoder_and_keeps_the_known_region(tmp_path):
    from train.decoder import main

    decoder = main([TINY, f"train.output_dir={tmp_path / 'dec'}", "train.max_steps=2", "train.eval_every=100"])
    export = main(
        [
            "configs/decoder/inpaint_tiny.yaml",
            f"train.output_dir={tmp_path / 'inp'}",
            "train.max_steps=2",
            "train.eval_every=2",
            f"train.init_from={decoder}",
        ]
    )
    loaded = load_model(export)
    model = loaded.model
    assert isinstance(model, InpaintUNet) and loaded.meta["kind"] == "inpaint"
    # started from the decoder: its weights were copied, the first conv widened with zeros for the new inputs
    source = load_model(decoder).model.state_dict()
    run = load_config("configs/decoder/inpaint_tiny.yaml", [f"train.init_from={decoder}"])
    start = build_task(run).model.state_dict()
    assert set(source) == set(start)
    for key, value in source.items():
        if key != "input_conv.weight":
            assert torch.equal(start[key], value), key
    widened = start["input_conv.weight"]
    assert torch.equal(widened[:, :3], source["input_conv.weight"]) and not widened[:, 3:].any()
    assert (tmp_path / "inp" / "samples" / "step_0000002.png").is_file()

    image = torch.rand(2, 3, 16, 16) * 2 - 1
    mask = random_inpaint_mask(2, 16, generator=torch.Generator().manual_seed(0))
    out = sample_decoder(
        model,
        GaussianDiffusion.from_config(loaded.diffusion),
        torch.randn(2, 32),
        torch.randn(2, 5, 48),
        torch.ones(2, 5, dtype=torch.bool),
        steps=4,
        inpaint={"image": image, "mask": mask},
        generator=torch.Generator().manual_seed(0),
    )
    keep = mask.expand_as(image) == 0
    assert torch.equal(out[keep], image[keep])
    assert not torch.equal(out[~keep], image[~keep])


def test_text_words_fine_tune_trains_the_word_projection(tmp_path):
    """Fine-tuning a plain decoder with model.text_words: the caption's word embeddings reach the network in
    training (their zero-initialised projection moves), and a caller without them gets a clear error."""
    from train.decoder import main

    plain = main([TINY, f"train.output_dir={tmp_path / 'plain'}", "train.max_steps=1", "train.eval_every=100"])
    export = main(
        [
            TINY,
            f"train.output_dir={tmp_path / 'words'}",
            "train.max_steps=3",
            "train.eval_every=3",
            "model.text_words=true",
            f"train.init_from={plain}",
        ]
    )
    model = load_model(export).model
    assert model.config.text_words and model.words_proj.weight.abs().amax() > 0
    with pytest.raises(ValueError, match=r"model.text_words\), but none were given"):
        sample_decoder(
            model,
            GaussianDiffusion.from_config(load_model(export).diffusion),
            torch.randn(1, 32),
            torch.randn(1, 5, 48),
        )


def test_inpaint_without_a_decoder_to_start_from_builds_a_fresh_model():
    config = load_config("configs/decoder/inpaint_tiny.yaml")
    assert isinstance(build_task(config).model, InpaintUNet)


def test_data_and_model_sizes_must_agree():
    with pytest.raises(ValueError, match="data.image_size"):
        build_task(load_config(TINY, ["data.image_size=32"]))


def test_text_guidance_needs_caption_tokens():
    config = load_config(TINY, ["model.text_width=0"]).model
    with pytest.raises(ValueError, match="text_guidance_scale needs a decoder conditioned on text"):
        sample_decoder(UNet(config), GaussianDiffusion.from_config(load_config(TINY).diffusion), torch.randn(1, 32),
                       steps=2, text_guidance_scale=2.0)  # fmt: skip


def test_random_inpaint_mask():
    g = torch.Generator().manual_seed(0)
    masks = random_inpaint_mask(64, (16, 24), g)
    assert masks.shape == (64, 1, 16, 24) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    per_mask = masks.flatten(1)
    assert (per_mask.min(dim=1).values == 0).all() and (per_mask.max(dim=1).values == 1).all()
    assert 0.1 < masks.mean() < 0.9
    torch.testing.assert_close(random_inpaint_mask(64, (16, 24), torch.Generator().manual_seed(0)), masks)
