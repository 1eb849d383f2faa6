"""What the pipeline returns: images with the settings that made them, and how they are written as PNGs.

    out = pipe(["a red circle"], seed=0)
    out.save("outputs/")          # a_red_circle_00000.png (prompt, seed, settings in its text chunks), a grid

A file that exists is never replaced unless `overwrite=True`: the new image gets the next free name
(`NAME-2.png`, `NAME-3.png`, ...), so two runs into one folder, or two prompts whose names reduce to the same
text, keep every image.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from unclip.imageio import make_grid, save_png, to_pil


def slug(text: str, limit: int = 48) -> str:
    """A file-name stem from a prompt: lower case, letters and digits joined by "_"."""
    text = "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")
    return "_".join(filter(None, text.split("_")))[:limit] or "image"


def free_path(folder: Path, name: str, overwrite: bool = False, taken: set[Path] | None = None) -> Path:
    """folder/NAME.png, or with overwrite False and that file present (or in `taken`), NAME-2.png, NAME-3.png..."""
    path, k = folder / f"{name}.png", 1
    while not overwrite and (path.exists() or (taken is not None and path in taken)):
        k += 1
        path = folder / f"{name}-{k}.png"
    if taken is not None:
        taken.add(path)
    return path


def write_pngs(
    folder: str | Path, images: list[Image.Image], names: list[str], metadata: list[dict], *, overwrite: bool = False
) -> list[Path]:
    """Write each image as NAME.png with its metadata (see `free_path` for names in use)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    taken: set[Path] = set()
    return [
        save_png(image, free_path(folder, name, overwrite, taken), {**meta, "software": "unclip"})
        for image, name, meta in zip(images, names, metadata, strict=True)
    ]


@dataclasses.dataclass
class PipelineOutput:
    """The images of a text-to-image call, with what made them."""

    images: Tensor  # (B, 3, size, size) in [-1, 1]
    image_embeds: Tensor  # (B, D) the CLIP image embeddings the decoder was conditioned on
    text_embeds: Tensor  # (B, D)
    prompts: list[str]
    seeds: list[int]  # image i is made again by seed seeds[i] with candidates 1
    settings: dict[str, Any]  # the call's resolved settings (`GenerateSettings.metadata()`)
    clip_scores: list[float] | None = None  # with reranking: the kept images' CLIP scores
    # with reranking, every candidate at the decoder's size, (B, candidates, 3, s, s), and its CLIP score
    # (B, candidates); candidate j of prompt i had seed seed + i·candidates + j
    candidate_images: Tensor | None = None
    candidate_scores: Tensor | None = None

    @classmethod
    def concat(cls, outputs: list[PipelineOutput]) -> PipelineOutput:
        """One output from the outputs of consecutive batches of a call."""
        first = outputs[0]

        def cat(name):
            values = [getattr(o, name) for o in outputs]
            return None if values[0] is None else torch.cat(values)

        def join(name):
            values = [getattr(o, name) for o in outputs]
            return None if values[0] is None else [v for value in values for v in value]

        return cls(
            cat("images"),
            cat("image_embeds"),
            cat("text_embeds"),
            join("prompts"),
            join("seeds"),
            first.settings,
            join("clip_scores"),
            cat("candidate_images"),
            cat("candidate_scores"),
        )

    def metadata(self, i: int) -> dict[str, Any]:
        meta = {"prompt": self.prompts[i], "seed": self.seeds[i], "settings": self.settings}
        if self.clip_scores is not None:
            meta["clip_score"] = round(self.clip_scores[i], 4)
        return meta

    def names(self) -> list[str]:
        return [f"{slug(p)}_{s:05d}" for p, s in zip(self.prompts, self.seeds, strict=True)]

    def save(
        self, folder: str | Path, nrow: int | None = None, *, overwrite: bool = False, grid: bool = True
    ) -> list[Path]:
        """Write <prompt>_<seed>.png for each image (prompt, seed and settings in its text chunks) and a grid,
        <prompt>_grid.png (or <first prompt>_and_<k>_more_grid.png when the prompts differ), `nrow` a row. By
        default a run of several prompts, each repeated n > 1 times in a row, gets a grid row per prompt.

        Returns:
            the image paths, then the grid's.
        """
        metadata = [self.metadata(i) for i in range(len(self.prompts))]
        paths = write_pngs(folder, to_pil(self.images), self.names(), metadata, overwrite=overwrite)
        if grid:
            paths.append(self.save_grid(folder, nrow, overwrite=overwrite))
        return paths

    def save_grid(self, folder: str | Path, nrow: int | None = None, *, overwrite: bool = False) -> Path:
        others = len(dict.fromkeys(self.prompts)) - 1
        if nrow is None and others:
            repeats = next(i for i, p in enumerate(self.prompts) if p != self.prompts[0])
            nrow = repeats if repeats > 1 else None
        stem = slug(self.prompts[0]) + (f"_and_{others}_more" if others else "") + "_grid"
        meta = {"prompts": self.prompts, "seeds": self.seeds, "settings": self.settings, "software": "unclip"}
        return save_png(make_grid(self.images, nrow), free_path(Path(folder), stem, overwrite), meta)


@dataclasses.dataclass
class EditOutput:
    """The images an edit made, with the PNG metadata of each."""

    images: Tensor  # (N, 3, size, size) in [-1, 1]
    image_embeds: Tensor  # (N, D) the CLIP image embeddings the decoder was conditioned on
    names: list[str]  # file name of each image, without ".png"
    metadata: list[dict[str, Any]]  # PNG text chunks of each image
    stem: str  # file name prefix of the grid
    low_res: Tensor | None = None  # (N, 3, s, s) the decoder's outputs, when images were upsampled from them
    nrow: int | None = None  # grid columns (None: a square grid)

    def save(self, folder: str | Path, *, overwrite: bool = False) -> list[Path]:
        """Write NAME.png per image (+ NAME_{s}px.png of the decoder's output) and STEM_grid.png.

        Returns:
            the image paths, the decoder-size paths if any, then the grid's.
        """
        paths = write_pngs(folder, to_pil(self.images), self.names, self.metadata, overwrite=overwrite)
        if self.low_res is not None:
            s = self.low_res.shape[-1]
            names = [f"{name}_{s}px" for name in self.names]
            paths += write_pngs(folder, to_pil(self.low_res), names, self.metadata, overwrite=overwrite)
        metadata = [{**meta, "software": "unclip"} for meta in self.metadata]
        common = {k: v for k, v in metadata[0].items() if all(m.get(k) == v for m in metadata)}
        grid = {
            **common,
            "images": [p.name for p in paths[: len(self.names)]],
            "per_image": [{k: v for k, v in m.items() if k not in common} for m in metadata],
        }
        path = free_path(Path(folder), f"{self.stem}_grid", overwrite)
        paths.append(save_png(make_grid(self.images, self.nrow), path, grid))
        return paths
