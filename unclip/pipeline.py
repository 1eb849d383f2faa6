"""UnCLIPPipeline: CLIP -> prior -> decoder -> upsamplers (DALL·E 2, Ramesh et al. 2022, figure 2).

A pipeline folder holds one folder per component and a `pipeline.json` that names them:

    models/shapes/
      pipeline.json       {"format_version": 1, "clip": "clip", "prior": "prior", "decoder": "decoder",
                           "inpaint": null, "upsamplers": ["upsampler_256", "upsampler_1024"], "defaults": {...}}
      clip/               written by train/clip.py (open_clip layout)
      prior/ decoder/ upsampler_256/ ...   written by the trainers' exports (config.json + model.safetensors)

    pipe = UnCLIPPipeline.from_pretrained("models/shapes")
    out = pipe(["a red circle above a blue square"], size=256, seed=0)
    out.images          # (B, 3, 256, 256) in [-1, 1]
    pipe.variations("photo.png", n=4).save("outputs/")   # and .inpaint, .interpolate: DALL·E 2 §3 (edits.py)

Every image i of a call with seed s draws its noise from its own generator seeded s + i, so an image does not
depend on the batch it was made in, and the deterministic samplers (DPM-Solver++, DDIM with eta 0) reproduce
it exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch import Tensor

from unclip import edits
from unclip.checkpoint import atomic_save_safetensors, atomic_write_bytes, fingerprint, load_model, save_model
from unclip.clip import ClipAdapter
from unclip.diffusion import GaussianDiffusion
from unclip.imageio import make_grid, save_png, square_tensor, to_pil
from unclip.nets.unet import UNet
from unclip.sampling import (
    DECODER_DEFAULTS,
    PRIOR_DEFAULTS,
    UPSAMPLER_DEFAULTS,
    sample_decoder,
    sample_prior,
    sample_upsampler,
)

PIPELINE_FORMAT_VERSION = 1
DEFAULT_PIPELINE = str(Path(__file__).resolve().parent.parent / "models" / "shapes")  # the bundled model
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# candidates: the prior keeps the best of that many embeddings, the decoder the best of that many images (both
# by CLIP similarity to the prompt); the decoder's is applied by the text-to-image call
DEFAULTS = {
    "prior": {**PRIOR_DEFAULTS, "candidates": 2},
    "decoder": {**DECODER_DEFAULTS, "candidates": 1},
    "upsampler": UPSAMPLER_DEFAULTS,
}


@dataclasses.dataclass
class Stage:
    """One diffusion stage: its network, its diffusion process and its default sampling settings."""

    model: torch.nn.Module
    diffusion: GaussianDiffusion
    defaults: dict[str, Any]
    folder: str

    @classmethod
    def load(cls, root: Path, folder: str, defaults: dict[str, Any], device, dtype) -> Stage:
        loaded = load_model(root / folder, device=device, dtype=dtype)
        model = loaded.model
        if isinstance(model, UNet):  # image stages: NHWC convolutions sample faster (1.9x at 256 px on CPU)
            model.config.channels_last = True
            model.to(memory_format=torch.channels_last)
        return cls(model, GaussianDiffusion.from_config(loaded.diffusion), dict(defaults), folder)

    def settings(self, overrides: dict[str, Any] | None) -> dict[str, Any]:
        settings = {**self.defaults, **{k: v for k, v in (overrides or {}).items() if v is not None}}
        unknown = set(settings) - set(self.defaults)
        if unknown:
            raise ValueError(f"unknown {self.folder} settings {sorted(unknown)}; valid: {sorted(self.defaults)}")
        return settings


@dataclasses.dataclass
class PipelineOutput:
    images: Tensor  # (B, 3, size, size) in [-1, 1]
    image_embeds: Tensor  # (B, D) the CLIP image embeddings the decoder was conditioned on
    text_embeds: Tensor  # (B, D)
    prompts: list[str]
    seeds: list[int]  # image i is reproduced by seed seeds[i] (with candidates=1)
    settings: dict[str, Any]
    clip_scores: list[float] | None = None  # with reranking: the kept images' CLIP scores
    # with reranking, every candidate at the decoder's size, (B, candidates, 3, s, s), and its CLIP score
    # (B, candidates); candidate j of prompt i had seed seed + i·candidates + j
    candidate_images: Tensor | None = None
    candidate_scores: Tensor | None = None

    def metadata(self, i: int) -> dict[str, Any]:
        meta = {"prompt": self.prompts[i], "seed": self.seeds[i], "settings": self.settings, "software": "unclip"}
        if self.clip_scores is not None:
            meta["clip_score"] = round(self.clip_scores[i], 4)
        return meta

    def save(self, folder: str | Path, stem: str | None = None, nrow: int | None = None) -> list[Path]:
        """Write <prompt>_<seed>.png for each image (prompt, seed and settings in its text chunks) and a grid,
        <prompt>_grid.png (or <first prompt>_and_<k>_more_grid.png when the prompts differ), `nrow` a row. By
        default a run of several prompts, each repeated n > 1 times in a row, gets a grid row per prompt.

        Returns:
            the image paths, then the grid's.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i, image in enumerate(to_pil(self.images)):
            name = f"{stem or _slug(self.prompts[i])}_{self.seeds[i]:05d}.png"
            paths.append(save_png(image, folder / name, self.metadata(i)))
        others = len(dict.fromkeys(self.prompts)) - 1
        if nrow is None and others:
            repeats = next(i for i, p in enumerate(self.prompts) if p != self.prompts[0])
            nrow = repeats if repeats > 1 else None
        grid_stem = stem or _slug(self.prompts[0]) + (f"_and_{others}_more" if others else "")
        grid = {"prompts": self.prompts, "seeds": self.seeds, "settings": self.settings}
        paths.append(save_png(make_grid(self.images, nrow), folder / f"{grid_stem}_grid.png", grid))
        return paths


