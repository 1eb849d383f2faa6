"""The CUDA paths: every trainer in fp32, fp16 and bf16, resume, and the pipeline on the GPU.

Skipped where no GPU is present (the CI machines have none); run them on a GPU machine with
`pytest tests/test_cuda.py`.
"""

import importlib
import json

import pytest
import torch
from pipeline_helpers import make_tiny_pipeline

from unclip.checkpoint import load_model
from unclip.clip import ClipAdapter
from unclip.pipeline import UnCLIPPipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TRAINERS = {
    "clip": "configs/clip/tiny.yaml",
    "prior": "configs/prior/tiny.yaml",
    "decoder": "configs/decoder/tiny.yaml",
    "upsampler": "configs/upsampler/tiny.yaml",
}


def _losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("precision", ["no", "fp16", "bf16"])
@pytest.mark.parametrize("kind", list(TRAINERS))
def test_trainer_runs_on_cuda_and_resumes(kind, precision, tmp_path):
    main = importlib.import_module(f"train.{kind}").main
    args = [
        TRAINERS[kind],
        f"train.output_dir={tmp_path}",
        f"train.mixed_precision={precision}",
        "train.max_steps=6",
        "train.checkpoint_every=3",
        "train.eval_every=6",
        "train.log_every=1",
    ]
    main([*args, "train.max_steps=3"])
    export = main([*args, "--resume", "latest"])
    losses = _losses(tmp_path)
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses))), losses
    # exported weights load on the CPU
    model = ClipAdapter.from_checkpoint(export).model if kind == "clip" else load_model(export).model
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("pipe"))


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_pipeline_on_cuda(tiny_pipeline, dtype):
    pipe = UnCLIPPipeline.from_pretrained(tiny_pipeline, device="cuda", dtype=dtype)
    out = pipe(["a red circle", "a blue square"], seed=0, prior={"steps": 4}, decoder={"steps": 4})
    assert out.images.dtype == torch.float32 and torch.isfinite(out.images).all()


def test_cuda_matches_cpu_for_the_same_seed(tiny_pipeline):
    settings = dict(seed=3, prior={"steps": 4}, decoder={"steps": 4})
    gpu = UnCLIPPipeline.from_pretrained(tiny_pipeline, device="cuda")(["a red circle"], **settings).images
    cpu = UnCLIPPipeline.from_pretrained(tiny_pipeline, device="cpu")(["a red circle"], **settings).images
    # the noise is drawn on the CPU from per-image seeds, so only kernel rounding differs
    assert (gpu.cpu() - cpu).abs().max() < 2e-2


def test_mfu_bench_runs_each_variant_on_cuda_in_bf16(tmp_path):
    """bench/mfu.py at the tiny decoder's size: eager, channels_last, torch.compile and both, in bf16."""
    from bench import mfu

    args = ["--device", "cuda", "--dtype", "bf16", "--config", "configs/decoder/tiny.yaml", "--batch", "4"]
    args += ["--steps", "2", "--warmup", "2", "--peak-tflops", "989", "--out", str(tmp_path / "mfu.json")]
    report = mfu.main(args)
    assert [r["variant"] for r in report["results"]] == list(mfu.VARIANTS)
    flops = {r["flops_per_step"] for r in report["results"]}
    assert len(flops) == 1 and flops.pop() > 0 and all(0 < r["mfu"] < 1 for r in report["results"])
