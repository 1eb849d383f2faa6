"""Make variations of an image with an unCLIP pipeline: decodings of its CLIP image embedding (DALL·E 2 §3.1).

    python sample/variations.py --image photo.png
    python sample/variations.py --image photo.png --n 8 --eta 0.8 --size 256 --out outputs/
    python sample/variations.py --image photo.png --fresh-noise --guidance 5

By default the decoder is DDIM-inverted on the image (its latent x_T, conditioned on the image embedding and no
caption) and x_T is decoded with DDIM at --eta, as in the paper: 0 reconstructs the image, larger values keep
less of it. --fresh-noise decodes new noise with the decoder's own sampler instead. Each variation is written
as a PNG whose metadata holds the source, the seed and every setting, with a grid beside; the paths are printed.
"""

import argparse
import sys

import torch

from unclip.edits import INVERSION_STEPS, VARIATION_ETA
from unclip.pipeline import DEFAULT_PIPELINE, DTYPES, UnCLIPPipeline


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    p.add_argument("--image", required=True, help="the image to vary (PNG, JPEG, WebP, ...)")
    p.add_argument("--n", type=int, default=4, help="variations to make (default 4)")
    p.add_argument("--seed", type=int, default=0, help="variation i uses seed + i (default 0)")
    p.add_argument("--size", type=int, help="output size, as the pipeline allows (default: largest)")
    p.add_argument(
        "--eta", type=float, default=VARIATION_ETA, help=f"DDIM eta (default {VARIATION_ETA}; 0 = the input)"
    )
    p.add_argument(
        "--steps",
        type=int,
        help=f"inversion and decoding steps (default {INVERSION_STEPS}; with --fresh-noise: "
        "decoder steps, default the pipeline's)",
    )
    p.add_argument("--guidance", type=float, help="decoder guidance scale (default 1 inverted, else the pipeline's)")
    p.add_argument("--fresh-noise", action="store_true", help="decode fresh noise instead of the inverted latent")
    p.add_argument("--pipeline", default=DEFAULT_PIPELINE, help=f"pipeline folder (default {DEFAULT_PIPELINE})")
    p.add_argument("--out", default="outputs", help="output folder (default outputs/)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="fp16/bf16 are for GPUs")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    invert = not args.fresh_noise
    try:
        pipe = UnCLIPPipeline.from_pretrained(args.pipeline, device=args.device, dtype=args.dtype)
        out = pipe.variations(
            args.image,
            n=args.n,
            seed=args.seed,
            invert=invert,
            eta=args.eta,
            size=args.size or max(pipe.sizes),
            decoder={"guidance_scale": args.guidance, "steps": None if invert else args.steps},
            inversion_steps=args.steps or INVERSION_STEPS,
        )
    except ValueError as e:
        sys.exit(f"error: {e}")
    paths = out.save(args.out)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
