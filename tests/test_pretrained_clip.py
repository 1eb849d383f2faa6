"""A real open_clip architecture (ViT-B-32, random weights saved as a local file) through every stage.

The stage networks are tiny; the CLIP is the published architecture: 512-d embeddings, 512-wide token encodings,
a context of 77 tokens and a 224 px image tower fed 64 px images. The scripts run as a user runs them, with
`clip.model_name=ViT-B-32 clip.pretrained=FILE` on the command line. Nothing is downloaded.

    HF_HUB_OFFLINE=1 python -m pytest -q -m slow tests/test_pretrained_clip.py   # 5 to 7 minutes on 2 busy CPU cores
"""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from pipeline_helpers import make_tiny_pipeline
from safetensors.torch import save_file

from unclip.checkpoint import build_pipeline_folder, save_model
from unclip.clip import TINY_CLIP_CONFIG, ClipAdapter
from unclip.config import ClipConfig, load_config
from unclip.data.embeddings import EmbeddingDataset
from unclip.nets.unet import UNet
from unclip.nets.upsampler import UpsamplerUNet
from unclip.pipeline import UnCLIPPipeline

ROOT = Path(__file__).resolve().parents[1]
FAST = ["train.max_steps=2", "train.batch_size=4", "train.log_every=1", "train.warmup_steps=1"]
FAST += ["train.eval_every=2", "train.checkpoint_every=2", "data.val_size=4"]
WIDTHS = ["model.clip_dim=512", "model.text_width=512", "model.text_ctx=77"]  # ViT-B-32's


def load_script(folder: str, name: str):
    spec = importlib.util.spec_from_file_location(f"{folder}_{name}", ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train(stage: str, config: str, *overrides: str) -> Path:
    """Run train/<stage>.py in this process; Accelerate's process-wide state is reset after it."""
    from accelerate.state import AcceleratorState

    try:
        return load_script("train", stage).main([f"configs/{config}", *overrides])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row]