def _slug(text: str, limit: int = 48) -> str:
    slug = "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")
    return "_".join(filter(None, slug.split("_")))[:limit] or "image"


class UnCLIPPipeline:
    def __init__(
        self,
        clip: ClipAdapter,
        prior: Stage | None,
        decoder: Stage,
        upsamplers: list[Stage] = (),
        inpaint: Stage | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.clip, self.prior, self.decoder, self.inpaint_stage = clip, prior, decoder, inpaint
        self.upsamplers = list(upsamplers)
        self.device, self.dtype = torch.device(device), dtype

    # -- loading -----------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32"
    ) -> UnCLIPPipeline:
        """Load the pipeline folder at `path` (see the module docstring) onto `device` in `dtype`."""
        root = Path(path)
        index = read_index(root)
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        saved = index.get("defaults", {})  # per-stage settings that override the toolkit's defaults
        defaults = {
            stage: {**DEFAULTS.get(stage, DEFAULTS["upsampler"]), **saved.get(stage, {})}
            for stage in {*DEFAULTS, *saved}
        }
        clip = ClipAdapter.from_checkpoint(root / index["clip"], device=device)
        prior = Stage.load(root, index["prior"], defaults["prior"], device, dtype) if index.get("prior") else None
        decoder = Stage.load(root, index["decoder"], defaults["decoder"], device, dtype)
        upsamplers = [
            Stage.load(root, name, defaults.get(name, defaults["upsampler"]), device, dtype)
            for name in index.get("upsamplers", [])
        ]
        inpaint = (
            Stage.load(root, index["inpaint"], defaults["decoder"], device, dtype) if index.get("inpaint") else None
        )
        return cls(clip, prior, decoder, upsamplers, inpaint, device=device, dtype=dtype)

    def fingerprint(self) -> str:
        """A hash of what this pipeline samples with: every network's weights and every stage's default settings
        (`unclip.checkpoint.fingerprint`), not the folder it was loaded from: a copy has the same one."""
        stages = [s for s in (self.prior, self.decoder, *self.upsamplers, self.inpaint_stage) if s is not None]
        parts = []
        for s in stages:
            d = s.diffusion
            settings = {"folder": s.folder, "defaults": s.defaults, "prediction": d.prediction}
            parts += [s.model, d.betas, {**settings, "learned_variance": d.learned_variance}]
        return fingerprint(self.clip.fingerprint(), *parts)

    @property
    def sizes(self) -> list[int]:
        """The output sizes this pipeline can stop at: the decoder's, then each upsampler's."""
        return [self.decoder.model.config.image_size] + [s.model.config.image_size for s in self.upsamplers]

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def generators(self, seed: int, n: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(seed + i) for i in range(n)]

    def noise(self, shape: tuple[int, ...], generators: list[torch.Generator]) -> Tensor:
        """(B, ...) standard normal noise, row i from generators[i] (drawn on the CPU, then moved)."""
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)

    # -- the stages ----------------------------------------------------------------------------------------

    def encode_text(self, prompts: list[str]):
        prompts = check_prompts(prompts)
        return self.clip.embed_text(prompts, normalize=True)

    def image_embeds_from_text(self, text, generators, settings: dict[str, Any], use_prior: bool = True) -> Tensor:
        """1. prior: CLIP text embedding -> CLIP image embedding (or the raw text embedding, the ablation)."""
        if not use_prior:
            return text.embed
        if self.prior is None:
            raise ValueError("this pipeline has no prior; generate with use_prior=False or add a prior/ folder")
        s = self.prior.settings(settings)
        tokens = (text.tokens, text.mask) if self.prior.model.config.text_width else (None, None)
        with self._autocast():  # one generator per prompt: an embedding does not depend on its batch
            return sample_prior(self.prior.model, self.prior.diffusion, text.embed, *tokens, generator=generators, **s)

    def decode(self, image_embed: Tensor, text, generators, settings=None, *, x_T=None, inpaint=None) -> Tensor:
        """2. decoder: CLIP image embedding (+ caption tokens) -> 64 px images."""
        stage = self.inpaint_stage if (inpaint is not None and self.inpaint_stage is not None) else self.decoder
        s = stage.settings(settings)
        s.pop("candidates")  # the text-to-image call's reranking, not the sampler's
        tokens = (None, None) if text is None else (text.tokens, text.mask)
        with self._autocast():
            return sample_decoder(
                stage.model,
                stage.diffusion,
                image_embed,
                *tokens,
                text_words=None if text is None else text.words,
                x_T=x_T,
                inpaint=inpaint,
                generator=generators,
                **s,
            ).float()

    def upsample(self, images: Tensor, size: int, generators, settings: dict[str, dict] | None = None) -> Tensor:
        """3. upsamplers: 64 -> 256 (-> 1024), stopping at `size`."""
        if size not in self.sizes:
            raise ValueError(f"size {size} is not one this pipeline makes; choose one of {self.sizes}")
        for stage in self.upsamplers:
            if images.shape[-1] >= size:
                break
            s = stage.settings((settings or {}).get(stage.folder))
            outs = []
            for i, g in enumerate(generators):  # per image, so each image keeps its own random stream
                with self._autocast():
                    outs.append(sample_upsampler(stage.model, stage.diffusion, images[i : i + 1], generator=g, **s))
            images = torch.cat(outs).float()
        return images

    # -- text to image ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompts: str | list[str],
        *,
        size: int | None = None,
        seed: int = 0,
        use_prior: bool = True,
        prior: dict[str, Any] | None = None,
        decoder: dict[str, Any] | None = None,
        upsamplers: dict[str, dict[str, Any]] | None = None,
        batch_size: int | None = None,
        candidates: int | None = None,
        image_embeds: Tensor | None = None,
    ) -> PipelineOutput:
        """Generate one image per prompt.

        Args:
            prompts: B prompts (repeat a prompt for several images of it).
            size: 64, 256 or 1024 (what the pipeline has); default its decoder's size.
            seed: image i uses seed + i.
            use_prior: False decodes the raw text embedding (DALL·E 2's ablation, §5.1).
            prior, decoder: per-stage overrides of {"sampler", "steps", "guidance_scale", "candidates"} (+
                "text_guidance_scale" for the decoder); upsamplers: {folder name: overrides}.
            batch_size: prompts per decoder batch (all at once by default).
            candidates: make this many images per prompt and keep the one whose CLIP image embedding is most
                similar to the prompt's text embedding (DALL·E's reranking; Ramesh et al. 2021, §2.5); default
                the decoder's "candidates" setting (1 unless pipeline.json sets it). Candidates are scored at the
                decoder's resolution, so only the kept images go through the upsamplers.
            image_embeds: (B, D) CLIP image embeddings to decode instead of the prior's (e.g. those of real
                images of the prompts: the decoder's accuracy under a perfect prior); the prompts still give
                the decoder its caption tokens. With candidates, each is decoded that many times.
        """
        prompts = check_prompts(prompts)
        if candidates is None:
            candidates = self.decoder.settings(decoder)["candidates"]
        if not (isinstance(candidates, int) and candidates >= 1):
            raise ValueError(f"candidates must be a whole number >= 1, got {candidates}")
        decoder = {**(decoder or {}), "candidates": candidates}
        if image_embeds is not None:
            if image_embeds.shape != (len(prompts), self.clip.embed_dim):
                raise ValueError(
                    f"image_embeds must have shape ({len(prompts)}, {self.clip.embed_dim}) for {len(prompts)} "
                    f"prompts and this pipeline's CLIP, got {tuple(image_embeds.shape)}"
                )
        size = size or self.sizes[0]
        if size not in self.sizes:
            raise ValueError(f"size {size} is not one this pipeline makes; choose one of {self.sizes}")
        stages = {"use_prior": use_prior, "prior": prior, "decoder": decoder}
        if candidates > 1:
            many = [p for p in prompts for _ in range(candidates)]
            given = None if image_embeds is None else image_embeds.repeat_interleave(candidates, dim=0)
            images, decoded_embeds, text_embeds, generators = self._decode_all(
                many,
                list(range(seed, seed + len(many))),
                batch_size=batch_size or len(many),
                image_embeds=given,
                **stages,
            )
            # scored at the decoder's resolution, so that only the kept images are upsampled
            scores = self.clip_scores(images, text_embeds).view(len(prompts), candidates)
            candidate_images, candidate_scores = images.view(len(prompts), candidates, *images.shape[1:]), scores
            best = (scores.argmax(dim=1) + torch.arange(len(prompts), device=scores.device) * candidates).tolist()
            images, decoded_embeds, text_embeds = images[best], decoded_embeds[best], text_embeds[best]
            seeds, generators = [seed + i for i in best], [generators[i] for i in best]
            clip_scores = scores.max(dim=1).values.tolist()
        else:
            seeds, clip_scores = list(range(seed, seed + len(prompts))), None
            candidate_images = candidate_scores = None
            images, decoded_embeds, text_embeds, generators = self._decode_all(
                prompts, seeds, batch_size=batch_size or len(prompts), image_embeds=image_embeds, **stages
            )
        images = self.upsample(images, size, generators, upsamplers)
        settings = self.describe(
            size=size, seed=seed, use_prior=use_prior, prior=prior, decoder=decoder, upsamplers=upsamplers
        )
        if image_embeds is not None:
            settings.pop("prior", None)
            settings["use_prior"], settings["image_embeds"] = False, "given"
        return PipelineOutput(
            images,
            decoded_embeds,
            text_embeds,
            prompts,
            seeds,
            settings,
            clip_scores,
            candidate_images,
            candidate_scores,
        )

    def _decode_all(
        self, prompts: list[str], seeds: list[int], *, batch_size: int, use_prior, prior, decoder, image_embeds=None
    ) -> tuple[Tensor, Tensor, Tensor, list[torch.Generator]]:
        """Stages 1-2 for each prompt, `batch_size` at a time, prompt i from its own generator seeded seeds[i]:
        the decoder's images, the image and text embeddings, and the generators (to go on into the upsamplers)."""
        images, decoded_embeds, text_embeds, generators = [], [], [], []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            chunk_generators = [torch.Generator().manual_seed(s) for s in seeds[start : start + batch_size]]
            text = self.encode_text(chunk)
            if image_embeds is None:
                image_embed = self.image_embeds_from_text(text, chunk_generators, prior, use_prior)
            else:
                image_embed = image_embeds[start : start + batch_size].to(self.device, text.embed.dtype)
            images.append(self.decode(image_embed, text, chunk_generators, decoder))
            decoded_embeds.append(image_embed)
            text_embeds.append(text.embed)
            generators += chunk_generators
        return torch.cat(images), torch.cat(decoded_embeds), torch.cat(text_embeds), generators

    def clip_scores(self, images: Tensor, text_embeds: Tensor) -> Tensor:
        """(B,) cosine similarity of each image's CLIP embedding with its (normalised) text embedding."""
        image_embed = self.clip.embed_image(images.to(self.device), normalize=True).float()
        return (image_embed * text_embeds.float()).sum(-1)

    def describe(self, *, size, seed, use_prior=True, prior=None, decoder=None, upsamplers=None) -> dict[str, Any]:
        """The full settings of a call (defaults filled in), for the PNG metadata."""
        stages = {"decoder": self.decoder.settings(decoder)}
        if use_prior and self.prior is not None:
            stages["prior"] = self.prior.settings(prior)
        for stage in self.upsamplers:
            if stage.model.config.low_res_size < size:
                stages[stage.folder] = stage.settings((upsamplers or {}).get(stage.folder))
        return {
            "size": size,
            "seed": seed,
            "use_prior": use_prior,
            "dtype": str(self.dtype).removeprefix("torch."),
            **stages,
        }

    # -- edits (DALL·E 2 §3); their pieces are in unclip/edits.py ---------------------------------------------

    def _check_edit(self, size: int | None, n: int = 1) -> int:
        size = size or self.sizes[0]
        if size not in self.sizes:
            raise ValueError(f"size {size} is not one this pipeline makes; choose one of {self.sizes}")
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n (the number of images) must be an integer >= 1, got {n!r}")
        return size

    @torch.no_grad()
    def invert(
        self,
        image: Image.Image,
        image_embed: Tensor | None = None,
        *,
        steps: int = edits.INVERSION_STEPS,
        refine: int = edits.INVERSION_REFINE,
    ) -> Tensor:
        """The decoder's DDIM latent x_T (1, 3, s, s) of an image's centre square: with its L2-normalised CLIP
        embedding z_i (1, D), computed if None, the bipartite latent (z_i, x_T) of DALL·E 2 §3.1. The decoder
        is inverted conditioned on z_i and no caption (`edits.null_text`), at guidance scale 1."""
        if image_embed is None:
            image_embed = self.clip.embed_image([image], normalize=True).to(self.device)
        x_0 = square_tensor(image, self.sizes[0]).to(self.device)
        text = edits.null_text(1, self.decoder.model, self.device)
        with self._autocast():
            x_T = edits.invert_decoder(
                self.decoder.model, self.decoder.diffusion, x_0, image_embed, text, steps=steps, refine=refine
            )
        return x_T.float()

    @torch.no_grad()
    def variations(
        self,
        image: Image.Image | str | Path,
        *,
        n: int = 4,
        seed: int = 0,
        invert: bool = True,
        eta: float = edits.VARIATION_ETA,
        size: int | None = None,
        decoder: dict[str, Any] | None = None,
        upsamplers: dict[str, dict[str, Any]] | None = None,
        inversion_steps: int = edits.INVERSION_STEPS,
        refine: int = edits.INVERSION_REFINE,
    ) -> edits.EditOutput:
        """Variations of an image: decodings of its CLIP image embedding (DALL·E 2 §3.1, figure 3).

        Args:
            image: a PIL image or an image file. n: variation i uses seed + i.
            invert: decode the image's DDIM-inverted latent x_T (`invert`) with DDIM at `eta`, as the paper does:
                eta = 0 reconstructs the image, larger eta keeps less of it. False: decode fresh noise with the
                decoder's own sampler (what Karlo and diffusers do).
            decoder: overrides of {"sampler", "steps", "guidance_scale"}; with invert only "guidance_scale"
                (default 1, the model that was inverted: larger scales leave the path back to the image).
            inversion_steps, refine: DDIM inversion (and decoding) steps, and fixed-point iterations per step.
        """
        size = self._check_edit(size, n)
        # 1. the bipartite latent (z_i, x_T): CLIP image embedding (CLIP's own preprocessing), decoder inversion
        source, name = edits.open_source(image)
        image_embed = self.clip.embed_image([source], normalize=True).to(self.device)
        x_T = self.invert(source, image_embed, steps=inversion_steps, refine=refine) if invert else None
        generators = self.generators(seed, n)
        # 2. decoder: DDIM at eta from x_T (or fresh noise), one generator per image; 3. upsamplers (edit_output)
        embeds, x_T = image_embed.repeat(n, 1), None if x_T is None else x_T.repeat(n, 1, 1, 1)
        s, images = edits.decode_embeds(
            self, embeds, x_T, generators, decoder, invert=invert, eta=eta, steps=inversion_steps, refine=refine
        )
        stem, meta = f"{_slug(Path(name).stem)}_variations", {"mode": "variation", "source": name}
        fields = {"names": [f"{stem}_{seed + i:05d}" for i in range(n)], "stem": stem}
        per_image = [{"seed": seed + i} for i in range(n)]
        return edits.edit_output(
            self, images, embeds, generators, size, seed, upsamplers, {"decoder": s}, meta, per_image, fields
        )

    @torch.no_grad()
    def inpaint(
        self,
        image: Image.Image | str | Path,
        mask: Image.Image | str | Path,
        prompt: str,
        *,
        n: int = 4,
        seed: int = 0,
        size: int | None = None,
        method: str = "auto",
        resample: int = edits.REPAINT_RESAMPLE,
        use_prior: bool = True,
        prior: dict[str, Any] | None = None,
        decoder: dict[str, Any] | None = None,
        upsamplers: dict[str, dict[str, Any]] | None = None,
    ) -> edits.EditOutput:
        """Repaint the white part of `mask` to fit `prompt`, keeping the rest (GLIDE §3.3, DALL·E 2 figure 1).

        The decoder is conditioned on the prompt's prior embedding and tokens, as in generation. At the
        decoder's size s the pixels outside the mask (reduced to s, see `prepare_mask`) equal the input's; the
        upsamplers then re-render the whole image. `EditOutput.low_res` holds the size-s images.

        Args:
            mask: white = repaint, black = keep; see `edits.prepare_mask` for sizes and greyscale.
            method: "model" (the trained inpainting decoder, pipeline.json's "inpaint", with known-region
                replacement), "repaint" (training-free RePaint with the plain decoder, `resample` jumps back
                per step) or "auto" (the model if the pipeline has one).
            prior, decoder, upsamplers: per-stage overrides as in `__call__`.
        """
        size = self._check_edit(size, n)
        check_prompts(prompt)
        use_model = edits.use_inpaint_model(method, self.inpaint_stage is not None)
        source, name = edits.open_source(image)
        s = self.sizes[0]
        known = square_tensor(source, s).to(self.device)  # (1, 3, s, s)
        mask_s = edits.prepare_mask(mask, source.size, s).to(self.device)  # (1, 1, s, s), 1 = repaint
        # 1. prior: the prompt's CLIP image embedding; 2. decoder: fill the mask; 3. upsamplers (edit_output)
        text = self.encode_text([prompt] * n)
        generators = self.generators(seed, n)
        image_embed = self.image_embeds_from_text(text, generators, prior, use_prior)
        d, low_res = edits.inpaint_embeds(
            self, image_embed, text, known, mask_s, generators, decoder, use_model, resample
        )
        settings = {"use_prior": use_prior, "decoder": d}
        if use_prior and self.prior is not None:
            settings["prior"] = self.prior.settings(prior)
        stem, mask_name = f"{_slug(prompt)}_inpaint", str(mask) if isinstance(mask, (str, Path)) else "<mask>"
        meta = {"mode": "inpaint", "prompt": prompt, "source": name, "mask": mask_name}
        fields = {"names": [f"{stem}_{seed + i:05d}" for i in range(n)], "stem": stem, "low_res": low_res}
        per_image = [{"seed": seed + i} for i in range(n)]
        return edits.edit_output(
            self, low_res, image_embed, generators, size, seed, upsamplers, settings, meta, per_image, fields
        )

    @torch.no_grad()
    def interpolate(
        self,
        image: Image.Image | str | Path,
        *,
        image2: Image.Image | str | Path | None = None,
        prompt: str | None = None,
        from_caption: str | None = None,
        to_caption: str | None = None,
        steps: int = 5,
        max_theta: float = 0.5,
        seed: int = 0,
        invert: bool = True,
        size: int | None = None,
        prior: dict[str, Any] | None = None,
        decoder: dict[str, Any] | None = None,
        upsamplers: dict[str, dict[str, Any]] | None = None,
        inversion_steps: int = edits.INVERSION_STEPS,
        refine: int = edits.INVERSION_REFINE,
    ) -> edits.EditOutput:
        """Frames that move an image's CLIP embedding z_1 toward a target z_2 by slerp (DALL·E 2 §3.2-3.3).

        Give exactly one target:
            image2: z_2 is a second image's embedding; t runs over [0, 1] (§3.2, figure 4).
            prompt: z_2 is the prior's image embedding for the prompt (drawn with `seed`); t over [0, 1].
            from_caption + to_caption: a text diff (§3.3, figure 5): z_2 = z_d = normalize(z_t(to) - z_t(from)),
                and θ runs over [0, max_theta] (the paper goes up to about 0.5; beyond, z_d's content takes over).

        With invert (default), frames decode DDIM-inverted latents with DDIM eta 0: for two images the slerp of
        both latents, so that the ends reconstruct the images (§3.2's first option); otherwise the image's own
        latent. Without invert, every frame decodes the same noise drawn from `seed` (§3.2's second option).
        All frames use the null caption, so that only the embedding changes along the way.

        Args:
            steps: number of frames, >= 2, ends included.
        """
        size = self._check_edit(size)
        mode = edits.interpolation_mode(image2, prompt, from_caption, to_caption, steps)
        # 1. the start: the image's CLIP embedding z_1 and decoder latent x_1 (inverted, or fresh noise)
        source, name = edits.open_source(image)
        z_1 = self.clip.embed_image([source], normalize=True).to(self.device)
        if invert:
            x_1 = self.invert(source, z_1, steps=inversion_steps, refine=refine)
        else:
            x_1 = self.noise((3, self.sizes[0], self.sizes[0]), self.generators(seed, 1))
        # 2. the target z_2 (and x_2)
        x_2, settings = x_1, {}
        if mode == "images":
            source2, name2 = edits.open_source(image2)
            z_2 = self.clip.embed_image([source2], normalize=True).to(self.device)
            x_2 = self.invert(source2, z_2, steps=inversion_steps, refine=refine) if invert else x_1
            ends = {"image2": name2}
        elif mode == "prompt":
            z_2 = self.image_embeds_from_text(self.encode_text([prompt]), self.generators(seed, 1), prior)
            ends, settings = {"prompt": prompt}, {"prior": self.prior.settings(prior)}
        else:
            z_t = self.encode_text([from_caption, to_caption]).embed
            z_2 = F.normalize(z_t[1:] - z_t[:1], dim=-1)  # z_d, the text diff (§3.3)
            ends = {"from_caption": from_caption, "to_caption": to_caption}
        # 3. slerp, then decode every frame with the same decoder noise; 4. upsamplers (in edit_output)
        fractions = torch.linspace(0, max_theta if mode == "text_diff" else 1, steps, dtype=torch.float64).tolist()
        embeds = torch.cat([edits.slerp(z_1, z_2, f) for f in fractions])
        x_T = torch.cat([edits.slerp(x_1, x_2, f) for f in fractions])
        generators = [torch.Generator().manual_seed(seed) for _ in fractions]  # the same noise for every frame
        settings["decoder"], images = edits.decode_embeds(
            self, embeds, x_T, generators, decoder, invert=invert, eta=0.0, steps=inversion_steps, refine=refine
        )
        key, stem = ("theta" if mode == "text_diff" else "t"), f"{_slug(Path(name).stem)}_{mode}"
        meta = {"mode": mode if mode == "text_diff" else f"interpolate_{mode}", "source": name, **ends, "seed": seed}
        per_image = [{"frame": i, key: round(f, 6)} for i, f in enumerate(fractions)]
        fields = {"names": [f"{stem}_{i:02d}" for i in range(steps)], "stem": stem, "nrow": steps}
        return edits.edit_output(
            self, images, embeds, generators, size, seed, upsamplers, settings, meta, per_image, fields
        )


