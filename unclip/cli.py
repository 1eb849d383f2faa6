"""The command line the sample/ scripts share: the pipeline, device and output options, and error handling.

    parser = sample_parser(__doc__)
    parser.add_argument("--image", required=True)
    args = parser.parse_args(argv)
    return run_sample(args, lambda pipe: pipe.variations(args.image, n=args.n, seed=args.seed, size=...))

User mistakes (a missing pipeline folder, an empty prompt, an unreadable image, an impossible size) are
`ValueError`s in the library; here they end the script with "error: ..." and no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from unclip.pipeline import DEFAULT_PIPELINE, DTYPES, UnCLIPPipeline


def sample_parser(doc: str, *, n: str | None = "images to make") -> argparse.ArgumentParser:
    """A parser whose help is the script's docstring, with the options every sample script takes."""
    lines = doc.strip().splitlines()
    p = argparse.ArgumentParser(
        description=lines[0], epilog="\n".join(lines[1:]), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if n:
        p.add_argument("--n", type=int, default=4, help=f"{n} (default 4)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    p.add_argument("--size", type=int, help="output size, 64, 256 or 1024 as the pipeline allows (default: largest)")
    p.add_argument("--pipeline", default=DEFAULT_PIPELINE, help=f"pipeline folder (default {DEFAULT_PIPELINE})")
    p.add_argument("--out", default="outputs", help="output folder (default outputs/)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="fp16/bf16 are for GPUs")
    return p


def run_sample(args: argparse.Namespace, make: Callable[[UnCLIPPipeline], object]) -> list[Path]:
    """Load the pipeline, call `make(pipe)`, save what it returns under --out and print the paths."""
    try:
        pipe = UnCLIPPipeline.from_pretrained(args.pipeline, device=args.device, dtype=args.dtype)
        args.size = args.size or max(pipe.sizes)
        out = make(pipe)
    except ValueError as e:
        sys.exit(f"error: {e}")
    paths = out.save(args.out)
    for path in paths:
        print(path)
    return paths
