"""The 64 px decoder: a training step (batch 8, or `--decoder-batch`) and a 50-step guided sampling loop
(batch 1 and 4).

Both U-Nets are conditioned on a 512-d CLIP image embedding and 77 text tokens of width 512, randomly
initialised, and built to about the same size (50M parameters):

- ours: `UNet` with model_channels 64, channel_mult (1, 2, 3, 6, 8), one ResBlock per level, plain
  resampling (no resampling ResBlocks, no resampling convs) and attention at 16 and 8 px, with the text
  tokens and 4 image tokens as extra keys and values of every attention layer; v-prediction, Min-SNR-5;
- theirs: `Unet(dim=64, dim_mults=(1, 2, 4, 8), cond_on_text_encodings=True)` inside their `Decoder` with its
  defaults: a learned variance (6 output channels, the VLB term in the loss), cross-attention to the time and
  image tokens in every ResBlock below the top level, the text only at the middle block.

Sampling: DDIM for both, 50 steps, guidance scale 5. Theirs runs the conditional and unconditional passes
one after the other (`forward_with_cond_scale`); ours runs them as one doubled batch.
"""

from __future__ import annotations

import torch

from bench.common import OURS, THEIRS, Case, Contender, Settings, import_peer, param_count
from unclip.config import DiffusionConfig
from unclip.diffusion import GaussianDiffusion
from unclip.nets.unet import UNet, UNetConfig
from unclip.sampling import sample_decoder

IMAGE_SIZE, CLIP_DIM, TEXT_WIDTH, TEXT_LEN = 64, 512, 512, 77
SAMPLE_STEPS, GUIDANCE = 50, 5.0
LR = 1e-4


def our_decoder(device: torch.device) -> tuple[UNet, GaussianDiffusion]:
    config = UNetConfig(
        image_size=IMAGE_SIZE,
        model_channels=64,
        channel_mult=(1, 2, 3, 6, 8),
        num_res_blocks=1,
        resblock_updown=False,
        conv_resample=False,
        attention_resolutions=(16, 8),
        clip_dim=CLIP_DIM,
        text_width=TEXT_WIDTH,
        text_ctx=TEXT_LEN,
    )
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(schedule="cosine", prediction="v", min_snr_gamma=5.0))
    return UNet(config).to(device), diffusion


def their_decoder(device: torch.device):
    peer = import_peer()
    unet = peer.Unet(
        dim=64,
        dim_mults=(1, 2, 4, 8),
        cond_on_text_encodings=True,
        image_embed_dim=CLIP_DIM,
        text_embed_dim=TEXT_WIDTH,
    )
    # the Decoder rebuilds the U-Net for its settings (6 output channels for the learned variance)
    return peer.Decoder(unet, image_size=IMAGE_SIZE, timesteps=1000, sample_timesteps=SAMPLE_STEPS).to(device)


def conditioning(batch: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image_embed": torch.randn(batch, CLIP_DIM, generator=g).to(device),
        "text_tokens": torch.randn(batch, TEXT_LEN, TEXT_WIDTH, generator=g).to(device),
        "text_mask": torch.ones(batch, TEXT_LEN, dtype=torch.bool).to(device),
        "images": torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(device),  # in [0, 1]
    }


def train_step(model: torch.nn.Module, loss_fn, settings: Settings):
    """forward + loss under the optional autocast, backward, AdamW step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with settings.autocast():
            loss = loss_fn()
        loss.backward()
        optimizer.step()

    return step


def train_case(settings: Settings) -> Case:
    device = settings.device
    torch.manual_seed(0)
    ours, diffusion = our_decoder(device)
    theirs = their_decoder(device)
    ours.train()
    theirs.train()
    n_ours, n_theirs = param_count(ours), param_count(theirs)
    if abs(n_ours - n_theirs) > 0.1 * n_theirs:
        raise AssertionError(f"decoder sizes differ by more than 10%: ours {n_ours:,}, theirs {n_theirs:,}")
    c = conditioning(settings.decoder_batch, device)
    x_0 = c["images"] * 2 - 1
    cond = {"image_embed": c["image_embed"], "text_tokens": c["text_tokens"], "text_mask": c["text_mask"]}

    def our_loss():
        return diffusion.training_loss(ours, x_0, cond=cond)["loss"].mean()

    def their_loss():
        return theirs(c["images"], image_embed=c["image_embed"], text_encodings=c["text_tokens"])

    return Case(
        name="decoder_train",
        title=f"decoder train step, 64 px, batch {settings.decoder_batch}",
        contenders=[
            Contender(OURS, train_step(ours, our_loss, settings), n_ours, notes="v-prediction, Min-SNR-5 MSE"),
            Contender(
                THEIRS, train_step(theirs, their_loss, settings), n_theirs, notes="eps MSE + learned-variance VLB"
            ),
        ],
        info={"params_ours": n_ours, "params_theirs": n_theirs},
    )


def sample_case(settings: Settings, batch: int) -> Case:
    device = settings.device
    torch.manual_seed(0)
    ours, diffusion = our_decoder(device)
    theirs = their_decoder(device)
    ours.eval()
    theirs.eval()
    c = conditioning(batch, device)
    steps = settings.steps(SAMPLE_STEPS)

    def our_run(k: int):
        def run():
            with settings.autocast():
                return sample_decoder(
                    ours,
                    diffusion,
                    c["image_embed"],
                    c["text_tokens"],
                    c["text_mask"],
                    sampler="ddim",
                    steps=k,
                    guidance_scale=GUIDANCE,
                )

        return run

    def their_run(k: int):
        def run():
            theirs.sample_timesteps = (k,)  # the Decoder reads its DDIM step count from here
            with settings.autocast():
                # one_unet_in_gpu_at_time would move every U-Net to the CPU and back at each call
                return theirs.sample(
                    image_embed=c["image_embed"],
                    text_encodings=c["text_tokens"],
                    cond_scale=GUIDANCE,
                    one_unet_in_gpu_at_time=False,
                )

        return run

    their_unet = theirs.unets[0]
    return Case(
        name=f"decoder_sample_b{batch}",
        title=f"decoder sampling, DDIM 50 steps, CFG, batch {batch}",
        contenders=[
            Contender(
                OURS,
                our_run(steps),
                param_count(ours),
                net=ours,
                calls_per_step=1,
                nominal_steps=SAMPLE_STEPS,
                notes="CFG as one doubled batch; dynamic thresholding",
                flop_run=our_run(1),
            ),
            Contender(
                THEIRS,
                their_run(steps),
                param_count(their_unet),
                net=their_unet,
                calls_per_step=2,
                nominal_steps=SAMPLE_STEPS,
                notes="CFG as two passes; static clipping",
                flop_run=their_run(1),
            ),
        ],
        info={"batch": batch, "guidance": GUIDANCE},
    )
