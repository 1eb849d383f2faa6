"""Image–caption datasets read from disk: a folder with sidecar captions, a CSV, and webdataset tar shards.

    ImageFolderDataset("photos/", 64)          # photos/a.jpg + photos/a.txt, searched recursively
    CsvDataset("train.csv", 64)                # columns image|filepath and caption|text
    WebDataset("shards/{00000..00099}.tar", 64)  # img2dataset layout: key.jpg + key.txt per sample

Every image goes through the same preprocessing (`load_image`): convert to 8-bit RGB (`to_rgb`: transparency
composited onto white, 16-bit and float greyscale scaled, not clipped), resize the short side to `image_size`
with Lanczos, centre-crop to a square; items are `{"image": (3, S, S) in [-1, 1], "caption": str}`, plus
`"low_res"` (an area downsample) when `low_res_size` is given, for upsamplers. A file that cannot be decoded is
skipped and counted in `num_skipped`; it never stops a run. The first few skips are logged one by one, and the
total at the end of each pass over the data. The streaming reader uses only `tarfile`, splitting shards across
DataLoader workers and distributed ranks as webdataset does.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import itertools
import logging
import os
import random
import re
import tarfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageCms, ImageOps
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, get_worker_info

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
MAX_WARNINGS = 5  # warnings logged per dataset for skipped files; later ones are only counted


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB, compositing transparency onto white.

    Transparency: RGBA, LA, PA, premultiplied RGBa/La, and a palette, greyscale or RGB image with a transparent
    colour. High-bit-depth greyscale is scaled to 8 bits, not clipped: "I;16*" (16-bit PNG, TIFF) and "I" by
    the 16-bit range when its values fit in 0..65535 (as a 16-bit PNG decodes), else by its own min..max;
    "F" by 0..1 or 0..255 when its values fit, else by its min..max (NaN as black). CMYK uses PIL's
    conversion (which undoes Adobe's inverted JPEGs), LAB the CIE conversion to sRGB.

    Raises:
        ValueError: for a mode that has no conversion to RGB.
    """
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode.startswith("I") or mode == "F":
        grey = _grey_to_8bit(image)
        if "transparency" in image.info and mode.startswith("I"):
            array = np.asarray(image)
            opaque = Image.fromarray(((array != image.info["transparency"]) * 255).astype(np.uint8))
            return _on_white(Image.merge("RGBA", (grey, grey, grey, opaque)))
        return grey.convert("RGB")
    if mode == "La":  # premultiplied: composite onto white is L + (1 - alpha) * 255
        grey, alpha = (np.asarray(band, dtype=np.float32) for band in image.split())
        return Image.fromarray(np.clip(grey + 255.0 - alpha, 0, 255).round().astype(np.uint8)).convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "PA") or "transparency" in image.info:
        return _on_white(image.convert("RGBA"))
    if mode == "LAB":
        lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
        transform = ImageCms.buildTransform(lab, srgb, "LAB", "RGB")
        return ImageCms.applyTransform(image, transform)
    try:
        return image.convert("RGB")
    except ValueError as e:
        raise ValueError(f"cannot convert an image of mode {mode} to RGB: {e}") from e


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _grey_to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float greyscale image as an 8-bit "L" image, scaled to its range."""
    array = np.asarray(image).astype(np.float64)
    finite = np.isfinite(array)
    array = np.where(finite, array, 0.0)
    low, high = (array.min(), array.max()) if array.size else (0.0, 0.0)
    if image.mode.startswith("I") and low >= 0 and high <= 65535:
        scaled = array / 257.0
    elif image.mode == "F" and low >= 0 and high <= 1:
        scaled = array * 255.0
    elif image.mode == "F" and low >= 0 and high <= 255:
        scaled = array
    else:  # values outside any fixed range: stretch min..max to 0..255
        scaled = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
    return Image.fromarray(np.clip(scaled, 0, 255).round().astype(np.uint8))


def resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the short side to `size` (Lanczos) and centre-crop to a `size` x `size` square."""
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image(source: str | Path | io.BytesIO, size: int) -> Image.Image:
    """Decode an image file and preprocess it to an RGB `size` x `size` square.

    JPEGs are decoded at a reduced scale (`Image.draft`) when they are much larger than `size`, and photos
    are turned upright by their EXIF orientation.
    """
    with Image.open(source) as image:
        image.draft("RGB", (size, size))
        image = ImageOps.exif_transpose(image)
        return resize_and_crop(to_rgb(image), size)


