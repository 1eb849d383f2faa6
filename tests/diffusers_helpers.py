"""Tiny random diffusers folders in the published layouts (the configs of diffusers' own fast tests): a Karlo
`UnCLIPPipeline` with the image tower of its image-variation sibling, and a `KandinskyV22PriorPipeline`."""

from pathlib import Path

import torch
from diffusers import (
    KandinskyV22PriorPipeline,
    PriorTransformer,
    UnCLIPPipeline,
    UnCLIPScheduler,
    UNet2DConditionModel,
    UNet2DModel,
)
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from unclip.diffusers_format import UnCLIPTextProjModel

D = 32  # CLIP embedding and text width
CONTEXT = 77  # tokens, as the PriorTransformer's default num_embeddings (Karlo's)


def byte_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer without merges: one token per byte (the last of a word marked "</w>"), 514 ids."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    chars = [chr(c) for c in printable] + [chr(256 + i) for i in range(len(rest))]
    words = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={w: i for i, w in enumerate(words)}, merges=[], model_max_length=CONTEXT)


def clip_towers(tokenizer: CLIPTokenizer):
    torch.manual_seed(0)
    text = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=D,
            projection_dim=D,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=CONTEXT,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vision = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=D,
            projection_dim=D,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
        )
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return text.eval(), vision.eval(), processor


def unclip_components() -> dict:
    tokenizer = byte_tokenizer()
    text_encoder, _, _ = clip_towers(tokenizer)
    torch.manual_seed(0)
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=D, num_layers=1)
    with torch.no_grad():  # normalisation statistics that are not the identity
        prior.clip_mean.copy_(0.1 * torch.randn(1, D))
        prior.clip_std.copy_(1 + 0.1 * torch.rand(1, D))
    text_proj = UnCLIPTextProjModel(clip_embeddings_dim=D, time_embed_dim=128, cross_attention_dim=100)
    with torch.no_grad():
        text_proj.learned_classifier_free_guidance_embeddings.copy_(torch.randn(D))
    decoder = UNet2DConditionModel(
        sample_size=32,
        in_channels=3,
        out_channels=6,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=100,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type="identity",
    )
    super_res = {
        "sample_size": 64,
        "layers_per_block": 1,
        "down_block_types": ("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
        "up_block_types": ("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
        "block_out_channels": (32, 64),
        "in_channels": 6,
        "out_channels": 3,
    }
    first = UNet2DModel(**super_res)
    torch.manual_seed(1)
    last = UNet2DModel(**super_res)
    return {
        "prior": prior,
        "decoder": decoder,
        "text_proj": text_proj,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "super_res_first": first,
        "super_res_last": last,
        "prior_scheduler": UnCLIPScheduler(
            variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0
        ),
        "decoder_scheduler": UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"),
        "super_res_scheduler": UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"),
    }


def make_karlo_folder(root: Path) -> Path:
    """A tiny UnCLIPPipeline saved with diffusers, plus image_encoder/ and feature_extractor/ (the CLIP's image
    tower, as kakaobrain/karlo-v1-alpha-image-variations holds it)."""
    root = Path(root)
    UnCLIPPipeline(**unclip_components()).save_pretrained(root)
    _, vision, processor = clip_towers(byte_tokenizer())
    vision.save_pretrained(root / "image_encoder")
    processor.save_pretrained(root / "feature_extractor")
    return root


def make_kandinsky_prior_folder(root: Path) -> Path:
    tokenizer = byte_tokenizer()
    text_encoder, vision, processor = clip_towers(tokenizer)
    torch.manual_seed(0)
    prior = PriorTransformer(num_attention_heads=2, attention_head_dim=12, embedding_dim=D, num_layers=1)
    with torch.no_grad():
        prior.clip_mean.copy_(0.1 * torch.randn(1, D))
        prior.clip_std.copy_(1 + 0.1 * torch.rand(1, D))
    scheduler = UnCLIPScheduler(
        variance_type="fixed_small_log", prediction_type="sample", clip_sample=True, clip_sample_range=10.0
    )
    KandinskyV22PriorPipeline(
        prior=prior,
        image_encoder=vision,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        image_processor=processor,
    ).save_pretrained(root)
    return Path(root)
