"""What the web app's buttons do, without the page layout: each handler checks its input, runs one pipeline call
(one at a time per process, under a lock) and returns the PNG files it wrote, whose text chunks hold the prompt,
seed and settings exactly as `sample/*.py` write them. A bad input raises `gr.Error`, which the page shows as a
message; a pipeline warning (e.g. a resized mask) is shown as a `gr.Warning`."""

from __future__ import annotations

import atexit
import contextlib
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch
from PIL import Image

from unclip.data.images import to_rgb
from unclip.imageio import open_image
from unclip.pipeline import UnCLIPPipeline


def user_error(e: Exception) -> gr.Error:
    """A message for the page from a ValueError (the pipeline's settings and input errors are ValueErrors)."""
    message = str(e) or type(e).__name__
    first = message.split(" ", 1)[0]
    if first.isalpha():  # a word, not a setting's name such as decoder.steps
        message = message[:1].upper() + message[1:]
    return gr.Error(message, print_exception=False)


def parse_size(value: Any, sizes: list[int]) -> int:
    """The size dropdown's value (a choice, or typed text) -> an int the pipeline makes."""
    try:
        size = int(str(value).strip().removesuffix("px").strip())
    except ValueError:
        raise gr.Error(f"Size {value!r} is not a number; choose one of {sizes}", print_exception=False) from None
    if size not in sizes:
        raise gr.Error(f"Size {size} is not one this pipeline makes; choose one of {sizes}", print_exception=False)
    return size


def whole(name: str, value: Any, minimum: int = 0) -> int:
    """A whole number from a number box (gradio gives floats, or None for an empty box)."""
    if value is None or value == "":
        raise gr.Error(f"{name} is empty: enter a whole number >= {minimum}", print_exception=False)
    if float(value) != int(value) or int(value) < minimum:
        raise gr.Error(f"{name} must be a whole number >= {minimum}, got {value}", print_exception=False)
    return int(value)


def model_card_info(folder: Path) -> dict[str, str | None]:
    """The pipeline's MODEL_CARD.md, its licence line ("- Licence: ...") and any attribution paragraph
    ("**Licence: ...** ..."), for the page's about line."""
    card = folder / "MODEL_CARD.md"
    if not card.is_file():
        return {"card": None, "licence": None, "attribution": None}
    text = card.read_text(encoding="utf-8")
    line = re.search(r"^- Licence: (.+)$", text, re.MULTILINE)
    licence = line.group(1).replace("**", "").split(". ")[0].rstrip(".") if line else None
    licence = re.sub(r"\s*\((?:below|above)\)", "", licence) if licence else None  # pointers within the card
    para = re.search(r"^\*\*Licence: [^*]+\*\*\s*(.+?)(?:\n\s*\n|\Z)", text, re.MULTILINE | re.DOTALL)
    attribution = " ".join(para.group(1).split()) if para else None
    return {"card": str(card), "licence": licence, "attribution": attribution}


def mask_from_editor(value: Mapping | None) -> Image.Image | None:
    """The white-on-black mask of what was painted on the image editor's layers (any colour paints), or None."""
    if not value or not value.get("layers"):
        return None
    alpha = None
    for layer in value["layers"]:
        if layer is None:
            continue
        a = np.asarray(layer.convert("RGBA"))[..., 3] > 0
        alpha = a if alpha is None else (alpha | a)
    if alpha is None or not alpha.any():
        return None
    return Image.fromarray(np.where(alpha, 255, 0).astype(np.uint8), "L")


