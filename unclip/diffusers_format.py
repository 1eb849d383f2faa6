"""Published unCLIP weights in diffusers' folder layout, behind the pipeline's interfaces. The only module that
imports diffusers and transformers: `pip install -e '.[diffusers]'`.

    pipe = UnCLIPPipeline.from_pretrained("karlo-v1-alpha")   # a diffusers UnCLIPPipeline folder, loaded here
    clip, prior = load_prior("kandinsky-2-2-prior")             # a KandinskyV22PriorPipeline folder: a prior stage

A Karlo folder (kakaobrain/karlo-v1-alpha, or any diffusers `UnCLIPPipeline` saved with `save_pretrained`) holds
a CLIP text encoder (transformers' `CLIPTextModelWithProjection`) and tokenizer, a `PriorTransformer`, the
decoder (`UNet2DConditionModel` with a learned variance) and its `text_proj`, two super-resolution `UNet2DModel`s
(`super_res_first` for every step but the last, `super_res_last` for the last) and an `UnCLIPScheduler` per stage.
Its networks stay diffusers' modules; small wrappers give them the `model(x_t, t, **cond)` interface of
unclip.nets, and each scheduler becomes a `GaussianDiffusion` (its betas, prediction, variance and x_0 clipping,
and the "unclip" timestep spacing, both ends, that UnCLIPScheduler visits). With the same noise and timesteps,
the DDPM sampler reproduces diffusers' pipeline; every other sampler and edit of the pipeline runs on it too.

How these networks differ from unclip's own, and how the wrappers bridge it:
- Classifier-free guidance: the unconditional rows see the empty prompt's encoding "" (and, in the decoder,
  the learned null image embedding), not a learned null token. `cond_drop` rows get exactly that.
- Karlo reads CLIP's raw (not L2-normalised) embeddings. The raw text embedding is the text projection of the
  end token's state, so the wrappers recompute it from the token states the pipeline passes; the prior returns
  raw image embeddings (`unit_embeddings = False`). Unit-norm image embeddings (from an image's CLIP embedding
  in the edits, or slerps) are scaled by the decoder to the prior's typical norm, sqrt(|mean|² + |std|²).
- Reranking and the image edits need the image tower: a folder with `image_encoder/` and `feature_extractor/`
  (as kakaobrain/karlo-v1-alpha-image-variations has) provides it; without one they raise a ValueError.
"""

from __future__ import annotations

import dataclasses
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

try:
    from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from transformers import (
        CLIPImageProcessor,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        CLIPVisionModelWithProjection,
    )
except ImportError as e:  # an optional extra; a ValueError, which the command lines print as one line
    raise ValueError(
        f"loading diffusers folders needs diffusers and transformers ({e}): pip install -e '.[diffusers]'"
    ) from e

try:
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel
except ImportError:  # diffusers before the unCLIP pipelines were moved to deprecated/
    from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel

from unclip.checkpoint import fingerprint, read_json_object
from unclip.clip import TextEmbedding
from unclip.diffusion import GaussianDiffusion
from unclip.sampling import DecoderSettings, PriorSettings, UpsamplerSettings

KARLO_CLASSES = ("UnCLIPPipeline", "UnCLIPImageVariationPipeline")
PRIOR_CLASSES = ("KandinskyV22PriorPipeline", "KandinskyPriorPipeline", *KARLO_CLASSES)
KARLO_DEFAULTS = {  # diffusers' UnCLIPPipeline call defaults, where unclip's own differ
    "prior": PriorSettings(guidance_scale=4.0, candidates=1),
    "decoder": DecoderSettings(guidance_scale=8.0),
    "upsampler": UpsamplerSettings(sampler="ddpm", steps=7, noise_level=0),
}


def is_diffusers_folder(path: str | Path) -> bool:
    return (Path(path) / "model_index.json").is_file()


def read_index(root: Path) -> dict[str, Any]:
    index = read_json_object(root / "model_index.json")
    return {**index, "_class_name": index.get("_class_name")}


