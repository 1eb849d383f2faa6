"""Precomputed CLIP embeddings for the prior: `embed_dataset` writes them and `EmbeddingDataset` reads them.

The folder follows clip-retrieval's `clip_inference` layout (https://github.com/rom1504/clip-retrieval), so
embeddings made by either tool load with the other:

    embeddings/
      img_emb/img_emb_0000.npy            # (N, D) float16, L2-normalised, as clip-retrieval stores them
      text_emb/text_emb_0000.npy          # (N, D) float16, L2-normalised
      metadata/metadata_0000.jsonl        # one {"caption": ...} per line (clip-retrieval: .parquet)
      text_tokens/text_tokens_0000.npy    # optional (N, L, W) float16 per-token encodings, padding zeroed
      text_mask/text_mask_0000.npy        # optional (N, L) bool, True for real tokens
      embeddings.json                     # ours: count, dimensions, the CLIP and data that made them

Shards pair up by their number's spelling (clip-retrieval pads to the digits of its shard count, we pad to
four). Metadata is JSON lines because pyarrow is not a dependency; `.parquet` metadata is read when pyarrow
happens to be installed. The embeddings are stored normalised, as clip-retrieval does: the prior normalises
each dimension with dataset statistics anyway, and CLIP's contrastive space is the unit sphere.
"""

from __future__ import annotations

import io
import json
import logging
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from unclip.checkpoint import atomic_write_bytes

if TYPE_CHECKING:
    from unclip.clip import ClipAdapter

logger = logging.getLogger(__name__)

IMAGE_EMBED, TEXT_EMBED, TEXT_TOKENS, TEXT_MASK, METADATA = (
    "img_emb",
    "text_emb",
    "text_tokens",
    "text_mask",
    "metadata",
)
INFO_NAME = "embeddings.json"


def write_shard(
    directory: str | Path,
    index: int,
    *,
    image_embed: np.ndarray,
    text_embed: np.ndarray,
    captions: list[str],
    text_tokens: np.ndarray | None = None,
    text_mask: np.ndarray | None = None,
) -> None:
    """Write shard `index`: each file atomically, the metadata last.

    Args:
        image_embed, text_embed: (N, D) arrays, stored as float16.
        captions: N strings.
        text_tokens, text_mask: optional (N, L, W) and (N, L) arrays, stored as float16 and bool.
    """
    n = len(captions)
    arrays = {IMAGE_EMBED: image_embed.astype(np.float16), TEXT_EMBED: text_embed.astype(np.float16)}
    if text_tokens is not None:
        arrays[TEXT_TOKENS] = text_tokens.astype(np.float16)
        arrays[TEXT_MASK] = text_mask.astype(bool)
    for kind, array in arrays.items():
        assert len(array) == n, f"{kind} has {len(array)} rows for {n} captions"
        _atomic_save_npy(Path(directory) / kind / f"{kind}_{index:04d}.npy", array)
    lines = "".join(json.dumps({"caption": caption}, ensure_ascii=False) + "\n" for caption in captions)
    atomic_write_bytes(Path(directory) / METADATA / f"{METADATA}_{index:04d}.jsonl", lines.encode())


@torch.no_grad()
def embed_dataset(
    clip: Any,
    dataset: Dataset,
    directory: str | Path,
    *,
    text_tokens: bool = False,
    shard_size: int = 10_000,
    batch_size: int = 256,
    num_workers: int = 0,
    info: dict[str, Any] | None = None,
) -> int:
    """Embed every image and caption of `dataset` with `clip` and write them as shards under `directory`.

    Args:
        clip: a ClipAdapter.
        dataset: items {"image": (3, H, W) in [-1, 1], "caption": str}; map-style or iterable.
        directory: a new (or empty) folder.
        text_tokens: also store the per-token text encodings and their mask (large: N * L * W halves).
        shard_size: rows per shard.
        info: extra entries for embeddings.json (e.g. the CLIP and data configs).

    Returns:
        the number of rows written.
    """
    directory = Path(directory)
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size} and {batch_size}")
    if (directory / IMAGE_EMBED).is_dir() and any((directory / IMAGE_EMBED).iterdir()):
        raise ValueError(f"{directory} already holds embeddings; delete it or choose another output folder")
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    total = len(dataset) if hasattr(dataset, "__len__") else None
    pending: dict[str, list] = {}
    rows = shards = full_context = 0
    with warnings.catch_warnings(), tqdm(total=total, unit="img", desc="embedding") as progress:
        # one warning per batch of long captions would flood the log: they are counted below instead
        warnings.filterwarnings("ignore", message=".*was truncated", category=UserWarning)
        for batch in loader:
            text = clip.embed_text(batch["caption"], normalize=True)
            columns = {
                "image_embed": clip.embed_image(batch["image"], normalize=True),
                "text_embed": text.embed,
            }
            if text_tokens:
                columns.update(text_tokens=text.tokens.half(), text_mask=text.mask)
            for name, value in columns.items():
                pending.setdefault(name, []).append(value.cpu().numpy())
            pending.setdefault("captions", []).extend(batch["caption"])
            full_context += int(text.mask[:, -1].sum())
            rows += len(batch["caption"])
            progress.update(len(batch["caption"]))
            while len(pending["captions"]) >= shard_size:
                _flush(directory, shards, pending, shard_size)
                shards += 1
    if rows == 0:
        raise ValueError("the dataset is empty: there is nothing to embed")
    if pending["captions"]:
        _flush(directory, shards, pending, len(pending["captions"]))
        shards += 1
    if full_context:
        logger.warning(
            "%d of %d captions filled CLIP's %d-token context; longer ones were truncated",
            full_context,
            rows,
            clip.context_length,
        )
    meta = {"count": rows, "shards": shards, "normalized": True, "embed_dim": clip.embed_dim}
    if text_tokens:
        meta.update(context_length=clip.context_length, text_width=clip.text_width)
    atomic_write_bytes(directory / INFO_NAME, (json.dumps({**meta, **(info or {})}, indent=2) + "\n").encode())
    return rows


