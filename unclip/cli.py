"""The command line the sample/ scripts share: the pipeline, device and output options, and error handling.

    parser = sample_parser(__doc__)
    parser.add_argument("--image", required=True)
    args = parser.parse_args(argv)
    return run_sample(args, lambda pipe: pipe.variations(args.image, n=args.n, seed=args.seed, size=...))

Expected failures (a missing pipeline folder, an empty prompt, an unreadable image, an impossible size, a
setting out of range, a device that is not there, corrupt weights, running out of memory) end the script with
one line, "error: ...", and exit status 1 (2 for a bad command line), never a traceback. Images are written as
soon as they are made; Ctrl-C or SIGTERM keeps them and exits 130 / 143.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from unclip.pipeline import UnCLIPPipeline

# torch and the pipeline are imported when a script runs, not for --help

# the flag that sets each sampling setting, for error messages
FLAGS = {
    "decoder.steps": "--steps",
    "decoder.guidance_scale": "--guidance",
    "decoder.text_guidance_scale": "--text-guidance",
    "decoder.clip_guidance_scale": "--clip-guidance",
    "decoder.sampler": "--sampler",
    "prior.steps": "--prior-steps",
    "prior.guidance_scale": "--prior-guidance",
    "candidates": "--candidates",
    "preview_steps": "--preview-steps",
    "pruning": "--pruning",
    "seed": "--seed",
    "inpaint.steps": "--steps",
    "inpaint.guidance_scale": "--guidance",
    "inpaint.sampler": "--sampler",
    "inversion steps": "--steps",
    "eta": "--eta",
    "resample": "--resample",
}


MAX_SEED = 2**62  # torch generators take 64-bit seeds; image i of a run (and its candidates) adds to it


def whole_number(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum}, got {value}")
        return value

    return parse


def finite_number(minimum: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < minimum:
            raise argparse.ArgumentTypeError(f"must be a finite number >= {minimum:g}, got {text}")
        return value

    return parse


def sample_parser(doc: str, *, n: str | None = "images to make") -> argparse.ArgumentParser:
    """A parser whose help is the script's docstring, with the options every sample script takes."""
    lines = doc.strip().splitlines()
    p = argparse.ArgumentParser(
        description=lines[0], epilog="\n".join(lines[1:]), formatter_class=argparse.RawDescriptionHelpFormatter
    )
    if n:
        p.add_argument("--n", type=whole_number(1), default=4, help=f"{n} (default 4)")
    p.add_argument("--seed", type=whole_number(0, MAX_SEED), default=0, help="image i uses seed + i (default 0)")
    p.add_argument(
        "--size", type=whole_number(1), help="output size, 64, 256 or 1024 as the pipeline allows (default: largest)"
    )
    p.add_argument("--pipeline", help="pipeline folder (default: the bundled models/shapes)")
    p.add_argument("--out", default="outputs", help="output folder (default outputs/)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace files of the same name (default: write NAME-2.png, ...)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars (they are shown only on a terminal anyway)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when there is a GPU, else cpu)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="fp32", help=DTYPE_HELP)
    return p


DTYPE_CHOICES = ("fp32", "fp16", "bf16", "auto")
DTYPE_HELP = (
    "fp32 (the default); fp16 or bf16 autocast; auto: bf16 where the device computes it natively (a GPU that "
    "supports it, or a CPU with avx512_bf16 or amx_bf16 units), else fp32. Reduced precision is faster and its "
    "images differ slightly from fp32's; the metadata records the one used"
)


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has bf16 arithmetic units (the avx512_bf16 or amx_bf16 flags of /proc/cpuinfo); False
    where that cannot be read. Without them bf16 is emulated, and slower than fp32."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = {
        flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()
    }
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def resolve_dtype(dtype: str, device: str) -> str:
    """`dtype`, with "auto" made bf16 or fp32 for `device` (see DTYPE_HELP)."""
    if dtype != "auto":
        return dtype
    import torch

    if device.split(":")[0] == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def check_device(name: str | None) -> str:
    """The device to run on: `name`, or cuda when there is a GPU; a ValueError for one that is not there."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return name
    if device.type != "cuda":
        raise ValueError(f"--device {name!r}: this toolkit runs on cpu or cuda")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} GPUs")
    return name


def process_share() -> tuple[int, int, int]:
    """(rank, number of processes, local rank) of a command started by `accelerate launch` or torchrun, which set
    RANK, WORLD_SIZE and LOCAL_RANK; (0, 1, 0) for a plain `python`."""
    return tuple(
        int(os.environ.get(name, default)) for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0))
    )


def others_batches(count: int, batch_size: int) -> frozenset[int]:
    """The starts of the batches of a `count`-image call that the other processes make: batch k goes to process
    k mod N. Each image keeps the seed (and name) its index gives it, so N processes write what one would."""
    rank, processes, _ = process_share()
    return frozenset(start for k, start in enumerate(range(0, count, batch_size)) if k % processes != rank)


def finished_batches(folder: str | Path, prompts: list[str], batch_size: int, call) -> frozenset[int]:
    """The starts of the batches whose every image is already in `folder`, made with the same settings: image i
    is there when a PNG named for prompt i and one of its candidates' seeds (call.seed + i·candidates ...) holds
    that prompt and `call.metadata()` (--skip-existing). Each image's seed is fixed by its index, so the batches
    made again are the images an uninterrupted run would have written."""
    from unclip.imageio import read_png_metadata
    from unclip.outputs import slug

    settings, c = json.loads(json.dumps(call.metadata())), call.candidates

    def exists(i: int) -> bool:
        for seed in range(call.seed + i * c, call.seed + (i + 1) * c):
            path = Path(folder) / f"{slug(prompts[i])}_{seed:05d}.png"
            try:
                meta = read_png_metadata(path) if path.is_file() else None
                if meta and meta.get("prompt") == prompts[i] and json.loads(meta.get("settings", "null")) == settings:
                    return True
            except (OSError, ValueError):  # unreadable or cut short: made again
                continue
        return False

    starts = range(0, len(prompts), batch_size)
    return frozenset(s for s in starts if all(exists(i) for i in range(s, min(s + batch_size, len(prompts)))))


def check_out(folder: str | Path) -> Path:
    """--out as a folder this process can write to (made if missing), checked before any sampling."""
    if not str(folder).strip():
        raise ValueError("--out is empty; give a folder (it is made if missing)")
    folder = Path(folder)
    try:
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"--out {folder} is a file, not a folder; choose a folder")
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a name too long, a file in the path, no permission
        raise ValueError(f"--out {folder}: cannot create the folder ({e.strerror})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"--out {folder} is not writable; choose another folder")
    return folder


def error_message(e: BaseException) -> str:
    from unclip.sampling import SettingError

    if isinstance(e, SettingError):
        flag = FLAGS.get(e.name)
        return f"{flag} ({e.name}) {e.problem}" if flag else str(e)
    if _out_of_memory(e):
        return "out of memory; lower --n, --candidates or --size (or the batch size), or use a GPU"
    return str(e)


def _out_of_memory(e: BaseException) -> bool:
    import torch

    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(e).lower()


def fail(e: BaseException) -> None:
    sys.exit(f"error: {error_message(e)}")


class StepProgress:
    """Progress on stderr: a bar per stage of each batch, "[k/N images] decoder (64 images)", from the
    pipeline's `progress` reports."""

    def __init__(self, total: int | None = None):
        self.total, self.done, self.bar, self.desc = total, 0, None, ""

    def __call__(self, info: dict[str, Any]) -> None:
        from tqdm.auto import tqdm

        where = f"[{self.done}/{self.total} images] " if self.total else ""
        desc = f"{where}{info['stage']} ({info['images']} image{'s' * (info['images'] != 1)})"
        if info["step"] == 1 or self.bar is None:
            self.close()
            self.bar = tqdm(total=info["steps"], desc=desc, unit="step", leave=False, file=sys.stderr)
        elif desc != self.desc:  # pruning dropped candidates
            self.bar.set_description_str(desc, refresh=False)
        self.desc = desc
        self.bar.update(1)
        if info["step"] >= info["steps"]:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Stopped(Exception):
    def __init__(self, signum: int):
        self.signum = signum


