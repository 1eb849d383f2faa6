"""The two folder formats: one model (`config.json` + `model.safetensors`, the diffusers layout) and a pipeline
(`pipeline.json` + one model folder per stage).

    runs/prior/export/            # one component
      config.json                 # {"format_version": 1, "class": "PriorTransformer", "kind": ..., "model": {...},
                                  #  "diffusion": {...}, "clip": {...}}
      model.safetensors           # weights (the EMA weights when exported by the trainer)

    models/shapes/                # a pipeline
      pipeline.json               # {"format_version": 1, "clip": "clip", "prior": "prior", "decoder": "decoder",
                                  #  "inpaint": null, "upsamplers": ["upsampler_256", "upsampler_1024"],
                                  #  "defaults": {"candidates": 32, "decoder": {"guidance_scale": 1.0}}}
      clip/ prior/ decoder/ upsampler_256/ ...

`load_model(path)` rebuilds the network from `config.json` alone; `read_pipeline_index(path)` checks a
pipeline.json, and `build_pipeline_folder` writes one. Files are written to a temporary name and
renamed into place, so a kill during a save never leaves a half-written file under the final name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from unclip.config import ClipConfig, DiffusionConfig, from_dict

FORMAT_VERSION = 1

# class name in config.json -> (module, network class, architecture dataclass)
MODEL_CLASSES = {
    "PriorTransformer": ("unclip.nets.prior", "PriorTransformer", "PriorConfig"),
    "ARPrior": ("unclip.nets.ar_prior", "ARPrior", "ARPriorConfig"),
    "UNet": ("unclip.nets.unet", "UNet", "UNetConfig"),
    "InpaintUNet": ("unclip.nets.inpaint", "InpaintUNet", "UNetConfig"),
    "UpsamplerUNet": ("unclip.nets.upsampler", "UpsamplerUNet", "UpsamplerConfig"),
}


@dataclasses.dataclass
class LoadedModel:
    model: nn.Module
    diffusion: DiffusionConfig
    clip: ClipConfig
    meta: dict[str, Any]


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _umask_mode() -> int:
    """0o666 less the process's umask: the mode open() gives a new file (mkstemp's own is 0o600)."""
    return 0o666 & ~_umask()


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


def read_json_object(path: Path, remedy: str = "") -> dict[str, Any]:
    """The JSON object in `path`; a ValueError naming the file (and `remedy`) if it is not one."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}){remedy}") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}{remedy}")
    return value


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
    meta = read_json_object(config_path, "; re-export the model")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{config_path} has format_version {version!r}, but this unclip reads version {FORMAT_VERSION}; "
            "re-export the checkpoint with this version of unclip"
        )
    if meta.get("class") not in MODEL_CLASSES:
        raise ValueError(f"{config_path}: unknown model class {meta.get('class')!r}; known: {sorted(MODEL_CLASSES)}")
    if not isinstance(meta.get("model"), dict):
        raise ValueError(f'{config_path} has no model settings (a "model" object); re-export the model')
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
    state = read_safetensors(weights)
    load_state_dict_checked(model, state, str(weights))
    model.to(device=device, dtype=dtype).eval()
    return LoadedModel(
        model=model,
        diffusion=from_dict(DiffusionConfig, meta.get("diffusion", {}), "diffusion"),
        clip=from_dict(ClipConfig, meta.get("clip", {}), "clip"),
        meta=meta,
    )


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """load_file with an error that names the file when it is missing, empty, truncated or not safetensors."""
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise ValueError(f"weights file {path} does not exist") from None
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        raise ValueError(
            f"cannot read weights file {path}: {e}. The file is corrupt or incomplete; copy or export it again"
        ) from None


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
    if missing or unexpected or shapes:  # one line: command lines print it as their error
        parts = [f"{source} does not match the {type(model).__name__} described by its config.json"]
        if missing:
            parts.append(f"missing tensors ({len(missing)}): {', '.join(missing[:4])}")
        if unexpected:
            parts.append(f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:4])}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {', '.join(shapes[:4])}")
        parts.append("it was written by another version or for another config; re-export it")
        raise ValueError("; ".join(parts))
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


# -- pipeline folders -------------------------------------------------------------------------------------

PIPELINE_FORMAT_VERSION = 1
PIPELINE_STAGES = ("clip", "prior", "decoder", "inpaint", "noised_clip")  # besides the list "upsamplers"
# "defaults" of the whole call; the others are stages
PIPELINE_CALL_DEFAULTS = ("candidates", "preview_steps", "pruning")