@pytest.fixture(scope="module")
def vit_b_32(tmp_path_factory) -> Path:
    """ViT-B-32 with random weights, saved as a user's downloaded weights file would be."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-32", pretrained=None)
    path = tmp_path_factory.mktemp("weights") / "vit-b-32.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.slow
def test_vit_b_32_trains_every_stage_and_samples(vit_b_32, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    relative = os.path.relpath(vit_b_32, ROOT)  # recorded as an absolute path by the train/ scripts
    clip_args = ["clip.model_config=null", "clip.model_name=ViT-B-32", f"clip.pretrained={relative}"]
    clip = ClipAdapter.from_pretrained("ViT-B-32", str(vit_b_32))
    assert (clip.embed_dim, clip.text_width, clip.context_length, clip.image_size) == (512, 512, 77, 224)

    # precomputed embeddings for the prior, from 64 px images through the 224 px tower
    emb = tmp_path / "emb"
    load_script("train", "embed").main(
        ["configs/prior/tiny.yaml", *clip_args, "data.image_size=64", "data.options.num_samples=12"]
        + ["data.val_size=4", "--out", str(emb), "--tokens", "--batch-size", "8", "--device", "cpu"]
    )
    rows = EmbeddingDataset(emb, val_size=0)
    first = rows[0]
    assert first["image_embed"].shape == first["text_embed"].shape == (512,)
    assert first["text_tokens"].shape == (77, 512) and first["text_mask"].shape == (77,)
    caption = first["caption"]
    expected = clip.embed_text([caption], normalize=True).embed[0]
    torch.testing.assert_close(torch.as_tensor(first["text_embed"]).float(), expected, atol=2e-3, rtol=0)

    prior = train(
        "prior",
        "prior/tiny.yaml",
        *clip_args,
        *WIDTHS,
        *FAST,
        "data.dataset=embeddings",
        f"data.path={emb}",
        f"train.output_dir={tmp_path / 'prior'}",
    )
    decoder = train(
        "decoder",
        "decoder/tiny.yaml",
        *clip_args,
        *WIDTHS,
        *FAST,
        "model.image_size=64",
        "data.image_size=64",
        "model.attention_resolutions=[32]",
        "data.options.num_samples=12",
        f"train.output_dir={tmp_path / 'decoder'}",
    )
    upsampler = train(
        "upsampler",
        "upsampler/tiny.yaml",
        *clip_args,
        *FAST,
        "model.clip_dim=512",
        "model.low_res_size=64",
        "model.image_size=128",
        "data.image_size=128",
        "data.crop_size=32",
        "data.options.num_samples=12",
        f"train.output_dir={tmp_path / 'upsampler'}",
    )
    for export in (prior, decoder, upsampler):
        run = export.parent
        assert len(losses(run)) == 2 and all(np.isfinite(losses(run))), run
        recorded = json.loads((export / "config.json").read_text())["clip"]
        assert (recorded["model_name"], recorded["pretrained"]) == ("ViT-B-32", str(vit_b_32.resolve()))

    # the pipeline's CLIP is the decoder's, written into the folder; the sample script reads only the folder
    pipe = load_script("train", "pipeline").main(
        ["--out", str(tmp_path / "pipe"), "--prior", str(prior), "--decoder", str(decoder)]
        + ["--upsampler", str(upsampler), "--default", "prior.steps=3", "--default", "decoder.steps=3"]
    )
    assert ClipAdapter.from_checkpoint(pipe / "clip").fingerprint() == clip.fingerprint()
    out = tmp_path / "out"
    load_script("sample", "generate").main(
        ["--pipeline", str(pipe), "--prompt", "a red circle above a blue square", "--n", "2", "--size", "64"]
        + ["--out", str(out), "--device", "cpu", "--quiet"]
    )
    images = sorted(out.glob("*_0000[01].png"))
    assert len(images) == 2
    for path in images:
        pixels = np.asarray(Image.open(path))
        assert pixels.shape == (64, 64, 3) and pixels.std() > 0
    # and through the upsampler, which reads the CLIP image embedding too
    load_script("sample", "generate").main(
        ["--pipeline", str(pipe), "--prompt", "a green diamond", "--n", "1", "--size", "128"]
        + ["--out", str(out), "--device", "cpu", "--quiet"]
    )
    assert np.asarray(Image.open(out / "a_green_diamond_00000.png")).shape == (128, 128, 3)


@pytest.mark.slow
def test_weights_file_of_another_architecture_is_named(vit_b_32):
    with pytest.raises(
        ValueError, match=r"could not load CLIP weights .*vit-b-32.safetensors into open_clip 'ViT-B-16'"
    ):
        ClipAdapter.from_pretrained("ViT-B-16", str(vit_b_32))


@pytest.mark.slow
def test_quickgelu_tag_from_the_cache_builds_quickgelu(vit_b_32, tmp_path, monkeypatch):
    """A tag whose weights were trained with QuickGELU (ViT-B-32 'openai') is built with it, read offline from a
    Hugging Face cache, and a saved copy rebuilds it: open_clip alone would build GELU and only warn."""
    import huggingface_hub.constants

    repo = open_clip.get_pretrained_cfg("ViT-B-32", "openai")["hf_hub"].strip("/")
    snapshot = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_model.safetensors").symlink_to(vit_b_32)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    clip = ClipAdapter.from_pretrained("ViT-B-32", "openai")
    assert clip.model_config["quick_gelu"] is True
    assert isinstance(clip.model.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    copy = ClipAdapter.from_checkpoint(clip.save(tmp_path / "clip"))
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.testing.assert_close(copy.embed_image(images), clip.embed_image(images))
    plain = ClipAdapter.from_pretrained("ViT-B-32", str(vit_b_32))  # a file: the architecture as named
    assert not isinstance(plain.model.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)


# -- train/pipeline.py takes the decoder's CLIP when --clip is left out (tiny parts, fast) ----------------------


def tiny_decoder(path: Path, clip: ClipConfig) -> Path:
    config = load_config("configs/decoder/tiny.yaml")
    save_model(UNet(config.model), path, kind="decoder", diffusion=config.diffusion, clip=clip)
    return path


def test_pipeline_without_clip_takes_the_decoders(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    decoder = tiny_decoder(tmp_path / "decoder", ClipConfig(model_config=TINY_CLIP_CONFIG))
    pipe = load_script("train", "pipeline").main(["--out", str(tmp_path / "pipe"), "--decoder", str(decoder)])
    expected = ClipAdapter.from_model_config(TINY_CLIP_CONFIG).fingerprint()
    assert ClipAdapter.from_checkpoint(pipe / "clip").fingerprint() == expected


@pytest.mark.parametrize(
    "clip, says",
    [
        (ClipConfig(), "names no CLIP.*pass --clip"),
        (ClipConfig(model_name="ViT-B-32", pretrained="gone/vit-b-32.safetensors"), "gone/vit-b-32.* does not exist"),
    ],
)
def test_pipeline_without_clip_names_what_is_missing(tmp_path, monkeypatch, capsys, clip, says):
    monkeypatch.chdir(ROOT)
    decoder = tiny_decoder(tmp_path / "decoder", clip)
    with pytest.raises(SystemExit, match=f"error: .*{says}"):
        load_script("train", "pipeline").main(["--out", str(tmp_path / "pipe"), "--decoder", str(decoder)])
    assert not (tmp_path / "pipe").exists()


def test_pipeline_refuses_a_clip_of_other_widths(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    decoder = tiny_decoder(tmp_path / "decoder", ClipConfig(model_config=TINY_CLIP_CONFIG))
    other = ClipAdapter.from_model_config({**TINY_CLIP_CONFIG, "embed_dim": 16}).save(tmp_path / "clip16")
    argv = ["--out", str(tmp_path / "pipe"), "--clip", str(other), "--decoder", str(decoder)]
    with pytest.raises(SystemExit, match=r"error: --decoder .* model.clip_dim=32, but the CLIP .* has 16"):
        load_script("train", "pipeline").main(argv)
    assert not (tmp_path / "pipe").exists()


def test_a_relative_weights_file_is_recorded_absolute(tmp_path, monkeypatch):
    """The train/ scripts record clip.pretrained as an absolute path, which train/pipeline.py reads from anywhere."""
    from unclip.training.cli import absolute_weights_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "clip.safetensors").write_bytes(b"")
    named = ["clip.model_config=null", "clip.model_name=ViT-B-32"]
    config = load_config(ROOT / "configs/prior/tiny.yaml", [*named, "clip.pretrained=weights/clip.safetensors"])
    absolute_weights_path(config)
    assert config.clip.pretrained == str((tmp_path / "weights" / "clip.safetensors").resolve())
    tag = load_config(ROOT / "configs/prior/tiny.yaml", [*named, "clip.pretrained=laion2b_s34b_b79k"])
    absolute_weights_path(tag)
    assert tag.clip.pretrained == "laion2b_s34b_b79k"


# -- an upsampler conditioned on the CLIP image embedding (model.clip_dim) samples in the pipeline (tiny, fast) --


def test_clip_conditioned_upsampler_in_the_pipeline(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    parts = make_tiny_pipeline(tmp_path / "tiny", upsampler=False).parent / "parts"
    config = load_config("configs/upsampler/tiny.yaml", ["model.clip_dim=32"])
    torch.manual_seed(0)
    upsampler = UpsamplerUNet(config.model)
    with torch.no_grad():  # its output layer starts at zero: perturb it, so that the output depends on the inputs
        for p in upsampler.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    save_model(upsampler, parts / "up", kind="upsampler", diffusion=config.diffusion)
    folder = build_pipeline_folder(
        tmp_path / "pipe",
        clip=parts / "clip",
        prior=parts / "prior",
        decoder=parts / "decoder",
        upsamplers=[parts / "up"],
        defaults={"prior": {"steps": 3}, "decoder": {"steps": 3}, "upsampler_32": {"steps": 2}},
    )
    pipe = UnCLIPPipeline.from_pretrained(folder)
    out = pipe(["a red circle", "a blue square"], size=32, seed=0)
    assert out.images.shape == (2, 3, 32, 32) and torch.isfinite(out.images).all()
    edit = pipe.variations(Image.new("RGB", (16, 16), "red"), n=1, size=32, invert=False)
    assert edit.images.shape == (1, 3, 32, 32)
    # the embedding reaches the upsampler: the same low-res image and noise with another embedding differ
    low = out.images[:1, :, ::2, ::2]
    a, b = (
        pipe.upsample(low, 32, [torch.Generator().manual_seed(0)], image_embeds=e) for e in out.image_embeds[:, None]
    )
    assert not torch.allclose(a, b)
