"""Make variations of an image with an unCLIP pipeline: decodings of its CLIP image embedding (DALL·E 2 §3.1).

    python sample/variations.py --image photo.png
    python sample/variations.py --image photo.png --n 8 --eta 0.8 --size 256 --out outputs/
    python sample/variations.py --image photo.png --fresh-noise --guidance 5

By default the decoder is DDIM-inverted on the image (its latent x_T, conditioned on the image embedding and no
caption) and x_T is decoded with DDIM at --eta, as in the paper: 0 reconstructs the image, larger values keep
less of it. --fresh-noise decodes new noise with the decoder's own sampler instead. Each variation is the best
of --candidates decodings (default 4), the one the pipeline's CLIP finds closest to the image. It is written as
a PNG whose metadata holds the source, the kept decoding's seed and every setting, with a grid beside; the
paths are printed. --seed SEED --candidates 1 remakes one variation from the seed in its metadata.
"""

from unclip.cli import run_sample, sample_parser, whole_number
from unclip.edits import INVERSION_STEPS, VARIATION_CANDIDATES, VARIATION_ETA


def parse_args(argv=None):
    p = sample_parser(__doc__)
    p.add_argument("--image", required=True, help="the image to vary (PNG, JPEG, WebP, ...)")
    p.add_argument(
        "--eta", type=float, default=VARIATION_ETA, help=f"DDIM eta (default {VARIATION_ETA}; 0 = the input)"
    )
    p.add_argument(
        "--steps",
        type=whole_number(1),
        help=f"inversion and decoding steps (default {INVERSION_STEPS}; with --fresh-noise: "
        "decoder steps, default the pipeline's)",
    )
    p.add_argument(
        "--guidance",
        type=float,
        help="decoder guidance scale (default: 1 for the inverted latent, else the pipeline's; with --fresh-noise, "
        "2 or more keeps more of the image when the pipeline's default is 1)",
    )
    p.add_argument("--fresh-noise", action="store_true", help="decode fresh noise instead of the inverted latent")
    p.add_argument(
        "--candidates",
        type=whole_number(1),
        default=VARIATION_CANDIDATES,
        help="decode each variation this many times and keep the one the pipeline's CLIP finds closest to the "
        f"image (default {VARIATION_CANDIDATES}; 1 is about twice as fast and keeps less of the image)",
    )
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    invert = not args.fresh_noise
    return run_sample(
        args,
        lambda pipe: pipe.variations(
            args.image,
            n=args.n,
            seed=args.seed,
            invert=invert,
            eta=args.eta,
            size=args.size,
            decoder={"guidance_scale": args.guidance, "steps": None if invert else args.steps},
            inversion_steps=INVERSION_STEPS if args.steps is None else args.steps,
            candidates=args.candidates,
        ),
    )


if __name__ == "__main__":
    main()
