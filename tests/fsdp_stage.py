"""Train a stage sharded (train.distributed=fsdp) under torchrun: once straight through, once stopped and resumed.

    torchrun --nproc_per_node 2 tests/fsdp_stage.py OUT STEPS CONFIG [key=value ...]

OUT/whole trains STEPS steps in one go; OUT/resumed stops after step 1 and a second Trainer resumes it to STEPS.
Each ends with a checkpoint checkpoints/step_<STEPS> of the gathered weights, EMA and optimizer state, and the
process r writes OUT/whole/sharded_<r>.json: how many parameters it held.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from accelerate import Accelerator

from unclip.config import load_config
from unclip.tasks import build_task
from unclip.training import Trainer


def run(out: Path, config_path: str, overrides: list[str], stop_at: int, resume=None, accelerator=None) -> Trainer:
    config = load_config(config_path, [f"train.output_dir={out}", *overrides])
    if accelerator is not None:  # forget the earlier run's model (Accelerate's FSDP clipping looks for its own)
        accelerator._models.clear(), accelerator._optimizers.clear(), accelerator._dataloaders.clear()
    trainer = Trainer(build_task(config), config, accelerator)
    trainer.fit(resume=resume, stop_at=stop_at)
    return trainer


def record_sharding(trainer: Trainer, path: Path) -> None:
    """What this process holds: its shards of the weights, the EMA and AdamW's first moments, and the full count."""
    held = {
        "sharded": trainer.sharded,
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "weights": sum(p.to_local().numel() for p in trainer.model.parameters()),
        "ema": sum(p.to_local().numel() for p in trainer.ema.ema_model.parameters()),
        "moments": sum(s["exp_avg"].to_local().numel() for s in trainer.optimizer.optimizer.state.values()),
    }
    path.write_text(json.dumps(held))


if __name__ == "__main__":
    out, steps, config_path, overrides = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    # the three runs share one Accelerator, whose process group must outlive the first two fits
    end_training, Accelerator.end_training = Accelerator.end_training, lambda self: None
    whole = run(out / "whole", config_path, overrides, steps)
    acc = whole.accelerator
    assert acc.num_processes == 2 and acc.state.backend == "gloo", (acc.num_processes, acc.state.backend)
    record_sharding(whole, out / "whole" / f"sharded_{acc.process_index}.json")
    run(out / "resumed", config_path, overrides, 1, accelerator=acc)
    Accelerator.end_training = end_training
    run(out / "resumed", config_path, overrides, steps, resume="latest", accelerator=acc)
