import dataclasses

import pytest
import torch

from unclip.checkpoint import load_model, save_model
from unclip.config import DiffusionConfig, load_config
from unclip.nets.upsampler import UpsamplerConfig, UpsamplerUNet

B = 2


@pytest.fixture(scope="module")
def tiny() -> UpsamplerConfig:
    return load_config("configs/upsampler/tiny.yaml").model


def make_model(config: UpsamplerConfig, seed: int = 0) -> UpsamplerUNet:
    """A model whose zero-initialised layers are randomised, so that every input can change the output."""
    torch.manual_seed(seed)
    model = UpsamplerUNet(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return model


def inputs(size: int, low_size: int, seed: int = 1, width: int | None = None) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    width = width or size
    x_t = torch.randn(B, 3, size, width, generator=g)
    low_res = torch.rand(B, 3, low_size, low_size * width // size, generator=g) * 2 - 1
    return x_t, torch.randint(0, 1000, (B,), generator=g), low_res, torch.randint(0, 250, (B,), generator=g)


def test_tiny_config(tiny):
    assert (tiny.image_size, tiny.low_res_size, tiny.attention_resolutions) == (32, 16, ())
    assert tiny.extra_in_channels == 3 and tiny.clip_dim is None and tiny.text_width is None


@pytest.mark.parametrize("size, low_size, width", [(32, 16, 32), (16, 8, 16), (64, 32, 64), (16, 8, 48)])
def test_any_size_divisible_by_the_down_factor(tiny, size, low_size, width):
    """Trained on crops (16 px), sampled at full (32 px) or larger, non-square sizes."""
    model = make_model(tiny)
    x_t, t, low_res, noise_level = inputs(size, low_size, width=width)
    out = model(x_t, t, low_res=low_res, noise_level=noise_level)
    assert out.shape == (B, 3, size, width) and torch.isfinite(out).all()


def test_learned_variance_and_clip_conditioning(tiny):
    config = dataclasses.replace(tiny, learned_variance=True, clip_dim=8)
    model = make_model(config)
    x_t, t, low_res, noise_level = inputs(32, 16)
    embed = torch.randn(B, 8)
    out = model(x_t, t, low_res=low_res, noise_level=noise_level, image_embed=embed)
    assert out.shape == (B, 6, 32, 32)
    other = model(x_t, t, low_res=low_res, noise_level=noise_level, image_embed=torch.randn(B, 8))
    assert (other - out).abs().max() > 1e-4


def test_low_res_and_noise_level_change_the_output(tiny):
    model = make_model(tiny)
    x_t, t, low_res, noise_level = inputs(32, 16)
    out = model(x_t, t, low_res=low_res, noise_level=noise_level)
    assert (model(x_t, t, low_res=-low_res, noise_level=noise_level) - out).abs().max() > 1e-4
    assert (model(x_t, t, low_res=low_res, noise_level=noise_level + 100) - out).abs().max() > 1e-4


def test_input_errors(tiny):
    model = make_model(tiny)
    x_t, t, low_res, noise_level = inputs(32, 16)
    with pytest.raises(ValueError, match="low_res should be 16x16"):
        model(x_t, t, low_res=low_res[..., :8, :8], noise_level=noise_level)
    with pytest.raises(ValueError, match="pass noise_level"):
        model(x_t, t, low_res=low_res)
    with pytest.raises(ValueError, match=r"30x31 is not divisible by 2 .* e.g. 30x32"):
        model(torch.randn(B, 3, 30, 31), t, low_res=low_res, noise_level=noise_level)
    plain = make_model(dataclasses.replace(tiny, noise_aug_embed=False))
    with pytest.raises(ValueError, match="noise_aug_embed=False"):
        plain(x_t, t, low_res=low_res, noise_level=noise_level)
    assert plain(x_t, t, low_res=low_res).shape == x_t.shape


def test_config_errors(tiny):
    with pytest.raises(ValueError, match="extra_in_channels must equal in_channels"):
        dataclasses.replace(tiny, extra_in_channels=4)
    with pytest.raises(ValueError, match="low_res_size"):
        dataclasses.replace(tiny, low_res_size=64)


def test_save_load_roundtrip(tmp_path, tiny):
    model = make_model(tiny)
    save_model(model, tmp_path / "upsampler", kind="upsampler", diffusion=DiffusionConfig())
    loaded = load_model(tmp_path / "upsampler").model
    assert type(loaded) is UpsamplerUNet and loaded.config == tiny
    x_t, t, low_res, noise_level = inputs(32, 16)
    expected = model(x_t, t, low_res=low_res, noise_level=noise_level)
    torch.testing.assert_close(loaded(x_t, t, low_res=low_res, noise_level=noise_level), expected, rtol=0, atol=0)
