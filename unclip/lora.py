"""Low-rank adapters (LoRA, Hu et al. 2021) on a stage's network, through the peft library.

`train.lora` (unclip.config.LoraConfig) fine-tunes only adapters: the trainer loads the stage's weights
(`train.init_from`), `add_lora` freezes them and adds peft's LoRA layers to the target modules, and the run's
export is the adapter alone (`save_adapter`), a small folder:

    runs/decoder-orange/export/
      adapter_config.json         peft's LoraConfig (rank, alpha, target modules)
      adapter_model.safetensors   the adapter's weights (peft's state dict: lora_A and lora_B of each module)
      unclip-adapter.json         {"format_version": 1, "kind": "decoder", "class": "UNet", "base": <init_from>}

A pipeline folder names adapters to apply at load time (pipeline.json's "adapters", docs/pipeline-format.md);
`load_adapter` adds them to a loaded network (at a weight, if given) and `merge_adapters` folds them into its
weights for sampling. A network without adapters is the base network, unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from unclip.checkpoint import atomic_save_safetensors, atomic_write_bytes, read_json_object, read_safetensors
from unclip.config import LoraConfig

if TYPE_CHECKING:
    import peft

    from unclip.diffusion import GaussianDiffusion

ADAPTER_FORMAT_VERSION = 1
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
ADAPTER_META = "unclip-adapter.json"

# network class -> the module names (or their last parts) LoRA adapts by default
_UNET_TARGETS = [
    "qkv",  # attention over the pixels (with the context's keys and values), and the text blocks' attention
    "context_kv",  # the keys and values of the caption tokens and image-embedding tokens
    "proj_out",  # the attention layers' output projection
    "proj",  # the text blocks' attention output
    "mlp.0",  # the text blocks' MLP
    "mlp.2",
    "image_proj",  # the image embedding into the timestep embedding
    "image_tokens",  # and into the context tokens
    "text_proj",  # the caption's token encodings into the context
    "text_pool_proj",
    "emb_proj",  # each residual block's scale and shift from the conditioning embedding
]
DEFAULT_TARGETS = {
    "UNet": _UNET_TARGETS,
    "InpaintUNet": _UNET_TARGETS,
    "PriorTransformer": ["qkv", "proj", "mlp.0", "mlp.2", "embed_tokens", "embed_text", "proj_out"],
}


def _peft():
    """peft, imported on first use: about 0.3 s of start-up that a pipeline without adapters does not need."""
    import peft

    return peft


def _peft_config(settings: LoraConfig, model: nn.Module) -> peft.LoraConfig:
    name = type(model).__name__
    targets = settings.target_modules or DEFAULT_TARGETS.get(name)
    if not targets:
        raise ValueError(
            f"train.lora has no default target modules for a {name}: set train.lora.target_modules to the names "
            "of its Linear or Conv2d modules"
        )
    return _peft().LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=list(targets)
    )


def add_lora(model: nn.Module, settings: LoraConfig) -> nn.Module:
    """Freeze `model` and add trainable LoRA layers (B = 0, so the output is unchanged) to its target modules,
    in place. Returns `model`."""
    config = _peft_config(settings, model)
    try:
        _peft().inject_adapter_in_model(config, model)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"train.lora.target_modules: {e}") from None
    return model


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as its base network: every LoRA layer off inside the block, on again after it, with each
    parameter as trainable as it was."""
    layers = [m for m in lora_layers(model) if not m.disable_adapters]  # those on now
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, requires_grad in trainable:
            p.requires_grad_(requires_grad)


def teaches_nothing_new(captions: list[str], new_words: list[str] | None) -> list[bool]:
    """For each caption, whether it holds none of `new_words` (whole words or phrases, any case); with no
    new words every caption is True."""
    patterns = [re.compile(rf"(?<!\w){re.escape(w.strip())}(?!\w)", re.IGNORECASE) for w in new_words or []]
    return [not any(p.search(c) for p in patterns) for c in captions]


def preserving_loss(
    diffusion: GaussianDiffusion,
    model: nn.Module,
    x_0: Tensor,
    *,
    cond: dict[str, Any],
    keep: Tensor,
    weight: float,
) -> dict[str, Tensor]:
    """The diffusion loss of an adapted network, plus what keeps it from forgetting (`train.lora.preserve`).

    Learning without Forgetting (Li & Hoiem 2016) as a diffusion loss: for the rows in `keep` (B,) bool, the
    squared distance between the adapted network's prediction and the base network's (adapters off), at the same
    x_t, t and conditioning dropout, weighted as the diffusion loss weights its rows (Min-SNR), times `weight`.
    The base network's prediction is a lower-variance target than the data's noisy one, so the adapter is pulled
    back wherever it changes what the base network drew for captions that teach nothing new.

    The same dropout needs adapters without dropout of their own (LoraConfig checks it). With a learned
    variance only the mean's prediction is kept close.

    Returns training_loss's terms, with "loss" including the preservation term and "preserve" (B,), the
    unweighted distance of every row.
    """
    B = x_0.shape[0]
    t = torch.randint(0, diffusion.num_timesteps, (B,), device=x_0.device)
    noise = torch.randn_like(x_0)
    devices = [x_0.device] if x_0.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the base network below draws the same conditioning dropout
        terms = diffusion.training_loss(model, x_0, cond=cond, t=t, noise=noise)
    with torch.no_grad(), adapters_disabled(model):
        base = diffusion.training_loss(model, x_0, cond=cond, t=t, noise=noise)["prediction"]
    drift = (terms["prediction"].float() - base.float()).pow(2).flatten(1).mean(1)
    weighted = drift * diffusion.min_snr_weight(t) if diffusion.min_snr_gamma is not None else drift
    terms["preserve"] = drift
    terms["loss"] = terms["loss"] + weight * keep.to(weighted.dtype) * weighted
    return terms