# -- CLIP --------------------------------------------------------------------------------------------------


class TransformersClip:
    """transformers' CLIP towers behind `ClipAdapter`'s interface (`embed_text`, `embed_image`, dimensions).

    The text side is a `CLIPTextModelWithProjection` and its `CLIPTokenizer`; the image side, when there is
    one, a `CLIPVisionModelWithProjection` and its `CLIPImageProcessor`. Frozen, in eval mode, float32.
    """

    def __init__(self, text_encoder, tokenizer, image_encoder=None, image_processor=None, *, device="cpu"):
        self.text_encoder = text_encoder.eval().requires_grad_(False).to(device=device, dtype=torch.float32)
        self.tokenizer = tokenizer
        self.image_encoder = image_encoder
        if image_encoder is not None:
            self.image_encoder = image_encoder.eval().requires_grad_(False).to(device=device, dtype=torch.float32)
        self.image_processor = image_processor

    @classmethod
    def from_folder(cls, root: Path, *, device="cpu") -> TransformersClip:
        """The text_encoder/ and tokenizer/ (and image_encoder/ with feature_extractor/ or image_processor/)."""
        image_encoder = image_processor = None
        if (root / "image_encoder").is_dir():
            image_encoder = CLIPVisionModelWithProjection.from_pretrained(root / "image_encoder")
            processor = next((root / n for n in ("feature_extractor", "image_processor") if (root / n).is_dir()), None)
            image_processor = CLIPImageProcessor.from_pretrained(processor) if processor else CLIPImageProcessor()
        text_encoder = CLIPTextModelWithProjection.from_pretrained(root / "text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
        return cls(text_encoder, tokenizer, image_encoder, image_processor, device=device)

    def fingerprint(self) -> str:
        towers = [self.text_encoder] + ([self.image_encoder] if self.image_encoder is not None else [])
        return fingerprint(*towers, {"vocab": len(self.tokenizer), "context_length": self.context_length})

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    @property
    def embed_dim(self) -> int:
        return int(self.text_encoder.config.projection_dim)

    dim = embed_dim

    @property
    def text_width(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    @property
    def context_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def to(self, device) -> TransformersClip:
        for tower in (self.text_encoder, self.image_encoder):
            if tower is not None:
                tower.to(device)
        return self

    def tokenize(self, prompts: str | list[str]) -> tuple[Tensor, Tensor]:
        """(ids, mask), both (B, L) on the CPU: the tokenizer's padding to L and attention mask, truncating (with
        a warning) prompts longer than L, as diffusers' pipelines do."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts to tokenize: the prompt list is empty")
        L = self.context_length
        out = self.tokenizer(prompts, padding="max_length", max_length=L, truncation=True, return_tensors="pt")
        too_long = [p for p in prompts if len(self.tokenizer(p).input_ids) > L]
        if too_long:
            warnings.warn(
                f"prompt {too_long[0][:80]!r} (and {len(too_long) - 1} more) is longer than the CLIP context "
                f"length of {L} tokens and was truncated",
                stacklevel=2,
            )
        return out.input_ids, out.attention_mask.bool()

    @torch.no_grad()
    def embed_text(self, prompts: str | list[str], *, normalize: bool = False) -> TextEmbedding:
        """TextEmbedding(embed (B, D), tokens (B, L, W) the last hidden states, mask (B, L), words (B, L, W) the
        input embeddings), padding zeroed, float32 on the adapter's device."""
        ids, mask = (x.to(self.device) for x in self.tokenize(prompts))
        out = self.text_encoder(ids)
        keep = mask[..., None]
        tokens = out.last_hidden_state.float().masked_fill(~keep, 0.0)
        words = self.text_encoder.get_input_embeddings()(ids).float().masked_fill(~keep, 0.0)
        embed = out.text_embeds.float()
        return TextEmbedding(F.normalize(embed, dim=-1) if normalize else embed, tokens, mask, words)

    @torch.no_grad()
    def embed_image(self, images: Tensor | list[Image.Image], *, normalize: bool = False) -> Tensor:
        """(B, D) image embeddings of (B, 3, H, W) images in [-1, 1] or PIL images, with the processor's resize,
        centre crop and mean/std."""
        if self.image_encoder is None:
            raise ValueError(
                "this pipeline's CLIP has no image tower, which reranking (candidates > 1) and the image edits "
                "need: add image_encoder/ and feature_extractor/ folders of the same CLIP (for Karlo, those of "
                "kakaobrain/karlo-v1-alpha-image-variations) to the folder"
            )
        if isinstance(images, Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"images must be (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
            pixels = self._preprocess((images.float().to(self.device) + 1) / 2)
        else:
            images = list(images)
            if not images:
                raise ValueError("no images to embed: the image list is empty")
            pixels = self.image_processor(images=images, return_tensors="pt").pixel_values.to(self.device)
        embed = self.image_encoder(pixel_values=pixels).image_embeds.float()
        return F.normalize(embed, dim=-1) if normalize else embed

    def _preprocess(self, images: Tensor) -> Tensor:
        """The processor's steps on a tensor in [0, 1]: shortest side to its size (bicubic), centre crop, mean/std."""
        p = self.image_processor
        size = p.size.get("shortest_edge", min(p.size.get("height", 224), p.size.get("width", 224)))
        crop = (p.crop_size["height"], p.crop_size["width"])
        H, W = images.shape[-2:]
        scale = size / min(H, W)
        images = F.interpolate(images, size=(round(H * scale), round(W * scale)), mode="bicubic", antialias=True)
        top, left = (images.shape[-2] - crop[0]) // 2, (images.shape[-1] - crop[1]) // 2
        images = images[..., top : top + crop[0], left : left + crop[1]].clamp(0, 1)
        mean = torch.tensor(p.image_mean, device=images.device)[:, None, None]
        std = torch.tensor(p.image_std, device=images.device)[:, None, None]
        return (images - mean) / std


class NullText(nn.Module):
    """The empty prompt's encoding, the unconditional input of guidance, and the raw text embedding of any
    prompt recomputed from its token states: the text projection of the end token's (the mask's last) state."""

    def __init__(self, clip: TransformersClip):
        super().__init__()
        self.projection = nn.Linear(clip.text_width, clip.embed_dim, bias=False)
        self.projection.load_state_dict(clip.text_encoder.text_projection.state_dict())
        null = clip.embed_text([""])
        self.register_buffer("tokens", null.tokens)
        self.register_buffer("mask", null.mask)

    def raw_embed(self, tokens: Tensor, mask: Tensor) -> Tensor:
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = torch.where(mask, positions, -1).amax(dim=1)
        return self.projection(tokens[torch.arange(len(tokens), device=tokens.device), last])

    def apply(self, drop: Tensor | None, tokens: Tensor | None, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(token states, mask, raw embedding) with the rows in `drop` (and rows without any token, the edits'
        "no caption") replaced by the empty prompt's."""
        B = len(drop) if drop is not None else len(tokens)
        null_tokens, null_mask = self.tokens.expand(B, -1, -1), self.mask.expand(B, -1)
        empty = torch.ones(B, dtype=torch.bool, device=null_mask.device) if mask is None else ~mask.any(dim=1)
        drop = empty if drop is None else drop | empty
        if bool(drop.all()):
            tokens, mask = null_tokens, null_mask
        elif tokens.shape[1] != null_tokens.shape[1]:
            raise ValueError(f"text tokens must have length {null_tokens.shape[1]}, got {tokens.shape[1]}")
        else:
            tokens = torch.where(drop[:, None, None], null_tokens, tokens.to(null_tokens.dtype))
            mask = torch.where(drop[:, None], null_mask, mask)
        return tokens, mask, self.raw_embed(tokens, mask)


# -- the stages' networks ------------------------------------------------------------------------------------


@dataclasses.dataclass
class PriorWrapConfig:
    clip_dim: int
    text_width: int
    threshold: Any = None
    unit_embeddings: bool = False  # the decoder reads raw embeddings (unclip.sampling.sample_prior)


class DiffusersPrior(nn.Module):
    """A diffusers `PriorTransformer` as `prior(x_t, t, text_embed=, text_tokens=, text_mask=, cond_drop=)`.

    `text_embed` (the pipeline's unit-norm one) is not read: the network takes the raw embedding, recomputed
    from the tokens. x_t lives in the prior's normalised space; `denormalize` is its `post_process_latents`.
    """

    def __init__(self, prior: PriorTransformer, null: NullText, threshold=None):
        super().__init__()
        self.prior, self.null = prior, null
        self.config = PriorWrapConfig(prior.config.embedding_dim, null.tokens.shape[-1], threshold)

    def forward(self, x_t, t, *, text_embed=None, text_tokens=None, text_mask=None, cond_drop=None) -> Tensor:
        tokens, mask, raw = self.null.apply(cond_drop, text_tokens, text_mask)
        out = self.prior(x_t, timestep=t, proj_embedding=raw, encoder_hidden_states=tokens, attention_mask=mask)
        return out.predicted_image_embedding

    def denormalize(self, x: Tensor) -> Tensor:
        return self.prior.post_process_latents(x)

    def typical_norm(self) -> float:
        """sqrt(|mean|² + |std|²): the mean norm of embeddings drawn from the prior's normalisation statistics."""
        mean, std = self.prior.clip_mean, self.prior.clip_std
        if mean is None or std is None:
            return 1.0
        with torch.no_grad():
            return float((mean.float().square().sum() + std.float().square().sum()).sqrt())


@dataclasses.dataclass
class DecoderWrapConfig:
    image_size: int
    clip_dim: int
    text_width: int
    out_channels: int = 3
    text_words: bool = False
    extra_in_channels: int = 0
    threshold: Any = "static"


class DiffusersDecoder(nn.Module):
    """Karlo's decoder (`text_proj` + `UNet2DConditionModel`) as `decoder(x_t, t, image_embed=, text_tokens=,
    text_mask=, cond_drop=)`. `cond_drop` (B,) drops both conditions; (B, 2) drops (image embedding, text):
    the image embedding becomes text_proj's learned null embedding, the text the empty prompt's."""

    def __init__(self, unet: UNet2DConditionModel, text_proj: UnCLIPTextProjModel, null: NullText, norm: float):
        super().__init__()
        self.unet, self.text_proj, self.null = unet, text_proj, null
        self.register_buffer("image_norm", torch.tensor(float(norm)))
        channels = unet.config.in_channels
        self.config = DecoderWrapConfig(unet.config.sample_size, text_proj.config.clip_embeddings_dim,
                                        null.tokens.shape[-1], channels)  # fmt: skip

    def forward(self, x_t, t, *, image_embed, text_tokens=None, text_mask=None, cond_drop=None, **_) -> Tensor:
        B = x_t.shape[0]
        drop = torch.zeros(B, 2, dtype=torch.bool, device=x_t.device) if cond_drop is None else cond_drop
        drop = drop[:, None].expand(B, 2) if drop.ndim == 1 else drop
        image_embed = self.scale_unit(image_embed.to(x_t.dtype))
        null_image = self.text_proj.learned_classifier_free_guidance_embeddings.to(image_embed.dtype)
        image_embed = torch.where(drop[:, :1], null_image[None], image_embed)
        tokens, mask, raw = self.null.apply(drop[:, 1], text_tokens, text_mask)
        hidden, added = self.text_proj(
            image_embeddings=image_embed,
            prompt_embeds=raw,
            text_encoder_hidden_states=tokens,
            do_classifier_free_guidance=False,
        )
        mask = F.pad(mask, (self.text_proj.clip_extra_context_tokens, 0), value=True)
        return self.unet(x_t, t, encoder_hidden_states=hidden, class_labels=added, attention_mask=mask).sample

    def scale_unit(self, image_embed: Tensor) -> Tensor:
        """Unit-norm rows (the edits' image embeddings and slerps) scaled to the prior's typical norm; raw ones,
        as the prior makes them, are left as they are."""
        unit = (image_embed.norm(dim=-1, keepdim=True) - 1).abs() < 1e-3
        return torch.where(unit, image_embed * self.image_norm, image_embed)


@dataclasses.dataclass
class UpsamplerWrapConfig:
    image_size: int
    low_res_size: int
    sample_noise_level: int = 0
    noise_aug_embed: bool = False
    clip_dim: int | None = None
    residual: bool = False


class DiffusersUpsampler(nn.Module):
    """Karlo's super-resolution pair as `upsampler(x_t, t, low_res=)`: the low-res image resized bicubically
    (antialiased) to x_t's size is concatenated to x_t; `last` denoises the final step (t = 0, where the
    "unclip" spacing ends), `first` every other."""

    def __init__(self, first: UNet2DModel, last: UNet2DModel | None, low_res_size: int):
        super().__init__()
        self.first, self.last = first, last
        self.config = UpsamplerWrapConfig(first.config.sample_size, low_res_size)

    def forward(self, x_t, t, *, low_res, **_) -> Tensor:
        up = F.interpolate(low_res.to(x_t.dtype), size=x_t.shape[-2:], mode="bicubic", align_corners=False,
                           antialias=True)  # fmt: skip
        net = self.last if self.last is not None and bool((t == 0).all()) else self.first
        return net(torch.cat([x_t, up], dim=1), t).sample


# -- loading -----------------------------------------------------------------------------------------------


def scheduler_diffusion(path: Path) -> tuple[GaussianDiffusion, Any]:
    """The GaussianDiffusion of an UnCLIPScheduler folder, and its x_0 threshold (None, "static" or a clamp)."""
    scheduler = UnCLIPScheduler.from_pretrained(path)
    config = scheduler.config
    predictions = {"epsilon": "eps", "sample": "x0"}
    if config.prediction_type not in predictions:
        raise ValueError(f"{path}: prediction_type {config.prediction_type!r} is not one UnCLIPScheduler supports")
    diffusion = GaussianDiffusion(
        scheduler.betas.double(),
        prediction=predictions[config.prediction_type],
        learned_variance=config.variance_type == "learned_range",
        spacing="unclip",
        clamp_variance=False,  # UnCLIPScheduler interpolates the learned log-variance without clamping
    )
    threshold = None
    if config.clip_sample:
        r = float(config.clip_sample_range)
        threshold = "static" if r == 1.0 else partial(torch.clamp, min=-r, max=r)
    return diffusion, threshold


def _scheduler_folder(root: Path, *names: str) -> Path:
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise ValueError(f"{root} has no scheduler folder (looked for {', '.join(names)}): the folder is incomplete")


def _require(root: Path, index: dict, names: tuple[str, ...]) -> None:
    missing = [n for n in names if not (root / n).is_dir()]
    if missing:
        raise ValueError(
            f"{root} is a diffusers {index['_class_name']} folder without {', '.join(missing)}: copy the whole "
            "folder (every subfolder that model_index.json names)"
        )


def load_prior(path: str | Path, *, device="cpu", dtype=torch.float32):
    """(clip, prior Stage) of a folder that holds a diffusers PriorTransformer and its CLIP: a Karlo folder, or
    Kandinsky 2.2's prior (KandinskyV22PriorPipeline: prior/, text_encoder/, tokenizer/, image_encoder/,
    image_processor/, scheduler/). Sample it with `pipe`-free `unclip.sampling.sample_prior`, e.g.

        clip, prior = load_prior("kandinsky-2-2-prior")
        text = clip.embed_text(["a red cat"], normalize=True)
        z = sample_prior(prior.model, prior.diffusion, text.embed, text.tokens, text.mask, **prior.defaults.kwargs())
    """
    from unclip.pipeline import Stage  # the pipeline imports this module only when it loads such a folder

    root = Path(path)
    index = _check_folder(root, PRIOR_CLASSES)
    _require(root, index, ("prior", "text_encoder", "tokenizer"))
    clip = TransformersClip.from_folder(root, device=device)
    return clip, _prior_stage(root, clip, Stage, device, dtype)


def _prior_stage(root: Path, clip: TransformersClip, stage_cls, device, dtype):
    diffusion, threshold = scheduler_diffusion(_scheduler_folder(root, "prior_scheduler", "scheduler"))
    prior = DiffusersPrior(PriorTransformer.from_pretrained(root / "prior"), NullText(clip), threshold)
    prior.to(device=device, dtype=dtype).eval()
    return stage_cls(prior, diffusion, KARLO_DEFAULTS["prior"], "prior")


def load_karlo(path: str | Path, *, device="cpu", dtype=torch.float32) -> dict[str, Any]:
    """The UnCLIPPipeline arguments (clip, prior, decoder, upsamplers, candidates) of a diffusers UnCLIPPipeline
    folder (kakaobrain/karlo-v1-alpha's layout)."""
    from unclip.pipeline import Stage

    root = Path(path)
    index = _check_folder(root, KARLO_CLASSES)
    _require(root, index, ("prior", "decoder", "text_proj", "text_encoder", "tokenizer", "super_res_first"))
    clip = TransformersClip.from_folder(root, device=device)
    prior = _prior_stage(root, clip, Stage, device, dtype)
    diffusion, threshold = scheduler_diffusion(_scheduler_folder(root, "decoder_scheduler"))
    decoder_net = DiffusersDecoder(
        UNet2DConditionModel.from_pretrained(root / "decoder"),
        UnCLIPTextProjModel.from_pretrained(root / "text_proj"),
        NullText(clip),
        prior.model.typical_norm(),
    )
    decoder_net.config.threshold = threshold
    decoder = Stage(decoder_net.to(device=device, dtype=dtype).eval(), diffusion, KARLO_DEFAULTS["decoder"], "decoder")
    first = UNet2DModel.from_pretrained(root / "super_res_first")
    last = UNet2DModel.from_pretrained(root / "super_res_last") if (root / "super_res_last").is_dir() else None
    up_diffusion, up_threshold = scheduler_diffusion(_scheduler_folder(root, "super_res_scheduler"))
    if up_threshold != "static":
        raise ValueError(f"{root}/super_res_scheduler: only x_0 clipping to [-1, 1] (clip_sample) is supported")
    up_net = DiffusersUpsampler(first, last, decoder_net.config.image_size).to(device=device, dtype=dtype).eval()
    size = up_net.config.image_size
    upsampler = Stage(up_net, up_diffusion, KARLO_DEFAULTS["upsampler"], f"upsampler_{size}")
    return {"clip": clip, "prior": prior, "decoder": decoder, "upsamplers": [upsampler], "candidates": 1}


def _check_folder(root: Path, classes: tuple[str, ...]) -> dict[str, Any]:
    if not root.is_dir():
        raise ValueError(f"folder {root} does not exist")
    if not is_diffusers_folder(root):
        raise ValueError(f"{root} has no model_index.json: it is not a diffusers pipeline folder")
    index = read_index(root)
    if index["_class_name"] in PRIOR_CLASSES and index["_class_name"] not in classes:
        raise ValueError(
            f"{root} holds a diffusers {index['_class_name']}: a prior and its CLIP, without a decoder to make "
            "images. Sample image embeddings from it with unclip.diffusers_format.load_prior (docs/pretrained.md)"
        )
    if index["_class_name"] not in classes:
        raise ValueError(
            f"{root} holds a diffusers {index['_class_name']}, which unclip cannot load here; it loads "
            f"{', '.join(classes)} folders"
        )
    return index