class EmbeddingDataset(Dataset):
    """Rows of a precomputed-embedding folder, memory-mapped; the last `val_size` rows are the val split.

    Items: {"image_embed": (D,) float32, "text_embed": (D,) float32, "caption": str}, plus
    "text_tokens" (L, W) float32 and "text_mask" (L,) bool when the folder has them.
    """

    def __init__(self, path: str | Path, *, split: str = "train", val_size: int = 64, text_tokens: bool = True):
        """
        Args:
            path: a folder with img_emb/ and text_emb/ (and metadata/, text_tokens/, text_mask/).
            split: "train" (all rows but the last `val_size`) or "val" (the last `val_size`).
            text_tokens: read the per-token encodings when present; False skips them.
        """
        self.path = Path(path)
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.shards = _find_shards(self.path)
        kinds = [IMAGE_EMBED, TEXT_EMBED]
        if text_tokens and (self.path / TEXT_TOKENS).is_dir():
            kinds += [TEXT_TOKENS, TEXT_MASK]
        self.files = {kind: [_shard_file(self.path, kind, s, ".npy") for s in self.shards] for kind in kinds}
        counts = [self._check_shard(s) for s in range(len(self.shards))]
        self.offsets = np.cumsum([0, *counts])
        self.captions = self._read_captions(counts)
        total = int(self.offsets[-1])
        if not 0 <= val_size < total:
            raise ValueError(f"{self.path} has {total} rows: val_size must be in [0, {total}), got {val_size}")
        self.start, self.stop = (total - val_size, total) if split == "val" else (0, total - val_size)
        self._arrays: dict[str, list[np.ndarray]] | None = None  # opened lazily, in each worker

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        row = self.start + index
        shard = int(np.searchsorted(self.offsets, row, side="right")) - 1
        local = row - int(self.offsets[shard])
        arrays = self._open()
        item = {"caption": self.captions[row]}
        for kind, key in (
            (IMAGE_EMBED, "image_embed"),
            (TEXT_EMBED, "text_embed"),
            (TEXT_TOKENS, "text_tokens"),
        ):
            if kind in arrays:
                item[key] = torch.from_numpy(np.asarray(arrays[kind][shard][local], dtype=np.float32))
        if TEXT_MASK in arrays:
            item["text_mask"] = torch.from_numpy(np.array(arrays[TEXT_MASK][shard][local], dtype=bool))
        return item

    @property
    def embed_dim(self) -> int:
        return int(self._open()[IMAGE_EMBED][0].shape[1])

    @property
    def has_text_tokens(self) -> bool:
        return TEXT_TOKENS in self.files

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}  # a pickled memmap would copy its whole file

    def _open(self) -> dict[str, list[np.ndarray]]:
        if self._arrays is None:
            self._arrays = {kind: [np.load(f, mmap_mode="r") for f in files] for kind, files in self.files.items()}
        return self._arrays

    def _check_shard(self, s: int) -> int:
        shapes = {kind: np.load(files[s], mmap_mode="r").shape for kind, files in self.files.items()}
        counts = {kind: shape[0] for kind, shape in shapes.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"{self.path}: shard {self.shards[s]} has row counts that disagree: {counts}")
        if shapes[IMAGE_EMBED][1:] != shapes[TEXT_EMBED][1:]:
            raise ValueError(f"{self.path}: shard {self.shards[s]} has image and text embeddings of shapes {shapes}")
        return counts[IMAGE_EMBED]

    def _read_captions(self, counts: list[int]) -> list[str]:
        if not (self.path / METADATA).is_dir():
            return [""] * sum(counts)
        captions = []
        for shard, count in zip(self.shards, counts, strict=True):
            shard_captions = _read_metadata(self.path, shard)
            if len(shard_captions) != count:
                raise ValueError(
                    f"{self.path}: shard {shard} has {count} embeddings but {len(shard_captions)} captions"
                )
            captions += shard_captions
        return captions


