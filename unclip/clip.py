"""ClipAdapter: the frozen CLIP that conditions the cascade. With `unclip.clip_models`, the only modules that
import open_clip.

unCLIP (Ramesh et al. 2022, section 2) conditions every stage on a CLIP: the prior maps the text embedding
to an image embedding, and the decoder reads the image embedding and the per-token text encodings. This file
puts open_clip (https://github.com/mlfoundations/open_clip, MIT) behind one small interface, as
DALLE2-pytorch's `BaseClipAdapter` does: `embed_text`, `embed_image`, `tokenize` and the dimensions. Swapping
CLIP libraries touches only these two files.

A CLIP comes from one of three places (`ClipAdapter.from_config` picks by which `ClipConfig` field is set):

    clip.model_name + clip.pretrained   # open_clip architecture + pretrained tag (or weights file)
    clip.checkpoint                     # a folder written by `save_clip` (the CLIP trainer)
    clip.model_config [+ pretrained]    # an open_clip model-config dict, e.g. TINY_CLIP_CONFIG for tests

The checkpoint folder format and the building blocks live in `unclip.clip_models`.

Pretrained tags need the weights on disk: they are fetched from the Hugging Face Hub and cached there. On a
machine without network set HF_HUB_OFFLINE=1 before anything imports huggingface_hub; huggingface_hub
otherwise retries the network for a while before `from_pretrained` raises its ValueError.
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from unclip.checkpoint import check_safetensors, fingerprint
from unclip.clip_models import (
    build_clip_model,
    build_tokenizer,
    default_preprocess_cfg,
    image_transform,
    model_preprocess_cfg,
    read_clip_checkpoint,
    save_clip,
    set_preprocess_cfg,
)
from unclip.config import ClipConfig

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WEIGHTS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz")  # what names a weights file, not a tag

# A 2.5M-parameter ViT + text transformer for tests; 96% of it is the 49408-token embedding that the CLIP
# tokenizer needs. Text width W = 48 differs from embed_dim D = 32 so that tests catch a mixed-up D and W.
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 48, "heads": 3, "layers": 2},
}


class TextEmbedding(NamedTuple):
    embed: Tensor  # (B, D) pooled, projected text embedding, in the image-embedding space
    tokens: Tensor  # (B, L, W) final hidden states after ln_final, before the projection; padding zeroed
    mask: Tensor  # (B, L) bool, True for real tokens (SOT ... EOT), False for padding
    words: Tensor  # (B, L, W) the text transformer's input word embeddings, before positions; padding zeroed


class ClipAdapter:
    """A frozen open_clip CLIP in eval mode, seen through `embed_text`, `embed_image` and its dimensions.

    Not an `nn.Module` on purpose: a network that holds the adapter never saves CLIP's weights in its own
    state_dict, and optimizers and `accelerator.prepare` never see them. Outputs are computed under
    `torch.no_grad()` (not `inference_mode`, whose tensors cannot be saved for a later backward pass) and
    returned as float32 whatever `precision` the weights are cast to.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        model_config: dict[str, Any],
        *,
        precision: str = "fp32",
        device: str | torch.device = "cpu",
    ):
        """Wrap an open_clip model; the adapter takes it over, freezing and casting it in place.

        Args:
            model: an open_clip `CLIP` or `CustomTextCLIP`.
            tokenizer: an open_clip tokenizer (`tokenizer(texts, context_length) -> (B, L) ids`).
            model_config: the open_clip model config the model was built from (embed_dim, vision_cfg, ...).
            precision: "fp32", "fp16" or "bf16"; the weights are cast to it.
        """
        if precision not in DTYPES:
            raise ValueError(f"clip precision must be one of {list(DTYPES)}, got {precision!r}")
        if not isinstance(model, (open_clip.CLIP, open_clip.CustomTextCLIP)):
            raise ValueError(f"ClipAdapter supports open_clip CLIP and CustomTextCLIP, got {type(model).__name__}")
        self.model = model.eval().requires_grad_(False).to(device=device, dtype=DTYPES[precision])
        self.tokenizer = tokenizer
        self.model_config = copy.deepcopy(model_config)
        self.precision = precision
        self.preprocess_cfg = model_preprocess_cfg(model, model_config)
        self.preprocess = image_transform(self.preprocess_cfg)

    def fingerprint(self) -> str:
        """A hash of the weights and model config (`unclip.checkpoint.fingerprint`), not of the path."""
        return fingerprint(self.model, self.model_config)

    # ---- builders ----

    @classmethod
    def from_config(cls, config: ClipConfig, *, device: str | torch.device = "cpu") -> ClipAdapter:
        """Build the CLIP that a run config's `clip:` section names (see the module docstring)."""
        sources = [n for n in ("checkpoint", "model_config", "model_name") if getattr(config, n) is not None]
        if len(sources) != 1:
            raise ValueError(
                "clip: set exactly one of clip.checkpoint (a folder written by train/clip.py), "
                "clip.model_config (an open_clip model-config dict) or clip.model_name (+ clip.pretrained); "
                f"got {sources or 'none'}"
            )
        if config.checkpoint is not None:
            if config.pretrained is not None:
                raise ValueError("clip.pretrained cannot be combined with clip.checkpoint (it holds its weights)")
            return cls.from_checkpoint(config.checkpoint, precision=config.precision, device=device)
        if config.model_config is not None:
            return cls.from_model_config(
                config.model_config, weights=config.pretrained, precision=config.precision, device=device
            )
        if config.pretrained is None:
            raise ValueError(
                f"clip.model_name={config.model_name!r} needs clip.pretrained (a pretrained tag such as "
                f"{_known_tags(config.model_name)[:3]} or a weights file): a randomly initialised frozen "
                "CLIP conditions nothing useful; use clip.model_config for random test CLIPs"
            )
        return cls.from_pretrained(config.model_name, config.pretrained, precision=config.precision, device=device)

    @classmethod
    def from_pretrained(
        cls, model_name: str, pretrained: str, *, precision: str = "fp32", device: str | torch.device = "cpu"
    ) -> ClipAdapter:
        """An open_clip architecture with a pretrained tag ("laion2b_s34b_b79k") or a weights file.

        A tag brings its preprocessing (mean, std) and, for weights trained with QuickGELU, that activation; a
        file gets open_clip's default preprocessing and the activation its architecture name says.

        Raises:
            ValueError: for an unknown name or tag, a missing file, a file of another architecture, or when the
                tag's weights are neither cached nor downloadable (e.g. offline).
        """
        name = model_name.replace("/", "-")
        if name not in open_clip.list_models():
            close = difflib.get_close_matches(name, open_clip.list_models(), n=4, cutoff=0.6)
            hint = f"did you mean {' or '.join(map(repr, close))}? " if close else ""
            raise ValueError(
                f"unknown open_clip model {model_name!r}; {hint}open_clip.list_models() lists the known names "
                "(e.g. 'ViT-B-32', 'ViT-L-14')"
            )
        tag = _pretrained_tag(name, pretrained)
        # open_clip builds a tag's model with the name's activation and only warns when the weights were trained
        # with QuickGELU (OpenAI's and some LAION-400M tags): the model then computes something else, so use theirs
        quick_gelu = bool(tag.get("quick_gelu")) and not open_clip.get_model_config(name).get("quick_gelu")
        try:
            model = open_clip.create_model(
                model_name, pretrained=pretrained, require_pretrained=True, force_quick_gelu=quick_gelu
            )
        except (RuntimeError, AssertionError, KeyError) as e:  # open_clip asserts on some mismatches
            if not tag:
                raise ValueError(
                    f"could not load CLIP weights {pretrained} into open_clip {model_name!r}: "
                    f"{_short_load_error(e)} (is the file a checkpoint of this architecture?)"
                ) from e
            raise ValueError(
                f"could not find the weights of open_clip {model_name!r} / {pretrained!r} offline: they are "
                "not in the Hugging Face cache and could not be downloaded. Download them once where there "
                "is network (they are cached under $HF_HOME), or pass a local checkpoint: "
                "clip.pretrained=/path/to/weights.safetensors or clip.checkpoint=<folder written by "
                "train/clip.py>. Set HF_HUB_OFFLINE=1 on machines without network to fail at once. "
                f"open_clip said: {e}"
            ) from e
        model_config = open_clip.get_model_config(name)
        if quick_gelu:
            model_config["quick_gelu"] = True  # a saved copy rebuilds the same activation
        tokenizer = open_clip.get_tokenizer(model_name)
        return cls(model, tokenizer, model_config, precision=precision, device=device)

    @classmethod
    def from_checkpoint(
        cls, directory: str | Path, *, precision: str = "fp32", device: str | torch.device = "cpu"
    ) -> ClipAdapter:
        """A folder written by `save_clip` (or a snapshot of an open_clip Hugging Face repository)."""
        model_config, weights, preprocess_cfg = read_clip_checkpoint(directory)
        return cls.from_model_config(
            model_config, weights=weights, preprocess_cfg=preprocess_cfg, precision=precision, device=device
        )

    @classmethod
    def from_model_config(
        cls,
        model_config: dict[str, Any],
        *,
        weights: str | Path | None = None,
        preprocess_cfg: dict[str, Any] | None = None,
        precision: str = "fp32",
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> ClipAdapter:
        """A CLIP built from an open_clip model config (`embed_dim`, `vision_cfg`, `text_cfg`, ...).

        Args:
            model_config: e.g. TINY_CLIP_CONFIG, or the `model_cfg` of a checkpoint.
            weights: a state_dict file (.safetensors, .bin, .pt); None keeps the random initialisation,
                which is seeded by `seed` so that the same config always gives the same CLIP.
            preprocess_cfg: open_clip preprocessing (size, mean, std, interpolation, resize_mode); its
                defaults are open_clip's (OpenAI mean/std) with the config's image size.
        """
        model = build_clip_model(model_config, seed=seed)
        if weights is not None:
            if not os.path.isfile(weights):
                raise ValueError(f"CLIP weights file {weights} does not exist")
            if str(weights).endswith(".safetensors"):
                check_safetensors(weights)  # an empty or truncated file is named, not a traceback
            open_clip.load_checkpoint(model, str(weights))
        preprocess_cfg = {**default_preprocess_cfg(model_config), **(preprocess_cfg or {})}
        set_preprocess_cfg(model, preprocess_cfg)
        tokenizer = build_tokenizer(model_config)
        return cls(model, tokenizer, model_config, precision=precision, device=device)

    # ---- properties ----

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    @property
    def embed_dim(self) -> int:
        """D: width of the text and image embeddings."""
        return int(self.model_config["embed_dim"])

    dim = embed_dim

    @property
    def text_width(self) -> int:
        """W: width of the per-token text encodings."""
        if isinstance(self.model, open_clip.CLIP):
            return self.model.ln_final.weight.shape[0]
        text = self.model.text
        return text.width if hasattr(text, "width") else text.config.hidden_size

    @property
    def context_length(self) -> int:
        """L: number of text tokens, SOT and EOT included."""
        return int(self.model.context_length)

    @property
    def image_size(self) -> int | tuple[int, int]:
        size = self.preprocess_cfg["size"]
        if isinstance(size, (tuple, list)):
            return size[0] if size[0] == size[1] else tuple(size)
        return size

    def to(self, device: str | torch.device) -> ClipAdapter:
        self.model.to(device)
        return self

    # ---- text ----

    def tokenize(self, prompts: str | list[str]) -> Tensor:
        """Token ids with the model's own tokenizer, truncating (with a warning) prompts longer than L.

        Returns:
            (B, L) int64 ids on the CPU.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts to tokenize: the prompt list is empty")
        L = self.context_length
        # tokenizing to L + 1 shows which prompts need more than L tokens: their position L is not padding
        too_long = [
            p for p, ids in zip(prompts, self.tokenizer(prompts, L + 1), strict=True) if ids[L] != self._pad_id
        ]
        if too_long:
            others = f" (and {len(too_long) - 1} more prompts)" if len(too_long) > 1 else ""
            warnings.warn(
                f"prompt {_shorten(too_long[0])!r}{others} is longer than the CLIP context length of {L} "
                "tokens and was truncated",
                stacklevel=2,
            )
        return self.tokenizer(prompts, L)

    def token_mask(self, ids: Tensor) -> Tensor:
        """(B, L) bool: True up to and including each sequence's last non-padding token (EOT)."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        last = torch.where(ids != self._pad_id, positions, -1).amax(dim=1)  # (B,)
        return positions[None] <= last[:, None]

    @torch.no_grad()
    def embed_text(self, prompts: str | list[str], *, normalize: bool = False) -> TextEmbedding:
        """Encode prompts (Ramesh et al. 2022: z_t and the text encoder's token outputs).

        Args:
            prompts: B strings.
            normalize: L2-normalise `.embed` (CLIP's contrastive space); off by default.

        Returns:
            TextEmbedding(embed (B, D), tokens (B, L, W), mask (B, L), words (B, L, W)), float32 on the
            adapter's device. `words` are what the text transformer reads: CLIP's contrastive objective never
            asks it to tell "above" from "below", and its final states for such words can barely differ, while
            the input embeddings of any two words are distinct.
        """
        ids = self.tokenize(prompts).to(self.device)
        mask = self.token_mask(ids)
        embed, tokens = self._encode_text(ids)
        tokens = tokens.float().masked_fill(~mask[..., None], 0.0)
        words = self._word_embedding(ids).float().masked_fill(~mask[..., None], 0.0)
        embed = embed.float()
        return TextEmbedding(F.normalize(embed, dim=-1) if normalize else embed, tokens, mask, words)

    def _word_embedding(self, ids: Tensor) -> Tensor:
        owner = self.model if isinstance(self.model, open_clip.CLIP) else self.model.text
        table = getattr(owner, "token_embedding", None)
        if table is None:  # a Hugging Face text tower
            table = owner.transformer.get_input_embeddings()
        return table(ids)

    def _encode_text(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        text = getattr(self.model, "text", None)
        if text is not None and not hasattr(text, "forward_intermediates"):  # a Hugging Face text tower
            previous, text.output_tokens = text.output_tokens, True
            try:
                return text(ids)
            finally:
                text.output_tokens = previous
        # the last block's output after ln_final is exactly what the pooled embedding is taken from
        out = self.model.forward_intermediates(text=ids, text_indices=1, normalize=False, normalize_intermediates=True)
        return out["text_features"], out["text_intermediates"][-1]

    # ---- images ----

    @torch.no_grad()
    def embed_image(self, images: Tensor | list[Image.Image], *, normalize: bool = False) -> Tensor:
        """Encode images with the model's own preprocessing (resize, centre crop, mean/std).

        Args:
            images: (B, 3, H, W) floats in [-1, 1] (the project's convention), or a list of PIL images.
            normalize: L2-normalise the embeddings.

        Returns:
            (B, D) float32 image embeddings z_i on the adapter's device.
        """
        if isinstance(images, Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"images must be (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
            # open_clip's transform is torchvision ops, which take (B, 3, H, W) tensors in [0, 1] too
            pixels = self.preprocess((images.float().to(self.device) + 1) / 2)
        else:
            images = list(images)
            if not images:
                raise ValueError("no images to embed: the image list is empty")
            pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device)
        embed = self.model.encode_image(pixels.to(self.dtype)).float()
        return F.normalize(embed, dim=-1) if normalize else embed

    # ---- saving ----

    def save(self, directory: str | Path, *, name: str = "unclip-clip") -> Path:
        """Write this CLIP as a checkpoint folder (weights in fp32), see `save_clip`."""
        return save_clip(self.model, self.model_config, directory, preprocess_cfg=self.preprocess_cfg, name=name)

    @property
    def _pad_id(self) -> int:
        hf_tokenizer = getattr(self.tokenizer, "tokenizer", None)  # open_clip's HFTokenizer / SigLipTokenizer
        return 0 if hf_tokenizer is None else int(hf_tokenizer.pad_token_id)


def _known_tags(model_name: str) -> list[str]:
    return open_clip.list_pretrained_tags_by_model(model_name.replace("/", "-"))


def _pretrained_tag(name: str, pretrained: str) -> dict[str, Any]:
    """open_clip's settings of a pretrained tag of `name`; {} for a weights file (a tag wins, as in open_clip).

    Raises:
        ValueError: when `pretrained` is neither a tag of `name` nor an existing file.
    """
    tag = open_clip.get_pretrained_cfg(name, pretrained)
    if tag or os.path.isfile(pretrained):
        return tag
    if os.path.isdir(pretrained):
        raise ValueError(
            f"clip.pretrained={pretrained!r} is a folder: give the weights file inside it, or a folder written by "
            "train/clip.py as clip.checkpoint instead of clip.model_name + clip.pretrained"
        )
    if os.sep in pretrained or Path(pretrained).suffix in WEIGHTS_SUFFIXES:
        where = "" if os.path.isabs(pretrained) else f" (relative to the current folder {os.getcwd()})"
        raise ValueError(f"CLIP weights file {pretrained} does not exist{where}")
    raise ValueError(
        f"clip.pretrained={pretrained!r} is neither a file nor a pretrained tag of {name!r}; tags: {_known_tags(name)}"
    )


def _short_load_error(error: Exception) -> str:
    """open_clip's loading error on one line, cut short: load_state_dict's lists every one of hundreds of keys."""
    text = " ".join(str(error).split()) or type(error).__name__
    return _shorten(text, 300)


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
