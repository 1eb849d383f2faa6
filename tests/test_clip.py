import os
import time
import warnings

import numpy as np
import open_clip
import pytest
import torch
from huggingface_hub import try_to_load_from_cache
from PIL import Image

from unclip.clip import TINY_CLIP_CONFIG, ClipAdapter
from unclip.clip_models import CONFIG_NAME, WEIGHTS_NAME, save_clip
from unclip.config import ClipConfig

PROMPTS = ["a red square", "a small blue circle on a green background", ""]


@pytest.fixture(scope="module")
def clip():
    return ClipAdapter.from_model_config(TINY_CLIP_CONFIG)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, clip):
    return clip.save(tmp_path_factory.mktemp("clip") / "export", name="unclip-test-tiny")


def random_images(batch=2, size=32, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_dimensions(clip):
    assert (clip.embed_dim, clip.dim, clip.text_width, clip.context_length, clip.image_size) == (
        32,
        32,
        48,
        16,
        32,
    )
    assert not any(p.requires_grad for p in clip.model.parameters())
    assert not clip.model.training


def test_embed_text_shapes_and_mask(clip):
    text = clip.embed_text(PROMPTS)
    assert text.embed.shape == (3, 32) and text.tokens.shape == (3, 16, 48) and text.mask.shape == (3, 16)
    assert text.embed.dtype == text.tokens.dtype == torch.float32 and text.mask.dtype == torch.bool
    counts = [len(clip.tokenizer.encode(p)) + 2 for p in PROMPTS]  # + SOT and EOT
    assert text.mask.sum(1).tolist() == counts
    for row, n in zip(text.mask, counts, strict=True):  # real tokens first, then padding
        assert row[:n].all() and not row[n:].any()
    assert (text.tokens[~text.mask] == 0).all()
    assert (text.tokens[text.mask].abs().sum(-1) > 0).all()


def test_embed_text_words_are_the_text_transformers_input(clip):
    """`words` are the token embeddings the text transformer starts from, one per real token, padding zeroed."""
    text = clip.embed_text(PROMPTS)
    assert text.words.shape == text.tokens.shape and text.words.dtype == torch.float32
    expected = clip.model.token_embedding(clip.tokenize(PROMPTS))
    torch.testing.assert_close(text.words[text.mask], expected[text.mask])
    assert (text.words[~text.mask] == 0).all()


def test_embed_text_matches_open_clip_encode_text(clip):
    text = clip.embed_text(PROMPTS)
    expected = clip.model.encode_text(clip.tokenize(PROMPTS))
    torch.testing.assert_close(text.embed, expected, rtol=0, atol=0)
    normalized = clip.embed_text(PROMPTS, normalize=True).embed
    torch.testing.assert_close(normalized.norm(dim=-1), torch.ones(3))


def test_embed_text_is_deterministic_and_padding_independent(clip):
    a = clip.embed_text(PROMPTS)
    b = clip.embed_text(PROMPTS)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    alone = clip.embed_text([PROMPTS[1]])
    torch.testing.assert_close(alone.embed[0], a.embed[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(alone.tokens[0], a.tokens[1], rtol=1e-5, atol=1e-6)


def test_truncation_warns_and_keeps_eot(clip):
    long_prompt = "a very long prompt " * 10
    with pytest.warns(UserWarning, match="context length of 16 tokens"):
        text = clip.embed_text([long_prompt, "short"])
    assert text.mask[0].all()
    with pytest.warns(UserWarning, match="a very long prompt"):
        assert clip.tokenize([long_prompt])[0, -1] == clip.tokenizer.eot_token_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clip.embed_text(["fits easily"])


def test_empty_prompt_list_is_an_error(clip):
    with pytest.raises(ValueError, match="empty"):
        clip.embed_text([])


def test_embed_image_tensor_and_pil(clip):
    images = random_images()
    embed = clip.embed_image(images)
    assert embed.shape == (2, 32) and embed.dtype == torch.float32
    assert clip.embed_image(random_images(size=48)).shape == (2, 32)  # resized and cropped to 32
    # the same pixels as PIL images go through the model's own PIL preprocessing
    images = torch.round((images + 1) / 2 * 255) / 255 * 2 - 1
    pil = [Image.fromarray(np.uint8(torch.round((x + 1) / 2 * 255).permute(1, 2, 0).numpy())) for x in images]
    torch.testing.assert_close(clip.embed_image(pil), clip.embed_image(images), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="B, 3, H, W"):
        clip.embed_image(images[0])


def test_checkpoint_roundtrip(clip, checkpoint):
    assert (checkpoint / CONFIG_NAME).is_file() and (checkpoint / WEIGHTS_NAME).is_file()
    a = ClipAdapter.from_config(ClipConfig(checkpoint=str(checkpoint)))
    b = ClipAdapter.from_checkpoint(checkpoint)
    images = random_images()
    for x, y, z in zip(clip.embed_text(PROMPTS), a.embed_text(PROMPTS), b.embed_text(PROMPTS), strict=True):
        assert torch.equal(x, y) and torch.equal(y, z)
    assert torch.equal(clip.embed_image(images), a.embed_image(images))
    assert torch.equal(a.embed_image(images), b.embed_image(images))


def test_open_clip_loads_the_checkpoint(clip, checkpoint):
    ids, images = clip.tokenize(PROMPTS), random_images()
    pixels = clip.preprocess((images + 1) / 2)
    open_clip.add_model_config(checkpoint / "unclip-test-tiny.json")
    registered = open_clip.create_model("unclip-test-tiny", pretrained=str(checkpoint / WEIGHTS_NAME))
    local_dir = open_clip.create_model(f"local-dir:{checkpoint}")
    with torch.no_grad():
        for model in (registered, local_dir):
            # frozen like the adapter's: nn.MultiheadAttention takes its fused fast path only when no
            # parameter requires grad, and that path differs from the slow one by ~1e-6
            model.eval().requires_grad_(False)
            torch.testing.assert_close(model.encode_text(ids), clip.embed_text(PROMPTS).embed, rtol=0, atol=0)
            torch.testing.assert_close(model.encode_image(pixels), clip.embed_image(images), rtol=0, atol=0)


def test_from_config_model_config_is_seeded():
    config = ClipConfig(model_config=TINY_CLIP_CONFIG)
    a, b = ClipAdapter.from_config(config), ClipAdapter.from_config(config)
    assert torch.equal(a.embed_text(["x"]).embed, b.embed_text(["x"]).embed)


def test_from_config_errors():
    with pytest.raises(ValueError, match="exactly one"):
        ClipAdapter.from_config(ClipConfig())
    with pytest.raises(ValueError, match="exactly one"):
        ClipAdapter.from_config(ClipConfig(model_name="ViT-B-32", model_config=TINY_CLIP_CONFIG))
    with pytest.raises(ValueError, match="needs clip.pretrained"):
        ClipAdapter.from_config(ClipConfig(model_name="ViT-B-32"))
    with pytest.raises(ValueError, match="unknown open_clip model"):
        ClipAdapter.from_config(ClipConfig(model_name="ViT-Nope", pretrained="openai"))
    with pytest.raises(ValueError, match="neither a file nor a pretrained tag"):
        ClipAdapter.from_config(ClipConfig(model_name="ViT-B-32", pretrained="no_such_tag"))
    with pytest.raises(ValueError, match="no open_clip_config.json"):
        ClipAdapter.from_checkpoint("/nonexistent")
    with pytest.raises(ValueError, match="precision"):
        ClipAdapter.from_model_config(TINY_CLIP_CONFIG, precision="fp8")


def test_pretrained_tag_offline_fails_fast_and_clearly():
    repo, filename = os.path.split(open_clip.get_pretrained_cfg("RN50", "openai")["hf_hub"])
    for name in (filename or "open_clip_pytorch_model.bin", "open_clip_model.safetensors"):
        if isinstance(try_to_load_from_cache(repo, name), str):
            pytest.skip("the RN50/openai weights are in this machine's Hugging Face cache")
    start = time.monotonic()
    with pytest.raises(ValueError, match="could not find the weights .* offline"):
        ClipAdapter.from_config(ClipConfig(model_name="RN50", pretrained="openai"))
    assert time.monotonic() - start < 10


def test_bf16_returns_float32(checkpoint):
    clip = ClipAdapter.from_checkpoint(checkpoint, precision="bf16")
    assert next(clip.model.parameters()).dtype == torch.bfloat16
    text = clip.embed_text(PROMPTS[:2])
    image = clip.embed_image(random_images())
    assert text.embed.dtype == text.tokens.dtype == image.dtype == torch.float32
    fp32 = ClipAdapter.from_checkpoint(checkpoint)
    torch.testing.assert_close(text.embed, fp32.embed_text(PROMPTS[:2]).embed, rtol=0.1, atol=0.1)


def test_save_clip_from_open_clip_model(tmp_path):
    model = open_clip.CLIP(**TINY_CLIP_CONFIG)
    save_clip(model, TINY_CLIP_CONFIG, tmp_path / "c")
    clip = ClipAdapter.from_checkpoint(tmp_path / "c")
    for name, value in model.state_dict().items():
        assert torch.equal(value, clip.model.state_dict()[name])
    assert not list(tmp_path.glob("c/*.tmp"))
