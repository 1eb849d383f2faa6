r"""Precompute the CLIP image and text embeddings of a dataset, for training the prior.

    python train/embed.py configs/prior/shapes.yaml data.dataset=shapes data.image_size=64 \
        data.options.num_samples=50000 --out runs/embeddings-shapes --tokens
    python train/embed.py configs/prior/openmoji.yaml data.dataset=openmoji data.image_size=64 \
        data.options.skin_tones=true --out runs/embeddings-openmoji --tokens

The run config's `clip:` section picks the CLIP and its `data:` section the images and captions. The output
folder uses clip-retrieval's layout (img_emb/, text_emb/, metadata/, see unclip/data/embeddings.py), with
L2-normalised float16 embeddings as clip-retrieval stores them; --tokens adds the per-token text encodings
(text_tokens/, text_mask/) that a prior conditioned on them needs. Train the prior on the result with
`data.dataset=embeddings data.path=<out>`.
"""

import argparse
import logging
import sys
from dataclasses import asdict

import yaml

from unclip.cli import check_device
from unclip.clip import ClipAdapter
from unclip.config import load_config
from unclip.data import build_dataset
from unclip.data.embeddings import embed_dataset


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="a run config YAML with clip: and data: sections")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. clip.precision=fp16")
    parser.add_argument("--out", required=True, help="output folder (must not hold embeddings yet)")
    parser.add_argument("--tokens", action="store_true", help="also store per-token text encodings and masks")
    parser.add_argument("--shard-size", type=int, default=10_000, help="rows per shard (default 10000)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per CLIP forward pass (default 256)")
    parser.add_argument("--split", choices=("train", "val"), default="train", help="dataset split (default train)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    args = parser.parse_intermixed_args(argv)  # options and key=value overrides in any order
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        args.device = check_device(args.device)
        config = load_config(args.config, args.overrides)
        clip = ClipAdapter.from_config(config.clip, device=args.device)
        dataset = build_dataset(config.data, split=args.split)
    except yaml.YAMLError as e:
        fail(2, f"{args.config} or an override is not valid YAML ({e})")
    except (ValueError, OSError) as e:
        fail(2, e)
    try:
        rows = embed_dataset(
            clip,
            dataset,
            args.out,
            text_tokens=args.tokens,
            shard_size=args.shard_size,
            batch_size=args.batch_size,
            num_workers=config.data.num_workers,
            info={"clip": asdict(config.clip), "data": asdict(config.data), "split": args.split},
        )
    except (ValueError, OSError) as e:
        fail(1, e)
    logging.getLogger(__name__).info("wrote %d embeddings to %s", rows, args.out)


def fail(status: int, error: BaseException | str) -> None:
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    sys.exit(status)


if __name__ == "__main__":
    main()
