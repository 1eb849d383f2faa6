"""Assemble a pipeline folder from trained components, for sample/generate.py and the other sample scripts.

    python train/pipeline.py --out models/mine --clip models/shapes/clip \\
        --prior runs/prior-shapes/export --decoder runs/decoder-shapes/export \\
        --upsampler runs/upsampler-shapes-256/export --upsampler runs/upsampler-shapes-1024/export \\
        --default decoder.guidance_scale=2 --default decoder.candidates=4

A --default sets a sampling setting the pipeline uses unless the caller overrides it (stages: prior, decoder,
upsampler_256, upsampler_1024; settings: sampler and steps, guidance_scale for the prior and decoder,
text_guidance_scale for the decoder, noise_level for upsamplers; candidates for the prior, the best of that many
embeddings, and for the decoder, the best of that many images, both by CLIP similarity to the prompt). The
settings are stored in pipeline.json under "defaults".
"""

import argparse
import sys

import torch

from unclip.diffusion import SAMPLERS
from unclip.pipeline import DEFAULTS, UnCLIPPipeline, build_pipeline_folder


def parse_default(text: str) -> tuple[str, str, float | int | str]:
    """ "decoder.guidance_scale=2" -> ("decoder", "guidance_scale", 2.0); a ValueError names what is wrong."""
    key, sep, value = text.partition("=")
    stage, dot, name = key.partition(".")
    if not (sep and dot and value):
        raise ValueError(f"--default {text!r}: write STAGE.SETTING=VALUE, e.g. decoder.guidance_scale=2")
    known = DEFAULTS.get(stage, DEFAULTS["upsampler"] if stage.startswith("upsampler_") else None)
    if known is None:
        raise ValueError(f"--default {text!r}: unknown stage {stage!r}; use prior, decoder or upsampler_<size>")
    if name not in known:
        raise ValueError(f"--default {text!r}: {stage} has no setting {name!r}; valid: {sorted(known)}")
    if name == "sampler" and value not in SAMPLERS:
        raise ValueError(f"--default {text!r}: the sampler is one of {', '.join(SAMPLERS)}")
    kind = type(known[name])
    try:
        parsed = kind(value)
    except ValueError:
        raise ValueError(
            f"--default {text!r}: {name} takes {'a whole number' if kind is int else 'a number'}"
        ) from None
    if kind is not str and not parsed >= 0:
        raise ValueError(f"--default {text!r}: {name} must be >= 0")
    if name == "candidates" and parsed < 1:
        raise ValueError(f"--default {text!r}: candidates must be >= 1 (1 = no reranking)")
    return stage, name, parsed


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
    p.add_argument(
        "--default",
        action="append",
        default=[],
        metavar="STAGE.SETTING=VALUE",
        help="a sampling default of the pipeline, e.g. decoder.guidance_scale=2 (repeat)",
    )
    args = p.parse_args(argv)
    try:
        defaults: dict[str, dict] = {}
        for text in args.default:
            stage, name, value = parse_default(text)
            defaults.setdefault(stage, {})[name] = value
        out = build_pipeline_folder(
            args.out,
            clip=args.clip,
            prior=args.prior,
            decoder=args.decoder,
            upsamplers=args.upsampler,
            inpaint=args.inpaint,
            defaults=defaults,
            dtype=torch.float16 if args.fp16 else None,
        )
        pipe = UnCLIPPipeline.from_pretrained(out)  # check that it loads
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out} (sizes {pipe.sizes})")
    return out


if __name__ == "__main__":
    main()
