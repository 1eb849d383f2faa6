"""Sampling with a pipeline's LoRA adapters merged into the weights (how a pipeline loads them) against unmerged.

    OMP_NUM_THREADS=1 python bench/lora_merge.py                  # models/shapes-orange, one CPU thread
    python bench/lora_merge.py --pipeline PIPE --device cuda --repeats 5

Unmerged, every adapted layer computes its base output and the low-rank path beside it; merged
(`unclip.lora.merge_adapters`), it is one layer with W + scaling·B·A. Times the same 64 px call both ways,
alternately, and reports the medians, their ratio, and the largest difference between the two images (rounding
only: they are the same function).
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
from unclip.lora import lora_layers  # noqa: E402
from unclip.pipeline import DEFAULT_PIPELINE  # noqa: E402

PROMPTS = ["an orange circle above a blue square", "a small red triangle"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = str(Path(DEFAULT_PIPELINE).parent / "shapes-orange")
    parser.add_argument("--pipeline", default=default, help=f"a pipeline folder with adapters (default {default})")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--candidates", type=int, default=8, help="decoder samples per prompt (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls each way (default 3)")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)

    merged, unmerged = load_pipeline(args.pipeline, args.device), load_pipeline(args.pipeline, args.device)
    stages = [unmerged.prior, unmerged.decoder, *unmerged.upsamplers]
    layers = [layer for stage in stages if stage is not None for layer in lora_layers(stage.model)]
    if not layers:
        parser.error(f"{args.pipeline}'s pipeline.json names no adapters; give a pipeline that does")
    for layer in layers:
        layer.unmerge()
    kwargs = dict(size=merged.sizes[0], candidates=args.candidates, pruning="none", seed=0)
    times: dict[str, list[float]] = {"merged": [], "unmerged": []}
    images = {}
    for _ in range(args.repeats + 1):  # the first round warms up
        for name, pipe in (("merged", merged), ("unmerged", unmerged)):
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            images[name] = pipe(PROMPTS, **kwargs).images
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    result = {
        "pipeline": args.pipeline,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "prompts": len(PROMPTS),
        "candidates": args.candidates,
        "adapted_layers": len(layers),
        "seconds": {name: statistics.median(t[1:]) for name, t in times.items()},
        "max_image_difference": (images["merged"] - images["unmerged"]).abs().max().item(),
    }
    result["unmerged_over_merged"] = result["seconds"]["unmerged"] / result["seconds"]["merged"]
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
