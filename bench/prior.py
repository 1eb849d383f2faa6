"""The diffusion prior: a training step (batch 32) and a 64-step guided sampling loop (batch 1 and 4).

Both are causal Transformers of width 512, 6 layers and 8 heads of 64, reading 77 text tokens of width 512,
the pooled text embedding, the timestep, the noised image embedding and a learned query, randomly initialised:

- ours: `PriorTransformer` (pre-LN blocks, GELU MLP, PyTorch SDPA), predicting x_0 (DALL·E 2's choice);
- theirs: `DiffusionPriorNetwork(dim=512, depth=6, dim_head=64, heads=8)` in `DiffusionPrior` (x_0
  prediction, its default), with `max_text_len=77`: its default of 256 pads every caption to 256 tokens with
  learned null tokens, which would make the comparison one of sequence lengths (260 against 81 tokens).

Sampling: DDIM, guidance scale 2, 64 timesteps. Theirs turns `timesteps=64` into 63 network steps (its last
timestep pair ends at -1 and returns x_0 directly); ours runs 64. Times are compared per step and, for the
loop, as each implementation's own total.
"""

from __future__ import annotations

import torch

from bench.common import OURS, THEIRS, Case, Contender, Settings, import_peer, param_count
from bench.decoder import train_step
from unclip.config import DiffusionConfig
from unclip.diffusion import GaussianDiffusion
from unclip.nets.prior import PriorConfig, PriorTransformer
from unclip.sampling import sample_prior

CLIP_DIM, TEXT_WIDTH, TEXT_LEN = 512, 512, 77
TRAIN_BATCH = 32
SAMPLE_STEPS, GUIDANCE = 64, 2.0
COND_DROP = 0.1


def our_prior(device: torch.device) -> tuple[PriorTransformer, GaussianDiffusion]:
    config = PriorConfig(
        clip_dim=CLIP_DIM,
        text_width=TEXT_WIDTH,
        text_ctx=TEXT_LEN,
        width=512,
        layers=6,
        heads=8,
        cond_drop_prob=COND_DROP,
    )
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(schedule="cosine", prediction="x0"))
    return PriorTransformer(config).to(device), diffusion


def their_prior(device: torch.device):
    peer = import_peer()
    net = peer.DiffusionPriorNetwork(dim=CLIP_DIM, depth=6, dim_head=64, heads=8, max_text_len=TEXT_LEN)
    # cond_drop_prob > 0, as for classifier-free guidance (its default of 0 trains a prior that cannot guide)
    return peer.DiffusionPrior(net, image_embed_dim=CLIP_DIM, timesteps=1000, cond_drop_prob=COND_DROP).to(device)


def conditioning(batch: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "text_embed": torch.randn(batch, CLIP_DIM, generator=g).to(device),
        "text_tokens": torch.randn(batch, TEXT_LEN, TEXT_WIDTH, generator=g).to(device),
        "text_mask": torch.ones(batch, TEXT_LEN, dtype=torch.bool).to(device),
        "image_embed": torch.randn(batch, CLIP_DIM, generator=g).to(device),
    }


def train_case(settings: Settings) -> Case:
    device = settings.device
    torch.manual_seed(0)
    ours, diffusion = our_prior(device)
    theirs = their_prior(device)
    ours.train()
    theirs.train()
    c = conditioning(TRAIN_BATCH, device)
    cond = {"text_embed": c["text_embed"], "text_tokens": c["text_tokens"], "text_mask": c["text_mask"]}

    def our_loss():
        return diffusion.training_loss(ours, c["image_embed"], cond=cond)["loss"].mean()

    def their_loss():
        # DiffusionPrior.forward scales image_embed in place, so it gets a copy
        return theirs(
            text_embed=c["text_embed"], image_embed=c["image_embed"].clone(), text_encodings=c["text_tokens"]
        )

    return Case(
        name="prior_train",
        title=f"prior train step, batch {TRAIN_BATCH}",
        contenders=[
            Contender(OURS, train_step(ours, our_loss, settings), param_count(ours)),
            Contender(THEIRS, train_step(theirs, their_loss, settings), param_count(theirs)),
        ],
    )


def sample_case(settings: Settings, batch: int) -> Case:
    device = settings.device
    torch.manual_seed(0)
    ours, diffusion = our_prior(device)
    theirs = their_prior(device)
    ours.eval()
    theirs.eval()
    c = conditioning(batch, device)

    def our_run(k: int):
        def run():
            with torch.no_grad(), settings.autocast():
                return sample_prior(
                    ours,
                    diffusion,
                    c["text_embed"],
                    c["text_tokens"],
                    c["text_mask"],
                    sampler="ddim",
                    steps=k,
                    guidance_scale=GUIDANCE,
                )

        return run

    def their_run(k: int):
        # what DiffusionPrior.sample does after embedding the text with its CLIP, without the candidates' rerank
        text_cond = {"text_embed": c["text_embed"], "text_encodings": c["text_tokens"]}

        def run():
            with torch.no_grad(), settings.autocast():
                return theirs.p_sample_loop((batch, CLIP_DIM), text_cond=text_cond, cond_scale=GUIDANCE, timesteps=k)

        return run

    return Case(
        name=f"prior_sample_b{batch}",
        title=f"prior sampling, DDIM 64 timesteps, CFG, batch {batch}",
        contenders=[
            Contender(
                OURS,
                our_run(settings.steps(SAMPLE_STEPS)),
                param_count(ours),
                net=ours,
                calls_per_step=1,
                nominal_steps=SAMPLE_STEPS,
                flop_run=our_run(1),
            ),
            Contender(
                THEIRS,
                # timesteps=k runs k - 1 network steps
                their_run(settings.steps(SAMPLE_STEPS - 1) + 1),
                param_count(theirs.net),
                net=theirs.net,
                calls_per_step=2,
                nominal_steps=SAMPLE_STEPS - 1,
                flop_run=their_run(2),
            ),
        ],
        info={"batch": batch, "guidance": GUIDANCE},
    )
