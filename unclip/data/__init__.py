"""Datasets: image–caption pairs for the decoder and upsamplers, precomputed embeddings for the prior.

    shapes      procedural coloured-shape scenes, rendered exactly at any size (unclip.data.shapes)
    openmoji    ~4,000 OpenMoji emoji with CLDR captions (unclip.data.openmoji)
    folder      images with sidecar .txt captions (unclip.data.images)
    csv         a CSV of image paths and captions
    webdataset  img2dataset tar shards, streamed
    embeddings  precomputed CLIP embeddings (unclip.data.embeddings)

Image items are dicts {"image": (3, S, S) float in [-1, 1], "caption": str, ...}, with "low_res" (3, s, s)
when a `low_res_size` is asked for (upsampler training). `build_dataset(config.data)` picks the dataset
named in a DataConfig; `collate` batches the items.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import default_collate

from unclip.config import DataConfig
from unclip.data.images import CsvDataset, ImageFolderDataset, WebDataset
from unclip.data.openmoji import OpenMojiDataset
from unclip.data.shapes import ShapesDataset

DATASETS = ("shapes", "openmoji", "folder", "csv", "webdataset", "embeddings")
_IMAGE_DATASETS = {"shapes": ShapesDataset, "openmoji": OpenMojiDataset}
_PATH_DATASETS = {"folder": ImageFolderDataset, "csv": CsvDataset, "webdataset": WebDataset}


def build_dataset(config: DataConfig, *, split: str = "train", low_res_size: int | None = None):
    """Build the dataset a DataConfig names, passing `config.options` as keyword arguments.

    Args:
        config: the run's `data` section.
        split: "train", or "val": a disjoint, deterministic held-out set of `config.val_size` items.
        low_res_size: for upsamplers: items also hold "low_res" at this side (image datasets only).

    Returns:
        a torch Dataset (an IterableDataset for "webdataset").
    """
    name, options = config.dataset, dict(config.options)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if name in _PATH_DATASETS or name == "embeddings":
        if not config.path:
            raise ValueError(f"data.dataset={name!r} needs data.path")
    if name == "embeddings":
        if low_res_size is not None:
            raise ValueError("the embeddings dataset holds no images, so it takes no low_res_size")
        from unclip.data.embeddings import EmbeddingDataset  # lazy: owned by another module

        return EmbeddingDataset(config.path, split=split, val_size=config.val_size, **options)
    kwargs = dict(low_res_size=low_res_size, split=split, val_size=config.val_size, **options)
    if name in _PATH_DATASETS:
        return _PATH_DATASETS[name](config.path, config.image_size, **kwargs)
    return _IMAGE_DATASETS[name](config.image_size, **kwargs)


def collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """default_collate, except that dict and list values (e.g. shapes' "scene") stay a list per batch."""
    as_lists = {k for k, v in batch[0].items() if isinstance(v, (dict, list))}
    out = default_collate([{k: v for k, v in item.items() if k not in as_lists} for item in batch])
    out.update({k: [item[k] for item in batch] for k in as_lists})
    return out


def __getattr__(name: str):
    if name == "EmbeddingDataset":  # lazy, like build_dataset's import
        from unclip.data.embeddings import EmbeddingDataset

        return EmbeddingDataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DATASETS",
    "EmbeddingDataset",
    "CsvDataset",
    "ImageFolderDataset",
    "OpenMojiDataset",
    "ShapesDataset",
    "WebDataset",
    "build_dataset",
    "collate",
]
