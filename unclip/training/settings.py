"""The trainer's settings beyond TrainConfig's own checks, and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


TRAIN_CHECKS = (  # (setting, is it valid, what is valid), for what TrainConfig's own checks let through
    ("seed", lambda v: _whole(v) and v >= 0, "a whole number >= 0"),
    ("lr", lambda v: _finite(v) and v > 0, "a finite number > 0"),
    ("weight_decay", lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    ("warmup_steps", lambda v: _whole(v) and v >= 0, "a whole number >= 0"),
    ("min_lr_ratio", lambda v: _finite(v) and 0 <= v <= 1, "a number from 0 to 1"),
    ("grad_clip", lambda v: v is None or (_finite(v) and v > 0), "a finite number > 0, or null for none"),
    ("adam_betas", lambda v: len(v) == 2 and all(_finite(b) and 0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    ("ema_beta", lambda v: _finite(v) and 0 <= v <= 1, "a number from 0 to 1"),
    ("ema_update_every", lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    ("ema_warmup_steps", lambda v: _whole(v) and v >= 0, "a whole number >= 0"),
    ("keep_checkpoints", lambda v: _whole(v) and v >= 1, "a whole number >= 1"),
    ("max_nonfinite", lambda v: _whole(v) and v >= 0, "a whole number >= 0"),
)


def check_train_config(train, kind: str | None = None) -> None:
    """A one-line ValueError for the first invalid training setting."""
    if train.lora and not train.init_from:
        raise ValueError(
            "train.lora trains adapters on a trained stage: set train.init_from to its export folder (a pipeline's "
            "decoder/ or prior/, or runs/NAME/export)"
        )
    if train.lora and kind == "clip":
        raise ValueError("train.lora adapts the prior, decoder, inpaint and upsampler stages, not a CLIP")
    if train.lora and train.lora.preserve and kind is not None and kind not in ("decoder", "inpaint", "prior"):
        raise ValueError(f"train.lora.preserve is for the prior, decoder and inpaint stages; this run trains: {kind}")
    if train.distill and kind != "decoder":
        raise ValueError(f"train.distill distils a decoder (kind: decoder), not a {kind}")
    if train.distill and not train.init_from:
        raise ValueError(
            "train.distill starts the student from its teacher: set train.init_from to the decoder to distil "
            "(models/shapes/decoder, or the last round's runs/NAME/export)"
        )
    if train.distill and train.lora:
        raise ValueError("train.distill trains the whole student; leave train.lora unset")
    for name, valid, what in TRAIN_CHECKS:
        value = getattr(train, name)
        try:
            ok = valid(value)
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"train.{name} must be {what}, got {value!r}")


def lr_at(step: int, config) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to lr·min_lr_ratio."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
