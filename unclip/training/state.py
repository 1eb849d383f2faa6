"""Where a training run's weights go and come from: its checkpoints, and an export to start from (init_from).

A checkpoint is a folder `checkpoints/step_XXXXXXX` of the run folder:

    model.safetensors      the online network's weights
    ema.safetensors        the EMA's weights and counters (ema-pytorch's state_dict)
    optimizer.safetensors  the optimizer's per-parameter tensors (AdamW's moments and step counts)
    trainer_state.json     the optimizer's hyperparameters, the step and data position, the grad scaler, the
                           run's config; written last, so a folder without it is incomplete

Nothing is pickled: safetensors and JSON hold data only, so resuming a checkpoint from someone else cannot
execute code. The data order is a function of (seed, epoch) and the random streams of the training loop are
functions of (seed, micro-batch index) (see trainer.py), so the step and the position in the epoch
are all the randomness a resume needs.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from unclip.checkpoint import atomic_save_safetensors, atomic_write_bytes

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
MODEL_FILE, EMA_FILE, OPTIMIZER_FILE = "model.safetensors", "ema.safetensors", "optimizer.safetensors"
PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt")
RUN_OUTPUTS = ("checkpoints", "export", "samples", "metrics.jsonl", "config.json")  # what a training run writes


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed from: missing, incomplete, corrupt or of another model."""


@dataclass
class TrainingState:
    """A checkpoint read into memory, checked before any of it is applied."""

    path: Path
    state: dict[str, Any]  # trainer_state.json
    model: dict[str, Tensor]
    ema: dict[str, Tensor]
    optimizer: dict[str, Any]  # an optimizer state_dict


# -- listing and rotation --------------------------------------------------------------------------------


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """The checkpoint folders holding a state file, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [p for p in checkpoint_dir.glob("step_*") if p.name[5:].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def rotate_checkpoints(checkpoint_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` (>= 1) complete checkpoints."""
    if keep < 1:
        raise ValueError(f"train.keep_checkpoints must be >= 1, got {keep}")
    for old in complete_checkpoints(checkpoint_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def holds_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds the outputs of a training run."""
    return any((run_dir / name).exists() for name in RUN_OUTPUTS)


def clear_run(run_dir: Path) -> None:
    """Delete what a training run wrote into `run_dir` (and nothing else there)."""
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


# -- writing ----------------------------------------------------------------------------------------------


def write_checkpoint(
    directory: Path,
    *,
    model: nn.Module | dict[str, Tensor],
    ema: nn.Module | dict[str, Tensor],
    optimizer: torch.optim.Optimizer | dict[str, Any],
    state: dict[str, Any],
) -> None:
    """Write a checkpoint into the (new, empty) folder `directory`; the state file comes last. The model, EMA and
    optimizer are given as themselves or as their (gathered) state dicts."""
    atomic_save_safetensors(_tensors(_state_dict(model)), directory / MODEL_FILE)
    atomic_save_safetensors(_tensors(_state_dict(ema)), directory / EMA_FILE)
    tensors, optimizer_meta = split_optimizer_state(_state_dict(optimizer))
    atomic_save_safetensors(_tensors(tensors), directory / OPTIMIZER_FILE)
    state = {**state, "optimizer": optimizer_meta}
    atomic_write_bytes(directory / STATE_FILE, json.dumps(state, indent=2).encode())


def _state_dict(holder: Any) -> dict[str, Any]:
    return holder if isinstance(holder, dict) else holder.state_dict()


def _tensors(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU copies (safetensors stores no views and no shared storage)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimizer state_dict as ({"<param index>.<name>": tensor}, JSON-able rest)."""
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for name, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `split_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


# -- reading ----------------------------------------------------------------------------------------------


def read_checkpoint(path: Path) -> TrainingState:
    """Read and check every file of a checkpoint folder; a CheckpointError names the file that is wrong.

    Pickled files (such as other trainers write) are never opened; their names are logged.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a checkpoint folder (no such folder)")
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        logger.warning("%s: ignoring %s (pickled files are never loaded: they could run code)", path, pickles)
    state = _read_json(path / STATE_FILE)
    try:
        optimizer = join_optimizer_state(_read_tensors(path / OPTIMIZER_FILE), state["optimizer"])
        step = int(state["step"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path / STATE_FILE} is not a trainer state ({type(e).__name__}: {e})") from None
    if step < 0:
        raise CheckpointError(f"{path / STATE_FILE}: step {step} is negative")
    return TrainingState(path, state, _read_tensors(path / MODEL_FILE), _read_tensors(path / EMA_FILE), optimizer)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a trainer state")
    return state


def _read_tensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete or was written by another program")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt ({e})") from None


def load_into(module: nn.Module, tensors: dict[str, Tensor], source: Path) -> None:
    """module.load_state_dict(tensors), with a CheckpointError naming `source` when they do not fit."""
    try:
        module.load_state_dict(tensors)
    except (RuntimeError, ValueError, KeyError) as e:
        message = " ".join(str(e).split())
        raise CheckpointError(f"{source} does not fit this run's model ({message[:500]})") from None


# -- starting from an export ------------------------------------------------------------------------------


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
