"""Training throughput of the 64 px decoder: images/s and model FLOP utilisation (MFU) of one training step
(forward, diffusion loss, backward, AdamW), eagerly and with torch.compile, with and without channels_last.

    python bench/mfu.py --device cuda --dtype bf16 --peak-tflops 989 --out runs/bench/mfu-h200.json
    python bench/mfu.py --device cpu --dtype fp32 --config configs/decoder/tiny.yaml --batch 2 --steps 2 \
        --variants eager,channels_last                 # a smoke run

The network is a run config's decoder (default `configs/decoder/karlo.yaml`, 0.88B parameters; `--set
model.model_channels=192` gives 0.32B), randomly initialised and conditioned on random CLIP embeddings and text
tokens of the config's widths, so nothing is loaded. bf16 autocasts the step with fp32 weights and AdamW state,
as `train.mixed_precision=bf16` does. FLOPs per step are counted once, eagerly, with torch.utils.flop_counter
(matmuls, convolutions, attention); MFU = FLOPs per step / median step time / --peak-tflops (the H200's dense
bf16 peak is 989 TFLOP/s). Each variant builds its own network from the same seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from bench.common import count_flops, param_count, synchronize  # noqa: E402
from unclip.config import load_config  # noqa: E402
from unclip.diffusion import GaussianDiffusion  # noqa: E402
from unclip.nets.unet import UNet  # noqa: E402

VARIANTS = ("eager", "channels_last", "compile", "compile+channels_last")
DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--config", default="configs/decoder/karlo.yaml", help="a decoder run config")
    p.add_argument("--set", nargs="*", default=[], help="model overrides, e.g. model.model_channels=192")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--batch", type=int, default=64, help="images per step (default 64)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first, compilation included (default 3)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--peak-tflops", type=float, help="the device's peak for --dtype, for the MFU (H200 bf16: 989)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    if min(args.batch, args.steps) < 1 or args.warmup < 0:
        p.error("--batch and --steps must be >= 1, --warmup >= 0")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA GPU is available here; use --device cpu")
    args.variants = variants
    return args


class DecoderStep:
    """One training step of a randomly initialised decoder on random inputs, as the trainer runs it."""

    def __init__(self, args: argparse.Namespace, variant: str):
        overrides = [*args.set, f"model.channels_last={'channels_last' in variant}"]
        config = load_config(args.config, overrides)
        if config.kind != "decoder":
            raise ValueError(f"{args.config} is a '{config.kind}' config; this measures a decoder")
        self.device, self.dtype = torch.device(args.device), DTYPES[args.dtype]
        torch.manual_seed(0)
        self.model = UNet(config.model).to(self.device).train()
        self.diffusion = GaussianDiffusion.from_config(config.diffusion)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.forward = torch.compile(self.model) if "compile" in variant else self.model
        self.inputs = self._inputs(config.model, args.batch)

    def _inputs(self, model, batch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        gen = torch.Generator().manual_seed(1)
        x_0 = torch.rand(batch, model.in_channels, model.image_size, model.image_size, generator=gen) * 2 - 1
        cond = {}
        if model.clip_dim:
            cond["image_embed"] = torch.randn(batch, model.clip_dim, generator=gen)
        if model.text_width:
            cond["text_tokens"] = torch.randn(batch, model.text_ctx, model.text_width, generator=gen)
            cond["text_mask"] = torch.ones(batch, model.text_ctx, dtype=torch.bool)
        return x_0.to(self.device), {k: v.to(self.device) for k, v in cond.items()}

    def loss(self) -> torch.Tensor:
        x_0, cond = self.inputs
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            return self.diffusion.training_loss(self.forward, x_0, cond=cond)["loss"].mean()

    def __call__(self) -> None:
        self.loss().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def flops(self) -> int:
        """FLOPs of the forward and backward pass (AdamW's elementwise update is not model FLOPs), eagerly."""
        forward, self.forward = self.forward, self.model
        try:
            return count_flops(lambda: self.loss().backward())
        finally:
            self.forward = forward
            self.optimizer.zero_grad(set_to_none=True)


def measure(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    step = DecoderStep(args, variant)
    flops = step.flops()
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        synchronize(step.device)
        start = time.perf_counter()
        step()
        synchronize(step.device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    result = {
        "variant": variant,
        "parameters": param_count(step.model),
        "batch": args.batch,
        "seconds_per_step": seconds,
        "images_per_second": args.batch / seconds,
        "flops_per_step": flops,
        "tflops_per_second": flops / seconds / 1e12,
    }
    if args.peak_tflops:
        result["mfu"] = result["tflops_per_second"] / args.peak_tflops
    return result


def machine() -> dict[str, Any]:
    info = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| variant | parameters | s/step | images/s | TFLOP/s | MFU |", "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        rows.append(
            f"| {r['variant']} | {r['parameters'] / 1e6:.1f}M | {r['seconds_per_step']:.4f} | "
            f"{r['images_per_second']:.1f} | {r['tflops_per_second']:.2f} | {mfu} |"
        )
    return "\n".join(rows)


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    report = {"config": args.config, "set": args.set, "device": args.device, "dtype": args.dtype}
    report.update(machine=machine(), peak_tflops=args.peak_tflops, results=[])
    for variant in args.variants:
        try:
            report["results"].append(measure(args, variant))
        except ValueError as e:
            sys.exit(f"error: {e}")
        if args.out:  # rewritten after each variant, so that a long run leaves what it measured
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))
    print(table(report["results"]))
    return report


if __name__ == "__main__":
    main()
