"""Images in and out: tensors in [-1, 1] <-> PIL, grids, and PNGs that carry their settings as text chunks."""

from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps, PngImagePlugin
from torch import Tensor

from unclip.checkpoint import atomic_write_bytes
from unclip.data.images import to_rgb
from unclip.data.images import to_tensor as from_pil  # an RGB PIL image -> (3, H, W) in [-1, 1]


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> B RGB images (rounded to 8 bits)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    arrays = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in arrays]


def make_grid(images: Tensor, nrow: int | None = None, pad: int = 2) -> Image.Image:
    """Tile (N, 3, H, W) images in [-1, 1] into one image, `nrow` per row, on a white background."""
    n, _, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = Image.new("RGB", (nrow * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, tile in enumerate(to_pil(images)):
        grid.paste(tile, (pad + (i % nrow) * (w + pad), pad + (i // nrow) * (h + pad)))
    return grid


def save_png(image: Image.Image, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write a PNG atomically, with each metadata item as a text chunk (values JSON-encoded unless str)."""
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def read_png_metadata(path: str | Path) -> dict[str, str]:
    with Image.open(path) as image:
        return dict(getattr(image, "text", {}))


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None, captions: list[str] | None = None) -> Path:
    """Save a grid PNG; the captions (if any) go into its metadata and a .txt beside it."""
    path = Path(path)
    metadata = {"captions": captions} if captions else None
    save_png(make_grid(images, nrow), path, metadata)
    if captions:
        atomic_write_bytes(path.with_suffix(".txt"), ("\n".join(captions) + "\n").encode())
    return path


def open_image(path: str | Path) -> Image.Image:
    """Decode an image file to RGB as the training data was (upright by its EXIF orientation, transparency
    composited onto white), with a clear error for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"cannot read image {path}: " + ("it is a folder" if path.is_dir() else "no such file"))
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from e


def center_square(image: Image.Image) -> Image.Image:
    """The largest centred square of an image (with a warning when that crops anything)."""
    w, h = image.size
    if w == h:
        return image
    s = min(w, h)
    warnings.warn(f"image is {w}x{h}, not square: using its centre {s}x{s} square", stacklevel=2)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s))


def square_tensor(image: Image.Image, size: int) -> Tensor:
    """An RGB image's centre square resized (Lanczos, as the training data) -> (1, 3, size, size) in [-1, 1]."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"image size must be a positive integer, got {size!r}")
    square = center_square(image)
    if square.size != (size, size):
        square = square.resize((size, size), Image.Resampling.LANCZOS)
    return from_pil(square)[None]


def load_image(path: str | Path, size: int) -> Tensor:
    """Read an image file for a pipeline: (1, 3, size, size) in [-1, 1], its centre square resized to `size`.

    Raises:
        ValueError: "cannot read image PATH: ..." for a missing, unreadable or corrupt file, or a bad size.
    """
    return square_tensor(open_image(path), size)
