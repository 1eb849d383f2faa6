"""One 256 px image from the bundled shapes pipeline, sampled at our defaults and at DALLE2-pytorch's.

    python bench/defaults.py                      # 2 CPU threads; JSON in runs/bench/defaults-cpu.json
    python bench/defaults.py --device cuda --repeats 5

The networks are the same on both sides (models/shapes); only the sampling differs:

- ours: the pipeline's defaults (DPM-Solver++ for the prior and the decoder at their steps, the best of the
  pipeline's `candidates` decoder samples kept by its CLIP, dropping candidates part way as its `pruning` says,
  DDIM for the upsamplers at their steps);
- ours, earlier: models/shapes's defaults before it took fewer steps and dropped candidates part way: every
  candidate in full (`pruning` none), 25 prior and decoder steps, 8 steps for `upsampler_256` (`EARLIER`);
- theirs: what `DiffusionPrior.sample` and `Decoder.sample` of DALLE2-pytorch 1.15.6 do with
  `sample_timesteps=None`, their default: ancestral sampling over all 1000 training timesteps at every stage,
  and no reranking of decoder samples (`--candidates 1`).

`python -m unclip.eval shapes --pipeline models/shapes --prior-sampler ddpm --prior-steps 1000
--decoder-sampler ddpm --decoder-steps 1000 --candidates 1` measures the quality of the second (the model
card of models/shapes has both). Reports the median wall time of each and their ratio.
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
from unclip.pipeline import DEFAULT_PIPELINE, UnCLIPPipeline  # noqa: E402

PROMPT = "a red circle above a blue square"
THEIR_STEPS = 1000
# models/shapes's sampling defaults before it took fewer steps and pruned candidates (its model card has both)
EARLIER = {
    "pruning": "none",
    "prior": {"steps": 25},
    "decoder": {"steps": 25},
    "upsamplers": {"upsampler_256": {"steps": 8}},
}


def earlier_settings(pipe: UnCLIPPipeline) -> dict:
    """`EARLIER` for the upsamplers `pipe` has."""
    folders = {stage.folder for stage in pipe.upsamplers}
    return {**EARLIER, "upsamplers": {k: v for k, v in EARLIER["upsamplers"].items() if k in folders}}


def their_settings(pipe: UnCLIPPipeline) -> dict:
    ancestral = {"sampler": "ddpm", "steps": THEIR_STEPS}
    return {
        "prior": ancestral,
        "decoder": ancestral,
        "candidates": 1,
        "upsamplers": {stage.folder: ancestral for stage in pipe.upsamplers},
    }


def timed(run, repeats: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=DEFAULT_PIPELINE)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3, help="timed images at our defaults (default 3)")
    parser.add_argument(
        "--their-repeats", type=int, default=1, help="timed images at their defaults (default 1: minutes on a CPU)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads on a CPU (default 2)")
    parser.add_argument("--out", help="JSON results (default runs/bench/defaults-DEVICE.json)")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    pipe = load_pipeline(args.pipeline, device)
    if args.size not in pipe.sizes:
        parser.error(f"--size must be one of {pipe.sizes} for {args.pipeline}")
    ours = {}
    theirs = their_settings(pipe)
    pipe([PROMPT], size=args.size, seed=0, prior={"steps": 2}, decoder={"steps": 2})  # warm-up
    results = {"pipeline": str(args.pipeline), "device": args.device, "size": args.size, "prompt": PROMPT}
    runs = [("ours", ours, args.repeats), ("theirs", theirs, args.their_repeats)]
    earlier = earlier_settings(pipe)
    if pipe.resolve(size=args.size, **earlier).metadata() != pipe.resolve(size=args.size).metadata():
        runs.insert(1, ("ours_earlier", earlier, args.repeats))
    for name, settings, repeats in runs:
        times = timed(lambda s=settings: pipe([PROMPT], size=args.size, seed=0, **s), repeats, device)
        described = pipe.resolve(size=args.size, seed=0, **settings).metadata()
        results[name] = {"seconds": times, "median": statistics.median(times), **described}
        candidates = described["candidates"]
        pruning = f", pruned {described['pruning']}" if "pruning" in described else ""
        print(
            f"{name:12s}  {statistics.median(times):8.2f} s  (median of {repeats}; {candidates} candidates{pruning})"
        )
    results["theirs_over_ours"] = results["theirs"]["median"] / results["ours"]["median"]
    print(f"theirs / ours: {results['theirs_over_ours']:.1f}x")
    if "ours_earlier" in results:
        results["earlier_over_ours"] = results["ours_earlier"]["median"] / results["ours"]["median"]
        print(f"earlier defaults / ours: {results['earlier_over_ours']:.2f}x")
    out = Path(args.out or f"runs/bench/defaults-{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
