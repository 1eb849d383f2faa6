"""How many sampling steps each upsampler of a shapes pipeline needs: PSNR against exact renders, and time.

For N random scenes rendered exactly at each upsampler's input and output sizes, every upsampler of the
pipeline samples from the exact low-res render (not from the previous stage's output, so that each stage is
judged alone) with the pipeline's settings at each step count given, and the result is compared with the exact
high-res render. Bicubic resizing is the floor. Each image samples alone, as the pipeline does.

PSNR rewards the mean of the images a low-res input allows, which blurs edges, so each row also gives the
sharpness: the gradient energy of the result over that of the exact render (1 is as sharp as the truth, below 1
blurred, above 1 noisier).

    OMP_NUM_THREADS=2 python bench/upsampler_steps.py --pipeline models/shapes --steps 8 4 2 1 --n 8 \\
        --out runs/bench/upsampler_steps.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.common import load_pipeline  # noqa: E402
from unclip.checkpoint import atomic_write_bytes  # noqa: E402
from unclip.data.shapes import render_scene, sample_scene  # noqa: E402
from unclip.imageio import square_tensor  # noqa: E402
from unclip.sampling import sample_upsampler  # noqa: E402
from unclip.tasks.upsampler import psnr  # noqa: E402


def renders(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1]: exact renders of n scenes drawn with `seed`."""
    rng = random.Random(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    return torch.cat([square_tensor(render_scene(scene, size), size) for scene in scenes])


def sharpness(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared finite differences of `x` over those of `reference`, per image, averaged: 1 when the edges
    are as sharp as the reference's, less when blurred."""

    def energy(images: torch.Tensor) -> torch.Tensor:
        dx, dy = images.diff(dim=-1), images.diff(dim=-2)
        return dx.square().mean(dim=(1, 2, 3)) + dy.square().mean(dim=(1, 2, 3))

    return (energy(x) / energy(reference).clamp_min(1e-12)).mean().item()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", default="models/shapes", help="a shapes pipeline folder (default models/shapes)")
    p.add_argument("--steps", type=int, nargs="+", default=[8, 4, 2, 1], help="step counts to try (default 8 4 2 1)")
    p.add_argument("--n", type=int, default=8, help="scenes (default 8)")
    p.add_argument("--seed", type=int, default=1234, help="scene and noise seed (default 1234)")
    p.add_argument("--out", help="write the results here as JSON")
    args = p.parse_args(argv)
    if args.n < 1 or any(s < 1 for s in args.steps):
        p.error("--n and every --steps value must be >= 1")

    pipe = load_pipeline(args.pipeline)
    results = {
        "pipeline": args.pipeline,
        "n": args.n,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "upsamplers": {},
    }
    for stage in pipe.upsamplers:
        config = stage.model.config
        low, high = renders(args.n, config.low_res_size, args.seed), renders(args.n, config.image_size, args.seed)
        decoded = renders(args.n, pipe.sizes[0], args.seed)  # what a clip-conditioned upsampler's embedding comes from
        embeds = pipe.clip.embed_image(decoded, normalize=True) if config.clip_dim else None
        bicubic = F.interpolate(low, size=high.shape[-2:], mode="bicubic", align_corners=False).clamp(-1, 1)
        rows = {"bicubic": {"psnr": psnr(bicubic, high).mean().item(), "sharpness": sharpness(bicubic, high)}}
        for steps in args.steps:
            kwargs = stage.settings({"steps": steps}).kwargs()
            outs, start = [], time.perf_counter()
            for i in range(args.n):
                outs.append(
                    sample_upsampler(
                        stage.model,
                        stage.diffusion,
                        low[i : i + 1],
                        image_embed=None if embeds is None else embeds[i : i + 1],
                        generator=torch.Generator().manual_seed(args.seed + i),
                        **kwargs,
                    )
                )
            seconds = (time.perf_counter() - start) / args.n
            out = torch.cat(outs)
            rows[str(steps)] = row = {
                "psnr": psnr(out, high).mean().item(),
                "sharpness": sharpness(out, high),
                "seconds_per_image": seconds,
            }
            print(
                f"{stage.folder}: {kwargs['sampler']} {steps} steps: {row['psnr']:.2f} dB, sharpness "
                f"{row['sharpness']:.3f}, {seconds:.2f} s per image",
                flush=True,
            )
        row = rows["bicubic"]
        print(f"{stage.folder}: bicubic {row['psnr']:.2f} dB, sharpness {row['sharpness']:.3f}", flush=True)
        results["upsamplers"][stage.folder] = rows
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(args.out), json.dumps(results, indent=2).encode())
    return results


if __name__ == "__main__":
    main()
