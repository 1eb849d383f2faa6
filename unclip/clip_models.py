"""open_clip models as this project builds, saves and trains them: the checkpoint folder format, seeded random
models from a model config, tokenizers, image preprocessing and the contrastive loss. `ClipAdapter`
(`unclip.clip`) loads CLIPs through these; the CLIP trainer (`unclip.tasks.clip`) uses them directly. open_clip is
https://github.com/mlfoundations/open_clip (MIT).

A checkpoint folder uses open_clip's own Hugging Face Hub layout, so open_clip reads it too:

    runs/clip/export/clip/
      open_clip_config.json         # {"model_cfg": {...}, "preprocess_cfg": {...}, "unclip": {...}}
      open_clip_model.safetensors   # the whole CLIP state_dict, fp32
      unclip-clip.json              # the bare model_cfg again, named for open_clip.add_model_config

With open_clip 3.x (tested with 3.3) either of these rebuilds the same CLIP, with no unclip code involved:

    model = open_clip.create_model("local-dir:runs/clip/export/clip")     # config + preprocess + weights

    open_clip.add_model_config("runs/clip/export/clip/unclip-clip.json")  # registers the name "unclip-clip"
    weights = "runs/clip/export/clip/open_clip_model.safetensors"
    model = open_clip.create_model("unclip-clip", pretrained=weights)

The second route uses open_clip's default preprocessing (OpenAI mean/std, bicubic, shortest-side resize),
so it matches only when the saved `preprocess_cfg` uses those defaults; `local-dir:` always matches. A
snapshot of an open_clip Hugging Face repository (open_clip_config.json + open_clip_model.safetensors or
open_clip_pytorch_model.bin) reads as well.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from torch import nn

from unclip.checkpoint import atomic_save_safetensors, atomic_write_bytes

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
WEIGHTS_FALLBACKS = ("open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")
FORMAT_VERSION = 1


# ---- the checkpoint folder ----


def save_clip(
    model: nn.Module,
    model_config: dict[str, Any],
    directory: str | Path,
    *,
    preprocess_cfg: dict[str, Any] | None = None,
    name: str = "unclip-clip",
) -> Path:
    """Write an open_clip model as a checkpoint folder that both ClipAdapter and open_clip load.

    Files are written to temporary names and renamed into place, the config last, so a folder whose
    open_clip_config.json names this save always has its weights.

    Args:
        model: the open_clip model (unwrapped: no DDP, the EMA copy when there is one).
        model_config: the open_clip model config it was built from.
        directory: the checkpoint folder, created if needed.
        preprocess_cfg: image preprocessing; defaults to the model's own (`model.visual.preprocess_cfg`)
            or open_clip's defaults at the config's image size.
        name: the open_clip model name under which `{name}.json` registers (open_clip.add_model_config).

    Returns:
        the checkpoint folder.
    """
    if "/" in name or not name:
        raise ValueError(f"save_clip name {name!r} must be a non-empty file stem without '/'")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model
    preprocess_cfg = {**model_preprocess_cfg(model, model_config), **(preprocess_cfg or {})}
    state = {k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    atomic_save_safetensors(state, directory / WEIGHTS_NAME)
    atomic_write_bytes(directory / f"{name}.json", _json_bytes(model_config))
    meta = {
        "model_cfg": model_config,
        "preprocess_cfg": preprocess_cfg,
        "unclip": {
            "format_version": FORMAT_VERSION,
            "name": name,
            "open_clip_version": open_clip.__version__,
        },
    }
    atomic_write_bytes(directory / CONFIG_NAME, _json_bytes(meta))
    return directory


def read_clip_checkpoint(directory: str | Path) -> tuple[dict[str, Any], Path, dict[str, Any] | None]:
    """The model config, weights file and preprocessing (None when not saved) of a checkpoint folder.

    Raises:
        ValueError: when the folder has no open_clip_config.json with a model_cfg, or no weights file.
    """
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise ValueError(f"{directory} is not a CLIP checkpoint: it has no {CONFIG_NAME}")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or "model_cfg" not in meta:
        raise ValueError(f"{config_path} has no 'model_cfg' entry; was it written by save_clip?")
    weights = next((directory / n for n in (WEIGHTS_NAME, *WEIGHTS_FALLBACKS) if (directory / n).is_file()), None)
    if weights is None:
        raise ValueError(f"{directory} has {CONFIG_NAME} but no weights file {WEIGHTS_NAME}")
    return meta["model_cfg"], weights, meta.get("preprocess_cfg")


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


# ---- building ----


def build_clip_model(model_config: dict[str, Any], *, seed: int = 0) -> nn.Module:
    """An open_clip CLIP (or CustomTextCLIP) with seeded random weights, built as create_model builds it."""
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_config]
    if missing:
        raise ValueError(f"an open_clip model config needs embed_dim, vision_cfg and text_cfg; {missing} missing")
    config = copy.deepcopy(model_config)
    if "multimodal_cfg" in config:
        raise ValueError("CoCa models (model configs with multimodal_cfg) are not supported")
    config["vision_cfg"]["timm_model_pretrained"] = False  # weights come from our file or stay random
    hf_text = "hf_model_name" in config["text_cfg"]
    if hf_text:
        config["text_cfg"]["hf_model_pretrained"] = False
    model_class = open_clip.CustomTextCLIP if config.pop("custom_text", False) or hf_text else open_clip.CLIP
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(**config)


def build_tokenizer(model_config: dict[str, Any]) -> Any:
    """The tokenizer of a CLIP built from `model_config`: `tokenizer(texts) -> (B, L) int64 ids`."""
    text_cfg = model_config["text_cfg"]
    context_length = text_cfg.get("context_length", 77)
    if text_cfg.get("hf_tokenizer_name"):
        from open_clip.tokenizer import HFTokenizer

        return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length)
    return open_clip.SimpleTokenizer(context_length=context_length, **(text_cfg.get("tokenizer_kwargs") or {}))


def default_preprocess_cfg(model_config: dict[str, Any]) -> dict[str, Any]:
    """open_clip's default preprocessing (OpenAI mean/std, bicubic, shortest side) at the config's size."""
    return {**asdict(PreprocessCfg()), "size": model_config["vision_cfg"].get("image_size", 224)}


def model_preprocess_cfg(model: nn.Module, model_config: dict[str, Any]) -> dict[str, Any]:
    """The preprocessing open_clip.create_model attached to `model`, over the defaults for its config."""
    return {**default_preprocess_cfg(model_config), **(getattr(model.visual, "preprocess_cfg", None) or {})}


def set_preprocess_cfg(model: nn.Module, preprocess_cfg: dict[str, Any]) -> None:
    """Attach preprocessing to a model as open_clip.create_model does; copies and `save_clip` keep it."""
    open_clip.set_model_preprocess_cfg(model, preprocess_cfg)


def image_transform(preprocess_cfg: dict[str, Any]):
    """open_clip's inference preprocessing (resize, centre crop, mean/std), as `ClipAdapter.embed_image` uses.

    Returns:
        a callable on a PIL image or on (B, 3, H, W) float tensors in [0, 1].
    """
    return image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)


def contrastive_loss(*, rank: int = 0, world_size: int = 1) -> nn.Module:
    """open_clip's ClipLoss: symmetric cross-entropy over image-text similarities (Radford et al. 2021, fig. 3).

    Called as `loss(image_features, text_features, logit_scale)` with L2-normalised (B, D) features and the
    exponentiated temperature. With world_size > 1 each rank gathers every rank's features (with their
    gradients, so the data-parallel gradient equals one process's on the whole batch) and scores its own rows
    against all of them; the mean over ranks is the loss of the whole batch.
    """
    return open_clip.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
