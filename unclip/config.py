"""Run configuration: YAML files in `configs/` with dotted `key=value` overrides.

A run config has five parts, each a dataclass:

    kind: prior            # which component: clip | prior | decoder | inpaint | upsampler
    model: {...}           # the network's architecture (its dataclass lives beside the network)
    diffusion: {...}       # DiffusionConfig: noise schedule, prediction target, loss
    clip: {...}            # ClipConfig: which CLIP conditions the model
    data: {...}            # DataConfig
    train: {...}           # TrainConfig

`load_config("configs/prior/tiny.yaml", ["train.lr=3e-4", "model.layers=2"])` reads the file, applies the
overrides and checks every key against the dataclasses, so a typo is a `ValueError` that lists the valid
keys rather than a silently ignored setting. This module imports no torch.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# kind -> "module:ConfigClass" of the network's architecture dataclass (imported lazily)
MODEL_CONFIGS = {
    "clip": None,  # a CLIP's architecture is an open_clip model config, kept in ClipConfig
    "prior": "unclip.nets.prior:PriorConfig",
    "decoder": "unclip.nets.unet:UNetConfig",
    "inpaint": "unclip.nets.unet:UNetConfig",
    "upsampler": "unclip.nets.upsampler:UpsamplerConfig",
}
# a prior's model.kind -> its architecture dataclass (the diffusion prior when model.kind is left out)
PRIOR_MODEL_CONFIGS = {
    "diffusion": "unclip.nets.prior:PriorConfig",
    "autoregressive": "unclip.nets.ar_prior:ARPriorConfig",
}


@dataclass
class DiffusionConfig:
    schedule: Literal["cosine", "linear", "betas"] = "cosine"
    timesteps: int = 1000
    betas: list[float] | None = None  # explicit betas, for schedule="betas"
    prediction: Literal["eps", "x0", "v"] = "eps"
    learned_variance: bool = False  # IDDPM "learned range" variance, trained with the VLB term
    vlb_weight: float = 0.001  # IDDPM's lambda for the VLB term
    min_snr_gamma: float | None = None  # Min-SNR-gamma loss weighting (Hang et al. 2023); None = plain MSE

    def __post_init__(self):
        _check_choice("diffusion.schedule", self.schedule, ("cosine", "linear", "betas"))
        _check_choice("diffusion.prediction", self.prediction, ("eps", "x0", "v"))
        if self.schedule == "betas":
            if not self.betas:
                raise ValueError("diffusion.schedule='betas' needs diffusion.betas, a list of floats")
            self.timesteps = len(self.betas)
        if self.timesteps < 1:
            raise ValueError(f"diffusion.timesteps must be >= 1, got {self.timesteps}")


@dataclass
class ClipConfig:
    """Which CLIP: an open_clip name with a pretrained tag, a local checkpoint, or a model-config dict."""

    model_name: str | None = None  # open_clip architecture name, e.g. "ViT-B-32"
    pretrained: str | None = None  # open_clip pretrained tag, or a path to a weights file
    checkpoint: str | None = None  # a folder written by train/clip.py (open_clip_config.json + weights)
    model_config: dict[str, Any] | None = None  # an open_clip model config, for tiny/test CLIPs
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"


@dataclass
class DataConfig:
    dataset: str = "shapes"  # shapes | openmoji | folder | csv | webdataset | embeddings
    path: str | None = None  # folder, CSV file, shard pattern or embedding folder
    image_size: int = 64
    options: dict[str, Any] = field(default_factory=dict)  # dataset-specific keyword arguments
    val_size: int = 64  # held-out examples for validation metrics
    num_workers: int = 0
    crop_size: int | None = None  # upsamplers: train on random square crops of this side (DALL·E 2: 1/4)
    degradation: str | None = None  # upsamplers: corrupt the low-res input, "blur" or "bsr" (unclip.data.degrade)


@dataclass
class LoraConfig:
    """Low-rank adapters (LoRA, Hu et al. 2021, through the peft library) on a trained stage: `train.lora` fine-tunes
    only them, from the frozen weights of `train.init_from`, and the export holds only the adapter."""

    rank: int = 8
    alpha: float = 8.0  # the update is scaled by alpha / rank
    dropout: float = 0.0
    # module names (or their last parts, e.g. "qkv"); None: the stage's attention and projection layers
    # (unclip.lora.DEFAULT_TARGETS)
    target_modules: list[str] | None = None
    # learning without forgetting: the weight of a second loss that keeps the adapted network's predictions on the
    # base network's (adapters off) for training captions that teach nothing new; 0 turns it off
    preserve: float = 0.0
    # the words that mark a caption as teaching something new (e.g. [orange]); None: every caption is preserved
    new_words: list[str] | None = None

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"train.lora.rank must be a whole number >= 1, got {self.rank!r}")
        if not self.alpha > 0:
            raise ValueError(f"train.lora.alpha must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"train.lora.dropout must be in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None and (
            isinstance(self.target_modules, str)
            or not self.target_modules
            or not all(isinstance(m, str) and m for m in self.target_modules)
        ):
            raise ValueError(
                f"train.lora.target_modules must be a list of module names, e.g. [qkv, proj_out], or null for the "
                f"stage's defaults; got {self.target_modules!r}"
            )
        if (
            isinstance(self.preserve, bool)
            or not isinstance(self.preserve, (int, float))
            or not 0 <= self.preserve < math.inf
        ):
            raise ValueError(f"train.lora.preserve must be a finite weight >= 0 (0: off), got {self.preserve!r}")
        if self.new_words is not None and (
            not isinstance(self.new_words, list) or not all(isinstance(w, str) and w.strip() for w in self.new_words)
        ):
            raise ValueError(f"train.lora.new_words must be a list of words, e.g. [orange], got {self.new_words!r}")
        if self.new_words and not self.preserve:
            raise ValueError("train.lora.new_words only marks the captions train.lora.preserve leaves out: set both")
        if self.preserve and self.dropout:
            # the adapters' dropout draws random numbers the base network's pass does not, so the two passes would
            # not see the same conditioning dropout
            raise ValueError("train.lora.preserve needs train.lora.dropout 0: set one of them to 0")


@dataclass
class DistillConfig:
    """Progressive distillation (Salimans & Ho 2022, unclip.diffusion.distill): `train.distill` trains a decoder
    sampled with `steps` DDIM steps to match, at guidance 1, its teacher (`teacher`, else `train.init_from`)
    sampled with twice as many. The student starts from `train.init_from`; each round halves the steps."""

    steps: int = 16
    teacher: str | None = None  # an exported decoder folder; None: train.init_from

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"train.distill.steps must be a whole number >= 1, got {self.steps!r}")


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 0
    batch_size: int = 32  # per process, per micro-batch
    grad_accum: int = 1
    max_steps: int = 10_000  # optimizer steps
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 500
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float | None = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    ema_beta: float = 0.999
    ema_update_every: int = 1
    ema_warmup_steps: int = 100  # steps before the EMA starts tracking (it copies the weights until then)
    log_every: int = 50
    eval_every: int = 1000
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    max_nonfinite: int = 20  # consecutive non-finite losses before the run stops
    gradient_checkpointing: bool = False
    # how several processes train: "ddp" keeps a whole copy of the model on each; "fsdp" shards the weights,
    # gradients, optimizer state and EMA over them (PyTorch FSDP2 through Accelerate; docs/training.md)
    distributed: Literal["ddp", "fsdp"] = "ddp"
    init_from: str | None = None  # an exported model folder whose weights start this run (fine-tuning)
    lora: LoraConfig | None = None  # train only low-rank adapters on init_from's frozen weights (e.g. {rank: 8})
    distill: DistillConfig | None = None  # distil init_from into a student of fewer steps (e.g. {steps: 16})

    def __post_init__(self):
        if self.mixed_precision is False:  # YAML reads a bare `no` (as in train.mixed_precision=no) as false
            self.mixed_precision = "no"
        _check_choice("train.mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))
        _check_choice("train.lr_schedule", self.lr_schedule, ("cosine", "constant"))
        _check_choice("train.distributed", self.distributed, ("ddp", "fsdp"))
        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        self.adam_betas = tuple(self.adam_betas)


@dataclass
class RunConfig:
    kind: str
    model: Any = None
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config and apply dotted `key=value` overrides.

    Args:
        path: a YAML file with `kind` and any of `model`, `diffusion`, `clip`, `data`, `train`.
        overrides: strings such as "train.lr=3e-4" or "model.layers=2"; values are parsed as YAML.

    Returns:
        a RunConfig whose `model` is the component's architecture dataclass.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist; the committed configs are under configs/")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold a YAML mapping, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict[str, Any], source: str = "config") -> RunConfig:
    raw = dict(raw)
    kind = raw.pop("kind", None)
    if kind not in MODEL_CONFIGS:
        raise ValueError(f"{source}: 'kind' must be one of {sorted(MODEL_CONFIGS)}, got {kind!r}")
    known = {"model", "diffusion", "clip", "data", "train"}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{source}: unknown top-level keys {sorted(unknown)}; valid: {sorted(known)}")
    model_raw = raw.get("model") or {}
    model_kind = model_raw.get("kind") if isinstance(model_raw, dict) and kind == "prior" else None
    model_cls = model_config_class(kind, model_kind)
    if model_kind == "diffusion":  # the default, which PriorConfig does not store
        model_raw = {k: v for k, v in model_raw.items() if k != "kind"}
    model = from_dict(model_cls, model_raw, "model") if model_cls else raw.get("model")
    return RunConfig(
        kind=kind,
        model=model,
        diffusion=from_dict(DiffusionConfig, raw.get("diffusion") or {}, "diffusion"),
        clip=from_dict(ClipConfig, raw.get("clip") or {}, "clip"),
        data=from_dict(DataConfig, raw.get("data") or {}, "data"),
        train=from_dict(TrainConfig, raw.get("train") or {}, "train"),
    )


def model_config_class(kind: str, model_kind: str | None = None) -> type | None:
    """The architecture dataclass of a run `kind`; for a prior, of its `model.kind` (diffusion by default)."""
    target = MODEL_CONFIGS[kind]
    if kind == "prior" and model_kind is not None:
        if model_kind not in PRIOR_MODEL_CONFIGS:
            raise ValueError(f"model.kind of a prior must be one of {list(PRIOR_MODEL_CONFIGS)}, got {model_kind!r}")
        target = PRIOR_MODEL_CONFIGS[model_kind]
    if target is None:
        return None
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `raw[a][b] = value` for the override string "a.b=value"."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form key=value (e.g. train.lr=3e-4)")
    key, text = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {part!r} is not a section")
    node[parts[-1]] = parse_value(text)


def parse_value(text: str) -> Any:
    value = yaml.safe_load(text) if text.strip() else None
    if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    return value


def from_dict(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys and coercing numbers to the field types."""
    if not isinstance(values, dict):
        raise ValueError(f"{prefix} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"unknown keys in {prefix}: {sorted(unknown)}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, f"{prefix}.{name}") for name, value in values.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, name: str) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(args[0], value, name) if len(args) == 1 else value
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_dict(hint, value, name)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ValueError(f"{name} must be a {hint.__name__}, got {value!r}")
    return value


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
