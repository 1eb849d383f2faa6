"""Evaluate an unCLIP pipeline on `shapes` or OpenMoji, or validate the `shapes` checker.

    python -m unclip.eval shapes --pipeline models/shapes --evaluator-clip models/evaluators/shapes_clip --n 200
    python -m unclip.eval shapes --pipeline models/shapes --evaluator-clip ... --no-prior   # the ablation
    python -m unclip.eval shapes --pipeline models/shapes --prior-sampler ddpm --prior-steps 1000 \
        --decoder-sampler ddpm --decoder-steps 1000   # the same models sampled as DALLE2-pytorch does
    python -m unclip.eval openmoji --pipeline models/openmoji --evaluator-clip ... --out openmoji.json
    python -m unclip.eval openmoji --pipeline models/openmoji --evaluator-clip ... --split train --n 128
    python -m unclip.eval checker --n 500
    python -m unclip.eval clip --clip models/shapes/clip   # which caption differences a CLIP can see
    python -m unclip.eval caption --pipeline models/shapes  # which caption differences the decoder reads
    python -m unclip.eval variations --pipeline models/shapes   # do variations keep what the image shows?
    python -m unclip.eval inpaint --pipeline models/shapes --n 200   # edit one object of a render
    python -m unclip.eval inpaint --pipeline models/shapes --method repaint --size 256

The evaluator CLIP must be trained separately from the pipeline's own CLIP. A table is printed and, with
--out, the results are written as JSON.
"""

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError

from unclip.checkpoint import atomic_write_bytes, load_model
from unclip.config import DataConfig, from_dict, load_config
from unclip.data.shapes import EXTRA_COLORS, PromptSets
from unclip.diffusion import SAMPLERS
from unclip.edits import VARIATION_CANDIDATES
from unclip.eval.metrics import input_size
from unclip.eval.probes import probe_clip, probe_decoder_caption
from unclip.eval.report import format_caption_probe, format_probe, format_table, format_validation
from unclip.eval.shapes_checker import validate_checker
from unclip.eval.suites import evaluate_openmoji, evaluate_shapes, evaluate_variations
from unclip.sampling import check_pruning, format_pruning

SUITES = {"shapes": evaluate_shapes, "openmoji": evaluate_openmoji}
LOAD_ERRORS = (OSError, KeyError, TypeError, AttributeError, RuntimeError, SafetensorError, yaml.YAMLError)


def load_pipeline(path: str, device: str, dtype: str = "fp32"):
    from unclip.pipeline import UnCLIPPipeline  # the CLI's loaders are module-level so tests can swap them

    return UnCLIPPipeline.from_pretrained(path, device=device, dtype=dtype)


def load_evaluator(path: str, device: str):
    from unclip.clip import ClipAdapter

    return ClipAdapter.from_checkpoint(path, device=device)


def load(what: str, loader, path: str, *args):
    """`loader(path, *args)`, with what goes wrong reading a folder (a missing or corrupt file) as a ValueError
    that names the folder."""
    try:
        return loader(path, *args)
    except LOAD_ERRORS as e:
        raise ValueError(f"cannot load the {what} in {path}: {e}") from e


def at_least(minimum: float, kind: type = int):
    """An argparse type: a `kind` number >= minimum (and finite)."""

    def parse(text: str):
        value = kind(text)  # a ValueError: argparse says "invalid int value"
        if not (math.isfinite(value) and value >= minimum):
            raise argparse.ArgumentTypeError(
                f"must be {'a finite number ' if kind is float else ''}>= {minimum:g}, got {text}"
            )
        return value

    parse.__name__ = kind.__name__
    return parse