def read_pipeline_index(root: str | Path) -> dict[str, Any]:
    """Read and check `root`/pipeline.json: its stage folders exist inside `root`, its defaults are a dict.

    A file that keeps the reranking count in the decoder's defaults ("decoder": {"candidates": N}) reads as the
    top-level "candidates" it now is.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(
            f"pipeline folder {root} does not exist; pass --pipeline with a folder assembled by train/pipeline.py "
            "from trained components"
        )
    index_path = root / "pipeline.json"
    if not index_path.is_file():
        raise ValueError(
            f"{root} has no pipeline.json: it is not a pipeline folder. A pipeline folder holds pipeline.json "
            "and the clip/, prior/, decoder/ (and upsampler) folders"
        )
    index = read_json_object(index_path)
    if index.get("format_version") != PIPELINE_FORMAT_VERSION:
        raise ValueError(
            f"{index_path} has format_version {index.get('format_version')!r}; this unclip reads "
            f"{PIPELINE_FORMAT_VERSION}. Re-create the pipeline folder with this version"
        )
    for key in ("clip", "decoder"):
        if not index.get(key):
            raise ValueError(f"{index_path} names no {key} folder; a pipeline needs at least clip and decoder")
    upsamplers = index.setdefault("upsamplers", [])
    if not isinstance(upsamplers, list):
        raise ValueError(f'{index_path}: "upsamplers" must be a list of folder names')
    adapters = _check_adapters(index, index_path)
    for name in [index.get(k) for k in PIPELINE_STAGES] + upsamplers + [a["folder"] for a in adapters.values()]:
        if name is None:
            continue
        if not isinstance(name, str) or Path(name).is_absolute() or Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"{index_path} names the stage folder {name!r}: it must be a folder inside {root}")
        if not (root / name).is_dir():
            raise ValueError(f"{root} is incomplete: pipeline.json names {name!r}, which is not there")
    defaults = index.setdefault("defaults", {})
    if not isinstance(defaults, dict) or not all(
        isinstance(v, dict) for k, v in defaults.items() if k not in PIPELINE_CALL_DEFAULTS
    ):
        raise ValueError(f'{index_path}: "defaults" must map each stage to a dict of settings')
    decoder = defaults.get("decoder", {})
    if "candidates" in decoder and "candidates" not in defaults:
        defaults["candidates"] = decoder["candidates"]
        defaults["decoder"] = {k: v for k, v in decoder.items() if k != "candidates"}
    return index


def _check_adapters(index: dict[str, Any], index_path: Path) -> dict[str, dict[str, Any]]:
    """pipeline.json's optional "adapters": {stage: adapter folder, or {"folder": ..., "weight": w}}, a LoRA
    adapter (unclip.lora) to apply to the stage when the pipeline loads, at weight w (default 1); the stages are
    "prior", "decoder", "inpaint" and upsamplers' folders. Returns them as {stage: {"folder", "weight"}}."""
    example = '{"decoder": "decoder_lora"} or {"decoder": {"folder": "decoder_lora", "weight": 0.8}}'
    adapters = index.get("adapters", {})
    if not isinstance(adapters, dict):
        raise ValueError(f'{index_path}: "adapters" must map stages to adapter folders, e.g. {example}')
    stages = [k for k in ("prior", "decoder", "inpaint") if index.get(k)] + index["upsamplers"]
    checked = {}
    for stage, entry in adapters.items():
        if stage not in stages:
            raise ValueError(
                f'{index_path}: "adapters" names the stage {stage!r}, which this pipeline does not have; its stages '
                f"are {', '.join(stages)}"
            )
        entry = {"folder": entry} if isinstance(entry, str) else entry
        weight = entry.get("weight", 1.0) if isinstance(entry, dict) else None
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("folder"), str)
            or set(entry) - {"folder", "weight"}
            or isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not math.isfinite(weight)
        ):
            raise ValueError(
                f'{index_path}: "adapters".{stage} is {adapters[stage]!r}; give an adapter folder, or a folder and '
                f"a finite weight, e.g. {example}"
            )
        checked[stage] = {"folder": entry["folder"], "weight": float(weight)}
    index["adapters"] = checked
    return checked


# the network classes each pipeline stage may hold
STAGE_CLASSES = {
    "prior": ("PriorTransformer", "ARPrior"),
    "decoder": ("UNet",),
    "inpaint": ("InpaintUNet",),
    "upsampler": ("UpsamplerUNet",),
}


