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
from torch import Tensor

from unclip.checkpoint import atomic_write_bytes, load_model, save_model
from unclip.clip import ClipAdapter
from unclip.diffusion import GaussianDiffusion
from unclip.imageio import make_grid, save_png, to_pil
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
DEFAULTS = {"prior": {**PRIOR_DEFAULTS, "candidates": 2}, "decoder": DECODER_DEFAULTS, "upsampler": UPSAMPLER_DEFAULTS}


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
        return cls(loaded.model, GaussianDiffusion.from_config(loaded.diffusion), dict(defaults), folder)

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

    def metadata(self, i: int) -> dict[str, Any]:
        meta = {"prompt": self.prompts[i], "seed": self.seeds[i], "settings": self.settings, "software": "unclip"}
        if self.clip_scores is not None:
            meta["clip_score"] = round(self.clip_scores[i], 4)
        return meta

    def save(self, folder: str | Path, stem: str | None = None) -> list[Path]:
        """Write image_XXX.png for each image (prompt, seed and settings in its text chunks) and grid.png.

        Returns:
            the image paths, then the grid's.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        stem = stem or _slug(self.prompts[0])
        paths = []
        for i, image in enumerate(to_pil(self.images)):
            paths.append(save_png(image, folder / f"{stem}_{self.seeds[i]:05d}.png", self.metadata(i)))
        grid = {"prompts": self.prompts, "seeds": self.seeds, "settings": self.settings}
        paths.append(save_png(make_grid(self.images), folder / f"{stem}_grid.png", grid))
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
        embeds = []
        for i, g in enumerate(generators):  # one generator per prompt: results do not depend on the batch
            with self._autocast():
                embeds.append(
                    sample_prior(
                        self.prior.model,
                        self.prior.diffusion,
                        text.embed[i : i + 1],
                        *(None if t is None else t[i : i + 1] for t in tokens),
                        generator=g,
                        **s,
                    )
                )
        return torch.cat(embeds)

    def decode(self, image_embed: Tensor, text, generators, settings=None, *, x_T=None, inpaint=None) -> Tensor:
        """2. decoder: CLIP image embedding (+ caption tokens) -> 64 px images."""
        stage = self.inpaint_stage if (inpaint is not None and self.inpaint_stage is not None) else self.decoder
        s = stage.settings(settings)
        size = stage.model.config.image_size
        if x_T is None:
            x_T = self.noise((stage.model.config.out_channels, size, size), generators)
        tokens = (None, None) if text is None else (text.tokens, text.mask)
        with self._autocast():
            return sample_decoder(
                stage.model,
                stage.diffusion,
                image_embed,
                *tokens,
                x_T=x_T,
                inpaint=inpaint,
                generator=generators[0],
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
        candidates: int = 1,
    ) -> PipelineOutput:
        """Generate one image per prompt.

        Args:
            prompts: B prompts (repeat a prompt for several images of it).
            size: 64, 256 or 1024 (what the pipeline has); default its decoder's size.
            seed: image i uses seed + i.
            use_prior: False decodes the raw text embedding (DALL·E 2's ablation, §5.1).
            prior, decoder: per-stage overrides of {"sampler", "steps", "guidance_scale"} (+ "candidates" for
                the prior); upsamplers: {folder name: overrides}.
            batch_size: prompts per decoder batch (all at once by default).
            candidates: make this many images per prompt and keep the one whose CLIP image embedding is most
                similar to the prompt's text embedding (DALL·E's reranking; Ramesh et al. 2021, §2.5).
        """
        prompts = check_prompts(prompts)
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        if candidates > 1:
            return self._rerank(
                prompts,
                candidates,
                size=size,
                seed=seed,
                use_prior=use_prior,
                prior=prior,
                decoder=decoder,
                upsamplers=upsamplers,
                batch_size=batch_size,
            )
        size = size or self.sizes[0]
        if size not in self.sizes:
            raise ValueError(f"size {size} is not one this pipeline makes; choose one of {self.sizes}")
        batch_size = batch_size or len(prompts)
        images, image_embeds, text_embeds = [], [], []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            generators = self.generators(seed + start, len(chunk))
            text = self.encode_text(chunk)
            image_embed = self.image_embeds_from_text(text, generators, prior, use_prior)
            out = self.decode(image_embed, text, generators, decoder)
            images.append(self.upsample(out, size, generators, upsamplers))
            image_embeds.append(image_embed)
            text_embeds.append(text.embed)
        settings = self.describe(
            size=size, seed=seed, use_prior=use_prior, prior=prior, decoder=decoder, upsamplers=upsamplers
        )
        return PipelineOutput(
            torch.cat(images),
            torch.cat(image_embeds),
            torch.cat(text_embeds),
            prompts,
            [seed + i for i in range(len(prompts))],
            settings,
        )

    def _rerank(self, prompts: list[str], candidates: int, *, seed: int, **kwargs) -> PipelineOutput:
        """Image i is the best of the images with seeds seed + i·candidates + j, j < candidates."""
        many = self([p for p in prompts for _ in range(candidates)], seed=seed, **kwargs)
        B = len(prompts)
        image_embed = self.clip.embed_image(many.images.to(self.device), normalize=True).float()
        scores = (image_embed * many.text_embeds.float()).sum(-1).view(B, candidates)
        best = scores.argmax(dim=1) + torch.arange(B, device=scores.device) * candidates
        pick = best.tolist()
        return PipelineOutput(
            many.images[best],
            many.image_embeds[best],
            many.text_embeds[best],
            prompts,
            [many.seeds[i] for i in pick],
            {**many.settings, "candidates": candidates},
            clip_scores=scores.max(dim=1).values.tolist(),
        )

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
        raise ValueError(f"pipeline folder {root} does not exist")
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
        shutil.copytree(source, out / name, dirs_exist_ok=True)
        if dtype is not None and name != "clip":
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
