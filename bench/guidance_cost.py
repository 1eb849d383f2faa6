"""The decoder's cost per 64 px image under each kind of guidance: none, classifier-free, CLIP, both.

    python bench/guidance_cost.py --pipeline PIPELINE          # a pipeline folder with a noise-aware CLIP
    python bench/guidance_cost.py --pipeline PIPELINE --clip-guidance 10 --guidance 2 --batch 16 --repeats 3

Classifier-free guidance runs the decoder on a doubled batch; CLIP guidance runs it once and adds a forward and
backward pass of the noise-aware CLIP per step. Only the decoder is timed (the prior's embeddings are made once
and reused), at the pipeline's decoder sampler and steps. Reports the median seconds per image of each setting
over `--repeats` runs and writes them as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.common import load_pipeline  # noqa: E402

PROMPT = "a red circle above a blue square"


def settings(guidance: float, clip_guidance: float) -> dict[str, dict[str, float]]:
    return {
        "none": {"guidance_scale": 1.0, "clip_guidance_scale": 0.0},
        f"classifier-free {guidance:g}": {"guidance_scale": guidance, "clip_guidance_scale": 0.0},
        f"CLIP {clip_guidance:g}": {"guidance_scale": 1.0, "clip_guidance_scale": clip_guidance},
        f"both ({guidance:g}, {clip_guidance:g})": {"guidance_scale": guidance, "clip_guidance_scale": clip_guidance},
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", required=True, help="a pipeline folder with a noise-aware CLIP (noised_clip)")
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance scale (default 2)")
    p.add_argument("--clip-guidance", type=float, default=10.0, help="CLIP guidance scale (default 10)")
    p.add_argument("--batch", type=int, default=8, help="images per decoder call (default 8)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each setting (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--out", default="runs/bench/guidance-cost.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.pipeline)
    if pipe.noised_clip is None:
        sys.exit(f"error: {args.pipeline} has no noise-aware CLIP; add one with train/pipeline.py --noised-clip")
    prompts = [PROMPT] * args.batch
    generators = pipe.generators(0, args.batch)
    with torch.no_grad():
        text = pipe.encode_text(prompts)
        image_embed = pipe.prior_embeds(text, generators)
    results = {}
    for name, decoder in settings(args.guidance, args.clip_guidance).items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            with torch.no_grad():
                pipe.decode(image_embed, text, pipe.generators(0, args.batch), decoder, prompts=prompts)
            times.append((time.perf_counter() - start) / args.batch)
        results[name] = {"seconds_per_image": statistics.median(times), "runs": times}
        print(f"{name:>24}: {statistics.median(times):.3f} s per image", flush=True)
    record = {"pipeline": args.pipeline, "batch": args.batch, "threads": args.threads, "results": results}
    record["decoder"] = pipe.decoder.defaults.kwargs()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
