"""Assemble a pipeline folder from trained components, for sample/generate.py and the other sample scripts.

    python train/pipeline.py --out models/mine --clip models/shapes/clip \\
        --prior runs/prior-shapes/export --decoder runs/decoder-shapes/export \\
        --upsampler runs/upsampler-shapes-256/export --upsampler runs/upsampler-shapes-1024/export \\
        --default decoder.guidance_scale=2 --default candidates=4
    python train/pipeline.py --out models/mine-b32 --prior runs/prior-b32/export --decoder runs/decoder-b32/export

Without --clip the pipeline's CLIP is the one the decoder was trained with (its config's clip section: an
open_clip name with a pretrained tag or weights file, a CLIP folder, or a model config), written into the folder.

A --default sets a sampling setting the pipeline uses unless the caller overrides it (stages: prior, decoder,
upsampler_256, upsampler_1024; settings: sampler and steps, guidance_scale for the prior and decoder,
text_guidance_scale for the decoder, noise_level for upsamplers; candidates for the prior, the best of that many
embeddings by similarity to the prompt) and candidates=N, the best of N images by CLIP similarity to the prompt.
preview_steps=K ranks the candidates by K-step previews and samples only the kept one in full;
pruning=STEP:KEEP,... (e.g. 5:8,10:4,15:2) drops all but each prompt's best KEEP candidates after decoder step STEP
(docs/sampling.md). The settings are
stored in pipeline.json under "defaults". The folder is built beside --out and swapped in only
when every component has been checked and copied, so an error leaves an existing --out as it was.
"""

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

from unclip.checkpoint import build_pipeline_folder, read_meta
from unclip.clip import ClipAdapter
from unclip.clip_models import read_clip_checkpoint
from unclip.config import ClipConfig, from_dict
from unclip.pipeline import UnCLIPPipeline
from unclip.sampling import (
    DecoderSettings,
    PriorSettings,
    UpsamplerSettings,
    check_count,
    check_pruning,
    format_pruning,
)

# settings of the whole call: name -> (minimum, what the minimum means)
TOP_LEVEL = {"candidates": (1, "1 = no reranking"), "preview_steps": (0, "0 = rank fully sampled candidates")}
STAGES = {"prior": PriorSettings, "decoder": DecoderSettings, "upsampler": UpsamplerSettings}


def parse_default(text: str) -> tuple[str | None, str, float | int | str]:
    """ "decoder.guidance_scale=2" -> ("decoder", "guidance_scale", 2.0), "candidates=4" -> (None, "candidates",
    4); the value is checked by the stage's settings class, and a ValueError names what is wrong."""
    key, sep, value = text.partition("=")
    if not (sep and value):
        raise ValueError(
            f"--default {text!r}: write STAGE.SETTING=VALUE or candidates=N, e.g. decoder.guidance_scale=2"
        )
    if key == "pruning":
        try:
            return None, key, format_pruning(check_pruning(value)) or "none"
        except ValueError as e:
            raise ValueError(f"--default {text!r}: {e}") from None
    if key in TOP_LEVEL:
        minimum, meaning = TOP_LEVEL[key]
        try:
            return None, key, check_count(key, int(value), minimum)
        except ValueError:
            raise ValueError(f"--default {text!r}: {key} must be a whole number >= {minimum} ({meaning})") from None
    stage, dot, name = key.partition(".")
    kind = STAGES.get("upsampler" if stage.startswith("upsampler_") else stage)
    if not dot or kind is None:
        raise ValueError(f"--default {text!r}: unknown stage {stage!r}; use prior, decoder or upsampler_<size>")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    if name not in fields:
        raise ValueError(f"--default {text!r}: {stage} has no setting {name!r}; valid: {sorted(fields)}")
    cast = {"int": int, "float": float}.get(str(fields[name].type), str)
    try:
        parsed = cast(value)
    except ValueError:
        raise ValueError(
            f"--default {text!r}: {name} takes {'a whole number' if cast is int else 'a number'}"
        ) from None
    kind().replace({name: parsed}, f"--default {stage}")  # checks the value
    return stage, name, parsed


def decoder_clip(decoder: str, scratch: Path) -> Path:
    """The CLIP folder of the CLIP that the decoder export's config names, written under `scratch` if need be."""
    config = from_dict(ClipConfig, read_meta(decoder).get("clip") or {}, "clip")
    if config.checkpoint is not None:
        return Path(config.checkpoint)
    if config.model_name is None and config.model_config is None:
        raise ValueError(f"the decoder {decoder} names no CLIP in its config.json; pass --clip with a CLIP folder")
    try:
        clip = ClipAdapter.from_config(config)
    except ValueError as e:
        raise ValueError(f"the CLIP in {decoder}/config.json: {e}; or pass --clip with a CLIP folder") from None
    return clip.save(scratch / "clip")


def check_clip_widths(clip: str | Path, parts: list[tuple[str, str | None]]) -> None:
    """A ValueError, before anything is written, when a component was trained for another CLIP's widths: the
    embedding width (model.clip_dim), the token encodings' width (model.text_width) or a shorter context
    (model.text_ctx). Folders that cannot be read are left to build_pipeline_folder's own checks."""
    try:
        model_cfg = read_clip_checkpoint(clip)[0]
    except ValueError:
        return
    text_cfg = model_cfg.get("text_cfg") or {}
    widths = {
        "clip_dim": model_cfg.get("embed_dim"),
        "text_width": None if "hf_model_name" in text_cfg else text_cfg.get("width"),
        "text_ctx": text_cfg.get("context_length", 77),
    }
    for flag, folder in parts:
        try:
            model = read_meta(folder)["model"] if folder else {}
        except ValueError:
            continue
        for key, has in widths.items():
            wants = model.get(key)
            if wants and has and (wants < has if key == "text_ctx" else wants != has):
                raise ValueError(
                    f"--{flag} {folder} was trained with model.{key}={wants}, but the CLIP ({clip}) has {has}: "
                    "pass the CLIP it was trained with (without --clip, the decoder's)"
                )


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    p.add_argument("--out", required=True, help="the pipeline folder to write")
    p.add_argument(
        "--clip",
        help="a CLIP folder written by train/clip.py (runs/NAME/export); default: the decoder's CLIP (its config's)",
    )
    p.add_argument("--decoder", required=True, help="the decoder's export folder")
    p.add_argument("--prior", help="the prior's export folder")
    p.add_argument("--upsampler", action="append", default=[], help="an upsampler's export folder, in order (repeat)")
    p.add_argument("--inpaint", help="the inpainting decoder's export folder")
    p.add_argument(
        "--noised-clip",
        help="a noise-aware CLIP for CLIP guidance (a train/clip.py export with model.noise_aware: true)",
    )
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
        defaults: dict = {}
        for text in args.default:
            stage, name, value = parse_default(text)
            if stage is None:
                defaults[name] = value
            else:
                defaults.setdefault(stage, {})[name] = value
        with tempfile.TemporaryDirectory(prefix="unclip-clip-") as scratch:
            clip = args.clip or decoder_clip(args.decoder, Path(scratch))
            parts = [("prior", args.prior), ("decoder", args.decoder), ("inpaint", args.inpaint)]
            check_clip_widths(clip, parts + [("upsampler", u) for u in args.upsampler])
            out = build_pipeline_folder(
                args.out,
                clip=clip,
                prior=args.prior,
                decoder=args.decoder,
                upsamplers=args.upsampler,
                inpaint=args.inpaint,
                noised_clip=args.noised_clip,
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
