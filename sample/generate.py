"""Generate images from a prompt with an unCLIP pipeline (CLIP -> prior -> decoder -> upsamplers).

    python sample/generate.py --prompt "a red circle above a blue square"
    python sample/generate.py --prompt "a small green diamond" --n 8 --size 256 --seed 3 --out outputs/

Each image is written as a PNG whose text metadata holds the prompt, the seed and every sampling setting,
with a grid of all of them beside; the paths are printed.
"""

import argparse
import sys

import torch

from unclip.diffusion import SAMPLERS
from unclip.pipeline import DEFAULT_PIPELINE, DTYPES, UnCLIPPipeline


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    p.add_argument("--prompt", required=True, help="what to draw")
    p.add_argument("--n", type=int, default=4, help="images to make (default 4)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    p.add_argument("--size", type=int, help="output size: 64, 256 or 1024 as the pipeline allows (default: largest)")
    p.add_argument("--steps", type=int, help="decoder sampling steps (default: the pipeline's, 25)")
    p.add_argument("--guidance", type=float, help="decoder classifier-free guidance scale (default 5)")
    p.add_argument("--sampler", choices=SAMPLERS, help="decoder sampler (default dpm++)")
    p.add_argument("--prior-steps", type=int, help="prior sampling steps (default 25)")
    p.add_argument("--prior-guidance", type=float, help="prior guidance scale (default 2)")
    p.add_argument(
        "--candidates",
        type=int,
        default=1,
        help="make N images per requested image and keep the one CLIP scores highest (DALL·E's reranking)",
    )
    p.add_argument("--no-prior", action="store_true", help="decode the raw text embedding (the paper's ablation)")
    p.add_argument("--pipeline", default=DEFAULT_PIPELINE, help=f"pipeline folder (default {DEFAULT_PIPELINE})")
    p.add_argument("--out", default="outputs", help="output folder (default outputs/)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="fp16/bf16 are for GPUs")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        pipe = UnCLIPPipeline.from_pretrained(args.pipeline, device=args.device, dtype=args.dtype)
        out = pipe(
            [args.prompt] * args.n,
            candidates=args.candidates,
            size=args.size or max(pipe.sizes),
            seed=args.seed,
            use_prior=not args.no_prior,
            prior={"steps": args.prior_steps, "guidance_scale": args.prior_guidance},
            decoder={"steps": args.steps, "guidance_scale": args.guidance, "sampler": args.sampler},
        )
    except ValueError as e:
        sys.exit(f"error: {e}")
    paths = out.save(args.out)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
