"""Assemble a pipeline folder from trained components, for sample/generate.py and the other sample scripts.

    python train/pipeline.py --out models/mine --clip models/shapes/clip \\
        --prior runs/prior-shapes/export --decoder runs/decoder-shapes/export \\
        --upsampler runs/upsampler-shapes-256/export --upsampler runs/upsampler-shapes-1024/export
"""

import argparse
import sys

import torch

from unclip.pipeline import UnCLIPPipeline, build_pipeline_folder


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    p.add_argument("--out", required=True, help="the pipeline folder to write")
    p.add_argument("--clip", required=True, help="a CLIP folder written by train/clip.py (runs/NAME/export)")
    p.add_argument("--decoder", required=True, help="the decoder's export folder")
    p.add_argument("--prior", help="the prior's export folder")
    p.add_argument("--upsampler", action="append", default=[], help="an upsampler's export folder, in order (repeat)")
    p.add_argument("--inpaint", help="the inpainting decoder's export folder")
    p.add_argument("--fp16", action="store_true", help="store the weights in fp16 (half the size; for bundling)")
    args = p.parse_args(argv)
    try:
        out = build_pipeline_folder(
            args.out,
            clip=args.clip,
            prior=args.prior,
            decoder=args.decoder,
            upsamplers=args.upsampler,
            inpaint=args.inpaint,
            dtype=torch.float16 if args.fp16 else None,
        )
        pipe = UnCLIPPipeline.from_pretrained(out)  # check that it loads
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out} (sizes {pipe.sizes})")
    return out


if __name__ == "__main__":
    main()
