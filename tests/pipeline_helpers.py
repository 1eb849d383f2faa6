"""A tiny pipeline of randomly initialised components (diffusers' dummy-components pattern): 16 -> 32 px."""

from pathlib import Path

import torch

from unclip.checkpoint import build_pipeline_folder, load_model, save_model
from unclip.clip import TINY_CLIP_CONFIG, ClipAdapter
from unclip.config import DiffusionConfig, load_config
from unclip.lora import add_lora, save_adapter
from unclip.nets.inpaint import InpaintUNet
from unclip.nets.prior import PriorConfig, PriorTransformer
from unclip.nets.unet import UNet
from unclip.nets.upsampler import UpsamplerUNet


def perturb(model, seed):
    """Random weights everywhere (the zero-initialised output layers included), so outputs depend on inputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


def make_tiny_pipeline(root: Path, *, inpaint: bool = False, upsampler: bool = True, decoder_changes=()) -> Path:
    """decoder_changes: model config overrides for the decoder, e.g. ["model.text_words=true"]."""
    root = Path(root)
    parts = root / "parts"
    clip = ClipAdapter.from_model_config(TINY_CLIP_CONFIG)
    clip.save(parts / "clip")
    torch.manual_seed(0)
    prior = perturb(
        PriorTransformer(PriorConfig(clip_dim=32, text_width=48, text_ctx=16, width=32, layers=2, heads=2)), 1
    )
    prior.set_normalization(torch.zeros(32), torch.ones(32))
    save_model(prior, parts / "prior", kind="prior", diffusion=DiffusionConfig(prediction="x0"))
    decoder_config = load_config("configs/decoder/tiny.yaml", list(decoder_changes))
    decoder = perturb(UNet(decoder_config.model), 2)
    save_model(decoder, parts / "decoder", kind="decoder", diffusion=decoder_config.diffusion)
    upsamplers = []
    if upsampler:
        up_config = load_config("configs/upsampler/tiny.yaml")
        save_model(
            perturb(UpsamplerUNet(up_config.model), 3), parts / "up", kind="upsampler", diffusion=up_config.diffusion
        )
        upsamplers.append(parts / "up")
    inpaint_dir = None
    if inpaint:
        save_model(
            InpaintUNet.from_unet(decoder), parts / "inpaint", kind="inpaint", diffusion=decoder_config.diffusion
        )
        inpaint_dir = parts / "inpaint"
    fast = {"prior": {"steps": 3}, "decoder": {"steps": 3}, "upsampler_32": {"steps": 2}}
    return build_pipeline_folder(
        root / "pipeline",
        clip=parts / "clip",
        prior=parts / "prior",
        decoder=parts / "decoder",
        upsamplers=upsamplers,
        inpaint=inpaint_dir,
        defaults=fast,
    )


def add_random_adapter(stage_dir: Path, out: Path, kind: str, seed: int) -> Path:
    """A LoRA adapter (rank 2) for the stage in `stage_dir`, as a run would export it to `out`, with random A and B
    so that it changes the outputs."""
    model = load_model(stage_dir).model
    add_lora(model, load_config("configs/decoder/tiny.yaml", ["train.lora={rank: 2}"]).train.lora)
    perturb(model, seed)  # the frozen base moves too, but only the adapter is saved
    return save_adapter(model, out, kind=kind, base=str(stage_dir))