def probability(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def device_name(text: str) -> str:
    """An argparse type: a device that exists on this machine."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text} is not a device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and device.index is not None and torch.cuda.is_available():
        if device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise argparse.ArgumentTypeError(f"{text}: no such device on this machine; use cpu")
    return text


def check_writable(out: str) -> None:
    """A ValueError now, before any sampling, when the JSON cannot be written to `out` later."""
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out} is a folder; give the name of a JSON file")
    folder = path.parent
    while not folder.exists():  # the nearest folder that exists; the rest is made when the results are written
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"--out {out} cannot be written: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out} cannot be written: no permission to write in {folder}")


def resumable_out(what: str) -> str:
    """--out's help for a command that keeps its finished work in OUT.partial.jsonl (`what` is kept there)."""
    return (
        f"write the results here as JSON; until then {what} kept in OUT.partial.jsonl, so that the same command, "
        "run again after a kill, resumes where it stopped"
    )


def add_common(p: argparse.ArgumentParser, *, device: bool = True, out: str = "write the results here as JSON"):
    """--seed, --device and --out, which most commands take."""
    p.add_argument("--seed", type=at_least(0), default=0, help="random seed, >= 0 (default 0)")
    if device:
        p.add_argument(
            "--device",
            type=device_name,
            default="cuda" if torch.cuda.is_available() else "cpu",
            help="cpu, cuda, cuda:N or mps (default: cuda when there is a GPU, else cpu)",
        )
    p.add_argument("--out", help=out)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m unclip.eval",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name in SUITES:
        p = commands.add_parser(name, help=f"evaluate a pipeline on {name}")
        p.add_argument("--pipeline", required=True, help="pipeline folder (pipeline.json + components)")
        if name == "shapes":
            p.add_argument(
                "--evaluator-clip",
                help="CLIP checkpoint folder, not the pipeline's CLIP; without it only the checker's compositional "
                "accuracy is measured (no CLIP score, retrieval or Fréchet distance)",
            )
        else:
            p.add_argument("--evaluator-clip", required=True, help="CLIP checkpoint folder, not the pipeline's CLIP")
        what = "prompts per set" if name == "shapes" else "held-out emoji, at most"
        p.add_argument("--n", type=at_least(1 if name == "shapes" else 2), default=200, help=f"{what} (default 200)")
        p.add_argument("--size", type=at_least(1), default=64, help="image size to generate (default 64)")
        p.add_argument("--batch-size", type=at_least(1), default=16, help="prompts per pipeline call (default 16)")
        p.add_argument("--no-prior", action="store_true", help="decode the raw text embeddings (the ablation)")
        truth = "exact renders of the prompts" if name == "shapes" else "the emoji themselves"
        p.add_argument(
            "--oracle",
            action="store_true",
            help=f"decode the pipeline CLIP's image embeddings of {truth} instead of the prior's: the decoder's "
            "quality under a perfect prior",
        )
        if name == "shapes":
            p.add_argument(
                "--sets",
                nargs="+",
                choices=[*PromptSets._fields, "new_colors"],
                help="evaluate only these prompt sets, with the prompts and seeds a full run gives them (default: "
                "all three, and new_colors with --new-colors; the Fréchet distance needs single and relational)",
            )
            p.add_argument(
                "--new-colors",
                nargs="+",
                choices=list(EXTRA_COLORS),
                default=[],
                help="also evaluate the set new_colors: single objects in these colours, which the data draw only "
                "when asked, for a pipeline taught them (a LoRA adapter)",
            )
        for stage in ("prior", "decoder"):
            p.add_argument(
                f"--{stage}-sampler", choices=SAMPLERS, help=f"the {stage}'s sampler (default: the pipeline's)"
            )
            p.add_argument(
                f"--{stage}-steps", type=at_least(1), help=f"{stage} sampling steps (default: the pipeline's)"
            )
            p.add_argument(
                f"--{stage}-guidance",
                type=at_least(0.0, float),
                help=f"the {stage}'s classifier-free guidance scale, 1 for none (default: the pipeline's)",
            )
        p.add_argument(
            "--decoder-clip-guidance",
            type=at_least(0.0, float),
            help="GLIDE's CLIP guidance scale, with the pipeline's noise-aware CLIP, 0 for none (default: the "
            "pipeline's)",
        )
        p.add_argument(
            "--decoder-text-guidance",
            type=at_least(0.0, float),
            help="the decoder's extra guidance along what the caption adds, 0 for none (default: the pipeline's)",
        )
        p.add_argument(
            "--candidates",
            type=at_least(1),
            help="make this many images per prompt and keep the one the pipeline's CLIP scores highest (DALL·E's "
            "reranking; costs that many decoder passes; default: the pipeline's)",
        )
        p.add_argument(
            "--pruning",
            metavar="STEP:KEEP,...",
            help="with candidates, go on after decoder step STEP with each prompt's best KEEP of them by their x0 "
            "predictions (e.g. 5:8,10:4,15:2); 'none' samples every candidate in full (default: the pipeline's)",
        )
        p.add_argument(
            "--dtype",
            choices=["fp32", "fp16", "bf16"],
            default="fp32",
            help="sample in this precision (fp16/bf16 autocast, for GPUs; default fp32)",
        )
        if name == "openmoji":
            p.add_argument(
                "--val-size",
                type=at_least(1),
                default=64,
                help="the data.val_size the pipeline was trained with (default 64)",
            )
            p.add_argument(
                "--split",
                choices=["val", "train"],
                default="val",
                help="val: the held-out emoji, names no stage has seen (default); train: N emoji drawn from those "
                "the pipeline was trained on (--val-size 128 --n 128: the model card's in-distribution set)",
            )
        add_common(
            p,
            out=resumable_out("each scored batch is") if name == "shapes" else "write the results here as JSON",
        )
    p = commands.add_parser(
        "variations",
        help="shapes: how often variations of exact renders (DALL·E 2 §3.1) still show what the render's caption says",
    )
    p.add_argument("--pipeline", required=True, help="a shapes pipeline folder (e.g. models/shapes)")
    p.add_argument("--n", type=at_least(1), default=50, help="prompts per set (default 50)")
    p.add_argument("--per-image", type=at_least(1), default=4, help="variations of each render (default 4)")
    p.add_argument(
        "--sets",
        nargs="+",
        choices=PromptSets._fields,
        default=["single", "relational"],
        help="prompt sets (default: single relational)",
    )
    p.add_argument(
        "--fresh-noise",
        action="store_true",
        help="decode fresh noise with the decoder's sampler, as sample/variations.py --fresh-noise does (default: "
        "the DDIM-inverted latent, as the paper does and sample/variations.py by default)",
    )
    p.add_argument(
        "--decoder-guidance",
        type=at_least(0.0, float),
        help="decoder guidance scale (default: 1 inverted, else the pipeline's, as sample/variations.py)",
    )
    p.add_argument(
        "--candidates",
        type=at_least(1),
        default=VARIATION_CANDIDATES,
        help=f"decodings per variation, as sample/variations.py (default {VARIATION_CANDIDATES})",
    )
    add_common(p, out=resumable_out("the verdicts on each render's variations are"))
    p = commands.add_parser(
        "inpaint",
        help="shapes: mask one object of an exact render, ask for it changed or removed, and check the result and "
        "the pixels outside the mask",
    )
    p.add_argument("--pipeline", required=True, help="a shapes pipeline folder (e.g. models/shapes)")
    p.add_argument("--n", type=at_least(1), default=200, help="edits; the kinds take turns (default 200)")
    p.add_argument("--size", type=at_least(1), help="size of the render and the result (default: the decoder's)")
    p.add_argument(
        "--method",
        choices=["auto", "model", "repaint"],
        default="auto",
        help="the trained inpainting decoder, RePaint with the plain decoder, or the model if the pipeline has "
        "one (default auto)",
    )
    p.add_argument(
        "--phrasing",
        choices=["whole", "region"],
        default="whole",
        help="prompt with the caption of the whole edited image (default) or the new object's alone (removals "
        "are then left out)",
    )
    p.add_argument(
        "--candidates", type=at_least(1), help="fills per edit, CLIP's first kept (default: the pipeline's)"
    )
    p.add_argument("--decoder-guidance", type=at_least(0.0, float), help="decoder guidance (default: the pipeline's)")
    add_common(p, out=resumable_out("each judged edit is"))
    p = commands.add_parser("checker", help="validate the shapes checker on ground-truth renders")
    p.add_argument("--n", type=at_least(1), default=300, help="scenes (default 300)")
    p.add_argument(
        "--sizes", type=at_least(1), nargs="+", default=[32, 64, 256], help="image sizes (default 32 64 256)"
    )
    add_common(p, device=False, out="write the rates here as JSON")
    p = commands.add_parser(
        "clip", help="shapes: how often a CLIP prefers a scene's caption to one wrong in one thing, by kind"
    )
    p.add_argument("--clip", required=True, help="CLIP checkpoint folder (a pipeline's clip/ or an evaluator)")
    p.add_argument("--n", type=at_least(2), default=300, help="val scenes (default 300)")
    add_common(p, out="write the rates here as JSON")
    p = commands.add_parser(
        "caption",
        help="shapes: how far the decoder's prediction moves when its caption is wrong in one thing, by kind",
    )
    p.add_argument("--pipeline", required=True, help="a pipeline folder (e.g. models/shapes)")
    p.add_argument("--n", type=at_least(2), default=100, help="val scenes (default 100)")
    p.add_argument(
        "--timesteps",
        type=int,
        nargs="+",
        default=[999, 800, 600],
        help="noise levels to probe at (default 999 800 600; 999 is nearly pure noise)",
    )
    p.add_argument(
        "--text-only",
        action="store_true",
        help="replace the image embedding by the decoder's null one, so that the caption alone conditions it",
    )
    add_common(p, out="write the distances here as JSON")
    p = commands.add_parser("prior", help="prior vs raw text embedding: retrieval of held-out images (DALL·E 2 §5.1)")
    p.add_argument("--prior", required=True, help="the prior's export folder")
    p.add_argument("--clip", required=True, help="the CLIP the prior was trained with")
    p.add_argument("--config", help="the prior's run config, for its data section (default: the export's)")
    p.add_argument(
        "--n", type=at_least(2), default=100, help="held-out pairs, each retrieved among all n (default 100)"
    )
    p.add_argument(
        "--shapes-reference",
        action="store_true",
        help="shapes only: evaluate on rendered held-out scenes and add the retrieval of an exact sample of "
        "p(image | caption), the best a prior can reproduce",
    )
    p.add_argument(
        "--groups",
        type=at_least(1),
        default=1,
        help="with --shapes-reference: average over this many disjoint sets of n (default 1)",
    )
    p.add_argument(
        "--size-word-prob",
        type=probability,
        default=0.5,
        help="with --shapes-reference: the chance a caption states each object's size (default 0.5, as in training)",
    )
    add_common(p)
    args = parser.parse_args(argv)
    if getattr(args, "oracle", False) and args.no_prior:
        parser.error("--oracle replaces the prior's embeddings with true ones; it cannot go with --no-prior")
    return args


def stage_overrides(args: argparse.Namespace) -> dict:
    """{"prior": {...}, "decoder": {...}} from the --{prior,decoder}-{sampler,steps,guidance} options (and
    --decoder-text-guidance and --decoder-clip-guidance)."""
    out = {}
    for stage in ("prior", "decoder"):
        options = (("sampler", "sampler"), ("steps", "steps"), ("guidance_scale", "guidance"))
        if stage == "decoder":
            options += (("text_guidance_scale", "text_guidance"), ("clip_guidance_scale", "clip_guidance"))
        settings = {k: getattr(args, f"{stage}_{a}") for k, a in options if getattr(args, f"{stage}_{a}") is not None}
        if settings:
            out[stage] = settings
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.out:
            check_writable(args.out)
        results, table = COMMANDS[args.command](args)
        print(table)
        if args.out:
            atomic_write_bytes(Path(args.out), (json.dumps(results, indent=2) + "\n").encode())  # then the log goes
            print(f"wrote {args.out}")
            if args.command in ("shapes", "inpaint", "variations"):
                resume_log_path(args.out).unlink(missing_ok=True)
    except (torch.OutOfMemoryError, MemoryError):
        fewer = "--batch-size or --candidates" if args.command in SUITES else "--n"
        sys.exit(f"error: out of memory on {getattr(args, 'device', 'cpu')}; lower {fewer}")
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    return results


def run_checker(args) -> tuple[dict, str]:
    results = validate_checker(args.n, args.sizes, seed=args.seed, progress=True)
    return results, format_validation(results)


def run_clip(args) -> tuple[dict, str]:
    clip = load("CLIP", load_evaluator, args.clip, args.device)
    results = {"clip": str(args.clip), **probe_clip(clip, args.n, args.seed)}
    return results, format_probe(results)


def run_caption(args) -> tuple[dict, str]:
    pipe = load("pipeline", load_pipeline, args.pipeline, args.device)
    probe = probe_decoder_caption(pipe, args.n, args.seed, args.timesteps, text_only=args.text_only)
    results = {"pipeline": str(args.pipeline), **probe}
    return results, format_caption_probe(results)


def run_variations(args) -> tuple[dict, str]:
    decoder = None if args.decoder_guidance is None else {"guidance_scale": args.decoder_guidance}
    pipe = load("pipeline", load_pipeline, args.pipeline, args.device)
    results = evaluate_variations(
        pipe,
        args.n,
        args.seed,
        per_image=args.per_image,
        invert=not args.fresh_noise,
        sets=args.sets,
        decoder=decoder,
        candidates=args.candidates,
        resume=resume_log_path(args.out) if args.out else None,
        progress=True,
    )
    record_pipeline(results, args, pipe)
    return results, format_table(results)


def run_inpaint(args) -> tuple[dict, str]:
    from unclip.eval.inpaint import evaluate_inpaint

    decoder = None if args.decoder_guidance is None else {"guidance_scale": args.decoder_guidance}
    pipe = load("pipeline", load_pipeline, args.pipeline, args.device)
    results = evaluate_inpaint(
        pipe,
        args.n,
        args.seed,
        size=args.size,
        method=args.method,
        phrasing=args.phrasing,
        candidates=args.candidates,
        decoder=decoder,
        resume=resume_log_path(args.out) if args.out else None,
        progress=True,
    )
    record_pipeline(results, args, pipe)
    return results, format_table(results)


def run_suite(args) -> tuple[dict, str]:
    pipe = load("pipeline", load_pipeline, args.pipeline, args.device, args.dtype)
    if args.pruning is not None:
        try:
            pipe.pruning = check_pruning(args.pruning)  # the pipeline's default for this run
        except ValueError as e:
            raise SystemExit(f"error: --pruning: {e}") from None
    evaluator = (
        load("evaluator CLIP", load_evaluator, args.evaluator_clip, args.device) if args.evaluator_clip else None
    )
    options = dict(size=args.size, use_prior=not args.no_prior, batch_size=args.batch_size, progress=True)
    options["candidates"] = args.candidates
    options.update(stage_overrides(args))
    options["oracle"] = args.oracle
    if args.command == "openmoji":
        options.update(val_size=args.val_size, split=args.split)
    else:
        options.update(sets=args.sets, new_colors=args.new_colors)
        if args.out:  # scored batches are kept until the JSON is written: a rerun resumes
            options["resume"] = resume_log_path(args.out)
            options["resume_settings"] = dict(  # the models, by weights and defaults, not by path
                pipeline_fingerprint=pipe.fingerprint(),
                evaluator_fingerprint=evaluator.fingerprint() if evaluator else None,
                dtype=args.dtype,
            )
    results = SUITES[args.command](pipe, evaluator, args.n, args.seed, **options)
    results["settings"].update(evaluator_clip=str(args.evaluator_clip), dtype=args.dtype)
    record_pipeline(results, args, pipe)
    if getattr(pipe, "pruning", ()):  # the stages that dropped candidates at these settings, if any
        call = pipe.resolve(candidates=results["settings"].get("candidates"), decoder=options.get("decoder"))
        if call.pruning_used:
            results["settings"]["pruning"] = format_pruning(call.pruning_used)
    return results, format_table(results)


def record_pipeline(results: dict, args, pipe) -> None:
    """Add to the results' settings the pipeline folder, the device and the LoRA adapters (with their weights)
    that the folder's pipeline.json merges into its stages, if any."""
    results["settings"].update(pipeline=str(args.pipeline), device=args.device)
    if getattr(pipe, "adapters", None):
        results["settings"]["adapters"] = pipe.adapters


def resume_log_path(out: str) -> Path:
    """Where a `shapes` run with --out OUT keeps its scored batches until OUT is written."""
    return Path(out).with_name(Path(out).name + ".partial.jsonl")


def run_prior(args) -> tuple[dict, str]:
    from unclip.eval.prior import evaluate_prior, shapes_reference

    clip = load("CLIP", load_evaluator, args.clip, args.device)
    load("prior", load_model, args.prior)  # a broken folder is named before any work
    if args.shapes_reference:
        results = shapes_reference(
            args.prior,
            clip,
            n=args.n,
            groups=args.groups,
            image_size=input_size(clip),
            size_word_prob=args.size_word_prob,
            seed=args.seed,
        )
    else:
        config = load("config", load_config, args.config).data if args.config else None
        data = config or load("run config of the prior", run_data_config, args.prior)
        results = evaluate_prior(args.prior, clip, data, n=args.n, seed=args.seed)
    table = "\n".join(f"{k:>27}  {v:.4f}" if isinstance(v, float) else f"{k:>27}  {v}" for k, v in results.items())
    return results, table


def run_data_config(export: str) -> DataConfig:
    """The data section of the run that wrote `export` (runs/NAME/export -> runs/NAME/config.json)."""
    run_config = Path(export).parent / "config.json"
    if not run_config.is_file():
        raise ValueError(f"no run config beside {export}; pass --config configs/prior/NAME.yaml")
    return from_dict(DataConfig, json.loads(run_config.read_text())["data"], "data")


COMMANDS = {
    "shapes": run_suite,
    "openmoji": run_suite,
    "variations": run_variations,
    "inpaint": run_inpaint,
    "checker": run_checker,
    "clip": run_clip,
    "caption": run_caption,
    "prior": run_prior,
}

if __name__ == "__main__":
    main()
