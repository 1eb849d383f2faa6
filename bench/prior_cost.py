"""The two priors' cost side by side: the diffusion prior and the autoregressive prior of two exported folders.

    OMP_NUM_THREADS=1 python bench/prior_cost.py models/shapes/prior runs/prior-shapes-ar/export \
        --clip models/shapes/clip --out runs/prior-cost.json

For each prior: its parameters; the floating-point operations of one training example (forward and backward, as
torch's FlopCounterMode counts matrix products and attention) and of sampling one image embedding at the
folder's default settings; and the CPU time of a training step of `--batch` examples and of sampling `--batch`
prompts, medians of `--repeats` on the current thread count. The captions are real shapes captions encoded by
the CLIP the priors were trained with.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from unclip.checkpoint import load_model
from unclip.clip import ClipAdapter
from unclip.data.shapes import prompt_sets
from unclip.diffusion import GaussianDiffusion
from unclip.sampling import PriorSettings, sample_prior, text_cond
from unclip.sampling_ar import ARPriorSettings, is_autoregressive, sample_ar_prior


def train_loss(prior, diffusion, text, image):
    """One training loss of the prior's own task, on (B, D) image embeddings."""
    if is_autoregressive(prior):
        codes = prior.encode(image)
        logits = prior(codes, **text)
        return F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())
    return diffusion.training_loss(prior, prior.normalize(image), cond=text)["loss"].mean()


def sample(prior, diffusion, text, settings):
    tokens = (text.get("text_tokens"), text.get("text_mask"))
    g = torch.Generator().manual_seed(0)
    if is_autoregressive(prior):
        return sample_ar_prior(prior, text["text_embed"], *tokens, generator=g, **settings.kwargs())
    return sample_prior(prior, diffusion, text["text_embed"], *tokens, generator=g, **settings.kwargs())


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(folder: str, clip: ClipAdapter, text: dict, image: torch.Tensor, repeats: int) -> dict:
    loaded = load_model(folder)
    prior, diffusion = loaded.model, GaussianDiffusion.from_config(loaded.diffusion)
    settings = ARPriorSettings() if is_autoregressive(prior) else PriorSettings()
    B = len(image)

    def step():
        prior.train()
        prior.zero_grad(set_to_none=True)
        train_loss(prior, diffusion, text, image).backward()

    def draw():
        prior.eval()
        sample(prior, diffusion, text, settings)

    result = {
        "folder": folder,
        "class": type(prior).__name__,
        "parameters": sum(p.numel() for p in prior.parameters()),
        "sampling_settings": settings.kwargs(),
        "train_flops_per_example": flops(step) / B,
        "sample_flops_per_prompt": flops(draw) / B,
        "train_step_seconds": timed(step, repeats),
        "sample_seconds": timed(draw, repeats),
        "batch": B,
        "threads": torch.get_num_threads(),
    }
    prior.eval()
    return result


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("priors", nargs="+", help="prior export folders")
    parser.add_argument("--clip", required=True, help="the CLIP the priors were trained with")
    parser.add_argument("--batch", type=int, default=128, help="examples per training step and prompts sampled")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    clip = ClipAdapter.from_checkpoint(args.clip)
    embedded = clip.embed_text(prompt_sets(args.batch).relational, normalize=True)
    text = text_cond(embedded.embed, embedded.tokens, embedded.mask)
    # the costs do not depend on the values: noisy text embeddings stand in for the image embeddings
    image = F.normalize(embedded.embed + 0.3 * torch.randn_like(embedded.embed), dim=-1)
    results = [measure(folder, clip, text, image, args.repeats) for folder in args.priors]
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
