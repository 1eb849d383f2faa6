import dataclasses

import pytest
import torch
from torch import nn

from unclip.checkpoint import load_model, save_model
from unclip.config import DiffusionConfig, load_config
from unclip.nets.inpaint import InpaintUNet
from unclip.nets.layers import AttentionBlock
from unclip.nets.unet import UNet, UNetConfig

B, L = 2, 6


@pytest.fixture(scope="module")
def tiny() -> UNetConfig:
    return load_config("configs/decoder/tiny.yaml").model


def make_model(config: UNetConfig, cls=UNet, seed: int = 0) -> nn.Module:
    """A model whose zero-initialised layers are randomised, so that every input can change the output."""
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.1)
    return model


def inputs(config: UNetConfig, seed: int = 1, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    size = size or config.image_size
    x_t = torch.randn(B, config.in_channels, size, size, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    cond = {}
    if config.clip_dim:
        cond["image_embed"] = torch.randn(B, config.clip_dim, generator=g)
    if config.text_width:
        cond["text_tokens"] = torch.randn(B, L, config.text_width, generator=g)
        cond["text_mask"] = torch.tensor([[True] * L, [True] * 3 + [False] * (L - 3)])
    if config.text_words:
        cond["text_words"] = torch.randn(B, L, config.text_width, generator=g)
    return x_t, t, cond


def inpaint_inputs(x_t: torch.Tensor, seed: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(x_t.shape, generator=g) * 2 - 1
    mask = (torch.rand(x_t.shape[0], 1, *x_t.shape[2:], generator=g) < 0.5).float()  # 1 = repaint
    return {"inpaint_image": image, "inpaint_mask": mask}


VARIANTS = {
    "plain": {},
    "learned_variance": {"learned_variance": True},
    "no_text": {"text_width": None},
    "no_image": {"clip_dim": 0},
    "unconditional": {"clip_dim": None, "text_width": None},
    "conv_resample_no_scale_shift": {"resblock_updown": False, "use_scale_shift_norm": False},
    "three_levels": {"channel_mult": (1, 1, 2), "attention_resolutions": (8, 4), "num_heads": 2},
    "per_level_blocks_bare_resample": {"num_res_blocks": (1, 2), "resblock_updown": False, "conv_resample": False},
    "text_layers": {"text_layers": 2},
    "attention_pos": {"attention_pos": True},
    "text_words": {"text_words": True, "text_layers": 1},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_shapes(tiny, variant):
    config = dataclasses.replace(tiny, **VARIANTS[variant])
    model = make_model(config)
    x_t, t, cond = inputs(config)
    out = model(x_t, t, **cond)
    channels = 2 * config.out_channels if config.learned_variance else config.out_channels
    assert out.shape == (B, channels, 16, 16)
    assert torch.isfinite(out).all()
    unconditional = model(x_t, t, **cond, cond_drop=torch.ones(B, dtype=torch.bool))  # no fully masked row
    assert torch.isfinite(unconditional).all()


def test_inpaint_forward_shape(tiny):
    model = make_model(dataclasses.replace(tiny, extra_in_channels=4), InpaintUNet)
    x_t, t, cond = inputs(tiny)
    assert model(x_t, t, **inpaint_inputs(x_t), **cond).shape == (B, 3, 16, 16)
    with pytest.raises(ValueError, match="extra_in_channels"):
        InpaintUNet(tiny)


def test_fresh_model_outputs_zero(tiny):
    """ADM practice: the final conv is zero-initialised."""
    x_t, t, cond = inputs(tiny)
    assert UNet(tiny).eval()(x_t, t, **cond).abs().max() == 0


def test_conditioning_changes_output(tiny):
    model = make_model(tiny)
    x_t, t, cond = inputs(tiny)
    base = model(x_t, t, **cond)
    other_image = {**cond, "image_embed": torch.randn(B, tiny.clip_dim)}
    other_text = {**cond, "text_tokens": cond["text_tokens"] + torch.randn(B, L, tiny.text_width)}
    assert (model(x_t, t, **other_image) - base).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    assert (model(x_t, t, **other_text) - base).abs().amax(dim=(1, 2, 3)).min() > 1e-4


def test_cond_drop_rows_ignore_conditioning(tiny):
    model = make_model(tiny)
    x_t, t, cond = inputs(tiny)
    drop = torch.tensor([False, True])
    other = {"image_embed": torch.randn(B, tiny.clip_dim), "text_tokens": torch.randn(B, L, tiny.text_width)}
    out = model(x_t, t, **cond, cond_drop=drop)
    out_other = model(x_t, t, **{**cond, **other}, cond_drop=drop)
    torch.testing.assert_close(out[1], out_other[1])
    assert (out[0] - out_other[0]).abs().max() > 1e-4
    unconditional = model(x_t, t, cond_drop=torch.ones(B, dtype=torch.bool))
    torch.testing.assert_close(out[1], unconditional[1], atol=1e-5, rtol=1e-5)


def test_cond_drop_per_condition(tiny):
    """cond_drop (B, 2) drops the image embedding and the text separately (what text guidance runs)."""
    model = make_model(tiny)
    x_t, t, cond = inputs(tiny)
    text_only = model(x_t, t, **cond, cond_drop=torch.tensor([[True, False]] * B))
    image_only = model(x_t, t, **cond, cond_drop=torch.tensor([[False, True]] * B))
    other_image = {**cond, "image_embed": torch.randn(B, tiny.clip_dim)}
    other_text = {**cond, "text_tokens": torch.randn(B, L, tiny.text_width)}
    torch.testing.assert_close(model(x_t, t, **other_image, cond_drop=torch.tensor([[True, False]] * B)), text_only)
    torch.testing.assert_close(model(x_t, t, **other_text, cond_drop=torch.tensor([[False, True]] * B)), image_only)
    both = model(x_t, t, **cond, cond_drop=torch.tensor([[True, True]] * B))
    torch.testing.assert_close(both, model(x_t, t, **cond, cond_drop=torch.ones(B, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"cond_drop must have shape \(2,\) or \(2, 2\)"):
        model(x_t, t, **cond, cond_drop=torch.ones(B, 3, dtype=torch.bool))


def test_training_drops_are_independent(tiny):
    x_t, t, cond = inputs(tiny)
    model = make_model(dataclasses.replace(tiny, cond_drop_image=1.0, cond_drop_text=0.0)).train()
    with torch.no_grad():
        out = model(x_t, t, **cond)
        no_image = model(x_t, t, **{**cond, "image_embed": torch.randn(B, tiny.clip_dim)})
        torch.testing.assert_close(out, no_image)
        other_text = {**cond, "text_tokens": torch.randn(B, L, tiny.text_width)}
        assert (model(x_t, t, **other_text) - out).abs().max() > 1e-4
        model.config.cond_drop_text = 1.0
        unconditional = model.eval()(x_t, t, cond_drop=torch.ones(B, dtype=torch.bool))
        torch.testing.assert_close(model.train()(x_t, t, **cond), unconditional, atol=1e-5, rtol=1e-5)


def test_text_padding_is_ignored(tiny):
    model = make_model(tiny)
    x_t, t, cond = inputs(tiny)
    out = model(x_t, t, **cond)
    tokens = cond["text_tokens"].clone()
    tokens[1, 3:] = torch.randn(L - 3, tiny.text_width)
    torch.testing.assert_close(model(x_t, t, **{**cond, "text_tokens": tokens}), out)
    short = model(x_t[1:], t[1:], image_embed=cond["image_embed"][1:], text_tokens=tokens[1:, :3])
    torch.testing.assert_close(short[0], out[1], atol=1e-5, rtol=1e-5)


def test_text_layers_read_word_order_and_ignore_padding(tiny):
    """Without text layers the context attention is blind to token order (only the last token is pooled); the
    text layers' positions make order count, and padding still changes nothing."""
    x_t, t, cond = inputs(tiny)
    swapped = cond["text_tokens"].clone()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]
    plain = make_model(tiny)
    torch.testing.assert_close(plain(x_t, t, **{**cond, "text_tokens": swapped}), plain(x_t, t, **cond))
    model = make_model(dataclasses.replace(tiny, text_layers=2))
    out = model(x_t, t, **cond)
    assert (model(x_t, t, **{**cond, "text_tokens": swapped}) - out).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    padded = cond["text_tokens"].clone()
    padded[1, 3:] = torch.randn(L - 3, tiny.text_width)
    torch.testing.assert_close(model(x_t, t, **{**cond, "text_tokens": padded}), out)


def test_text_layers_fine_tune_starts_from_the_plain_decoder(tmp_path, tiny):
    """train.init_from a decoder without text layers: the new layers start at zero, so the function is the
    same; the converse (weights the config has no place for) is still refused."""
    from unclip.training import init_weights

    plain = make_model(tiny)
    save_model(plain, tmp_path / "plain", kind="decoder", diffusion=DiffusionConfig())
    model = UNet(dataclasses.replace(tiny, text_layers=1)).eval()
    new = init_weights(model, str(tmp_path / "plain"), "decoder")
    assert new == ["text_blocks.0.attn.proj", "text_blocks.0.attn.qkv", "text_blocks.0.ln_1", "text_blocks.0.ln_2",
                   "text_blocks.0.mlp.0", "text_blocks.0.mlp.2", "text_pos"]  # fmt: skip
    x_t, t, cond = inputs(tiny)
    torch.testing.assert_close(model(x_t, t, **cond), plain(x_t, t, **cond))
    save_model(model, tmp_path / "text", kind="decoder", diffusion=DiffusionConfig())
    with pytest.raises(ValueError, match="do not fit the model this config builds"):
        init_weights(UNet(tiny), str(tmp_path / "text"), "decoder")


def test_attention_pos_tells_the_attention_where_each_pixel_is():
    """Attention over a feature map that is the same everywhere gives the same output everywhere; with a
    position table the pixels differ, and a map of another size gets the table resampled."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 1, 1).expand(2, 8, 8, 8).contiguous()
    context = torch.randn(2, 3, 16)
    plain = AttentionBlock(8, 2, context_dim=16)
    nn.init.normal_(plain.proj_out.weight)
    out = plain(x, context)
    torch.testing.assert_close(out, out[..., :1, :1].expand_as(out))
    placed = AttentionBlock(8, 2, context_dim=16, resolution=8)
    placed.load_state_dict(plain.state_dict(), strict=False)
    torch.testing.assert_close(placed(x, context), out)  # a zero table: the same function
    nn.init.normal_(placed.pos)
    out = placed(x, context)
    assert (out - out[..., :1, :1]).abs().amax() > 0.1
    assert placed(x[..., :4, :4], context).shape == (2, 8, 4, 4)


def test_attention_pos_fine_tune_starts_from_the_decoder_without_it(tmp_path, tiny):
    from unclip.training import init_weights

    plain = make_model(tiny)
    save_model(plain, tmp_path / "plain", kind="decoder", diffusion=DiffusionConfig())
    model = UNet(dataclasses.replace(tiny, attention_pos=True)).eval()
    new = init_weights(model, str(tmp_path / "plain"), "decoder")
    assert new == sorted(f"{name}.pos" for name, m in model.named_modules() if isinstance(m, AttentionBlock))
    x_t, t, cond = inputs(tiny)
    torch.testing.assert_close(model(x_t, t, **cond), plain(x_t, t, **cond))
    x_t, t, cond = inputs(tiny, size=2 * tiny.image_size)  # another size: the tables are resampled
    assert model(x_t, t, **cond).shape == x_t.shape


def test_text_words_reach_the_output_and_start_at_zero(tmp_path, tiny):
    """The word embeddings are read: changing one real word changes the prediction. A decoder fine-tuned with
    them from one trained without starts as the same function, whatever the words."""
    from unclip.training import init_weights

    config = dataclasses.replace(tiny, text_words=True)
    model = make_model(config)
    x_t, t, cond = inputs(config)
    out = model(x_t, t, **cond)
    other = cond["text_words"].clone()
    other[0, 1] = torch.randn(config.text_width)  # another word at a real token of row 0
    changed = model(x_t, t, **{**cond, "text_words": other})
    assert (changed[0] - out[0]).abs().amax() > 1e-3
    torch.testing.assert_close(changed[1], out[1])
    with pytest.raises(ValueError, match=r"word embeddings \(text_words=True\): pass text_words of shape \(2, 6, "):
        model(x_t, t, **{k: v for k, v in cond.items() if k != "text_words"})
    assert model(x_t, t, cond_drop=torch.ones(B, dtype=torch.bool)).shape == x_t.shape  # no text at all

    plain = make_model(tiny)
    save_model(plain, tmp_path / "plain", kind="decoder", diffusion=DiffusionConfig())
    model = UNet(config).eval()
    assert init_weights(model, str(tmp_path / "plain"), "decoder") == ["words_norm", "words_proj"]
    torch.testing.assert_close(
        model(x_t, t, **cond), plain(x_t, t, **{k: v for k, v in cond.items() if k != "text_words"})
    )
    with pytest.raises(ValueError, match="model.text_words needs model.text_width"):
        dataclasses.replace(tiny, text_words=True, text_width=None)


def test_input_errors(tiny):
    model = make_model(tiny)
    x_t, t, cond = inputs(tiny)
    with pytest.raises(ValueError, match=r"15x15 is not divisible by 2 .*multiples of 2, e.g. 16x16"):
        model(torch.randn(B, 3, 15, 15), t, **cond)
    with pytest.raises(ValueError, match=r"expects input \(B, 3, H, W\)"):
        model(torch.randn(B, 4, 16, 16), t, **cond)
    with pytest.raises(ValueError, match="pass image_embed"):
        model(x_t, t, text_tokens=cond["text_tokens"])
    with pytest.raises(ValueError, match="pass text_tokens"):
        model(x_t, t, image_embed=cond["image_embed"])
    with pytest.raises(ValueError, match="image_embed must have shape"):
        model(x_t, t, **{**cond, "image_embed": torch.randn(B, 7)})
    with pytest.raises(ValueError, match="more than text_ctx"):
        model(x_t, t, **{**cond, "text_tokens": torch.randn(B, tiny.text_ctx + 1, tiny.text_width), "text_mask": None})
    with pytest.raises(ValueError, match="no text conditioning"):
        make_model(dataclasses.replace(tiny, text_width=None))(x_t, t, **cond)


def test_config_errors(tiny):
    with pytest.raises(ValueError, match="not divisible by 4"):
        dataclasses.replace(tiny, image_size=18, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match=r"attention_resolutions \[4\] .* are \[16, 8\]"):
        dataclasses.replace(tiny, attention_resolutions=(4,))
    with pytest.raises(ValueError, match="does not split into heads"):
        dataclasses.replace(tiny, num_heads=3)
    with pytest.raises(ValueError, match="text needs attention"):
        dataclasses.replace(tiny, attention_resolutions=())
    with pytest.raises(ValueError, match="cond_drop_text"):
        dataclasses.replace(tiny, cond_drop_text=1.5)
    with pytest.raises(ValueError, match="text_layers must be >= 0 and needs model.text_width"):
        dataclasses.replace(tiny, text_width=None, text_layers=1)
    with pytest.raises(ValueError, match="num_res_blocks must be an int >= 1 or one per level"):
        dataclasses.replace(tiny, num_res_blocks=[1, 1, 1])


@pytest.mark.parametrize("cls, kind", [(UNet, "decoder"), (InpaintUNet, "inpaint")])
def test_save_load_roundtrip(tmp_path, tiny, cls, kind):
    config = dataclasses.replace(tiny, extra_in_channels=4 if cls is InpaintUNet else 0)
    model = make_model(config, cls)
    save_model(model, tmp_path / kind, kind=kind, diffusion=DiffusionConfig())
    loaded = load_model(tmp_path / kind).model
    assert type(loaded) is cls and loaded.config == config
    x_t, t, cond = inputs(config)
    if cls is InpaintUNet:
        cond.update(inpaint_inputs(x_t))
    torch.testing.assert_close(loaded(x_t, t, **cond), model(x_t, t, **cond), rtol=0, atol=0)


def test_gradient_checkpointing_same_gradients(tiny):
    x_t, t, cond = inputs(tiny)
    drop = torch.tensor([False, True])
    grads = []
    for enabled in (False, True):
        model = make_model(dataclasses.replace(tiny, gradient_checkpointing=enabled, dropout=0.1)).train()
        torch.manual_seed(3)
        model(x_t, t, **cond, cond_drop=drop).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_channels_last_same_outputs(tiny):
    x_t, t, cond = inputs(tiny)
    reference = make_model(tiny)
    out = reference(x_t, t, **cond)
    model = UNet(dataclasses.replace(tiny, channels_last=True)).eval()
    model.load_state_dict(reference.state_dict())
    assert model.input_conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x_t, t, **cond), out, atol=1e-5, rtol=1e-5)


def test_inpaint_from_unet_starts_as_the_unet(tiny):
    unet = make_model(tiny)
    inpaint = InpaintUNet.from_unet(unet, gradient_checkpointing=True).eval()
    assert inpaint.config.extra_in_channels == 4 and inpaint.gradient_checkpointing
    x_t, t, cond = inputs(tiny)
    out = inpaint(x_t, t, **inpaint_inputs(x_t), **cond)
    torch.testing.assert_close(out, unet(x_t, t, **cond))
    torch.testing.assert_close(inpaint(x_t, t, **inpaint_inputs(x_t, seed=5), **cond), out)


def test_inpaint_sees_the_known_region(tiny):
    model = make_model(dataclasses.replace(tiny, extra_in_channels=4), InpaintUNet)
    x_t, t, cond = inputs(tiny)
    extra = inpaint_inputs(x_t)
    out = model(x_t, t, **extra, **cond)
    inside = extra["inpaint_image"] + 5 * extra["inpaint_mask"]  # changes only pixels that are repainted
    torch.testing.assert_close(model(x_t, t, **{**extra, "inpaint_image": inside}, **cond), out)
    assert (model(x_t, t, **{**extra, "inpaint_image": -extra["inpaint_image"]}, **cond) - out).abs().max() > 1e-4