def check_prompts(prompts: str | list[str]) -> list[str]:
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"empty prompt {p!r}: describe the image to generate, e.g. 'a red circle'")
    return prompts


def read_index(root: Path) -> dict[str, Any]:
    """Read and check pipeline.json."""
    if not root.is_dir():
        raise ValueError(
            f"pipeline folder {root} does not exist; pass --pipeline with a folder assembled by train/pipeline.py "
            "from trained components (see README.md, 'Train the cascade')"
        )
    index_path = root / "pipeline.json"
    if not index_path.is_file():
        raise ValueError(
            f"{root} has no pipeline.json: it is not a pipeline folder. A pipeline folder holds pipeline.json "
            "and the clip/, prior/, decoder/ (and upsampler) folders; see README.md"
        )
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{index_path} is not valid JSON ({e})") from e
    if index.get("format_version") != PIPELINE_FORMAT_VERSION:
        raise ValueError(
            f"{index_path} has format_version {index.get('format_version')!r}; this unclip reads "
            f"{PIPELINE_FORMAT_VERSION}. Re-create the pipeline folder with this version"
        )
    for key in ("clip", "decoder"):
        if not index.get(key):
            raise ValueError(f"{index_path} names no {key} folder; a pipeline needs at least clip and decoder")
    names = [index["clip"], index["decoder"], index.get("prior"), index.get("inpaint"), *index.get("upsamplers", [])]
    missing = [n for n in names if n and not (root / n).is_dir()]
    if missing:
        raise ValueError(f"{root} is incomplete: pipeline.json names {missing}, which are not there")
    return index


