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

from unclip.cli import finite_number, run_sample, sample_parser, whole_number
from unclip.edits import INVERSION_STEPS


def parse_args(argv=None):
    p = sample_parser(__doc__, n=None)
    p.add_argument("--image", required=True, help="the starting image")
    p.add_argument("--image2", help="target: a second image")
    p.add_argument("--prompt", help="target: a caption, through the prior")
    p.add_argument("--from-caption", help="text diff: a caption of --image ...")
    p.add_argument("--to-caption", help="... and the caption to move it toward")
    p.add_argument("--steps", type=int, default=5, help="frames, ends included (default 5)")
    p.add_argument(
        "--max-theta", type=finite_number(0), default=0.5, help="text diff: the last frame's θ (default 0.5)"
    )
    p.add_argument(
        "--inversion-steps", type=whole_number(1), default=INVERSION_STEPS, help="DDIM inversion and decoding steps"
    )
    p.add_argument("--guidance", type=float, help="decoder guidance scale (default 1 inverted, else the pipeline's)")
    p.add_argument("--fresh-noise", action="store_true", help="decode the same random noise in every frame")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    return run_sample(
        args,
        lambda pipe: pipe.interpolate(
            args.image,
            image2=args.image2,
            prompt=args.prompt,
            from_caption=args.from_caption,
            to_caption=args.to_caption,
            steps=args.steps,
            max_theta=args.max_theta,
            seed=args.seed,
            invert=not args.fresh_noise,
            size=args.size,
            decoder={"guidance_scale": args.guidance},
            inversion_steps=args.inversion_steps,
        ),
    )


if __name__ == "__main__":
    main()