def to_tensor(image: Image.Image) -> Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def downsample(image: Image.Image, size: int) -> Image.Image:
    """Antialiased (area) downsample to `size` x `size`: the low-resolution input of an upsampler."""
    return image.resize((size, size), Image.Resampling.BOX)


def image_item(image: Image.Image, caption: str, low_res_size: int | None = None) -> dict:
    """The common item format: {"image": (3, S, S) in [-1, 1], "caption", ["low_res": (3, s, s)]}."""
    item = {"image": to_tensor(image), "caption": caption}
    if low_res_size is not None:
        item["low_res"] = to_tensor(downsample(image, low_res_size))
    return item


def held_out(keys: list[str], val_size: int) -> set[str]:
    """The `val_size` keys with the smallest SHA-1 hashes: a deterministic validation set that does not
    depend on file order and stays stable when files are added."""
    if val_size < 0:
        raise ValueError(f"val_size must be >= 0, got {val_size}")
    return set(sorted(keys, key=lambda k: hashlib.sha1(k.encode()).hexdigest())[:val_size])


def check_split(split: str) -> None:
    """Reject a split name other than "train" or "val"."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")


class _SkipCounter:
    """Counts skipped samples, logs the first few, and logs the total skipped at the end of each pass over the
    data (`num_skipped` is per process: each DataLoader worker holds its own copy of the dataset, and a worker
    that never sees a whole pass logs its running total at 10, 100, 1000 ... skips)."""

    num_skipped = 0

    def _skip(self, what: str, error: BaseException | str) -> None:
        self.num_skipped += 1
        n = self.num_skipped
        if n <= MAX_WARNINGS:
            more = " (later ones are counted, and the total logged)" if n == MAX_WARNINGS else ""
            logger.warning("skipping unreadable image %s: %s%s", what, error, more)
        elif n >= 10 and str(n).rstrip("0") == "1":
            logger.warning("%d unreadable images skipped so far", n)


class _FileImageDataset(_SkipCounter, Dataset):
    """Map-style dataset over (image path, caption) pairs; a bad file is replaced by the next good one.

    A caption given as a Path is a sidecar file, read when the item is loaded.
    """

    def __init__(self, entries: list[tuple[Path, str | Path]], root: Path, image_size, low_res_size, split, val_size):
        check_split(split)
        if not entries:
            raise ValueError(f"no captioned images found in {root} (extensions: {', '.join(IMAGE_EXTENSIONS)})")
        base = root if root.is_dir() else root.parent
        keys = [os.path.relpath(path, base) for path, _ in entries]  # the split does not depend on `base`
        val = held_out(keys, val_size)
        self.entries = [e for e, k in zip(entries, keys, strict=True) if (k in val) == (split == "val")]
        if not self.entries:
            raise ValueError(f"{root} has {len(entries)} images, too few for a {split} split with val_size={val_size}")
        self.root = root
        self.image_size = image_size
        self.low_res_size = low_res_size
        self._bad: set[int] = set()
        self._tried: set[int] | None = set()  # indices tried in this process, until a whole pass is done

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        for i in range(index, index + len(self)):
            i %= len(self)
            if i in self._bad:
                continue
            path, caption = self.entries[i]
            try:
                image = load_image(path, self.image_size)
                if isinstance(caption, Path):
                    caption = caption.read_text(encoding="utf-8").strip()
            except Exception as error:  # any decoder failure (truncated, not an image, bomb) skips the file
                self._bad.add(i)
                self._skip(str(path), error)
                self._tried_one(i)
                continue
            self._tried_one(i)
            return image_item(image, caption, self.low_res_size)
        raise ValueError(f"every image in {self.root} failed to load ({len(self._bad)} files)")

    def _tried_one(self, index: int) -> None:
        """Note a tried index; once every one has been tried, log how many could not be read (bad files are
        remembered, so the count is then final for this process)."""
        if self._tried is None:
            return
        self._tried.add(index)
        if len(self._tried) == len(self.entries):
            self._tried = None
            if self._bad:
                logger.warning(
                    "%s: %d of %d images could not be read and are skipped",
                    self.root,
                    len(self._bad),
                    len(self.entries),
                )


class ImageFolderDataset(_FileImageDataset):
    """Images (jpg/png/webp) under a folder, searched recursively, each with a caption in `name.txt`.

    Args:
        path: the folder.
        image_size: side of the square images.
        low_res_size: if given, items also hold "low_res", an area downsample to this side.
        split: "train" or "val"; val holds the `val_size` files with the smallest path hashes.
        allow_missing_captions: use "" for images without a .txt file instead of leaving them out.
    """

    def __init__(
        self,
        path: str | Path,
        image_size: int = 64,
        *,
        low_res_size: int | None = None,
        split: str = "train",
        val_size: int = 64,
        allow_missing_captions: bool = False,
    ):
        root = Path(path).expanduser()
        if not root.is_dir():
            raise ValueError(f"image folder {root} does not exist")
        files = sorted(p for p in root.rglob("*") if p.is_file())
        texts = {p.with_suffix("") for p in files if p.suffix == ".txt"}
        entries, missing = [], 0
        for p in files:
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            if p.with_suffix("") in texts:
                entries.append((p, p.with_suffix(".txt")))
            elif allow_missing_captions:
                entries.append((p, ""))
            else:
                missing += 1
        if missing:
            logger.warning("%s: left out %d images without a .txt caption", root, missing)
        super().__init__(entries, root, image_size, low_res_size, split, val_size)


class CsvDataset(_FileImageDataset):
    """A CSV (or TSV) file listing image paths, relative to the file's folder, and their captions.

    Args:
        path: the CSV file; a .tsv suffix selects tab separation.
        image_size: side of the square images.
        image_column: column of image paths; by default "image" or else "filepath".
        caption_column: column of captions; by default "caption" or else "text".
        low_res_size, split, val_size: as for ImageFolderDataset.
    """

    def __init__(
        self,
        path: str | Path,
        image_size: int = 64,
        *,
        image_column: str | None = None,
        caption_column: str | None = None,
        low_res_size: int | None = None,
        split: str = "train",
        val_size: int = 64,
    ):
        path = Path(path).expanduser()
        if not path.is_file():
            raise ValueError(f"CSV file {path} does not exist")
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            columns = reader.fieldnames or []
            image_column = _pick_column(path, columns, image_column, ("image", "filepath"))
            caption_column = _pick_column(path, columns, caption_column, ("caption", "text"))
            rows = [(row[image_column], row[caption_column]) for row in reader]
        entries = [(path.parent / image, (caption or "").strip()) for image, caption in rows if image]
        super().__init__(entries, path, image_size, low_res_size, split, val_size)


def _pick_column(path: Path, columns: list[str], wanted: str | None, defaults: tuple[str, ...]) -> str:
    candidates = (wanted,) if wanted else defaults
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(f"{path} has no column {' or '.join(map(repr, candidates))}; its columns are {columns}")


def expand_urls(urls: str | list[str]) -> list[str]:
    """Expand brace ranges/lists ("shard-{000..009}.tar", "{a,b}.tar") and glob patterns, in order."""
    if isinstance(urls, (list, tuple)):
        return [u for pattern in urls for u in expand_urls(pattern)]
    out = []
    for url in _expand_braces(urls):
        if "://" not in url and glob.has_magic(url):
            out.extend(sorted(glob.glob(os.path.expanduser(url))))
        else:
            out.append(url)
    return out


def _expand_braces(pattern: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        first, last = numeric.groups()
        width = len(first) if first.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(first), int(last) + 1)]
    else:
        options = body.split(",")
    return [e for option in options for e in _expand_braces(head + option + tail)]


def split_shards(shards: list[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """The shards read by one DataLoader worker of one rank: every (world_size * num_workers)-th shard."""
    return shards[rank * num_workers + worker :: world_size * num_workers]


def distributed_rank() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed if initialised, else from the RANK/WORLD_SIZE env vars."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class WebDataset(_SkipCounter, IterableDataset):
    """Streaming image–caption samples from tar shards in img2dataset's layout (key.jpg + key.txt).

    Each DataLoader worker of each rank reads its own subset of the shards (`split_shards`); with more
    readers than shards some get none, so use at least world_size * num_workers shards. The val split is
    the first `val_size` samples of the last shard, which the train split skips.

    Args:
        urls: a shard path, URL or pattern ("data/{00000..00099}.tar", "data/*.tar"), or a list of them.
        image_size: side of the square images.
        low_res_size: if given, items also hold "low_res", an area downsample to this side.
        split: "train" or "val".
        shuffle_buffer: train only: shuffle samples within a buffer of this many (raw, undecoded) samples;
            the shard order is also shuffled each epoch. 0 keeps the file order.
        seed: seed of the shuffles; call `set_epoch(e)` each epoch for a new order.
        repeat: train only: loop over the shards forever, so ranks never run out at different times.
    """

    def __init__(
        self,
        urls: str | list[str],
        image_size: int = 64,
        *,
        low_res_size: int | None = None,
        split: str = "train",
        val_size: int = 64,
        shuffle_buffer: int = 256,
        seed: int = 0,
        repeat: bool = False,
        allow_missing_captions: bool = False,
    ):
        check_split(split)
        self.shards = expand_urls(urls)
        if not self.shards:
            raise ValueError(f"no tar shards match {urls!r}")
        self.urls, self.image_size, self.low_res_size = urls, image_size, low_res_size
        self.split, self.val_size, self.seed = split, val_size, seed
        self.shuffle_buffer = shuffle_buffer if split == "train" else 0
        self.repeat = repeat and split == "train"
        self.allow_missing_captions = allow_missing_captions
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        if self.split == "val":
            yield from self._decode(itertools.islice(self._samples(self.shards[-1]), self.val_size), True)
            return
        worker = get_worker_info()
        rank, world_size = distributed_rank()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        readers = world_size * num_workers
        if readers > len(self.shards):
            message = f"{len(self.shards)} shards for {readers} readers (ranks x DataLoader workers)"
            if self.repeat and not split_shards(self.shards, rank, world_size, worker_id, num_workers):
                raise ValueError(f"{message}: this reader has none to repeat; use more shards or fewer workers")
            logger.warning("%s: some read nothing", message)
        for epoch in itertools.count(self.epoch) if self.repeat else [self.epoch]:
            shards = list(self.shards)
            if self.shuffle_buffer:
                random.Random(f"{self.seed}/{epoch}").shuffle(shards)  # the same order on every reader
            samples = self._shard_samples(split_shards(shards, rank, world_size, worker_id, num_workers))
            rng = random.Random(f"{self.seed}/{epoch}/{rank}/{worker_id}")
            yield from self._decode(self._shuffled(samples, rng), readers == 1)

    def _shard_samples(self, shards: list[str]) -> Iterator[tuple[str, dict]]:
        for shard in shards:
            samples = self._samples(shard)
            if shard == self.shards[-1]:
                samples = itertools.islice(samples, self.val_size, None)  # held out for the val split
            yield from samples

    def _shuffled(self, samples: Iterator, rng: random.Random) -> Iterator:
        """Shuffle within a buffer of `shuffle_buffer` samples (raw bytes, so the buffer stays small)."""
        if not self.shuffle_buffer:
            yield from samples
            return
        buffer = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def _samples(self, url: str) -> Iterator[tuple[str, dict]]:
        """(key, {extension: bytes}) for each sample of a shard, grouping adjacent members by key."""
        key, files = None, {}
        try:
            stream = urllib.request.urlopen(url) if "://" in url else open(os.path.expanduser(url), "rb")
            with stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    name = member.name
                    dot = name.find(".", name.rfind("/") + 1)
                    if dot < 0:
                        continue
                    if name[:dot] != key and files:
                        yield key, files
                        files = {}
                    key = name[:dot]
                    files[name[dot + 1 :].lower()] = tar.extractfile(member).read()
        except (OSError, tarfile.TarError) as error:  # a truncated or missing shard ends that shard only
            self._skip(f"shard {url}", error)
        if files:
            yield key, files

    def _decode(self, samples: Iterator[tuple[str, dict]], sees_all: bool) -> Iterator[dict]:
        seen = yielded = 0
        skipped_before = self.num_skipped
        for key, files in samples:
            seen += 1
            image = next((files[ext] for ext in ("jpg", "jpeg", "png", "webp") if ext in files), None)
            if image is None or ("txt" not in files and not self.allow_missing_captions):
                continue
            try:
                pil = load_image(io.BytesIO(image), self.image_size)
            except Exception as error:  # any decoder failure skips the sample
                self._skip(key, error)
                continue
            yielded += 1
            yield image_item(pil, files.get("txt", b"").decode("utf-8").strip(), self.low_res_size)
        skipped = self.num_skipped - skipped_before
        if skipped:
            logger.warning("%d unreadable samples or shards skipped in a pass over %r", skipped, self.urls)
        if seen and not yielded:
            message = f"no readable image–caption sample in the shards {self.urls!r}"
            if sees_all:  # with several readers, another one may still find good samples
                raise ValueError(message)
            logger.warning("%s read by this worker", message)
