"""What every benchmark shares: the peer import, the timed and measured call, FLOP counting and the table.

A benchmark case holds two or more `Contender`s, each a zero-argument callable that does one unit of work (a
training step, or one sampling loop), built on the same inputs. `measure_case` runs them alternately, in an
order that flips every repeat (ours, theirs, theirs, ours, ...), so that a slow drift of the machine (a
neighbour's load, clocks, the allocator's warm-up) lands on both.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import statistics
import sys
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent
PEER_DIR = REPO / ".bench-deps"
PEER_VERSION = "1.15.6"
OURS, THEIRS = "unclip", f"dalle2-pytorch {PEER_VERSION}"


def import_peer() -> types.ModuleType:
    """Import `dalle2_pytorch.dalle2_pytorch` (the module holding Unet, Decoder, DiffusionPrior) from .bench-deps.

    Stub: the package's `__init__.py` also imports its trainer, trackers and training configs, which need
    pydantic, pytorch-warmup, webdataset, embedding-reader and torchmetrics, none of which the classes
    benchmarked here use. So the package is registered in sys.modules as a bare module with the installed
    folder as its `__path__`, and only the `dalle2_pytorch.dalle2_pytorch` submodule (and what it imports
    itself: kornia, x-clip, coca-pytorch, vector-quantize-pytorch, rotary-embedding-torch, resize-right) is
    loaded. Its tqdm progress bars are replaced by a pass-through, so that they do not write to the terminal.
    """
    if str(PEER_DIR) not in sys.path:
        sys.path.insert(0, str(PEER_DIR))
    if "dalle2_pytorch.dalle2_pytorch" not in sys.modules:
        spec = importlib.util.find_spec("dalle2_pytorch")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(
                f"dalle2-pytorch is not installed in {PEER_DIR}; see bench/README.md:\n"
                "    pip install --no-deps --upgrade --target .bench-deps -r bench/requirements.txt"
            )
        package = types.ModuleType("dalle2_pytorch")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["dalle2_pytorch"] = package
    with warnings.catch_warnings():  # their dependencies use deprecated torch.cuda.amp decorators
        warnings.simplefilter("ignore", FutureWarning)
        import dalle2_pytorch.dalle2_pytorch as peer
    peer.tqdm = lambda iterable, *args, **kwargs: iterable
    return peer


def load_pipeline(path: str | Path, device: str | torch.device = "cpu"):
    """The pipeline folder at `path`; a missing or broken one ends the benchmark with the loader's message (what
    is wrong, what to pass instead), not a traceback."""
    from unclip.cli import fail
    from unclip.pipeline import UnCLIPPipeline

    try:
        return UnCLIPPipeline.from_pretrained(path, device=device)
    except (OSError, ValueError) as e:
        fail(e)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- settings ---------------------------------------------------------------------------------------------


@dataclass
class Settings:
    device: torch.device
    dtype: str = "fp32"  # "fp32", or "bf16" for autocast around the forward passes
    repeats: int = 5
    warmup: int = 1
    max_steps: int | None = None  # cap on the denoising steps of a sampling loop; the total is then projected
    peak_tflops: float | None = None
    decoder_batch: int = 8  # the decoder training step's batch

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def steps(self, nominal: int) -> int:
        """The denoising steps to run for a loop of `nominal` steps."""
        return nominal if self.max_steps is None else max(1, min(nominal, self.max_steps))


# -- contenders and cases ---------------------------------------------------------------------------------


@dataclass
class Contender:
    """One implementation's unit of work.

    `run` does the work once. For a sampling loop, `net` is the network whose forward calls are counted and
    `calls_per_step` how many of them one denoising step makes (2 where the guidance runs the conditional and
    unconditional passes one after the other, 1 where they share a doubled batch); `nominal_steps` is the
    number of steps of the full loop, for the projected total when `run` was capped at fewer.
    """

    name: str
    run: Callable[[], Any]
    params: int
    net: nn.Module | None = None
    calls_per_step: int = 1
    nominal_steps: int = 1
    notes: str = ""
    flop_run: Callable[[], Any] | None = None  # a shorter run (fewer steps) to count FLOPs on; default `run`


@dataclass
class Case:
    name: str
    title: str  # one line for the table
    contenders: list[Contender]
    info: dict[str, Any] = field(default_factory=dict)


# -- measuring --------------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int | None:
    """The most memory that one call of `fn` holds at once on top of what was allocated before it, in bytes.

    CUDA: torch.cuda.max_memory_allocated above memory_allocated at the start. CPU: the running total of
    PyTorch's CPU allocator, read from the profiler's allocation events (process-wide RSS would mostly show
    the C allocator reusing memory kept from the warm-up). None where the profiler gives no such events.
    """
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    with (
        _quiet_stderr(),
        torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        fn()
    try:  # a private API: the profiler's event tree, whose allocation events carry the allocator's total
        from torch._C._profiler import _EventType

        events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            stack.extend(node.children)
            if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
                events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
    except (AttributeError, ImportError, RuntimeError):
        return None
    if not events:
        return None
    events.sort()
    base = events[0][2] - events[0][1]
    return max(total for _, _, total in events) - base


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ library logs each start and stop there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class CallCounter:
    """Counts a module's forward calls (the network evaluations of a sampling loop).

    It wraps the instance's `forward`, not `__call__` through a hook: DALLE2-pytorch's guidance calls
    `self.forward(...)` directly, which forward hooks do not see.
    """

    def __init__(self, module: nn.Module | None):
        self.calls = 0
        self.module = module
        if module is not None:
            forward = module.forward

            def counted(*args, **kwargs):
                self.calls += 1
                return forward(*args, **kwargs)

            module.forward = counted

    def remove(self) -> None:
        if self.module is not None:
            del self.module.forward  # back to the class's method


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call, as torch.utils.flop_counter counts them (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops()) as counter:
        fn()
    return counter.get_total_flops()


def _cpu_attention_flops() -> dict:
    """Formulas for the CPU kernels of F.scaled_dot_product_attention, which the FLOP counter leaves out (it
    counts the CUDA ones): without them an attention written as einsum would count and SDPA would not."""
    from torch.utils import flop_counter

    forward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if forward is None or backward is None or not hasattr(flop_counter, "sdpa_backward_flop_count"):
        return {}

    def forward_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)

    def backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)

    return {forward: forward_flops, backward: backward_flops}  # keyed by overload packet, as the registry is


def measure_case(case: Case, settings: Settings, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Count each contender's FLOPs and warm it up, time the contenders alternately, then measure memory.

    The FLOPs and the peak memory are measured on `flop_run` where a contender has one (the memory of a
    sampling loop is that of one step), else on `run`; the FLOP count on `run` doubles as its first warm-up.
    """
    device = settings.device
    results = {c.name: {"times": [], "steps": []} for c in case.contenders}
    counters = {c.name: CallCounter(c.net) for c in case.contenders}
    try:
        for c in case.contenders:
            log(f"  {case.name}: warm-up {c.name}")
            counters[c.name].calls = 0
            results[c.name]["flops"] = count_flops(c.flop_run or c.run)
            results[c.name]["flop_steps"] = _steps_run(c, counters[c.name])
            for _ in range(settings.warmup - (c.flop_run is None)):
                c.run()
        for r in range(settings.repeats):
            order = case.contenders if r % 2 == 0 else case.contenders[::-1]
            for c in order:
                counters[c.name].calls = 0
                synchronize(device)
                start = time.perf_counter()
                c.run()
                synchronize(device)
                elapsed = time.perf_counter() - start
                results[c.name]["times"].append(elapsed)
                results[c.name]["steps"].append(_steps_run(c, counters[c.name]))
            log(f"  {case.name}: repeat {r + 1}/{settings.repeats} done")
        for c in case.contenders:
            results[c.name]["peak"] = peak_memory(c.flop_run or c.run, device)
    finally:
        for counter in counters.values():
            counter.remove()
    return [_summarize(case, c, results[c.name], settings) for c in case.contenders]


