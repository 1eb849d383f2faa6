"""Morph an image toward another image, a prompt or a caption edit with an unCLIP pipeline (DALL·E 2 §3.2-3.3).

    python sample/interpolate.py --image a.png --image2 b.png --steps 5
    python sample/interpolate.py --image a.png --prompt "a blue square"
    python sample/interpolate.py --image cat.png --from-caption "a photo of a cat" \\
        --to-caption "an anime drawing of a cat" --steps 5 --max-theta 0.5

The CLIP image embedding of --image is rotated (slerp) toward the target: the second image's embedding, the
prior's embedding of --prompt, or the text diff normalize(z_t(to) - z_t(from)) up to --max-theta. Each frame
decodes the image's DDIM-inverted latent (for two images, the slerp of both latents) with DDIM eta 0, so the
first frame reconstructs the image; --fresh-noise decodes the same random noise for every frame instead.
Frames are written as PNGs (mode, t or θ, sources, seed and settings in their metadata) with a strip grid.
"""

import argparse
import sys

import torch

from unclip.edits import INVERSION_STEPS
from unclip.pipeline import DEFAULT_PIPELINE, DTYPES, UnCLIPPipeline


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    p.add_argument("--image", required=True, help="the starting image")
    p.add_argument("--image2", help="target: a second image")
    p.add_argument("--prompt", help="target: a caption, through the prior")
    p.add_argument("--from-caption", help="text diff: a caption of --image ...")
    p.add_argument("--to-caption", help="... and the caption to move it toward")
    p.add_argument("--steps", type=int, default=5, help="frames, ends included (default 5)")
    p.add_argument("--max-theta", type=float, default=0.5, help="text diff: the last frame's θ (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prior and of any fresh noise (default 0)")
    p.add_argument("--size", type=int, help="output size, as the pipeline allows (default: largest)")
    p.add_argument("--inversion-steps", type=int, default=INVERSION_STEPS, help="DDIM inversion and decoding steps")
    p.add_argument("--guidance", type=float, help="decoder guidance scale (default 1 inverted, else the pipeline's)")
    p.add_argument("--fresh-noise", action="store_true", help="decode the same random noise in every frame")
    p.add_argument("--pipeline", default=DEFAULT_PIPELINE, help=f"pipeline folder (default {DEFAULT_PIPELINE})")
    p.add_argument("--out", default="outputs", help="output folder (default outputs/)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="fp16/bf16 are for GPUs")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        pipe = UnCLIPPipeline.from_pretrained(args.pipeline, device=args.device, dtype=args.dtype)
        out = pipe.interpolate(
            args.image,
            image2=args.image2,
            prompt=args.prompt,
            from_caption=args.from_caption,
            to_caption=args.to_caption,
            steps=args.steps,
            max_theta=args.max_theta,
            seed=args.seed,
            invert=not args.fresh_noise,
            size=args.size or max(pipe.sizes),
            decoder={"guidance_scale": args.guidance},
            inversion_steps=args.inversion_steps,
        )
    except ValueError as e:
        sys.exit(f"error: {e}")
    paths = out.save(args.out)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
