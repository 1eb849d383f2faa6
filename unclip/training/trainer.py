"""The one trainer behind every `train/*.py`: Accelerate, mixed precision, accumulation, EMA, checkpoints.

    trainer = Trainer(task, config)
    trainer.fit(resume="latest")

A `Task` (unclip/tasks/) says what is trained and how: its model, datasets, `loss(model, batch)`,
`evaluate(model)` and `export(model, directory)`. The trainer does the rest, the same way for every stage:

- Accelerate: multi-GPU / multi-node through `accelerate launch` and its config, several processes on CPU
  (gloo) with `accelerate launch --multi_gpu --num_processes 2` on a machine without CUDA;
- mixed precision "no" | "fp16" | "bf16", with autocast around the whole loss (fp16 needs CUDA);
- gradient accumulation through `accelerator.accumulate`, so N processes × batch B equals one process with
  N× accumulation (tests/test_training.py checks the weights);
- `train.distributed=fsdp`: weights, gradients, optimizer state and EMA sharded over the processes with PyTorch
  FSDP2 through Accelerate (unclip/training/sharding.py), checkpoints gathered into the same files;
- AdamW, linear warmup then cosine decay (set by hand each step, so it does not depend on the process count),
  gradient clipping, EMA (ema-pytorch);
- a guard against non-finite losses and gradients: the step is skipped and counted, and the run stops with a
  clear message after `train.max_nonfinite` in a row;
- random streams per process: before each micro-batch the global torch RNG (timesteps, noise, dropout and
  conditioning-drop masks, crops, inpainting masks) is seeded from (train.seed, the micro-batch's global
  index), so processes draw differently, N processes equal one with N× accumulation, and a resume needs no
  RNG state;
- checkpoints every `train.checkpoint_every` steps under `checkpoints/step_XXXXXXX` (unclip/training/state.py:
  safetensors and JSON, nothing pickled), written to a temporary folder and renamed, plus the inference export
  (EMA weights) under `export/`; `fit(resume="latest")` continues from the newest intact checkpoint and gives
  the same weights as an uninterrupted run; a fresh run into a folder that holds a run is refused unless
  `fit(overwrite=True)`;
- SIGTERM or SIGINT (`kill`, Ctrl-C, a scheduler's preemption, torchrun passing either on) ends the run at
  the next step boundary with a checkpoint, all processes at the same step; a second signal acts at once;
- logging to `metrics.jsonl` in the run folder and to Accelerate's trackers (tensorboard when installed),
  with a tqdm bar on the main process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import time
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
from unclip.config import RunConfig
from unclip.lora import add_lora, save_adapter
from unclip.training import sharding
from unclip.training.settings import check_train_config, lr_at
from unclip.training.signals import ignore_stop_signals, stop_signals
from unclip.training.state import (
    CheckpointError,
    TrainingState,
    clear_run,
    complete_checkpoints,
    holds_run,
    init_weights,
    load_into,
    read_checkpoint,
    rotate_checkpoints,
    write_checkpoint,
)

logger = logging.getLogger(__name__)


class Task(Protocol):
    """What a stage supplies to the trainer."""

    kind: str
    model: nn.Module
    train_dataset: Dataset
    collate_fn: Any

    def setup(self, device: torch.device) -> None: ...  # move frozen helpers (CLIP) to the device

    # draws its randomness (timesteps, noise, masks, crops) from torch's global RNG, which the trainer seeds
    # for each micro-batch
    def loss(self, model: nn.Module, batch: Any) -> tuple[Tensor, dict[str, float]]: ...

    def evaluate(self, model: nn.Module, ema_model: nn.Module) -> dict[str, float]: ...

    def export(self, model: nn.Module, directory: Path) -> None: ...

    # optional: `save_samples(ema_model, path)` writes a sample grid at every evaluation


class NonFiniteLossError(RuntimeError):
    pass


class RunExistsError(ValueError):
    """A fresh run was asked for in a folder that holds another run."""


def micro_batch_seed(seed: int, index: int) -> int:
    """The seed of the random stream of global micro-batch `index` (a process's micro-batch i is global
    micro-batch i·N + rank): distinct for every process and step, and the same for N processes as for one
    process with N× accumulation, which sees the same micro-batches in the same order."""
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # a non-negative int64


def make_accelerator(config: RunConfig) -> Accelerator:
    train = config.train
    cuda = torch.cuda.is_available()
    if train.mixed_precision == "fp16" and not cuda:
        raise ValueError(
            "train.mixed_precision=fp16 needs a CUDA device; on CPU use 'no' "
            "(or 'bf16', which CPUs without bf16 units emulate very slowly)"
        )
    trackers = ["tensorboard"] if importlib.util.find_spec("tensorboard") else None
    fsdp = sharding.fsdp_plugin(train.mixed_precision) if train.distributed == "fsdp" else None
    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision=train.mixed_precision,
        gradient_accumulation_steps=train.grad_accum,
        log_with=trackers,
        project_dir=train.output_dir,
        # the shuffle order is a function of (seed, epoch): the same for 1 or N processes, and after a resume
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train.seed),
        fsdp_plugin=fsdp,
    )
    if fsdp is not None:
        sharding.enable_on_cpu(accelerator, fsdp)
    return accelerator


def _make_ema(model: nn.Module, train, ema_model: nn.Module | None = None) -> EMA:
    return EMA(
        model,
        ema_model=ema_model,
        beta=train.ema_beta,
        update_after_step=train.ema_warmup_steps,
        update_every=train.ema_update_every,
        include_online_model=False,
        # buffers are copied, not averaged: averaging a -inf attention mask gives NaN, and statistics
        # such as the prior's embedding normalisation are constants; so are frozen weights (train.lora)
        param_or_buffer_names_no_ema={name for name, _ in model.named_buffers()}
        | {name for name, p in model.named_parameters() if not p.requires_grad},
    )


class Trainer:
    """Trains `task.model` according to `config.train`; see the module docstring."""

    def __init__(self, task: Task, config: RunConfig, accelerator: Accelerator | None = None):
        check_train_config(config.train, config.kind)
        self.task, self.config, self.train_config = task, config, config.train
        self.run_dir = Path(config.train.output_dir)
        self.accelerator = accelerator or make_accelerator(config)
        self.sharded = sharding.is_sharded(self.accelerator)
        self.plain: nn.Module | None = None  # sharded: a full copy on the main process's CPU, for export and eval
        self.step = 0  # optimizer steps taken
        self.micro_batches = 0  # micro-batches this process has trained on (the key of its random streams)
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
        if train.lora:  # the loaded weights stay frozen; only the adapters train
            add_lora(model, train.lora)
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
            worker_init_fn=ignore_stop_signals,
        )
        if self.sharded:  # the EMA: a copy sharded like the network (tasks are built under train.seed)
            prepared = sharding.prepare(acc, model, optimizer, loader)
            self.model, self.optimizer, self.loader, ema_model, self.plain = prepared
            self.ema = _make_ema(self.model, train, ema_model)
            return
        self.model, self.optimizer, self.loader = acc.prepare(model, optimizer, loader)
        # the EMA starts from the prepared model, whose weights every process now shares (DDP broadcasts rank 0's)
        self.ema = _make_ema(acc.unwrap_model(self.model), train).to(acc.device)

    # -- checkpoints -----------------------------------------------------------------------------------

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def complete_checkpoints(self) -> list[Path]:
        return complete_checkpoints(self.checkpoint_dir)

    def save_checkpoint(self) -> Path:
        """Save the training state atomically, then export the EMA model for inference.

        Every process holds the same weights and optimizer state, so the main process writes them alone; sharded,
        every process first sends its shards to the main one.
        """
        acc = self.accelerator
        final = self.checkpoint_dir / f"step_{self.step:07d}"
        tmp = self.checkpoint_dir / f".tmp_step_{self.step:07d}"
        acc.wait_for_everyone()
        model, ema, optimizer = acc.unwrap_model(self.model), self.ema, self.optimizer
        if self.sharded:
            model, ema, optimizer = sharding.gather_all(self.model, self.ema, self.optimizer)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            write_checkpoint(tmp, model=model, ema=ema, optimizer=optimizer, state=self._state())
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._export(ema if self.sharded else None)
            rotate_checkpoints(self.checkpoint_dir, self.train_config.keep_checkpoints)
        acc.wait_for_everyone()
        return final

    def _state(self) -> dict[str, Any]:
        scaler = self.accelerator.scaler
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "micro_batches": self.micro_batches,
            "nonfinite_total": self.nonfinite_total,
            "nonfinite_run": self.nonfinite_run,
            "num_processes": self.accelerator.num_processes,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "config": self.config.to_dict(),
        }

    def _export(self, gathered_ema: dict[str, Tensor] | None = None) -> None:
        """Write the EMA model's inference folder to export/ (built aside, then swapped in); sharded, from the
        gathered EMA state."""
        export, tmp, old = self.run_dir / "export", self.run_dir / ".export.tmp", self.run_dir / ".export.old"
        shutil.rmtree(tmp, ignore_errors=True)
        ema_model = self.ema.ema_model if gathered_ema is None else sharding.load_ema_into(self.plain, gathered_ema)
        if self.train_config.lora:  # the adapter alone
            save_adapter(ema_model, tmp, kind=self.task.kind, base=self.train_config.init_from)
        else:
            self.task.export(ema_model, tmp)
        shutil.rmtree(old, ignore_errors=True)
        if export.exists():
            os.replace(export, old)
        os.replace(tmp, export)
        shutil.rmtree(old, ignore_errors=True)

    def resume(self, resume: str | Path) -> None:
        """Continue from `resume`: "latest" (the newest intact checkpoint; a corrupt one is skipped with a
        warning) or a checkpoint folder."""
        latest = str(resume) == "latest"
        candidates = complete_checkpoints(self.checkpoint_dir)[::-1] if latest else [Path(resume)]
        if latest and not candidates:
            self.accelerator.print(f"no checkpoint under {self.checkpoint_dir}; starting from scratch")
            return
        for path in candidates:
            try:
                self._load(read_checkpoint(path))
                break
            except CheckpointError as e:
                if not latest:
                    raise
                self.accelerator.print(f"warning: skipping the checkpoint {path}: {e}")
        else:
            raise CheckpointError(f"no intact checkpoint under {self.checkpoint_dir}")
        self.accelerator.print(f"resumed from {path} at step {self.step}")

    def _load(self, loaded: TrainingState) -> None:
        acc, state = self.accelerator, loaded.state
        if self.sharded:
            sharding.load_checkpoint(self.model, self.ema, self.optimizer, loaded)
        else:
            load_into(acc.unwrap_model(self.model), loaded.model, loaded.path / "model.safetensors")
            load_into(self.ema, loaded.ema, loaded.path / "ema.safetensors")
        try:
            if not self.sharded:
                self.optimizer.load_state_dict(loaded.optimizer)
            if acc.scaler is not None and state.get("scaler"):
                acc.scaler.load_state_dict(state["scaler"])
            self.step, self.epoch = int(state["step"]), int(state["epoch"])
            self.batch_in_epoch, self.micro_batches = int(state["batch_in_epoch"]), int(state["micro_batches"])
            self.nonfinite_total, self.nonfinite_run = int(state["nonfinite_total"]), int(state["nonfinite_run"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{loaded.path} does not fit this run ({type(e).__name__}: {e})") from None
        if state.get("num_processes", 1) != acc.num_processes:
            acc.print(
                f"warning: {loaded.path} was saved by {state['num_processes']} processes, resuming with "
                f"{acc.num_processes}; the data order and random streams will differ"
            )

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

    def fit(
        self, resume: str | Path | None = None, stop_at: int | None = None, *, overwrite: bool = False
    ) -> dict[str, float]:
        """Train to `train.max_steps` optimizer steps; returns the last logged metrics.

        Args:
            resume: "latest" or a checkpoint folder to continue from.
            stop_at: leave after this step with a checkpoint, as a time-sliced run (or a kill) would; a
                later `fit(resume="latest")` continues exactly where it stopped.
            overwrite: without `resume`, delete the outputs of a run already in the run folder (its
                checkpoints, export, samples and metrics); without it such a folder raises RunExistsError.
        """
        acc, train = self.accelerator, self.train_config
        if not resume:
            self._claim_run_dir(overwrite)
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

    def _claim_run_dir(self, overwrite: bool) -> None:
        """Refuse (or with `overwrite`, clear) a run folder that holds another run, on every process alike."""
        acc = self.accelerator
        exists = holds_run(self.run_dir)
        acc.wait_for_everyone()  # every process has looked before the main one clears anything
        if exists and not overwrite:
            raise RunExistsError(f"{self.run_dir} already holds a training run")
        if exists and acc.is_main_process:
            clear_run(self.run_dir)
        acc.wait_for_everyone()

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
            index = self.micro_batches * acc.num_processes + acc.process_index
            torch.manual_seed(micro_batch_seed(train.seed, index))
            self.micro_batches += 1
            with acc.accumulate(self.model):
                with acc.autocast():
                    loss, logs = self.task.loss(self.model, batch)
                acc.backward(loss)
                losses.append(loss.detach().float())
                if acc.sync_gradients:
                    break
        grad_norm = sharding.full_value(acc.clip_grad_norm_(self.model.parameters(), train.grad_clip or float("inf")))
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
        model, ema_model = acc.unwrap_model(self.model), self.ema.ema_model
        if self.sharded:  # whole copies on the main process, on its device for the evaluation's duration
            online, ema = sharding.gather_model(self.model), sharding.gather_ema(self.ema)
            if acc.is_main_process:
                ema_model = sharding.load_ema_into(self.plain, ema).to(acc.device)
                model = sharding.loaded_copy(ema_model, online)
        if acc.is_main_process:
            model.eval()
            ema_model.eval()
            metrics = self.task.evaluate(model, ema_model)
            if hasattr(self.task, "save_samples"):
                self.task.save_samples(ema_model, self.run_dir / "samples" / f"step_{self.step:07d}.png")
            model.train()
            if self.sharded:
                del model
                self.plain.cpu()
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
