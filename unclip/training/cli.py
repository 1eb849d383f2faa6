"""The command line shared by the train/ scripts: CONFIG [key=value ...] [--resume latest | --overwrite].

Expected failures (a bad config or setting, a missing or corrupt checkpoint, a run folder in use, a diverged
run) end with a one-line `error: ...` and exit status 2 (before training) or 1 (during it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from unclip.clip import WEIGHTS_SUFFIXES
from unclip.config import RunConfig, load_config
from unclip.training.settings import check_train_config
from unclip.training.state import holds_run
from unclip.training.trainer import NonFiniteLossError, RunExistsError, Trainer

EPILOG = """\
Runs on one process with `python`, or on several with `accelerate launch` (multi-GPU and multi-node
through accelerate's config; on a CPU-only machine, `accelerate launch --multi_gpu --num_processes 2`
starts two gloo processes). Checkpoints go to <train.output_dir>/checkpoints, the EMA weights for
inference to <train.output_dir>/export, metrics to <train.output_dir>/metrics.jsonl. Ctrl-C or SIGTERM
stops at the end of the current step with a checkpoint (exit status 130 or 143); --resume latest goes on.
A folder that holds a run is only continued (--resume) or replaced (--overwrite), never mixed.
"""

IN_USE = "; continue it with --resume latest, or start afresh with --overwrite (deletes its checkpoints)"


def train_main(kinds: tuple[str, ...], argv: list[str] | None, doc: str) -> Path:
    """Parse the arguments, build the task and train it.

    Returns:
        the run's export folder.
    """
    parser = _parser(doc)
    args = parser.parse_intermixed_args(argv)  # options and key=value overrides in any order
    if args.resume and args.overwrite:
        parser.error("--resume and --overwrite exclude each other")
    if args.stop_at is not None and args.stop_at < 1:
        parser.error(f"--stop-at must be >= 1, got {args.stop_at}")
    try:
        config = _load(args, kinds)
        from unclip.tasks import build_task

        trainer = Trainer(build_task(config), config)
    except (ValueError, OSError) as e:
        _fail(2, e)
    try:
        trainer.fit(resume=args.resume, stop_at=args.stop_at, overwrite=args.overwrite)
    except RunExistsError as e:
        _fail(2, f"{e}{IN_USE}")
    except (NonFiniteLossError, ValueError, OSError) as e:
        _fail(1, e)
    if trainer.stopped_by is not None:  # the shell's convention for a process ended by a signal
        sys.exit(128 + trainer.stopped_by)
    export = Path(config.train.output_dir) / "export"
    print(f"exported to {export}")
    return export


def _parser(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=doc.strip().splitlines()[0], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", help="a YAML run config, e.g. configs/prior/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=3e-4 model.layers=2")
    parser.add_argument("--resume", help="'latest', or a checkpoint folder (runs/NAME/checkpoints/step_...)")
    parser.add_argument(
        "--overwrite", action="store_true", help="start afresh in a run folder that holds a run, replacing it"
    )
    parser.add_argument("--stop-at", type=int, help="stop after this many steps, with a checkpoint (resume later)")
    return parser


def _load(args: argparse.Namespace, kinds: tuple[str, ...]) -> RunConfig:
    """The run config, checked as far as it can be before the (slow) build of the task."""
    try:
        config = load_config(args.config, args.overrides)
    except yaml.YAMLError as e:
        raise ValueError(f"{args.config} or an override is not valid YAML ({e})") from None
    if config.kind not in kinds:
        raise ValueError(f"{args.config} is a '{config.kind}' config; this script trains {' or '.join(kinds)}")
    check_train_config(config.train, config.kind)
    absolute_weights_path(config)
    run_dir = Path(config.train.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"train.output_dir={run_dir} is a file, not a folder")
    if args.resume not in (None, "latest") and not Path(args.resume).is_dir():
        raise ValueError(
            f"--resume {args.resume}: no such checkpoint folder; give 'latest' or a folder such as "
            f"{run_dir / 'checkpoints' / 'step_0001000'}"
        )
    if not args.resume and not args.overwrite and holds_run(run_dir):
        raise ValueError(f"{run_dir} already holds a training run{IN_USE}")
    return config


def absolute_weights_path(config: RunConfig) -> None:
    """Make a relative `clip.pretrained` weights file absolute, so that the run's config.json and export name the
    file whatever folder later reads them (train/pipeline.py takes the decoder's CLIP from there). Pretrained tags
    have no suffix and stay as they are."""
    pretrained = config.clip.pretrained
    if pretrained and Path(pretrained).suffix in WEIGHTS_SUFFIXES and Path(pretrained).is_file():
        config.clip.pretrained = str(Path(pretrained).resolve())


def _fail(status: int, error: BaseException | str) -> None:
    message = " ".join(str(error).split())  # one line, whatever the exception's own layout
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)
