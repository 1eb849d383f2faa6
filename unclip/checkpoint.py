"""Inference checkpoints: a folder with `config.json` and `model.safetensors` (the diffusers layout).

    runs/prior/export/            # one component
      config.json                 # {"format_version": 1, "class": "PriorTransformer", "kind": ..., "model": {...},
                                  #  "diffusion": {...}, "clip": {...}}
      model.safetensors           # weights (the EMA weights when exported by the trainer)

`load_model(path)` rebuilds the network from `config.json` alone. Files are written to a temporary name and
renamed into place, so a kill during a save never leaves a half-written file under the final name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from unclip.config import ClipConfig, DiffusionConfig, from_dict

FORMAT_VERSION = 1

# class name in config.json -> (module, network class, architecture dataclass)
MODEL_CLASSES = {
    "PriorTransformer": ("unclip.nets.prior", "PriorTransformer", "PriorConfig"),
    "UNet": ("unclip.nets.unet", "UNet", "UNetConfig"),
    "InpaintUNet": ("unclip.nets.unet", "InpaintUNet", "UNetConfig"),
    "UpsamplerUNet": ("unclip.nets.upsampler", "UpsamplerUNet", "UpsamplerConfig"),
}


@dataclasses.dataclass
class LoadedModel:
    model: nn.Module
    diffusion: DiffusionConfig
    clip: ClipConfig
    meta: dict[str, Any]


def _umask_mode() -> int:
    """0o666 less the process's umask: the mode open() gives a new file (mkstemp's own is 0o600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, _umask_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fingerprint(*parts: nn.Module | torch.Tensor | Any) -> str:
    """A hash of networks' weights and tensors (names, dtypes, shapes and values) and of JSON-able settings, in
    order: what a model computes, not where it was loaded from (a copied folder has the same fingerprint).
    16 hex digits."""
    h = hashlib.sha256()

    def add(name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())

    for part in parts:
        if isinstance(part, nn.Module):
            for name, tensor in part.state_dict().items():
                add(name, tensor)
        elif isinstance(part, torch.Tensor):
            add("", part)
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, _umask_mode())  # safetensors writes 0600 files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(
    model: nn.Module,
    directory: str | Path,
    *,
    kind: str,
    diffusion: DiffusionConfig,
    clip: ClipConfig | None = None,
    dtype: torch.dtype | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `config.json` and `model.safetensors` for `model` into `directory`.

    Args:
        model: a network whose class is in MODEL_CLASSES and that has a dataclass `config` attribute.
        kind: the run kind ("prior", "decoder", ...).
        dtype: cast floating-point weights to this dtype (e.g. torch.float16 for bundled weights).
        extra: more JSON-serialisable fields to keep in config.json.
    """
    name = type(model).__name__
    if name not in MODEL_CLASSES:
        raise ValueError(f"cannot save a {name}; saveable classes: {sorted(MODEL_CLASSES)}")
    directory = Path(directory)
    state = model.state_dict()
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    meta = {
        "format_version": FORMAT_VERSION,
        "class": name,
        "kind": kind,
        "model": dataclasses.asdict(model.config),
        "diffusion": dataclasses.asdict(diffusion),
        "clip": dataclasses.asdict(clip or ClipConfig()),
        **(extra or {}),
    }
    atomic_save_safetensors(state, directory / "model.safetensors")
    atomic_write_bytes(directory / "config.json", json.dumps(meta, indent=2).encode())
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    config_path = directory / "config.json"
    if not directory.is_dir():
        raise ValueError(f"model folder {directory} does not exist")
    if not config_path.is_file():
        raise ValueError(
            f"{directory} has no config.json: it is not an unclip model folder "
            "(export one with the train/ scripts, or point at runs/<name>/export)"
        )
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON ({e}); re-export the model") from e
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{config_path} has format_version {version!r}, but this unclip reads version {FORMAT_VERSION}; "
            "re-export the checkpoint with this version of unclip"
        )
    if meta.get("class") not in MODEL_CLASSES:
        raise ValueError(f"{config_path}: unknown model class {meta.get('class')!r}; known: {sorted(MODEL_CLASSES)}")
    return meta


def load_model(directory: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Rebuild a network from a folder written by `save_model`.

    Returns:
        LoadedModel(model, diffusion, clip, meta); the model is in eval mode on `device`.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    module, cls_name, cfg_name = MODEL_CLASSES[meta["class"]]
    module = importlib.import_module(module)
    model_config = from_dict(getattr(module, cfg_name), meta["model"], f"{directory}/config.json: model")
    model = getattr(module, cls_name)(model_config)
    weights = directory / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{directory} has config.json but no model.safetensors; the export is incomplete")
    state = load_file(str(weights))
    load_state_dict_checked(model, state, str(weights))
    model.to(device=device, dtype=dtype).eval()
    return LoadedModel(
        model=model,
        diffusion=from_dict(DiffusionConfig, meta.get("diffusion", {}), "diffusion"),
        clip=from_dict(ClipConfig, meta.get("clip", {}), "clip"),
        meta=meta,
    )


def load_state_dict_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with an error that names the missing, unexpected and mis-shaped tensors."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        lines = [f"{source} does not match the {type(model).__name__} described by its config.json:"]
        if missing:
            lines.append(f"  missing tensors ({len(missing)}): {missing[:8]}")
        if unexpected:
            lines.append(f"  unexpected tensors ({len(unexpected)}): {unexpected[:8]}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): {shapes[:8]}")
        lines.append("  The checkpoint was written by another version or for another config; re-export it.")
        raise ValueError("\n".join(lines))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
