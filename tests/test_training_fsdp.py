"""Sharded training (train.distributed=fsdp) with 2 gloo processes on CPU: each holds half of the weights,
EMA and optimizer state; the result equals one process with the same global batch; a resume is exact."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unclip.config import load_config
from unclip.tasks import build_task
from unclip.training import Trainer

HERE = Path(__file__).parent
STEPS = 2
# the tiny decoder: its U-Net levels become FSDP units; activation checkpointing on; an EMA that moves each step;
# an evaluation (validation losses of the online and EMA networks, and a sample grid) at the last step
ARGS = ["configs/decoder/tiny.yaml", "train.batch_size=4", "train.max_steps=100", "train.log_every=1"]
ARGS += [f"train.eval_every={STEPS}", "train.checkpoint_every=1000", "train.lr=1e-3", "train.warmup_steps=1"]
ARGS += ["train.ema_warmup_steps=0", "train.ema_beta=0.9", "train.gradient_checkpointing=true"]
FILES = ("model", "ema", "optimizer")


def _evaluation(run: Path) -> dict[str, float]:
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(m for m in logged if "val/loss" in m)


def _checkpoint(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    folder = run / "checkpoints" / f"step_{STEPS:07d}"
    return {name: load_file(str(folder / f"{name}.safetensors")) for name in FILES}


def test_two_gloo_ranks_shard_train_like_one_process_and_resume_exactly(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HERE.parent}{os.pathsep}{HERE}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29523"]
    cmd += [str(HERE / "fsdp_stage.py"), str(tmp_path / "fsdp"), str(STEPS), *ARGS, "train.distributed=fsdp"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    held = [json.loads((tmp_path / "fsdp" / "whole" / f"sharded_{r}.json").read_text()) for r in (0, 1)]
    total = held[0]["parameters"]
    for kind in ("weights", "ema", "moments"):  # every process holds about half, together all of it
        assert held[0][kind] + held[1][kind] == total, (kind, held)
        assert all(h[kind] < 0.55 * total for h in held), (kind, held)
    assert all(h["sharded"] for h in held)

    # one process with 2 accumulation steps sees the same global batches (and random streams)
    config = load_config(ARGS[0], [*ARGS[1:], "train.grad_accum=2", f"train.output_dir={tmp_path / 'single'}"])
    single = Trainer(build_task(config), config)
    assert not single.sharded
    single.fit(stop_at=STEPS)
    reference = _checkpoint(tmp_path / "single")
    whole, resumed = _checkpoint(tmp_path / "fsdp" / "whole"), _checkpoint(tmp_path / "fsdp" / "resumed")
    for name in FILES:
        assert set(whole[name]) == set(reference[name]) == set(resumed[name]), name
        for key, value in reference[name].items():
            torch.testing.assert_close(whole[name][key], value, atol=2e-6, rtol=1e-5, msg=f"{name}: {key}")
            assert torch.equal(resumed[name][key], whole[name][key]), f"{name}: {key}"  # the resume is exact
    evaluated = _evaluation(tmp_path / "single")
    for name in ("val/loss", "val_ema/loss"):  # the sharded run evaluates whole copies of its networks
        assert _evaluation(tmp_path / "fsdp" / "whole")[name] == pytest.approx(evaluated[name], rel=1e-5), name
    assert (tmp_path / "fsdp" / "whole" / "samples" / f"step_{STEPS:07d}.png").is_file()
    start = build_task(config).model.state_dict()
    assert any(not torch.equal(start[k], v) for k, v in reference["model"].items())  # it trained
    assert any(not torch.equal(reference["ema"][f"ema_model.{k}"], v) for k, v in reference["model"].items())
    export = load_file(str(tmp_path / "fsdp" / "whole" / "export" / "model.safetensors"))  # the EMA, gathered
    ema = {k.removeprefix("ema_model."): v for k, v in whole["ema"].items() if k.startswith("ema_model.")}
    assert set(export) <= set(ema) and all(torch.equal(export[k], ema[k].to(export[k].dtype)) for k in export)


def test_mixed_precision_computes_in_bf16_and_reduces_in_fp32():
    from unclip.training.sharding import fsdp_plugin

    policy = fsdp_plugin("bf16").mixed_precision_policy
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert fsdp_plugin("no").mixed_precision_policy is None
