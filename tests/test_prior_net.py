import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from unclip.checkpoint import load_model, save_model
from unclip.config import DiffusionConfig, load_config
from unclip.nets.prior import PriorConfig, PriorTransformer


@pytest.fixture
def tiny_config():
    return load_config("configs/prior/tiny.yaml").model


def make_prior(config: PriorConfig, seed: int = 0) -> PriorTransformer:
    """A prior in eval mode with a random (not zero-initialised) readout, so outputs depend on the inputs."""
    torch.manual_seed(seed)
    model = PriorTransformer(config)
    nn.init.normal_(model.proj_out.weight, std=0.5)
    return model.eval()


def random_inputs(config: PriorConfig, batch: int = 3, tokens: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    D = config.clip_dim
    x_t = torch.randn(batch, D, generator=g)
    t = torch.randint(0, config.num_timesteps, (batch,), generator=g)
    cond = {"text_embed": torch.randn(batch, D, generator=g)}
    if config.text_width:
        cond["text_tokens"] = torch.randn(batch, tokens, config.text_width, generator=g)
        cond["text_mask"] = torch.arange(tokens)[None] < torch.tensor([tokens, 3, 1][:batch])[:, None]
    return x_t, t, cond


def test_config_errors():
    with pytest.raises(ValueError, match="not divisible"):
        PriorConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="cond_drop_prob"):
        PriorConfig(cond_drop_prob=1.5)
    assert PriorConfig(text_width=0).text_width is None


def test_shape_and_eval_determinism(tiny_config):
    model = make_prior(tiny_config)
    x_t, t, cond = random_inputs(tiny_config)
    out = model(x_t, t, **cond)
    assert out.shape == x_t.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out, model(x_t, t, **cond), rtol=0, atol=0)


def test_zero_init_readout_predicts_the_mean(tiny_config):
    x_t, t, cond = random_inputs(tiny_config)
    assert PriorTransformer(tiny_config).eval()(x_t, t, **cond).abs().max() == 0


def test_text_condition_matters(tiny_config):
    model = make_prior(tiny_config)
    x_t, t, cond = random_inputs(tiny_config)
    other = {**cond, "text_embed": torch.randn_like(cond["text_embed"])}
    assert not torch.allclose(model(x_t, t, **cond), model(x_t, t, **other))


def test_unconditional_branch(tiny_config):
    model = make_prior(tiny_config)
    x_t, t, cond = random_inputs(tiny_config)
    drop = torch.ones(3, dtype=torch.bool)
    uncond = model(x_t, t, **cond, cond_drop=drop)
    # still reads x_t (the bug in https://github.com/lucidrains/DALLE2-pytorch/issues/285 replaced it by a null)
    assert not torch.allclose(uncond, model(torch.randn_like(x_t), t, **cond, cond_drop=drop))
    # ignores every text input, including how many tokens there are
    _, _, other = random_inputs(tiny_config, tokens=9, seed=2)
    torch.testing.assert_close(uncond, model(x_t, t, **other, cond_drop=drop))
    # a mixed batch drops only the flagged rows
    mixed = model(x_t, t, **cond, cond_drop=torch.tensor([False, True, False]))
    torch.testing.assert_close(mixed[1], uncond[1])
    torch.testing.assert_close(mixed[[0, 2]], model(x_t, t, **cond)[[0, 2]])