def _steps_run(c: Contender, counter: CallCounter) -> int:
    if c.net is None:
        return 1
    if counter.calls == 0 or counter.calls % c.calls_per_step:
        raise RuntimeError(f"{c.name}: {counter.calls} network calls, not a multiple of {c.calls_per_step} per step")
    return counter.calls // c.calls_per_step


def _summarize(case: Case, c: Contender, raw: dict[str, Any], settings: Settings) -> dict[str, Any]:
    times = raw["times"]
    median = statistics.median(times)
    steps = raw["steps"][0]
    flops_per_step = raw["flops"] / raw["flop_steps"]
    per_step = median / steps
    gflops = flops_per_step / per_step / 1e9 if per_step > 0 else math.nan
    row = {
        "case": case.name,
        "title": case.title,
        "impl": c.name,
        "params": c.params,
        "repeats": len(times),
        "times_s": times,
        "median_s": median,
        "min_s": min(times),
        "max_s": max(times),
        "steps_run": steps,
        "nominal_steps": c.nominal_steps,
        "per_step_s": per_step,
        "total_s": per_step * c.nominal_steps,
        "projected": steps != c.nominal_steps,
        "flops_per_step": flops_per_step,
        "gflops_per_s": gflops,
        "peak_mem_bytes": raw["peak"],
        "notes": c.notes,
        **{f"info_{k}": v for k, v in case.info.items()},
    }
    if settings.peak_tflops:
        row["mfu"] = gflops / (settings.peak_tflops * 1e3)
    return row


# -- reporting --------------------------------------------------------------------------------------------


def machine_info(settings: Settings) -> dict[str, Any]:
    import platform

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(settings.device),
        "dtype": settings.dtype,
        "peer": THEIRS,
    }
    if settings.device.type == "cuda":
        props = torch.cuda.get_device_properties(settings.device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cudnn=torch.backends.cudnn.version(),
            matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
            cudnn_tf32=torch.backends.cudnn.allow_tf32,
        )
    return info


def markdown_table(rows: list[dict[str, Any]], settings: Settings) -> str:
    """One line per case and implementation, with each case's time ratio theirs / ours."""
    mfu = settings.peak_tflops is not None
    header = ["case", "impl", "params", "time / step", "total", "theirs / ours", "GFLOP / step", "GFLOP/s"]
    header += ["MFU"] if mfu else []
    header += ["peak mem"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ours_total = {r["title"]: r["total_s"] for r in rows if r["impl"] == OURS}
    for r in rows:
        ratio = ""
        if r["impl"] != OURS and r["title"] in ours_total:
            ratio = f"{r['total_s'] / ours_total[r['title']]:.2f}x"
        total = _fmt_time(r["total_s"]) + (f" ({r['nominal_steps']} steps" if r["nominal_steps"] > 1 else "")
        if r["nominal_steps"] > 1:
            total += ", projected)" if r["projected"] else ")"
        cells = [
            r["title"],
            r["impl"],
            f"{r['params'] / 1e6:.1f}M",
            _fmt_time(r["per_step_s"]),
            total,
            ratio,
            f"{r['flops_per_step'] / 1e9:.1f}",
            f"{r['gflops_per_s']:.0f}",
        ]
        cells += [f"{100 * r['mfu']:.1f}%"] if mfu else []
        cells += [_fmt_bytes(r["peak_mem_bytes"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    return f"{seconds * 1e3:.1f} ms"


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**20:.0f} MiB"
