"""Benchmark unclip's networks and samplers against DALLE2-pytorch 1.15.6, randomly initialised, in one process.

    python bench/run.py --device cuda --repeats 10 --out runs/bench/cuda-fp32.json
    python bench/run.py --device cuda --dtype bf16 --peak-tflops 989 --out runs/bench/cuda-bf16.json  # H100/H200
    OMP_NUM_THREADS=1 python bench/run.py --device cpu --quick --only decoder_train

Each case builds both implementations on the same inputs, counts the FLOPs of each (torch.utils.flop_counter),
warms them up, then times them alternately and reports medians: a markdown table on stdout, every timing in
the JSON file. Needs the peer installed in .bench-deps (bench/README.md).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench import cascade, decoder, prior  # noqa: E402
from bench.common import Settings, machine_info, markdown_table, measure_case  # noqa: E402

SAMPLE_BATCHES = (1, 4)
# each name runs these case builders, Settings -> Case
CASES = {
    "decoder_train": [decoder.train_case],
    "decoder_sample": [partial(decoder.sample_case, batch=b) for b in SAMPLE_BATCHES],
    "prior_train": [prior.train_case],
    "prior_sample": [partial(prior.sample_case, batch=b) for b in SAMPLE_BATCHES],
    "upsample": [cascade.upsample_case],
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast the forward passes")
    parser.add_argument("--repeats", type=int, help="timed calls per implementation (default 5; --quick: 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per implementation before timing")
    parser.add_argument(
        "--max-steps",
        type=int,
        help="run at most this many denoising steps per sampling loop and project the loop's total (--quick: 2)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 repeat, 2 denoising steps per loop")
    parser.add_argument("--only", help=f"comma-separated cases, from {','.join(CASES)} (default: all)")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak TFLOP/s, to report model FLOP use")
    parser.add_argument(
        "--decoder-batch",
        type=int,
        default=8,
        help="batch of the decoder training step (default 8, the matched setting; on a GPU batch 8 is bound by "
        "kernel launches, and a larger batch shows the FLOP use when it is not)",
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument("--out", type=Path, help="JSON results file (default runs/bench/DEVICE-DTYPE.json)")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; valid: {list(CASES)}")
    args.cases = names
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    args.repeats = args.repeats or (1 if args.quick else 5)
    if args.max_steps is None and args.quick:
        args.max_steps = 2
    if args.decoder_batch < 1:
        parser.error("--decoder-batch must be >= 1")
    if args.repeats < 1 or args.warmup < 0 or (args.max_steps is not None and args.max_steps < 1):
        parser.error("--repeats and --max-steps must be >= 1, --warmup >= 0")
    args.out = args.out or Path("runs/bench") / f"{args.device}-{args.dtype}.json"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings(
        device=torch.device(args.device),
        dtype=args.dtype,
        repeats=args.repeats,
        warmup=args.warmup,
        max_steps=args.max_steps,
        peak_tflops=args.peak_tflops,
        decoder_batch=args.decoder_batch,
    )
    if settings.device.type == "cpu" and settings.dtype == "bf16":
        print("note: bf16 on a CPU is fast only with bf16 units (AVX512-BF16, AMX), else emulated", file=sys.stderr)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    rows, started = [], time.time()
    for name in args.cases:
        for build in CASES[name]:
            case = build(settings)
            log(f"{case.name}: {case.title}")
            rows += measure_case(case, settings, log)
            del case
            gc.collect()
            if settings.device.type == "cuda":
                torch.cuda.empty_cache()
            write_json(args, settings, rows, time.time() - started)  # after each case, so a cut run keeps them
    print(markdown_table(rows, settings))
    log(f"wrote {args.out}")


def write_json(args: argparse.Namespace, settings: Settings, rows: list, wall_s: float) -> None:
    result = {
        "machine": machine_info(settings),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "wall_s": wall_s,
        "results": rows,
        "table": markdown_table(rows, settings),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