class _StopSignals:
    """The SIGINT/SIGTERM handler of `run_batches`: it raises Stopped, except inside `deferred()`, where the
    signal waits until the block ends, so that a batch being written is written, printed and counted whole."""

    def __init__(self):
        self.deferring, self.pending = False, None

    def __call__(self, signum, frame):
        if not self.deferring:
            raise Stopped(signum)
        self.pending = self.pending or signum

    @contextlib.contextmanager
    def deferred(self):
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending is not None:
            signum, self.pending = self.pending, None
            raise Stopped(signum)


def load(args: argparse.Namespace, total: int | None = None) -> UnCLIPPipeline:
    from unclip.pipeline import DEFAULT_PIPELINE, UnCLIPPipeline

    args.device = check_device(args.device)
    args.dtype = resolve_dtype(args.dtype, args.device)
    _, processes, local_rank = process_share()
    if processes > 1 and args.device == "cuda":  # one GPU per process
        args.device = f"cuda:{local_rank}"
    args.out = check_out(args.out)
    args.pipeline = args.pipeline or DEFAULT_PIPELINE
    pipe = UnCLIPPipeline.from_pretrained(args.pipeline, device=args.device, dtype=args.dtype)
    args.size = args.size or max(pipe.sizes)
    pipe.check_size(args.size)
    if not args.quiet and sys.stderr.isatty():
        pipe.progress = StepProgress(total)
    return pipe


