"""Generate images from a prompt with an unCLIP pipeline (CLIP -> prior -> decoder -> upsamplers).

    python sample/generate.py --prompt "a red circle above a blue square"
    python sample/generate.py --prompt "a small green diamond" --n 8 --size 256 --seed 3 --out outputs/

Each image is written as a PNG whose text metadata holds the prompt, the seed and every sampling setting,
with a grid of all of them beside; the paths are printed.
"""

from unclip.cli import run_sample, sample_parser
from unclip.diffusion import SAMPLERS


def parse_args(argv=None):
    p = sample_parser(__doc__)
    p.add_argument("--prompt", required=True, help="what to draw")
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
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    return run_sample(
        args,
        lambda pipe: pipe(
            [args.prompt] * args.n,
            candidates=args.candidates,
            size=args.size,
            seed=args.seed,
            use_prior=not args.no_prior,
            prior={"steps": args.prior_steps, "guidance_scale": args.prior_guidance},
            decoder={"steps": args.steps, "guidance_scale": args.guidance, "sampler": args.sampler},
        ),
    )


if __name__ == "__main__":
    main()