def test_training_mode_draws_cond_drop(tiny_config):
    config = PriorConfig(**{**tiny_config.__dict__, "cond_drop_prob": 1.0})
    model = make_prior(config)
    x_t, t, cond = random_inputs(config)
    expected = model(x_t, t, **cond, cond_drop=torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(model.train()(x_t, t, **cond), expected)


def test_padding_independence(tiny_config):
    model = make_prior(tiny_config)
    x_t, t, cond = random_inputs(tiny_config, tokens=4)
    padded = {
        "text_embed": cond["text_embed"],
        "text_tokens": torch.cat([cond["text_tokens"], torch.randn(3, 6, tiny_config.text_width)], dim=1),
        "text_mask": torch.cat([cond["text_mask"], torch.zeros(3, 6, dtype=torch.bool)], dim=1),
    }
    torch.testing.assert_close(model(x_t, t, **cond), model(x_t, t, **padded))


def test_no_text_tokens(tiny_config):
    config = PriorConfig(**{**tiny_config.__dict__, "text_width": None})
    model = make_prior(config)
    x_t, t, cond = random_inputs(config)
    assert set(cond) == {"text_embed"}
    out = model(x_t, t, **cond)
    assert out.shape == x_t.shape and torch.isfinite(out).all()
    assert model.pos_embed.shape[0] == 4


def test_input_errors(tiny_config):
    model = make_prior(tiny_config)
    x_t, t, cond = random_inputs(tiny_config, tokens=tiny_config.text_ctx + 1)
    with pytest.raises(ValueError, match="text_tokens must be"):
        model(x_t, t, **cond)
    with pytest.raises(ValueError, match="pass text_tokens"):
        model(x_t, t, text_embed=cond["text_embed"])


def test_normalization():
    config = PriorConfig(clip_dim=8, text_width=None, width=16, layers=1, heads=2)
    model = PriorTransformer(config)
    with pytest.raises(ValueError, match="no image-embedding statistics"):
        model.require_normalization()
    embeds = torch.randn(100, 8) * 0.05 + 0.3
    embeds[:, 0] = 1.0  # a constant dimension: std floored at eps
    mean, std = PriorTransformer.compute_normalization(embeds)
    assert std[0] == 1e-5
    model.set_normalization(mean, std)
    model.require_normalization()
    x = model.normalize(embeds)
    torch.testing.assert_close(x[:, 1:].mean(0), torch.zeros(7), atol=1e-5, rtol=0)
    torch.testing.assert_close(x[:, 1:].std(0, correction=0), torch.ones(7), atol=1e-4, rtol=0)
    torch.testing.assert_close(model.denormalize(x), embeds)
    with pytest.raises(ValueError, match="must be"):
        model.set_normalization(mean[:4], std[:4])


def test_save_load_roundtrip(tiny_config, tmp_path):
    model = make_prior(tiny_config)
    embeds = torch.randn(50, tiny_config.clip_dim)
    model.set_normalization(*PriorTransformer.compute_normalization(embeds))
    save_model(model, tmp_path / "prior", kind="prior", diffusion=DiffusionConfig(prediction="x0"))
    loaded = load_model(tmp_path / "prior")
    assert loaded.diffusion.prediction == "x0" and loaded.model.config == tiny_config
    x_t, t, cond = random_inputs(tiny_config)
    torch.testing.assert_close(loaded.model(x_t, t, **cond), model(x_t, t, **cond), rtol=0, atol=0)
    assert loaded.model.has_normalization
    torch.testing.assert_close(loaded.model.image_mean, model.image_mean, rtol=0, atol=0)
    torch.testing.assert_close(loaded.model.image_std, model.image_std, rtol=0, atol=0)


def edit_config_json(directory, edit):
    meta = json.loads((directory / "config.json").read_text())
    edit(meta)
    (directory / "config.json").write_text(json.dumps(meta))


def test_load_errors(tiny_config, tmp_path):
    save_model(make_prior(tiny_config), tmp_path / "prior", kind="prior", diffusion=DiffusionConfig())
    edit_config_json(tmp_path / "prior", lambda meta: meta["model"].update(width=64))
    with pytest.raises(ValueError, match="does not match the PriorTransformer"):
        load_model(tmp_path / "prior")
    edit_config_json(tmp_path / "prior", lambda meta: meta.update(format_version=99))
    with pytest.raises(ValueError, match="format_version 99"):
        load_model(tmp_path / "prior")


def test_gradient_checkpointing_same_gradients(tiny_config):
    x_t, t, cond = random_inputs(tiny_config)
    drop = torch.tensor([False, True, False])
    grads = []
    for enabled in (False, True):
        config = PriorConfig(**{**tiny_config.__dict__, "gradient_checkpointing": enabled})
        model = make_prior(config).train()
        model(x_t, t, **cond, cond_drop=drop).square().sum().backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-5, rtol=1e-5, msg=name)


def cosine_alphas_cumprod(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal 2021 eq. 17, betas clipped at 0.999."""
    f = torch.cos((torch.linspace(0, 1, timesteps + 1, dtype=torch.float64) + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, 0).float()


def test_tiny_prior_fits_four_pairs(tiny_config):
    torch.manual_seed(0)
    model = PriorTransformer(tiny_config)
    D, T = tiny_config.clip_dim, tiny_config.num_timesteps
    alphas_cumprod = cosine_alphas_cumprod(T)
    text_embed, image_embed = torch.randn(4, D), torch.randn(4, D)
    cond = {"text_embed": text_embed, "text_tokens": torch.randn(4, 6, tiny_config.text_width)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    repeat = 8  # each pair 8 times per batch, at different noise levels
    batch_cond = {k: v.repeat(repeat, *[1] * (v.ndim - 1)) for k, v in cond.items()}
    x_0 = image_embed.repeat(repeat, 1)
    for _ in range(300):
        t = torch.randint(0, T, (len(x_0),))
        a = alphas_cumprod[t][:, None]
        x_t = a.sqrt() * x_0 + (1 - a).sqrt() * torch.randn_like(x_0)
        loss = F.mse_loss(model(x_t, t, **batch_cond), x_0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        pred = model(torch.randn(4, D), torch.full((4,), T - 1), **cond)
    assert F.cosine_similarity(pred, image_embed).min() >= 0.95