def run_sample(args: argparse.Namespace, make: Callable[[UnCLIPPipeline], Any]) -> list[Path]:
    """Load the pipeline, call `make(pipe)`, save what it returns under --out and print the paths."""
    try:
        pipe = load(args)
        out = make(pipe)
        paths = out.save(args.out, overwrite=args.overwrite)
    except (ValueError, OSError, RuntimeError, MemoryError) as e:
        if isinstance(e, RuntimeError) and not _out_of_memory(e):
            raise
        fail(e)
    for path in paths:
        print(path)
    return paths


def run_batches(
    args: argparse.Namespace, make: Callable[[UnCLIPPipeline], Iterator[Any]], total: int | None = None
) -> list[Path]:
    """Like `run_sample` for an iterator of batch outputs: each batch is written as soon as it is made, and a
    grid of all of them at the end. Ctrl-C or SIGTERM writes the grid of the finished images and exits 130/143.
    Started as several processes (`accelerate launch`, torchrun), each writes its own batches and no grid."""
    stops = _StopSignals()
    handlers = {s: signal.signal(s, stops) for s in (signal.SIGINT, signal.SIGTERM)}
    done, paths = [], []
    try:
        pipe = load(args, total)
        for out in make(pipe):
            with stops.deferred():  # a signal now stops the run once this batch is written and counted
                if pipe.progress is not None:
                    pipe.progress.close()
                    pipe.progress.done += len(out.prompts)
                written = out.save(args.out, overwrite=args.overwrite, grid=False)
                done.append(out)
                paths += written
                for path in written:
                    print(path, flush=True)
        if done and process_share()[1] == 1:
            paths.append(_write_grid(done, args))
            print(paths[-1])
        return paths
    except Stopped as stop:
        if done and process_share()[1] == 1:
            print(_write_grid(done, args))
        print(f"stopped: kept the {sum(len(o.prompts) for o in done)} finished images", file=sys.stderr)
        sys.exit(128 + stop.signum)
    except (ValueError, OSError, RuntimeError, MemoryError) as e:
        if isinstance(e, RuntimeError) and not _out_of_memory(e):
            raise
        fail(e)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def _write_grid(outputs: list, args: argparse.Namespace) -> Path:
    return type(outputs[0]).concat(outputs).save_grid(args.out, overwrite=args.overwrite)
