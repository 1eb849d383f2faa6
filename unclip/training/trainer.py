"""The one trainer behind every `train/*.py`: Accelerate, mixed precision, accumulation, EMA, checkpoints.

    trainer = Trainer(task, config)
    trainer.fit(resume="latest")

A `Task` (unclip/tasks.py) says what is trained and how: its model, datasets, `loss(model, batch)`,
`evaluate(model)` and `export(model, directory)`. The trainer does the rest, the same way for every stage:

- Accelerate: multi-GPU / multi-node through `accelerate launch` and its config, several processes on CPU
  (gloo) with `accelerate launch --multi_gpu --num_processes 2` on a machine without CUDA;
- mixed precision "no" | "fp16" | "bf16", with autocast around the whole loss (fp16 needs CUDA);
- gradient accumulation through `accelerator.accumulate`, so N processes × batch B equals one process with
  N× accumulation (tests/test_training.py checks the weights);
- AdamW, linear warmup then cosine decay (set by hand each step, so it does not depend on the process count),
  gradient clipping, EMA (ema-pytorch);
- a guard against non-finite losses and gradients: the step is skipped and counted, and the run stops with a
  clear message after `train.max_nonfinite` in a row;
- checkpoints every `train.checkpoint_every` steps: the training state (`accelerator.save_state`: model,
  optimizer, EMA, RNG states, data position) under `checkpoints/step_XXXXXXX`, written to a temporary
  folder and renamed, plus the inference export (EMA weights) under `export/`; `fit(resume="latest")`
  continues from the newest complete checkpoint and gives the same losses as an uninterrupted run;
- SIGTERM or SIGINT (`kill`, Ctrl-C, a scheduler's preemption, torchrun passing either on) ends the run at
  the next step boundary with a checkpoint, all processes at the same step; a second signal acts at once;
- logging to `metrics.jsonl` in the run folder and to Accelerate's trackers (tensorboard when installed),
  with a tqdm bar on the main process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from ema_pytorch import EMA
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from unclip.checkpoint import atomic_write_bytes
from unclip.config import RunConfig, load_config

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"


class Task(Protocol):
    """What a stage supplies to the trainer."""

    kind: str
    model: nn.Module
    train_dataset: Dataset
    collate_fn: Any

    def setup(self, device: torch.device) -> None: ...  # move frozen helpers (CLIP) to the device

    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]: ...

    def evaluate(self, model: nn.Module, ema_model: nn.Module) -> dict[str, float]: ...

    def export(self, model: nn.Module, directory: Path) -> None: ...

    # optional: `save_samples(ema_model, path)` writes a sample grid at every evaluation


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def stop_signals():
    """Catch SIGINT and SIGTERM while training: yields a list that receives each caught signal's number.

    The first signal of a kind is only recorded, so that the loop can finish its step and save; the handler
    then gives way to the one it replaced, so a second Ctrl-C interrupts at once. Outside the main thread
    (where Python cannot set handlers) nothing is caught.
    """
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def record(signum, frame):
        caught.append(signum)
        signal.signal(signum, previous[signum])

    for sig in STOP_SIGNALS:
        signal.signal(sig, record)
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the training process, which still needs their batches to finish
    its step (a worker killed by the terminal's SIGINT would fail that step instead)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class NonFiniteLossError(RuntimeError):
    pass


def lr_at(step: int, config) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to lr·min_lr_ratio."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    floor = config.lr * config.min_lr_ratio
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_accelerator(config: RunConfig) -> Accelerator:
    train = config.train
    cuda = torch.cuda.is_available()
    if train.mixed_precision == "fp16" and not cuda:
        raise ValueError(
            "train.mixed_precision=fp16 needs a CUDA device; on CPU use 'no' "
            "(or 'bf16', which CPUs without bf16 units emulate very slowly)"
        )
    trackers = ["tensorboard"] if importlib.util.find_spec("tensorboard") else None
    return Accelerator(
        cpu=not cuda,
        mixed_precision=train.mixed_precision,
        gradient_accumulation_steps=train.grad_accum,
        log_with=trackers,
        project_dir=train.output_dir,
        # the shuffle order is a function of (seed, epoch): the same for 1 or N processes, and after a resume
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train.seed),
    )


def init_weights(model: nn.Module, source: str, kind: str) -> list[str]:
    """Start `model` from the weights exported at `source` (train.init_from): fine-tuning, or continuing a run
    whose checkpoints are gone from its exported (EMA) weights. The architectures must match, except that the
    config may add modules or parameters the source lacks: they keep their initialisation, and their names are
    returned (a module's name for its weight and bias)."""
    from unclip.checkpoint import load_model, load_state_dict_checked

    if kind == "clip":
        from unclip.clip import ClipAdapter

        state = ClipAdapter.from_checkpoint(source).model.state_dict()
    else:
        loaded = load_model(source)
        if loaded.meta.get("kind") != kind:
            raise ValueError(
                f"train.init_from={source} holds a model of kind {loaded.meta.get('kind')!r}, not {kind!r}"
            )
        state = loaded.model.state_dict()
    state = {k: v.float() for k, v in state.items()}
    new = sorted(set(model.state_dict()) - set(state))
    if new and not set(state) - set(model.state_dict()):
        # the config adds modules (e.g. model.text_layers): they keep their initialisation, the rest is loaded
        state = {**{k: v for k, v in model.state_dict().items() if k in new}, **state}
    else:
        new = []
    try:
        load_state_dict_checked(model, state, source)
    except ValueError as e:
        raise ValueError(
            f"train.init_from={source}: its weights do not fit the model this config builds; give the run the "
            f"model section of {source}/config.json.\n{e}"
        ) from None
    return sorted({k.removesuffix(".weight").removesuffix(".bias") for k in new})


class Trainer:
    """Trains `task.model` according to `config.train`; see the module docstring."""

    def __init__(self, task: Task, config: RunConfig, accelerator: Accelerator | None = None):
        self.task, self.config, self.train_config = task, config, config.train
        self.run_dir = Path(config.train.output_dir)
        self.accelerator = accelerator or make_accelerator(config)
        self.step = 0  # optimizer steps taken
        self.epoch = 0
        self.batch_in_epoch = 0  # micro-batches consumed in the current epoch
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.stopped_by: signal.Signals | None = None  # the signal that ended the last fit early

    # -- setup ---------------------------------------------------------------------------------------

    def _build(self) -> None:
        acc, train = self.accelerator, self.train_config
        set_seed(train.seed)
        model = self.task.model
        if train.init_from and not getattr(self.task, "handles_init_from", False):
            new = init_weights(model, train.init_from, self.task.kind)
            if new:
                self.accelerator.print(
                    f"train.init_from={train.init_from}: {len(new)} modules or parameters are new in this config and "
                    f"start from their initialisation: {', '.join(new[:8])}{' ...' if len(new) > 8 else ''}"
                )
        self.ema = EMA(
            model,
            beta=train.ema_beta,
            update_after_step=train.ema_warmup_steps,
            update_every=train.ema_update_every,
            include_online_model=False,
            # buffers are copied, not averaged: averaging a -inf attention mask gives NaN, and statistics
            # such as the prior's embedding normalisation are constants
            param_or_buffer_names_no_ema={name for name, _ in model.named_buffers()},
        )
        self.ema.to(acc.device)
        self.task.setup(acc.device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=train.lr, betas=train.adam_betas, weight_decay=train.weight_decay)
        dataset = self.task.train_dataset
        loader = DataLoader(
            dataset,
            batch_size=train.batch_size,
            shuffle=not isinstance(dataset, IterableDataset),
            drop_last=True,
            num_workers=self.config.data.num_workers,
            collate_fn=getattr(self.task, "collate_fn", None),
            generator=torch.Generator().manual_seed(train.seed),
            worker_init_fn=_ignore_sigint,
        )
        self.model, self.optimizer, self.loader = acc.prepare(model, optimizer, loader)
        acc.register_for_checkpointing(self.ema)

    # -- checkpoints -----------------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def complete_checkpoints(self) -> list[Path]:
        if not self.checkpoint_dir.is_dir():
            return []
        found = [p for p in self.checkpoint_dir.glob("step_*") if (p / STATE_FILE).is_file()]
        return sorted(found, key=lambda p: int(p.name.split("_")[1]))

    def save_checkpoint(self) -> Path:
        """Save the training state atomically, then export the EMA model for inference."""
        acc = self.accelerator
        final = self.checkpoint_dir / f"step_{self.step:07d}"
        tmp = self.checkpoint_dir / f".tmp_step_{self.step:07d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {
                "step": self.step,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "nonfinite_total": self.nonfinite_total,
                "num_processes": acc.num_processes,
                "config": self.config.to_dict(),
            }
            # the state file is written last: a folder without it is incomplete and never resumed from
            atomic_write_bytes(tmp / STATE_FILE, json.dumps(state, indent=2).encode())
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._export()
            for old in self.complete_checkpoints()[: -self.train_config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def _export(self) -> None:
        """Write the EMA model's inference folder to export/ (built aside, then swapped in)."""
        export, tmp, old = self.run_dir / "export", self.run_dir / ".export.tmp", self.run_dir / ".export.old"
        shutil.rmtree(tmp, ignore_errors=True)
        self.task.export(self.ema.ema_model, tmp)
        shutil.rmtree(old, ignore_errors=True)
        if export.exists():
            os.replace(export, old)
        os.replace(tmp, export)
        shutil.rmtree(old, ignore_errors=True)

    def resume(self, resume: str | Path) -> None:
        if str(resume) == "latest":
            found = self.complete_checkpoints()
            if not found:
                self.accelerator.print(f"no checkpoint under {self.checkpoint_dir}; starting from scratch")
                return
            path = found[-1]
        else:
            path = Path(resume)
            if not (path / STATE_FILE).is_file():
                raise ValueError(f"{path} is not a complete checkpoint (no {STATE_FILE}); use --resume latest")
        state = json.loads((path / STATE_FILE).read_text())
        if state.get("num_processes", 1) != self.accelerator.num_processes:
            self.accelerator.print(
                f"warning: {path} was saved by {state['num_processes']} processes, resuming with "
                f"{self.accelerator.num_processes}; the data order and RNG streams will differ"
            )
        self.accelerator.load_state(str(path))
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.nonfinite_total = state.get("nonfinite_total", 0)
        self.accelerator.print(f"resumed from {path} at step {self.step}")

    # -- the loop ------------------------------------------------------------------------------------

    def batches(self):
        """Micro-batches forever, epoch after epoch, starting at the saved position."""
        while True:
            if hasattr(self.loader, "set_epoch"):
                self.loader.set_epoch(self.epoch)
            loader = self.loader
            if self.batch_in_epoch:
                loader = self.accelerator.skip_first_batches(self.loader, self.batch_in_epoch)
            yielded = False
            for batch in loader:
                yielded = True
                self.batch_in_epoch += 1
                yield batch
            if not yielded and self.batch_in_epoch == 0:
                raise ValueError(
                    f"the training data gave no batch of {self.train_config.batch_size}: the dataset is "
                    "smaller than one batch per process; lower train.batch_size or add data"
                )
            self.epoch += 1
            self.batch_in_epoch = 0

    def fit(self, resume: str | Path | None = None, stop_at: int | None = None) -> dict[str, float]:
        """Train to `train.max_steps` optimizer steps; returns the last logged metrics.

        Args:
            resume: "latest" or a checkpoint folder to continue from.
            stop_at: leave after this step with a checkpoint, as a time-sliced run (or a kill) would; a
                later `fit(resume="latest")` continues exactly where it stopped.
        """
        acc, train = self.accelerator, self.train_config
        self._build()
        if resume:
            self.resume(resume)
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.run_dir / "config.json", json.dumps(self.config.to_dict(), indent=2).encode())
        acc.init_trackers(self.run_dir.name or "unclip", config=_flatten(self.config.to_dict()))
        bar = tqdm(
            total=train.max_steps, initial=self.step, disable=not acc.is_local_main_process, desc=self.task.kind
        )
        window: list[float] = []
        last: dict[str, float] = {}
        started = time.perf_counter()
        self.model.train()
        data = self.batches()
        end = train.max_steps if stop_at is None else min(stop_at, train.max_steps)
        self.stopped_by = None
        try:
            with stop_signals() as caught:
                while self.step < end:
                    loss_value, logs = self._train_step(data)
                    if loss_value is not None:
                        window.append(loss_value)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.4f}" if loss_value is not None else "skipped")
                    if self.step % train.log_every == 0 or self.step == train.max_steps:
                        last = {"loss": sum(window) / max(1, len(window)), "lr": lr_at(self.step - 1, train), **logs}
                        last["nonfinite_total"] = self.nonfinite_total
                        last["seconds"] = time.perf_counter() - started
                        window.clear()
                        self._log(last)
                    if self.step % train.eval_every == 0 or self.step == train.max_steps:
                        self._log(self.evaluate())
                    saved = None
                    if self.step % train.checkpoint_every == 0 or self.step in (train.max_steps, end):
                        saved = self.save_checkpoint()
                    signum = self._agreed_signal(caught)
                    if signum:
                        path = saved or self.save_checkpoint()
                        self.stopped_by = signal.Signals(signum)
                        acc.print(
                            f"\n{self.stopped_by.name}: stopped at step {self.step} with a checkpoint in {path}; "
                            "continue with --resume latest"
                        )
                        break
        finally:  # also on errors: without end_training, about 1 in 4 multi-process runs abort at exit
            bar.close()
            acc.end_training()
        return last

    def _agreed_signal(self, caught: list[int]) -> int:
        """The signal any process caught (0 if none): every process sees the same answer after the same step,
        so all of them stop together, which a collective save_state needs."""
        signum = caught[0] if caught else 0
        if self.accelerator.num_processes == 1:
            return signum
        flags = self.accelerator.gather(torch.tensor([signum], device=self.accelerator.device))
        return int(flags.max())

    def _train_step(self, data) -> tuple[float | None, dict[str, float]]:
        """One optimizer step over `grad_accum` micro-batches; returns (mean loss or None if skipped, logs)."""
        acc, train = self.accelerator, self.train_config
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.step, train)
        losses, logs = [], {}
        while True:
            batch = next(data)
            with acc.accumulate(self.model):
                with acc.autocast():
                    loss, logs = self.task.loss(self.model, batch)
                acc.backward(loss)
                losses.append(loss.detach().float())
                if acc.sync_gradients:
                    break
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), train.grad_clip or float("inf"))
        finite = bool(torch.isfinite(grad_norm)) and all(bool(torch.isfinite(v)) for v in losses)
        if finite or train.mixed_precision == "fp16":  # fp16: the grad scaler skips inf steps itself
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if not finite:
            return self._nonfinite(), {}
        self.nonfinite_run = 0
        self.ema.update()
        mean = torch.stack(losses).mean()
        return float(acc.reduce(mean, reduction="mean")), {"grad_norm": float(grad_norm), **logs}

    def _nonfinite(self) -> None:
        self.nonfinite_total += 1
        self.nonfinite_run += 1
        logger.warning("non-finite loss or gradient at step %d: step skipped", self.step)
        if self.nonfinite_run > self.train_config.max_nonfinite:
            raise NonFiniteLossError(
                f"the loss or gradients were non-finite for {self.nonfinite_run} steps in a row (step "
                f"{self.step}); lower train.lr, set train.grad_clip, or check the data. The last good "
                f"checkpoint is under {self.checkpoint_dir}; resume with --resume latest."
            )
        return None

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        acc = self.accelerator
        metrics: dict[str, float] = {}
        if acc.is_main_process:
            model = acc.unwrap_model(self.model)
            model.eval()
            self.ema.ema_model.eval()
            metrics = self.task.evaluate(model, self.ema.ema_model)
            if hasattr(self.task, "save_samples"):
                self.task.save_samples(self.ema.ema_model, self.run_dir / "samples" / f"step_{self.step:07d}.png")
            model.train()
        acc.wait_for_everyone()
        return metrics

    def _log(self, metrics: dict[str, float]) -> None:
        if not metrics:
            return
        self.accelerator.log(metrics, step=self.step)
        if self.accelerator.is_main_process:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.step, **metrics}) + "\n")
            tqdm.write(f"step {self.step}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in metrics.items()))


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flat, tracker-friendly copy of a nested config (lists and None as strings)."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def train_main(kinds: tuple[str, ...], argv: list[str] | None, doc: str) -> Path:
    """The command line shared by the train/ scripts: CONFIG [key=value ...] [--resume latest] [--stop-at N].

    Returns:
        the run's export folder.
    """
    parser = argparse.ArgumentParser(
        description=doc.strip().splitlines()[0],
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("config", help="a YAML run config, e.g. configs/prior/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=3e-4 model.layers=2")
    parser.add_argument("--resume", help="'latest', or a checkpoint folder (runs/NAME/checkpoints/step_...)")
    parser.add_argument("--stop-at", type=int, help="stop after this many steps, with a checkpoint (resume later)")
    args = parser.parse_intermixed_args(argv)  # options and key=value overrides in any order
    from unclip.tasks import build_task

    try:
        config = load_config(args.config, args.overrides)
        if config.kind not in kinds:
            raise ValueError(f"{args.config} is a '{config.kind}' config; this script trains {' or '.join(kinds)}")
        task = build_task(config)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    trainer = Trainer(task, config)
    try:
        trainer.fit(resume=args.resume, stop_at=args.stop_at)
    except NonFiniteLossError as e:
        parser.exit(1, f"error: {e}\n")
    if trainer.stopped_by is not None:  # the shell's convention for a process ended by a signal
        sys.exit(128 + trainer.stopped_by)
    export = Path(config.train.output_dir) / "export"
    print(f"exported to {export}")
    return export


TRAIN_EPILOG = """\
Runs on one process with `python`, or on several with `accelerate launch` (multi-GPU and multi-node
through accelerate's config; on a CPU-only machine, `accelerate launch --multi_gpu --num_processes 2`
starts two gloo processes). Checkpoints go to <train.output_dir>/checkpoints, the EMA weights for
inference to <train.output_dir>/export, metrics to <train.output_dir>/metrics.jsonl. Ctrl-C or SIGTERM
stops at the end of the current step with a checkpoint (exit status 130 or 143); --resume latest goes on.
"""
