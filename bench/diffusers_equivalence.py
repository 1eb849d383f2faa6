"""Karlo and Kandinsky 2.2's prior through unclip against diffusers' pipelines, on the tiny random folders of
tests/diffusers_helpers.py, and the parameter counts of Karlo's published network configurations.

    python bench/diffusers_equivalence.py --out runs/bench/diffusers_equivalence.json

Reports, as docs/pretrained.md quotes them:
- the 64 px images of unclip's DDPM and of diffusers' UnCLIPPipeline at the same seed and timesteps (max abs
  difference in [0, 1]), with diffusers' scheduler tables in float64 (as unclip keeps them) and as diffusers
  ships them (float32);
- Kandinsky 2.2's prior: the image embeddings of both (max relative difference);
- the wall time of one call of each at these settings;
- the parameters of Karlo's prior, decoder, text_proj and super-resolution networks, built on the meta device from
  the configurations in diffusers' conversion script (scripts/convert_kakao_brain_unclip_to_diffusers.py).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusers import KandinskyV22PriorPipeline, PriorTransformer, UNet2DConditionModel, UNet2DModel  # noqa: E402

from tests.diffusers_helpers import make_kandinsky_prior_folder, make_karlo_folder  # noqa: E402
from tests.test_diffusers_format import float64_tables, load_reference  # noqa: E402
from unclip.diffusers_format import UnCLIPTextProjModel, load_prior  # noqa: E402
from unclip.pipeline import UnCLIPPipeline  # noqa: E402
from unclip.sampling import sample_prior  # noqa: E402

STEPS = {"prior": 25, "decoder": 25, "super_res": 7}  # diffusers' UnCLIPPipeline defaults


def karlo_images(root: Path, seed: int) -> dict:
    pipe = UnCLIPPipeline.from_pretrained(root)
    out = {}
    for tables in ("float64", "float32"):
        ref = load_reference(root, float64=tables == "float64")  # float32: as diffusers ships them
        start = time.perf_counter()
        theirs = ref(
            "a horse",
            generator=torch.Generator().manual_seed(seed),
            prior_num_inference_steps=STEPS["prior"],
            decoder_num_inference_steps=STEPS["decoder"],
            super_res_num_inference_steps=STEPS["super_res"],
            output_type="np",
        ).images
        ref_s = time.perf_counter() - start
        start = time.perf_counter()
        ours = pipe(
            ["a horse"],
            seed=seed,
            size=64,
            prior={"sampler": "ddpm", "steps": STEPS["prior"]},
            decoder={"sampler": "ddpm", "steps": STEPS["decoder"]},
            upsamplers={"upsampler_64": {"steps": STEPS["super_res"]}},
        ).images
        ours_s = time.perf_counter() - start
        ours = ((ours + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        diff = abs(ours - theirs)
        out[tables] = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean())}
        out[tables].update(unclip_s=round(ours_s, 2), diffusers_s=round(ref_s, 2))
    return out


def kandinsky_prior(root: Path, seed: int) -> dict:
    clip, prior = load_prior(root)
    ref = KandinskyV22PriorPipeline.from_pretrained(root)
    float64_tables(ref.scheduler)
    theirs = ref("a horse", num_inference_steps=STEPS["prior"], generator=torch.Generator().manual_seed(seed))
    text = clip.embed_text(["a horse"], normalize=True)
    generator = [torch.Generator().manual_seed(seed)]
    ours = sample_prior(prior.model, prior.diffusion, text.embed, text.tokens, text.mask, sampler="ddpm",
                        steps=STEPS["prior"], guidance_scale=4.0, generator=generator)  # fmt: skip
    return {"max_relative": float((ours - theirs.image_embeds).abs().max() / theirs.image_embeds.abs().max())}


def karlo_parameters() -> dict:
    """Millions of parameters of Karlo's networks in the configurations of diffusers' conversion script."""
    decoder = dict(
        sample_size=64, layers_per_block=3, block_out_channels=(320, 640, 960, 1280), in_channels=3, out_channels=6,
        down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
        up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=1536, class_embed_type="identity",
        attention_head_dim=64, resnet_time_scale_shift="scale_shift",
    )  # fmt: skip
    super_res = dict(
        sample_size=256, layers_per_block=3, block_out_channels=(320, 640, 960, 1280), in_channels=6, out_channels=3,
        down_block_types=("ResnetDownsampleBlock2D",) * 4, up_block_types=("ResnetUpsampleBlock2D",) * 4,
        add_attention=False,
    )  # fmt: skip
    with torch.device("meta"):
        nets = {
            "prior": PriorTransformer(),
            "decoder": UNet2DConditionModel(**decoder),
            "text_proj": UnCLIPTextProjModel(time_embed_dim=1280, cross_attention_dim=1536),
            "super_res_first": UNet2DModel(**super_res),
            "super_res_last": UNet2DModel(**super_res),
        }
    return {name: round(sum(p.numel() for p in net.parameters()) / 1e6, 1) for name, net in nets.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the results here as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "steps": STEPS,
            "karlo_images": karlo_images(make_karlo_folder(Path(tmp) / "karlo"), args.seed),
            "kandinsky_prior": kandinsky_prior(make_kandinsky_prior_folder(Path(tmp) / "kandinsky"), args.seed),
            "karlo_parameters_millions": karlo_parameters(),
            "torch": torch.__version__,
        }
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
