"""How many sampling steps the prior needs: its embeddings at fewer steps against those at many, same seeds.

For the first `--n` prompts of an evaluation set, with the candidates and seeds `python -m unclip.eval shapes`
gives them, the pipeline's prior samples every candidate's image embedding at each step count of `--steps`,
from the same seeds. Reported per step count: the mean cosine similarity to the embeddings at the first (most)
steps, its minimum over prompts, the mean cosine to the prompt's text embedding, and the prior's time. A cosine
near 1 means the decoder is handed nearly the same embedding, so the images cannot differ by much.

    OMP_NUM_THREADS=2 python bench/prior_steps.py --pipeline models/shapes --steps 25 15 10 5 --n 50 \\
        --out runs/bench/prior_steps.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.common import load_pipeline  # noqa: E402
from unclip.checkpoint import atomic_write_bytes  # noqa: E402
from unclip.data.shapes import prompt_sets  # noqa: E402

SETS = ("single", "relational", "held_out")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, help="a shapes pipeline folder")
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 15, 10, 5], help="the first is the reference")
    parser.add_argument("--set", default="relational", choices=SETS, help="evaluation set (default %(default)s)")
    parser.add_argument("--n", type=int, default=50, help="the first N prompts of the set (default %(default)s)")
    parser.add_argument("--eval-n", type=int, default=200, help="the eval's prompts per set, which fix the seeds")
    parser.add_argument("--seed", type=int, default=0, help="the eval's seed (default %(default)s)")
    parser.add_argument("--out", help="JSON results")
    args = parser.parse_args(argv)
    if any(s < 1 for s in args.steps) or len(set(args.steps)) != len(args.steps):
        parser.error("--steps must be different whole numbers >= 1")
    pipe = load_pipeline(args.pipeline)
    c = pipe.candidates
    prompts = getattr(prompt_sets(args.eval_n, args.seed), args.set)[: args.n]
    first = args.seed + SETS.index(args.set) * args.eval_n * c  # as evaluate_shapes seeds the set
    reference = args.steps[0]
    rows = {s: {"cosine_to_reference": [], "cosine_to_text": [], "seconds": 0.0} for s in args.steps}
    for i, prompt in enumerate(prompts):
        text = pipe.encode_text([prompt] * c)
        embeds = {}
        for steps in args.steps:
            generators = [torch.Generator().manual_seed(first + i * c + j) for j in range(c)]
            start = time.perf_counter()
            embeds[steps] = pipe.prior_embeds(text, generators, pipe.resolve(prior={"steps": steps}).prior)
            rows[steps]["seconds"] += time.perf_counter() - start
            rows[steps]["cosine_to_text"].append(F.cosine_similarity(embeds[steps], text.embed).mean().item())
            rows[steps]["cosine_to_reference"].append(
                F.cosine_similarity(embeds[steps], embeds[reference]).mean().item()
            )
    results = {
        "pipeline": str(args.pipeline),
        "set": args.set,
        "prompts": len(prompts),
        "candidates": c,
        "reference_steps": reference,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "steps": {
            str(s): {
                "cosine_to_reference": statistics.mean(r["cosine_to_reference"]),
                "min_cosine_to_reference": min(r["cosine_to_reference"]),
                "cosine_to_text": statistics.mean(r["cosine_to_text"]),
                "seconds_per_prompt": r["seconds"] / len(prompts),
            }
            for s, r in rows.items()
        },
    }
    print(f"{len(prompts)} {args.set} prompts, {c} candidates each; cosines to the embeddings at {reference} steps")
    print(f"{'steps':>5} {'cosine':>8} {'min':>8} {'to text':>8} {'s/prompt':>9}")
    for s, r in results["steps"].items():
        print(
            f"{s:>5} {r['cosine_to_reference']:8.4f} {r['min_cosine_to_reference']:8.4f} "
            f"{r['cosine_to_text']:8.4f} {r['seconds_per_prompt']:9.3f}"
        )
    if args.out:
        atomic_write_bytes(Path(args.out), (json.dumps(results, indent=2) + "\n").encode())
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