def build_pipeline_folder(
    out: str | Path,
    *,
    clip: str | Path,
    decoder: str | Path,
    prior: str | Path | None = None,
    upsamplers: list[str | Path] = (),
    inpaint: str | Path | None = None,
    defaults: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Assemble a pipeline folder from exported components (copies them, writes pipeline.json).

    Args:
        dtype: re-save the diffusion components' weights in this dtype (torch.float16 for bundled models).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, Any] = {"format_version": PIPELINE_FORMAT_VERSION, "upsamplers": []}
    parts = [("clip", clip), ("prior", prior), ("decoder", decoder), ("inpaint", inpaint)]
    parts += [(f"upsampler_{i}", p) for i, p in enumerate(upsamplers)]
    for name, source in parts:
        if source is None:
            index[name] = None
            continue
        if name.startswith("upsampler_"):
            name = f"upsampler_{json.loads((Path(source) / 'config.json').read_text())['model']['image_size']}"
            index["upsamplers"].append(name)
        else:
            index[name] = name
        if not Path(source).is_dir():
            raise ValueError(f"{source} is not a folder: pass the component's export folder (runs/NAME/export)")
        if Path(source).resolve() != (out / name).resolve():  # a component may already live in the folder
            shutil.copytree(source, out / name, dirs_exist_ok=True)
        if dtype is not None and name == "clip":
            cast_weights(out / name, dtype)  # the adapter loads them into its fp32 model
        elif dtype is not None:
            loaded = load_model(out / name)
            save_model(
                loaded.model,
                out / name,
                kind=loaded.meta["kind"],
                diffusion=loaded.diffusion,
                clip=loaded.clip,
                dtype=dtype,
            )
    index["defaults"] = defaults or {}
    atomic_write_bytes(out / "pipeline.json", json.dumps(index, indent=2).encode())
    return out


def cast_weights(folder: Path, dtype: torch.dtype) -> None:
    """Re-save every floating-point tensor of the .safetensors files in `folder` as `dtype`."""
    for path in Path(folder).glob("*.safetensors"):
        tensors = load_file(str(path))
        atomic_save_safetensors({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, path)