def preserving_step(
    settings: LoraConfig, diffusion: GaussianDiffusion, model: nn.Module, x_0: Tensor, cond: dict, captions: list[str]
) -> tuple[Tensor, dict[str, float]]:
    """A training task's loss and logs under `train.lora.preserve`: `preserving_loss`, keeping the rows whose
    caption holds none of `train.lora.new_words`."""
    keep = torch.tensor(teaches_nothing_new(list(captions), settings.new_words), device=x_0.device)
    terms = preserving_loss(diffusion, model, x_0, cond=cond, keep=keep, weight=settings.preserve)
    logs = {"vlb": terms["vlb"].mean().item()} if "vlb" in terms else {}
    if keep.any():
        logs["preserve"] = terms["preserve"][keep].mean().item()
    return terms["loss"].mean(), logs


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def adapter_state(model: nn.Module) -> dict:
    """The adapter's tensors (peft's names, e.g. "image_proj.lora_A.weight"), without the frozen base."""
    return _peft().get_peft_model_state_dict(model, save_embedding_layers=False)  # peft guesses them by name


def save_adapter(model: nn.Module, directory: str | Path, *, kind: str, base: str | None = None) -> Path:
    """Write the adapter of `model` (after `add_lora` or `load_adapter`) to `directory`: see the module docstring.

    Args:
        kind: the stage's run kind ("decoder", "prior", ...).
        base: the folder of the weights the adapter was trained on, recorded for the reader.
    """
    if not has_lora(model):
        raise ValueError(f"the {type(model).__name__} has no LoRA adapter to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = model.peft_config["default"].to_dict()
    config["target_modules"] = sorted(config["target_modules"])  # a set in peft
    meta = {"format_version": ADAPTER_FORMAT_VERSION, "kind": kind, "class": type(model).__name__, "base": base}
    atomic_save_safetensors(adapter_state(model), directory / ADAPTER_WEIGHTS)
    atomic_write_bytes(directory / ADAPTER_CONFIG, json.dumps(_jsonable(config), indent=2).encode())
    atomic_write_bytes(directory / ADAPTER_META, json.dumps(meta, indent=2).encode())
    return directory


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value):
        return _jsonable(dataclasses.asdict(value))
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)  # enums (peft's task type)


def read_adapter_meta(directory: str | Path) -> dict[str, Any]:
    """Check an adapter folder's files and return its unclip-adapter.json."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"adapter folder {directory} does not exist")
    missing = [name for name in (ADAPTER_META, ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (directory / name).is_file()]
    if missing:
        raise ValueError(
            f"{directory} is not an adapter folder (it lacks {', '.join(missing)}); export one with train.lora"
        )
    meta = read_json_object(directory / ADAPTER_META, "; export the adapter again")
    if meta.get("format_version") != ADAPTER_FORMAT_VERSION:
        raise ValueError(
            f"{directory / ADAPTER_META} has format_version {meta.get('format_version')!r}; this unclip reads "
            f"{ADAPTER_FORMAT_VERSION}. Export the adapter again with this version"
        )
    return meta


def load_adapter(model: nn.Module, directory: str | Path, *, weight: float = 1.0) -> nn.Module:
    """Add the adapter saved in `directory` to `model` (a network of the class it was trained on), in place.

    `weight` scales the adapter's change to each layer (peft's `scale_layer`): 0 is the base network, 1 the
    adapter as trained, values between blend them. The adapter's weights keep the dtype and device of the layers
    they adapt. Returns `model`.
    """
    if not math.isfinite(weight):
        raise ValueError(f"an adapter's weight must be a finite number, not {weight}")
    directory = Path(directory)
    meta = read_adapter_meta(directory)
    name = type(model).__name__
    if meta.get("class") != name:
        raise ValueError(f"the adapter {directory} was trained on a {meta.get('class')}, not a {name}")
    raw = read_json_object(directory / ADAPTER_CONFIG, "; export the adapter again")
    peft = _peft()
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)} - {"peft_type", "task_type"}
    try:
        config = peft.LoraConfig(**{k: v for k, v in raw.items() if k in fields})
        peft.inject_adapter_in_model(config, model)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the adapter {directory} does not fit this {name}: {e}") from None
    state = read_safetensors(directory / ADAPTER_WEIGHTS)
    result = peft.set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"{directory / ADAPTER_WEIGHTS} does not match its adapter_config.json and this {name} (missing "
            f"{missing[:4]}, unexpected {result.unexpected_keys[:4]}); export the adapter again"
        )
    if weight != 1.0:
        for layer in lora_layers(model):
            layer.scale_layer(weight)
    model.requires_grad_(False)
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer's change into its base weights (W + scaling·B·A), in place, for sampling.

    The network computes the same function, up to rounding, at the base network's cost (models/shapes-orange
    samples 1.35 times slower unmerged: bench/lora_merge.py). The layers stay peft's, marked merged;
    `adapters_disabled` unmerges them again. Returns `model`.
    """
    for layer in lora_layers(model):
        if not layer.merged:
            layer.merge()
    return model


def lora_layers(model: nn.Module) -> list:
    """peft's LoRA layers in `model`."""
    return [m for m in model.modules() if isinstance(m, _peft().tuners.lora.LoraLayer)]