class App:
    """One loaded pipeline and the folder its outputs are written to."""

    def __init__(self, pipe: UnCLIPPipeline, folder: str | Path, out: str | Path | None = None):
        self.pipe, self.folder = pipe, Path(folder)
        self.name = self.folder.name
        self.out = Path(out) if out else Path(tempfile.mkdtemp(prefix="unclip-app-"))
        if not out:  # a temporary folder goes when the process ends (gradio keeps its own copies while it runs)
            atexit.register(shutil.rmtree, self.out, ignore_errors=True)
        self.lock = threading.Lock()  # one pipeline call at a time, whatever the queue lets through
        self.defaults = pipe.resolve()
        self.info = model_card_info(self.folder)

    # -- shared ----------------------------------------------------------------------------------------------

    def run_folder(self, kind: str) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-", dir=self.out))

    @contextlib.contextmanager
    def call(self):
        """The pipeline, locked; ValueErrors and running out of memory become page messages, and warnings page
        warnings."""
        with self.lock, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield self.pipe
            except ValueError as e:
                raise user_error(e) from None
            except (MemoryError, torch.OutOfMemoryError):
                message = "Out of memory: lower the number of images, the candidates or the size"
                raise gr.Error(message, print_exception=False) from None
            finally:
                for w in dict.fromkeys(str(w.message) for w in caught):
                    gr.Warning(w)

    def image(self, path: str | None, what: str) -> Image.Image:
        if not path:
            raise gr.Error(f"No {what}: upload one, or send one from the Generate tab", print_exception=False)
        try:
            image = open_image(path)
        except ValueError as e:
            raise gr.Error(f"Cannot read the {what}: it is not an image file ({e})", print_exception=False) from None
        image.filename = Path(path).name  # the source's name in the outputs' metadata and file names
        return image

    def stage_settings(self, advanced: Mapping[str, Any]) -> dict[str, Any]:
        """The advanced fold's values {"decoder.steps": 10, "upsampler_256.steps": 4, ...} -> the call's
        keyword arguments (prior=..., decoder=..., upsamplers=...); empty boxes keep the pipeline's default."""
        stages: dict[str, dict[str, Any]] = {}
        for key, value in advanced.items():
            stage, field = key.split(".")
            if value is None or value == "":
                continue
            default = getattr(self.stage_defaults(stage), field)
            if isinstance(default, int) and not isinstance(default, bool):
                value = whole(f"{stage} {field}", value, 0)
            elif isinstance(default, float):
                value = float(value)
            stages.setdefault(stage, {})[field] = value
        ups = {s.folder for s in self.pipe.upsamplers}
        kwargs: dict[str, Any] = {k: v for k, v in stages.items() if k in ("prior", "decoder")}
        if ups & set(stages):
            kwargs["upsamplers"] = {k: v for k, v in stages.items() if k in ups}
        return kwargs

    def stage_defaults(self, stage: str):
        """The pipeline's default settings of a stage ("prior", "decoder" or an upsampler's folder)."""
        if stage == "prior":
            return self.pipe.prior.defaults if self.pipe.prior is not None else None
        if stage == "decoder":
            return self.pipe.decoder.defaults
        return next(s.defaults for s in self.pipe.upsamplers if s.folder == stage)

    # -- the tabs ----------------------------------------------------------------------------------------------

    def generate(self, prompt, n, seed, size, candidates, use_prior, advanced, progress=None) -> Iterator[list[str]]:
        """Text to image: yields the PNG paths written so far, one image at a time (for the progress bar)."""
        n, seed = whole("Number of images", n, 1), whole("Seed", seed, 0)
        size = parse_size(size, self.pipe.sizes)
        candidates = whole("Candidates", candidates, 1)
        kwargs = self.stage_settings(advanced)
        if not use_prior:
            kwargs.pop("prior", None)
        prompt = (prompt or "").strip()
        paths = []
        with self.call() as pipe:
            pipe.resolve(size=size, seed=seed, candidates=candidates, use_prior=bool(use_prior), **kwargs)
            if not prompt:
                raise ValueError("no prompt: describe the image to generate, e.g. 'a red circle above a blue square'")
            if progress is not None:
                progress((0, n), desc=f"image 1 of {n}", unit="images")
            batches = pipe.batches(
                [prompt] * n,
                batch_size=1,
                size=size,
                seed=seed,
                candidates=candidates,
                use_prior=bool(use_prior),
                **kwargs,
            )
            folder = None
            for start, out in batches:
                folder = folder or self.run_folder("generate")
                paths += [str(p) for p in out.save(folder, grid=False)]
                if progress is not None and start + 1 < n:
                    progress((start + 1, n), desc=f"image {start + 2} of {n}", unit="images")
                yield list(paths)

    def variations(self, image, n, seed, size, fresh_noise, eta, steps, guidance):
        source = self.image(image, "image")
        n, seed, size = whole("Number of images", n, 1), whole("Seed", seed, 0), parse_size(size, self.pipe.sizes)
        decoder = {"guidance_scale": float(guidance)} if guidance not in (None, "") else {}
        with self.call() as pipe:
            if fresh_noise:
                if steps not in (None, ""):
                    decoder["steps"] = whole("Steps", steps, 1)
                out = pipe.variations(source, n=n, seed=seed, invert=False, size=size, decoder=decoder)
            else:
                inv = {} if steps in (None, "") else {"inversion_steps": whole("Steps", steps, 1)}
                out = pipe.variations(source, n=n, seed=seed, eta=float(eta), size=size, decoder=decoder, **inv)
            return self.save(out, "variations")

    def inpaint(self, editor, mask_upload, prompt, n, seed, size, method, advanced):
        background = editor.get("background") if editor else None
        if background is None:
            message = "No image: upload one to paint on, or send one from the Generate tab"
            raise gr.Error(message, print_exception=False)
        image = to_rgb(background)  # transparency onto white, as the training data
        if mask_upload:
            mask = self.image(mask_upload, "mask")
        else:
            mask = mask_from_editor(editor)
            if mask is None:
                raise gr.Error(
                    "No mask: paint over the part to repaint with the brush (it becomes the white of the mask), "
                    "or upload a mask (white = repaint)",
                    print_exception=False,
                )
        n, seed, size = whole("Number of images", n, 1), whole("Seed", seed, 0), parse_size(size, self.pipe.sizes)
        kwargs = self.stage_settings(advanced)
        with self.call() as pipe:
            prompt = (prompt or "").strip()
            if not prompt:
                raise ValueError(
                    "no prompt: write the caption of the whole image you want, e.g. 'a red circle above a blue square'"
                )
            out = pipe.inpaint(image, mask, prompt, n=n, seed=seed, size=size, method=method, **kwargs)
            folder = self.run_folder("inpaint")
            mask_path = str(folder / "mask.png")
            mask.save(mask_path)
            paths = self.save(out, "inpaint", folder)
            return paths, mask_path

    def interpolate(self, image, mode, image2, from_caption, to_caption, steps, max_theta, seed, size, fresh_noise):
        source = self.image(image, "first image")
        steps, seed, size = whole("Steps", steps, 2), whole("Seed", seed, 0), parse_size(size, self.pipe.sizes)
        if mode == "caption edit":
            if not (from_caption or "").strip() or not (to_caption or "").strip():
                raise gr.Error(
                    "A caption edit needs both captions: what the image shows, and what it should show",
                    print_exception=False,
                )
            target = {"from_caption": from_caption.strip(), "to_caption": to_caption.strip()}
            target["max_theta"] = float(max_theta)
        else:
            target = {"image2": self.image(image2, "second image")}
        with self.call() as pipe:
            out = pipe.interpolate(source, steps=steps, seed=seed, size=size, invert=not fresh_noise, **target)
            paths = self.save(out, "interpolate")
            return paths[:steps], paths[-1]

    def save(self, out, kind: str, folder: Path | None = None) -> list[str]:
        """An EditOutput's PNGs: its images first, then the decoder-size ones if any, then the grid."""
        return [str(p) for p in out.save(folder or self.run_folder(kind))]
