"""Training tasks: what each stage trains and how (its model, data, loss, evaluation and export).

`build_task(config)` picks the task for `config.kind` (for a prior, by its `model.kind`); the imports are lazy
so that each train/ script loads only its own stage. The task is built under `train.seed`, so that every process,
and every run of the same config, starts from the same weights.
"""

from __future__ import annotations

import importlib

import torch

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
    target = TASKS[config.kind]
    if config.kind == "prior" and getattr(config.model, "kind", "diffusion") == "autoregressive":
        target = "unclip.tasks.ar_prior:ARPriorTask"
    module, name = target.split(":")
    task_class = getattr(importlib.import_module(module), name)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left as it was
        torch.manual_seed(config.train.seed)
        return task_class(config)
