"""Training tasks: what each stage trains and how (its model, data, loss, evaluation and export).

`build_task(config)` picks the task for `config.kind`; the imports are lazy so that each train/ script
loads only its own stage.
"""

from __future__ import annotations

import importlib

from unclip.config import RunConfig

TASKS = {
    "clip": "unclip.tasks.clip:ClipTask",
    "prior": "unclip.tasks.prior:PriorTask",
    "decoder": "unclip.tasks.decoder:DecoderTask",
    "inpaint": "unclip.tasks.decoder:DecoderTask",
    "upsampler": "unclip.tasks.upsampler:UpsamplerTask",
}


def build_task(config: RunConfig):
    if config.kind not in TASKS:
        raise ValueError(f"no training task for kind {config.kind!r}; valid kinds: {sorted(TASKS)}")
    module, name = TASKS[config.kind].split(":")
    return getattr(importlib.import_module(module), name)(config)
