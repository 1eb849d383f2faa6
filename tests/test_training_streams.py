"""The trainer's random streams on real stages: distinct per process, equal to accumulation on one process, and
runs that repeat exactly."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_stage import train
from safetensors.torch import load_file
from training_helpers import read_losses

from unclip.config import load_config
from unclip.tasks import build_task
from unclip.training import Trainer, micro_batch_seed

HERE = Path(__file__).parent
SMALL = ["train.batch_size=4", "train.max_steps=100", "train.log_every=1", "train.eval_every=1000"]
SMALL += ["train.checkpoint_every=1000", "train.lr=1e-3", "train.warmup_steps=1", "train.ema_warmup_steps=0"]
SMALL_DATA = ["data.options.num_samples=256"]  # the prior's embedding statistics are computed over the data
STAGES = {
    "clip": "configs/clip/tiny.yaml",
    "prior": "configs/prior/tiny.yaml",
    "decoder": "configs/decoder/tiny.yaml",
    "upsampler": "configs/upsampler/tiny.yaml",
}


def test_micro_batch_seeds_differ_and_repeat():
    seeds = [micro_batch_seed(0, i) for i in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**63 for s in seeds)
    assert seeds[:3] == [micro_batch_seed(0, i) for i in range(3)]
    assert micro_batch_seed(1, 0) != seeds[0]


def test_two_gloo_ranks_on_the_prior_draw_their_own_noise_and_equal_accumulation(tmp_path):
    """Each rank draws its own timesteps and noise; 2 ranks × batch 4 equal 1 process × 2 accumulation steps,
    micro-batch for micro-batch: rank r's draws at step s are the single process's at micro-batch 2s + r."""
    steps, args = 3, ["configs/prior/tiny.yaml", *SMALL, *SMALL_DATA]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{HERE.parent}{os.pathsep}{HERE}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519"]
    cmd += [str(HERE / "ddp_stage.py"), str(tmp_path / "ddp"), str(steps), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [load_file(str(tmp_path / "ddp" / f"draws_{r}.safetensors")) for r in (0, 1)]

    trainer, single = train(tmp_path / "single", steps, args[0], [*args[1:], "train.grad_accum=2"])
    assert len(single) == 2 * steps and all(len(r) == 2 * steps for r in ranks)  # t and noise per micro-batch
    for step in range(steps):
        t0, t1 = ranks[0][f"t_{step}"], ranks[1][f"t_{step}"]
        assert not torch.equal(t0, t1) and not torch.equal(ranks[0][f"noise_{step}"], ranks[1][f"noise_{step}"])
        for rank in (0, 1):
            t, noise = single[2 * step + rank]
            assert torch.equal(ranks[rank][f"t_{step}"], t), (step, rank)
            assert torch.equal(ranks[rank][f"noise_{step}"], noise), (step, rank)
    ddp = load_file(str(tmp_path / "ddp" / "final.safetensors"))
    reference = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert set(ddp) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(ddp[key], value, atol=2e-6, rtol=1e-5, msg=key)
    start = build_task(load_config(args[0], args[1:])).model.state_dict()
    assert any(not torch.equal(start[k], v) for k, v in reference.items())  # it trained


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_two_fresh_runs_of_a_stage_give_the_same_losses_and_weights(tmp_path, stage):
    """In one process, so that the second run starts with the global RNG wherever the first one left it."""
    weights = []
    for run in ("a", "b"):
        config = load_config(STAGES[stage], [f"train.output_dir={tmp_path / run}", *SMALL, *SMALL_DATA])
        trainer = Trainer(build_task(config), config)
        trainer.fit(stop_at=3)
        weights.append(trainer.accelerator.unwrap_model(trainer.model).state_dict())
    assert read_losses(tmp_path / "a") == read_losses(tmp_path / "b")
    for key, value in weights[0].items():
        assert torch.equal(weights[1][key], value), key
