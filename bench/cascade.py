"""The 64 -> 256 upsampler of the cascade, sampling one image, each implementation with its default steps.

- ours: `UpsamplerUNet` of configs/upsampler/shapes_256.yaml (convolutional, 3.6M parameters), sampled as the
  pipeline does (`sample_upsampler`): DDIM, `UPSAMPLER_DEFAULTS` steps (8), noise-conditioning augmentation;
- theirs: `Unet(dim=32, dim_mults=(1, 2, 3, 4), num_resnet_blocks=1, lowres_cond=True)`, the same widths as
  ours, as the second U-Net of a `Decoder(image_sizes=(64, 256))`, sampled with `Decoder.sample(...,
  start_at_unet_number=2)`. Its default (`sample_timesteps=None`) is ancestral DDPM over all 1000 training
  timesteps, as DALL·E 2's decoder. A capped run (--max-steps) uses their DDIM loop instead, whose step costs
  the same network pass; its total is projected to 1000 steps.
"""

from __future__ import annotations

import torch

from bench.common import OURS, REPO, THEIRS, Case, Contender, Settings, import_peer, param_count
from unclip.config import load_config
from unclip.diffusion import GaussianDiffusion
from unclip.nets.upsampler import UpsamplerUNet
from unclip.sampling import UPSAMPLER_DEFAULTS, sample_upsampler

OUR_CONFIG = "configs/upsampler/shapes_256.yaml"
THEIR_STEPS = 1000  # Decoder(timesteps=1000, sample_timesteps=None): DDPM over every timestep
LOW, HIGH, CLIP_DIM = 64, 256, 512


def our_upsampler(device: torch.device) -> tuple[UpsamplerUNet, GaussianDiffusion]:
    config = load_config(REPO / OUR_CONFIG)
    return UpsamplerUNet(config.model).to(device), GaussianDiffusion.from_config(config.diffusion)


def their_cascade(device: torch.device):
    peer = import_peer()
    base = peer.Unet(dim=8, dim_mults=(1, 2), image_embed_dim=CLIP_DIM)  # never run: the Decoder needs a first stage
    upsampler = peer.Unet(dim=32, dim_mults=(1, 2, 3, 4), num_resnet_blocks=1, lowres_cond=True)
    return peer.Decoder(unet=(base, upsampler), image_sizes=(LOW, HIGH), timesteps=THEIR_STEPS).to(device)


def upsample_case(settings: Settings) -> Case:
    device = settings.device
    torch.manual_seed(0)
    ours, diffusion = our_upsampler(device)
    theirs = their_cascade(device)
    ours.eval()
    theirs.eval()
    g = torch.Generator().manual_seed(0)
    low_res = (torch.rand(1, 3, LOW, LOW, generator=g) * 2 - 1).to(device)  # ours: [-1, 1]
    image_embed = torch.randn(1, CLIP_DIM, generator=g).to(device)  # their Decoder.sample requires one
    our_steps = UPSAMPLER_DEFAULTS.steps

    def our_run(k: int):
        def run():
            with settings.autocast():
                return sample_upsampler(ours, diffusion, low_res, steps=k)

        return run

    def their_run(k: int):
        def run():
            theirs.sample_timesteps = (None, None if k == THEIR_STEPS else k)
            with settings.autocast():
                return theirs.sample(
                    image=(low_res + 1) / 2,  # their images are in [0, 1]
                    image_embed=image_embed,
                    start_at_unet_number=2,
                    one_unet_in_gpu_at_time=False,
                )

        return run

    their_unet = theirs.unets[1]
    return Case(
        name="upsample_256",
        title="upsampler 64->256, 1 image, default steps",
        contenders=[
            Contender(
                OURS,
                our_run(settings.steps(our_steps)),
                param_count(ours),
                net=ours,
                nominal_steps=our_steps,
                notes=f"DDIM {our_steps} steps ({OUR_CONFIG})",
                flop_run=our_run(1),
            ),
            Contender(
                THEIRS,
                their_run(settings.steps(THEIR_STEPS)),
                param_count(their_unet),
                net=their_unet,
                nominal_steps=THEIR_STEPS,
                notes="DDPM 1000 steps (Decoder default)",
                flop_run=their_run(1),
            ),
        ],
        info={"our_steps": our_steps, "their_steps": THEIR_STEPS},
    )
