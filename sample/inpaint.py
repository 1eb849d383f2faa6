"""Repaint part of an image to fit a prompt with an unCLIP pipeline (GLIDE-style editing, DALL·E 2 figure 1).

    python sample/inpaint.py --image photo.png --mask mask.png --prompt "a red circle"
    python sample/inpaint.py --image photo.png --mask mask.png --prompt "a red circle" --method repaint --n 8

The mask is white where the image is to be repainted and black where it is kept. It may have another size
than the image if the aspect ratio is the same (it is resized, nearest, with a warning); grey pixels are
thresholded at 50% (with a warning that counts them); an all-black mask is an error. The pipeline's trained
inpainting decoder is used if it has one, otherwise RePaint (training-free) with the plain decoder. Outside
the mask, the decoder's output equals the input at the decoder's size: that image is written as
NAME_{size}px.png beside the upsampled one, with the prompt, seed and settings in each PNG's metadata.
"""

import argparse
import sys

import torch

from unclip.edits import REPAINT_RESAMPLE
from unclip.pipeline import DEFAULT_PIPELINE, DTYPES, UnCLIPPipeline


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    p.add_argument("--image", required=True, help="the image to edit")
    p.add_argument("--mask", required=True, help="white = repaint, black = keep")
    p.add_argument("--prompt", required=True, help="what to paint in the masked region")
    p.add_argument("--n", type=int, default=4, help="images to make (default 4)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    p.add_argument("--size", type=int, help="output size, as the pipeline allows (default: largest)")
    p.add_argument("--steps", type=int, help="decoder steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float, help="decoder classifier-free guidance scale (default: the pipeline's)")
    p.add_argument(
        "--method",
        choices=["auto", "model", "repaint"],
        default="auto",
        help="the trained inpainting decoder, RePaint with the plain decoder, or the first that exists (default)",
    )
    p.add_argument(
        "--resample",
        type=int,
        default=REPAINT_RESAMPLE,
        help=f"RePaint jumps back per step (default {REPAINT_RESAMPLE})",
    )
    p.add_argument("--pipeline", default=DEFAULT_PIPELINE, help=f"pipeline folder (default {DEFAULT_PIPELINE})")
    p.add_argument("--out", default="outputs", help="output folder (default outputs/)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="fp16/bf16 are for GPUs")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        pipe = UnCLIPPipeline.from_pretrained(args.pipeline, device=args.device, dtype=args.dtype)
        out = pipe.inpaint(
            args.image,
            args.mask,
            args.prompt,
            n=args.n,
            seed=args.seed,
            size=args.size or max(pipe.sizes),
            method=args.method,
            resample=args.resample,
            decoder={"steps": args.steps, "guidance_scale": args.guidance},
        )
    except ValueError as e:
        sys.exit(f"error: {e}")
    paths = out.save(args.out)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main()