def encode_batch(clip: ClipAdapter | None, batch: dict[str, Any], device: torch.device) -> dict[str, Tensor]:
    """{"text_embed" (B, D), "text_tokens" (B, L, W) | None, "text_mask" (B, L) | None, "text_words" (B, L, W)
    | None, "image_embed" (B, D)}.

    Batches from the "embeddings" dataset carry their embeddings (and no word embeddings); image-caption
    batches are encoded here.
    """
    if "image_embed" in batch:
        tokens, mask = batch.get("text_tokens"), batch.get("text_mask")
        return {
            "text_embed": F.normalize(batch["text_embed"].float().to(device), dim=-1),
            "image_embed": F.normalize(batch["image_embed"].float().to(device), dim=-1),
            "text_tokens": None if tokens is None else tokens.float().to(device),
            "text_mask": None if mask is None else mask.bool().to(device),
            "text_words": None,
        }
    if clip is None:
        raise ValueError("image-caption data needs a CLIP to encode it; set the run's clip section")
    text = clip.embed_text(list(batch["caption"]), normalize=True)
    return {
        "text_embed": text.embed.to(device),
        "text_tokens": text.tokens.to(device),
        "text_mask": text.mask.to(device),
        "text_words": text.words.to(device),
        "image_embed": clip.embed_image(batch["image"].to(device), normalize=True).to(device),
    }


def _find_shards(path: Path) -> list[str]:
    """The shard numbers as spelled in img_emb/img_emb_<number>.npy, in numeric order."""
    if not (path / IMAGE_EMBED).is_dir():
        raise ValueError(f"{path} is not an embedding folder: it has no {IMAGE_EMBED}/ (see train/embed.py)")
    if not (path / TEXT_EMBED).is_dir():
        raise ValueError(f"{path} has {IMAGE_EMBED}/ but no {TEXT_EMBED}/; the prior needs both")
    pattern = re.compile(rf"{IMAGE_EMBED}_(\d+)\.npy")
    shards = [m.group(1) for f in (path / IMAGE_EMBED).iterdir() if (m := pattern.fullmatch(f.name))]
    if not shards:
        raise ValueError(f"{path / IMAGE_EMBED} holds no {IMAGE_EMBED}_<number>.npy shards")
    return sorted(shards, key=int)


def _shard_file(path: Path, kind: str, shard: str, suffix: str) -> Path:
    file = path / kind / f"{kind}_{shard}{suffix}"
    if not file.is_file():
        raise ValueError(f"{path}: shard {shard} has {IMAGE_EMBED}_{shard}.npy but no {kind}/{file.name}")
    return file


def _read_metadata(path: Path, shard: str) -> list[str]:
    jsonl = path / METADATA / f"{METADATA}_{shard}.jsonl"
    if jsonl.is_file():
        with open(jsonl, encoding="utf-8") as f:
            return [json.loads(line).get("caption") or "" for line in f if line.strip()]
    parquet = path / METADATA / f"{METADATA}_{shard}.parquet"
    if not parquet.is_file():
        raise ValueError(f"{path}: shard {shard} has no {METADATA}/{jsonl.name} (or .parquet)")
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ValueError(f"reading {parquet} needs pyarrow (pip install pyarrow)") from e
    table = pq.read_table(parquet)
    if "caption" not in table.column_names:
        return [""] * table.num_rows
    return [c or "" for c in table.column("caption").to_pylist()]


def _collate(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "image": torch.stack([item["image"] for item in batch]),
        "caption": [item["caption"] for item in batch],
    }


def _flush(directory: Path, index: int, pending: dict[str, list], n: int) -> None:
    """Write the first n pending rows as shard `index` and keep the rest pending."""
    columns = {k: np.concatenate(v) if k != "captions" else v for k, v in pending.items()}
    write_shard(
        directory,
        index,
        image_embed=columns["image_embed"][:n],
        text_embed=columns["text_embed"][:n],
        captions=columns["captions"][:n],
        text_tokens=columns["text_tokens"][:n] if "text_tokens" in columns else None,
        text_mask=columns["text_mask"][:n] if "text_mask" in columns else None,
    )
    for k, v in columns.items():
        pending[k] = [v[n:]] if k != "captions" else v[n:]


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())  # with the umask's mode, as any other output
