"""Train a real stage and record each micro-batch's diffusion timesteps and noise, in-process or under torchrun.

    torchrun --nproc_per_node 2 tests/ddp_stage.py OUT STEPS CONFIG [key=value ...]

trains STEPS steps (of a longer schedule, so that no evaluation runs), then writes the draws of every
micro-batch to OUT/draws_<rank>.safetensors and, from rank 0, the online weights to OUT/final.safetensors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from unclip.config import load_config
from unclip.tasks import build_task
from unclip.training import Trainer


def record_draws(task) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Wrap the task's diffusion so that each training_loss call records the (t, noise) it draws, drawing them
    from a copy of the RNG state so that the run itself is unchanged."""
    draws, diffusion = [], task.diffusion
    original = diffusion.training_loss

    def training_loss(model, x_0, *, cond=None, t=None, noise=None):
        state = torch.random.get_rng_state()
        peeked_t = torch.randint(0, diffusion.num_timesteps, (x_0.shape[0],), device=x_0.device)
        peeked_noise = torch.randn_like(x_0)
        torch.random.set_rng_state(state)
        if model.training:
            draws.append((peeked_t.cpu(), peeked_noise.cpu()))
        return original(model, x_0, cond=cond, t=t, noise=noise)

    diffusion.training_loss = training_loss
    return draws


def train(out: Path, steps: int, config_path: str, overrides: list[str]) -> tuple[Trainer, list]:
    config = load_config(config_path, [f"train.output_dir={out}", *overrides])
    task = build_task(config)
    draws = record_draws(task)
    trainer = Trainer(task, config)
    trainer.fit(stop_at=steps)
    return trainer, draws


def save_draws(draws: list, path: Path) -> None:
    tensors = {f"t_{i}": t for i, (t, _) in enumerate(draws)}
    tensors.update({f"noise_{i}": noise for i, (_, noise) in enumerate(draws)})
    save_file(tensors, str(path))


if __name__ == "__main__":
    out = Path(sys.argv[1])
    trainer, draws = train(out, int(sys.argv[2]), sys.argv[3], sys.argv[4:])
    acc = trainer.accelerator
    assert acc.num_processes == 2 and acc.state.backend == "gloo", (acc.num_processes, acc.state.backend)
    save_draws(draws, out / f"draws_{acc.process_index}.safetensors")
    if acc.is_main_process:
        state = acc.unwrap_model(trainer.model).state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "final.safetensors"))
