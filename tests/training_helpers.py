"""A small regression task for testing the trainer's mechanics, independent of any diffusion model."""

import os
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from unclip.checkpoint import atomic_save_safetensors
from unclip.config import RunConfig, TrainConfig


class ToyTask:
    kind = "toy"
    collate_fn = None

    def __init__(self, n: int = 64, fail_after: int | None = None):
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(n, 4, generator=gen)
        self.train_dataset = TensorDataset(x, torch.sin(x).sum(1))
        self.fail_after, self.calls = fail_after, 0
        self.autocast_dtypes = []  # dtype of the first layer's output, seen by a forward hook
        self.model[0].register_forward_hook(self._record_dtype)

    def _record_dtype(self, module, args, out):
        if module.training:
            self.autocast_dtypes.append(out.dtype)

    def setup(self, device):
        pass

    def loss(self, model, batch):
        self.calls += 1
        x, y = batch
        x = x + 0.05 * torch.randn_like(x)  # from the global RNG, which the trainer seeds per micro-batch
        out = model(x).squeeze(-1)
        loss = F.mse_loss(out.float(), y)
        if self.fail_after is not None and self.calls > self.fail_after:
            loss = loss * float("nan")
        return loss, {}

    def evaluate(self, model, ema_model):
        x, y = self.train_dataset.tensors
        device = next(model.parameters()).device
        x, y = x.to(device), y.to(device)
        return {
            "val/loss": F.mse_loss(model(x).squeeze(-1), y).item(),
            "val_ema/loss": F.mse_loss(ema_model(x).squeeze(-1), y).item(),
        }

    def export(self, model, directory: Path):
        atomic_save_safetensors(model.state_dict(), directory / "model.safetensors")


class SignalledTask(ToyTask):
    """Sends its own process `signum` during the loss of step `at` (never if None), as `kill` or Ctrl-C would
    mid-step."""

    def __init__(self, at: int | None, signum=signal.SIGTERM, **kwargs):
        super().__init__(**kwargs)
        self.at, self.signum = at, signum

    def loss(self, model, batch):
        if self.calls + 1 == self.at:
            os.kill(os.getpid(), self.signum)
        return super().loss(model, batch)


def toy_config(output_dir, **train) -> RunConfig:
    defaults = dict(
        output_dir=str(output_dir),
        batch_size=4,
        max_steps=12,
        lr=1e-2,
        warmup_steps=2,
        log_every=1,
        eval_every=100,
        checkpoint_every=4,
        ema_warmup_steps=0,
        ema_beta=0.9,
    )
    defaults.update(train)
    return RunConfig(kind="toy", train=TrainConfig(**defaults))


def read_losses(run_dir: Path) -> dict[int, float]:
    import json

    losses = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            losses[row["step"]] = row["loss"]
    return losses


if __name__ == "__main__":
    # run by torchrun in tests/test_training.py: a data-parallel run on CPU (gloo)
    from safetensors.torch import save_file as _save

    from unclip.training import Trainer

    out, accum = Path(sys.argv[1]), int(sys.argv[2])
    signalled = len(sys.argv) > 3 and os.environ["RANK"] == "1"  # "signal": only rank 1 gets SIGTERM, in step 5
    task = SignalledTask(at=5 if signalled else None)
    trainer = Trainer(task, toy_config(out, grad_accum=accum, checkpoint_every=1000))
    acc = trainer.accelerator
    world_size = torch.distributed.get_world_size()
    assert acc.num_processes == 2 and world_size == 2, "expected 2 gloo ranks"
    assert torch.distributed.get_backend() == "gloo"
    trainer.fit()
    (out / f"stopped_{acc.process_index}.txt").write_text(
        f"{trainer.step} {getattr(trainer.stopped_by, 'name', None)}"
    )
    if acc.is_main_process:
        _save(acc.unwrap_model(trainer.model).state_dict(), str(out / "final.safetensors"))
        (out / "world_size.txt").write_text(str(world_size))
    # leave without the interpreter's teardown: gloo's threads can abort it ("terminate called without an active
    # exception") after everything above is written, which would fail the run for nothing
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
