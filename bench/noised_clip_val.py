"""A CLIP and a noise-aware CLIP on noised validation images: retrieval and hard negatives beaten, per timestep.

    python bench/noised_clip_val.py --clip models/shapes/clip --noised-clip runs/clip-shapes-noised/export

Runs the validation of a noise-aware clip run (`unclip.tasks.noised_clip`: the config's 512 validation scenes,
diffused with fixed noise to each timestep) on both models; the plain CLIP is seen through a zero timestep
input, that is, as it is. Prints and writes the metrics as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

import unclip.tasks.noised_clip as noised_task  # noqa: E402
from unclip.config import load_config  # noqa: E402
from unclip.noised_clip import load_noised_clip  # noqa: E402
from unclip.tasks import build_task  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clip", required=True, help="a CLIP folder (the one the noise-aware CLIP started from)")
    p.add_argument("--noised-clip", required=True, help="a noise-aware CLIP folder")
    p.add_argument("--config", default="configs/clip/shapes_noised.yaml", help="the noise-aware run's config")
    p.add_argument("--timesteps", type=int, nargs="+", default=[0, 500, 750])
    p.add_argument("--out", default="runs/noised_clip_val.json")
    args = p.parse_args(argv)
    noised_task.EVAL_TIMESTEPS = tuple(args.timesteps)
    config = load_config(args.config, [f"train.init_from={args.clip}", "data.num_workers=0"])
    task = build_task(config)  # the CLIP of --clip behind a zero-initialised timestep input
    results = {}
    for name, model in ((args.clip, task.model.eval()), (args.noised_clip, load_noised_clip(args.noised_clip))):
        metrics = task.evaluate(model, model)
        results[name] = {k.removeprefix("val/"): v for k, v in metrics.items() if k.startswith("val/")}
        print(name, {k: round(v, 3) for k, v in results[name].items() if "t2i" in k or "beats" in k}, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": args.config, "results": results}, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