def _check_component(name: str, source: Path) -> None:
    """A ValueError naming the flag, when `source` is not a readable export of the component `name`: no folder,
    another kind of model (a prior given as the decoder), or a .safetensors file that is empty or truncated."""
    if not source.is_dir():
        raise ValueError(f"--{name} {source} is not a folder: pass the component's export folder (runs/NAME/export)")
    if name == "clip":
        if not any(source.glob("*.safetensors")) and not any(source.glob("*.json")):
            raise ValueError(f"--clip {source} holds no CLIP (no .json or .safetensors files)")
    elif name == "noised_clip":  # unclip.noised_clip's folder: a CLIP folder with a timestep MLP
        if not (source / "noised_clip.json").is_file():
            raise ValueError(
                f"--noised-clip {source} is not a noise-aware CLIP (it has no noised_clip.json): pass the export of a "
                "train/clip.py run with model.noise_aware: true"
            )
    else:
        meta = read_meta(source)
        if meta["class"] not in STAGE_CLASSES[name]:
            raise ValueError(
                f"--{name} {source} holds a {meta['class']} ({meta.get('kind')}), not a "
                f"{' or '.join(STAGE_CLASSES[name])}: "
                f"pass the {name}'s export folder"
            )
        if name == "upsampler" and "image_size" not in meta["model"]:
            raise ValueError(f"--{name} {source}/config.json has no model.image_size; re-export it")
        if not (source / "model.safetensors").is_file():
            raise ValueError(f"--{name} {source} has config.json but no model.safetensors; the export is incomplete")
    for weights in sorted(source.glob("*.safetensors")):
        check_safetensors(weights)


def check_safetensors(path: str | Path) -> None:
    """Read a .safetensors file's header: a ValueError naming the file when it is empty, truncated or not
    safetensors (the tensors themselves are not read)."""
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        raise ValueError(
            f"cannot read weights file {path}: {e}. The file is corrupt or incomplete; copy or export it again"
        ) from None


def build_pipeline_folder(
    out: str | Path,
    *,
    clip: str | Path,
    decoder: str | Path,
    prior: str | Path | None = None,
    upsamplers: list[str | Path] = (),
    inpaint: str | Path | None = None,
    noised_clip: str | Path | None = None,
    defaults: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Assemble a pipeline folder from exported components (copies them, writes pipeline.json).

    Every source is checked before anything is written; the folder is built beside `out` and then swapped in,
    so an error or a kill leaves an existing `out` as it was.

    Args:
        defaults: pipeline.json's "defaults", e.g. {"candidates": 4, "decoder": {"guidance_scale": 2.0}}.
        dtype: re-save the diffusion components' weights in this dtype (torch.float16 for bundled models).
    """
    out = Path(out)
    parts = [("clip", clip), ("prior", prior), ("decoder", decoder), ("inpaint", inpaint)]
    parts += [("noised_clip", noised_clip)]  # GLIDE's noise-aware CLIP, for CLIP guidance
    parts += [("upsampler", p) for p in upsamplers]
    parts = [(name, Path(source)) for name, source in parts if source is not None]
    for name, source in parts:
        _check_component(name, source)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder: choose another --out")
    index: dict[str, Any] = {"format_version": PIPELINE_FORMAT_VERSION, "upsamplers": []}
    index.update({name: None for name in PIPELINE_STAGES})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's folder is 0700; the pipeline folder follows the umask
        for name, source in parts:
            if name == "upsampler":
                name = f"upsampler_{read_meta(source)['model']['image_size']}"
                index["upsamplers"].append(name)
            else:
                index[name] = name
            shutil.copytree(source, tmp / name)
            if dtype is not None and name in ("clip", "noised_clip"):
                cast_weights(tmp / name, dtype)  # the adapter loads them into its fp32 model
            elif dtype is not None:
                loaded = load_model(tmp / name)
                kind, diffusion, clip_config = loaded.meta["kind"], loaded.diffusion, loaded.clip
                save_model(loaded.model, tmp / name, kind=kind, diffusion=diffusion, clip=clip_config, dtype=dtype)
        index["defaults"] = defaults or {}
        atomic_write_bytes(tmp / "pipeline.json", json.dumps(index, indent=2).encode())
        _keep_other_files(out, tmp)
        _swap_in(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _keep_other_files(old: Path, new: Path) -> None:
    """Copy what an existing pipeline folder holds besides its stages (model card, evaluations) into `new`."""
    if not old.is_dir():
        return
    try:
        index = json.loads((old / "pipeline.json").read_text())
        stages = {index.get(k) for k in PIPELINE_STAGES} | set(index.get("upsamplers", []))
    except (OSError, ValueError, AttributeError, TypeError):
        stages = set()
    for entry in old.iterdir():
        if entry.name in stages or entry.name == "pipeline.json" or (new / entry.name).exists():
            continue
        if entry.is_dir():
            shutil.copytree(entry, new / entry.name)
        else:
            shutil.copy2(entry, new / entry.name)


def _swap_in(new: Path, out: Path) -> None:
    """Replace the folder `out` by `new` with two renames (the old one is removed after)."""
    if not out.exists():
        os.replace(new, out)
        return
    old = new.with_name(new.name + ".old")
    os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def cast_weights(folder: Path, dtype: torch.dtype) -> None:
    """Re-save every floating-point tensor of the .safetensors files in `folder` as `dtype`."""
    for path in Path(folder).glob("*.safetensors"):
        tensors = read_safetensors(path)
        atomic_save_safetensors({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}, path)
