"""Repaint part of an image to fit a prompt with an unCLIP pipeline (GLIDE-style editing, DALL·E 2 figure 1).

    python sample/inpaint.py --image scene.png --mask mask.png --prompt "a red circle above a green diamond"
    python sample/inpaint.py --image scene.png --mask mask.png --prompt "a red circle" --method repaint --n 8

The prompt is the caption of the whole image you want, as in GLIDE and DALL·E 2: to turn the square under a red
circle into a green diamond, mask the square and write "a red circle above a green diamond", not "a green
diamond". The pipeline fills the mask --candidates times per image (default: the pipeline's) and keeps the fill
whose whole image its CLIP finds closest to the prompt.

The mask is white where the image is to be repainted and black where it is kept. It may have another size
than the image if the aspect ratio is the same (it is resized, nearest, with a warning); grey pixels are
thresholded at 50% (with a warning that counts them); an all-black mask is an error. The pipeline's trained
inpainting decoder is used if it has one, otherwise RePaint (training-free) with the plain decoder. Outside
the mask the result equals the input at every size (the input resized to it): the decoder's image is written as
NAME_{size}px.png beside the upsampled one, with the prompt, seed and settings in each PNG's metadata.
"""

from unclip.cli import run_sample, sample_parser
from unclip.edits import REPAINT_RESAMPLE


def parse_args(argv=None):
    p = sample_parser(__doc__)
    p.add_argument("--image", required=True, help="the image to edit")
    p.add_argument("--mask", required=True, help="white = repaint, black = keep")
    p.add_argument(
        "--prompt",
        required=True,
        help='the caption of the whole desired image, the kept part included (e.g. "a red circle above a green '
        'diamond" to repaint the object under the circle)',
    )
    p.add_argument(
        "--candidates",
        type=int,
        help="fills per image; the one the pipeline's CLIP ranks first is kept (default: the pipeline's)",
    )
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
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    return run_sample(
        args,
        lambda pipe: pipe.inpaint(
            args.image,
            args.mask,
            args.prompt,
            n=args.n,
            seed=args.seed,
            size=args.size,
            method=args.method,
            candidates=args.candidates,
            resample=args.resample,
            decoder={"steps": args.steps, "guidance_scale": args.guidance},
        ),
    )


if __name__ == "__main__":
    main()
