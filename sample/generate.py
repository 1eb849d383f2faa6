"""Generate images from a prompt with an unCLIP pipeline (CLIP -> prior -> decoder -> upsamplers).

    python sample/generate.py --prompt "a red circle above a blue square"
    python sample/generate.py --prompt "a small green diamond" --n 8 --size 256 --seed 3 --out outputs/
    python sample/generate.py --prompt "a red circle" --prompt "a blue square" --n 4   # a row per prompt
    python sample/generate.py --prompts-file prompts.txt --n 1 --pipeline models/openmoji
    accelerate launch sample/generate.py --prompts-file prompts.txt --n 1   # the batches split over the GPUs

Each image is written as a PNG whose text metadata holds the prompt, the seed and every sampling setting,
with a grid of all of them beside (a row per prompt when there are several prompts and n > 1);
the paths are printed as each batch is written. Image i of the whole run uses seed + i; with reranking
(--candidates N, or a pipeline that reranks by default) its candidates use seed + i·N ... seed + i·N + N-1, and
the metadata's seed is the kept one's: --seed SEED --candidates 1 makes that image again. A file of the same
name is kept (the new one is NAME-2.png) unless --overwrite; Ctrl-C keeps the images written so far, and the
same command with --skip-existing makes only the batches that are missing.
Started as N processes (`accelerate launch`, or torchrun), process r makes batches r, r+N, ... on its own GPU and
writes the same files a single process would (without the grid).
"""

import sys
from pathlib import Path

from unclip.cli import finished_batches, others_batches, run_batches, sample_parser, whole_number


def step_list(text: str) -> list[int]:
    parse = whole_number(1)
    return [parse(part.strip()) for part in text.split(",")]


def upsampler_settings(pipe, steps: list[int] | None) -> dict[str, dict]:
    """{folder: {"steps": n}} for --upsampler-steps: one number for all the pipeline's upsamplers, or one each."""
    if not steps:
        return {}
    folders = [stage.folder for stage in pipe.upsamplers]
    if len(steps) == 1:
        steps = steps * len(folders)
    if len(steps) != len(folders):
        raise ValueError(
            f"--upsampler-steps gives {len(steps)} numbers, but this pipeline has {len(folders)} upsampler(s) "
            f"({', '.join(folders) or 'none'}): give one number for all, or one each"
        )
    return {folder: {"steps": n} for folder, n in zip(folders, steps, strict=True)}


def parse_args(argv=None):
    p = sample_parser(__doc__)
    p.add_argument("--prompt", action="append", default=[], help="what to draw (repeat for several prompts)")
    p.add_argument(
        "--prompts-file", type=Path, help="a text file of prompts, one a line (blank lines and # comments skipped)"
    )
    p.add_argument("--steps", type=int, help="decoder sampling steps (default: the pipeline's)")
    p.add_argument(
        "--guidance", type=float, help="decoder classifier-free guidance scale, 1 = none (default: the pipeline's)"
    )
    p.add_argument(
        "--text-guidance",
        type=float,
        help="extra decoder guidance along what the caption adds to the image embedding, 0 = none (default: the "
        "pipeline's)",
    )
    p.add_argument(
        "--clip-guidance",
        type=float,
        help="GLIDE's CLIP guidance scale: steer each decoder step along the gradient of the pipeline's noise-aware "
        "CLIP, with or without --guidance; 0 = none (default: the pipeline's)",
    )
    p.add_argument("--sampler", help="decoder sampler: ddpm, ddim or dpm++ (default: the pipeline's)")
    p.add_argument(
        "--upsampler-steps",
        type=step_list,
        metavar="N[,N]",
        help="upsampler sampling steps: one number for every upsampler, or one per upsampler in order (64->256, "
        "then 256->1024), e.g. 4,1 (default: the pipeline's)",
    )
    p.add_argument("--prior-steps", type=int, help="prior sampling steps (default: the pipeline's)")
    p.add_argument("--prior-guidance", type=float, help="prior guidance scale (default: the pipeline's)")
    p.add_argument(
        "--candidates",
        type=int,
        help="make N images per requested image and keep the one the pipeline's CLIP scores highest (DALL·E's "
        "reranking, at the decoder's size: N decoder passes, one upsampling); 1 = none (default: the pipeline's)",
    )
    p.add_argument(
        "--preview-steps",
        type=int,
        help="rank the candidates by previews of this many decoder steps, then sample only the kept one in full; "
        "0 = sample every candidate in full (default: the pipeline's)",
    )
    p.add_argument(
        "--pruning",
        metavar="STEP:KEEP,...",
        help="drop candidates part way: e.g. 5:8,10:4,15:2 goes on after decoder step 5 with each prompt's best 8 "
        "by the CLIP score of their x0 predictions, after step 10 with 4, after 15 with 2; the kept image is the "
        "one that candidate makes in full. 'none' samples every candidate in full (default: the pipeline's)",
    )
    p.add_argument("--no-prior", action="store_true", help="decode the raw text embedding (the paper's ablation)")
    p.add_argument(
        "--batch-size",
        type=whole_number(1),
        default=4,
        help="images made (and written) together; it does not change the images (default 4)",
    )
    p.add_argument(
        "--skip-existing",
        action="store_true",
        help="make only the batches whose images are not all in --out yet, with these settings: rerun a stopped "
        "run with the same arguments and this flag to finish it (the images are those one run would make)",
    )
    args = p.parse_args(argv)
    if args.prompts_file is not None:
        try:
            lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            p.error(f"cannot read --prompts-file {args.prompts_file}: {e}")
        args.prompt += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if not args.prompt:
            p.error(f"--prompts-file {args.prompts_file} holds no prompts")
    if not args.prompt:
        p.error('give a prompt: --prompt "a red circle" (or --prompts-file FILE)')
    return args


def main(argv=None):
    args = parse_args(argv)
    decoder = {
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "text_guidance_scale": args.text_guidance,
        "clip_guidance_scale": args.clip_guidance,
        "sampler": args.sampler,
    }
    prompts = [prompt for prompt in args.prompt for _ in range(args.n)]
    args.overwrite = args.overwrite or args.skip_existing  # a batch made again writes the same images

    def make(pipe):  # called once the pipeline is loaded, which settles args.size
        settings = dict(
            size=args.size,
            seed=args.seed,
            candidates=args.candidates,
            preview_steps=args.preview_steps,
            pruning=args.pruning,
            use_prior=not args.no_prior,
            prior={"steps": args.prior_steps, "guidance_scale": args.prior_guidance},
            decoder=decoder,
            upsamplers=upsampler_settings(pipe, args.upsampler_steps),
        )
        skip = others_batches(len(prompts), args.batch_size)
        if args.skip_existing:
            done = finished_batches(args.out, prompts, args.batch_size, pipe.resolve(**settings))
            print(f"{len(done)} of {-(-len(prompts) // args.batch_size)} batches are in {args.out}", file=sys.stderr)
            skip |= done
        return (out for _, out in pipe.batches(prompts, batch_size=args.batch_size, skip=skip, **settings))

    return run_batches(args, make, total=len(prompts))


if __name__ == "__main__":
    main()
