import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from training_helpers import SignalledTask, ToyTask, read_losses, toy_config

from unclip.training import NonFiniteLossError, Trainer, lr_at, stop_signals

HERE = Path(__file__).parent


def test_lr_schedule_warmup_then_cosine():
    config = toy_config("x", lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1).train
    assert lr_at(0, config) == pytest.approx(0.1)
    assert lr_at(9, config) == pytest.approx(1.0)
    assert lr_at(60, config) == pytest.approx(0.55)
    assert lr_at(110, config) == pytest.approx(0.1)


def test_training_lowers_loss_and_writes_checkpoints_and_export(tmp_path):
    trainer = Trainer(ToyTask(), toy_config(tmp_path, max_steps=40, checkpoint_every=10, keep_checkpoints=2))
    trainer.fit()
    losses = read_losses(tmp_path)
    assert losses[40] < 0.5 * losses[1]
    assert [p.name for p in trainer.complete_checkpoints()] == ["step_0000030", "step_0000040"]
    assert (tmp_path / "export" / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".export*")) and not list((tmp_path / "checkpoints").glob(".tmp*"))
    # the export holds the EMA weights, not the online ones
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    online = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert not torch.equal(exported["0.weight"], online["0.weight"])
    torch.testing.assert_close(exported["0.weight"], trainer.ema.ema_model.state_dict()["0.weight"])


def test_resume_gives_the_same_losses(tmp_path):
    """Stop after 8 of 12 steps, resume: the losses of steps 9-12 equal an uninterrupted run's, bitwise."""
    Trainer(ToyTask(), toy_config(tmp_path / "full")).fit()
    full = read_losses(tmp_path / "full")

    Trainer(ToyTask(), toy_config(tmp_path / "part")).fit(stop_at=8)
    resumed = Trainer(ToyTask(), toy_config(tmp_path / "part"))
    resumed.fit(resume="latest")
    part = read_losses(tmp_path / "part")
    assert resumed.step == 12
    for step in range(1, 13):
        assert part[step] == full[step], (step, part[step], full[step])
    a = load_file(str(tmp_path / "full" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "export" / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k])


def test_resume_crosses_an_epoch_boundary(tmp_path):
    """64 samples / batch 4 = 16 batches an epoch: stopping at 12 and running to 24 crosses an epoch."""
    Trainer(ToyTask(), toy_config(tmp_path / "full", max_steps=24)).fit()
    Trainer(ToyTask(), toy_config(tmp_path / "part", max_steps=24)).fit(stop_at=12)
    Trainer(ToyTask(), toy_config(tmp_path / "part", max_steps=24)).fit(resume="latest")
    assert read_losses(tmp_path / "part") == read_losses(tmp_path / "full")


def test_kill_during_checkpoint_save_keeps_previous_checkpoint(tmp_path):
    trainer = Trainer(ToyTask(), toy_config(tmp_path, max_steps=10))
    trainer.fit(stop_at=8)
    assert trainer.complete_checkpoints()[-1].name == "step_0000008"
    # a save killed midway leaves a temporary folder without trainer_state.json, never a step_ folder
    broken = tmp_path / "checkpoints" / ".tmp_step_0000012"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"partial")
    half = tmp_path / "checkpoints" / "step_0000012"  # even a renamed folder lacking the state file is ignored
    half.mkdir()
    resumed = Trainer(ToyTask(), toy_config(tmp_path, max_steps=10))
    resumed.fit(resume="latest")
    assert resumed.step == 10 and 9 in read_losses(tmp_path)


def test_kill_signal_during_save_leaves_loadable_checkpoint(tmp_path):
    """A real SIGKILL while the process writes a checkpoint; the earlier checkpoint still resumes."""
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(HERE)!r})
from training_helpers import ToyTask, toy_config
from unclip.training import Trainer, trainer
orig = trainer.write_checkpoint
def write_checkpoint(directory, **kwargs):
    if "0000008" in str(directory):
        orig(directory, **kwargs)   # write the whole state, then die before the rename
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(directory, **kwargs)
trainer.write_checkpoint = write_checkpoint
Trainer(ToyTask(), toy_config({str(tmp_path)!r}, max_steps=12)).fit()
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    trainer = Trainer(ToyTask(), toy_config(tmp_path, max_steps=12))
    assert trainer.complete_checkpoints()[-1].name == "step_0000004"
    trainer.fit(resume="latest")
    assert trainer.step == 12


def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(tmp_path):
    Trainer(ToyTask(), toy_config(tmp_path / "full")).fit()
    before = signal.getsignal(signal.SIGTERM)
    trainer = Trainer(SignalledTask(at=6), toy_config(tmp_path / "part"))  # checkpoints every 4 steps
    trainer.fit()
    assert trainer.stopped_by == signal.SIGTERM and trainer.step == 6
    assert trainer.complete_checkpoints()[-1].name == "step_0000006"
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the caller's again
    resumed = Trainer(ToyTask(), toy_config(tmp_path / "part"))
    resumed.fit(resume="latest")
    assert resumed.stopped_by is None and resumed.step == 12
    assert read_losses(tmp_path / "part") == read_losses(tmp_path / "full")


def test_a_second_signal_acts_at_once():
    # Python's own Ctrl-C handler before, whatever an earlier test in this process left installed
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with stop_signals() as caught:
            os.kill(os.getpid(), signal.SIGINT)
            assert caught == [signal.SIGINT]  # recorded, no KeyboardInterrupt yet
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)  # the handler runs between bytecodes; never reached
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outer)


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_to_the_whole_job_saves_and_exits(signum, status, tmp_path):
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it, or SIGTERM, as a scheduler preempting
    a job sends it to every process: DataLoader worker included."""
    cmd = [sys.executable, str(HERE.parent / "train" / "upsampler.py"), "configs/upsampler/tiny.yaml"]
    cmd += [f"train.output_dir={tmp_path}", "train.max_steps=100000", "train.log_every=1", "data.num_workers=1"]
    cmd += ["train.eval_every=100000", "train.checkpoint_every=100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        cmd,
        cwd=HERE.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    metrics, deadline = tmp_path / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    os.killpg(proc.pid, signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-2000:]
    step = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert (tmp_path / "checkpoints" / f"step_{step:07d}" / "trainer_state.json").is_file()
    assert f"{signum.name}: stopped at step {step}" in out + err and "--resume latest" in out + err
    assert "Traceback" not in err


def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path):
    trainer = Trainer(ToyTask(fail_after=5), toy_config(tmp_path, max_steps=50, max_nonfinite=3))
    with pytest.raises(NonFiniteLossError, match="non-finite for 4 steps"):
        trainer.fit()
    assert trainer.nonfinite_total == 4
    # the weights were never updated with NaN gradients
    for p in trainer.accelerator.unwrap_model(trainer.model).parameters():
        assert torch.isfinite(p).all()


def test_bf16_autocast_is_active_when_asked_for(tmp_path):
    task = ToyTask()
    Trainer(task, toy_config(tmp_path, max_steps=2, mixed_precision="bf16")).fit()
    assert set(task.autocast_dtypes) == {torch.bfloat16}
    AcceleratorState._reset_state(reset_partial_state=True)
    task = ToyTask()
    Trainer(task, toy_config(tmp_path / "fp32", max_steps=2)).fit()
    assert set(task.autocast_dtypes) == {torch.float32}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only error")
def test_fp16_on_cpu_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        Trainer(ToyTask(), toy_config(tmp_path, mixed_precision="fp16"))


def test_two_gloo_ranks_equal_one_process_with_accumulation(tmp_path):
    """2 data-parallel ranks × batch 4 give the same weights as 1 process with 2 accumulation steps, input noise
    included: each micro-batch's random stream is keyed by its global index, not by the process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        str(HERE / "training_helpers.py"),
        str(tmp_path / "ddp"),
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "ddp" / "world_size.txt").read_text() == "2"
    assert (tmp_path / "ddp" / "stopped_1.txt").read_text() == "12 None"

    trainer = Trainer(ToyTask(), toy_config(tmp_path / "single", grad_accum=2, checkpoint_every=1000))
    trainer.fit()
    single = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    ddp = load_file(str(tmp_path / "ddp" / "final.safetensors"))
    for k, v in single.items():
        torch.testing.assert_close(ddp[k], v, atol=1e-6, rtol=1e-5)
    # and it really differs from a run that sees only half the data per step
    half = Trainer(ToyTask(), toy_config(tmp_path / "half", checkpoint_every=1000))
    half.fit()
    assert not torch.allclose(half.accelerator.unwrap_model(half.model).state_dict()["0.weight"], single["0.weight"])


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """torchrun forwards a SIGTERM to each worker at slightly different times; here only rank 1 gets one."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518"]
    cmd += [str(HERE / "training_helpers.py"), str(tmp_path), "1", "signal"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        assert (tmp_path / f"stopped_{rank}.txt").read_text() == "5 SIGTERM"
    assert (tmp_path / "checkpoints" / "step_0000005" / "trainer_state.json").is_file()


def test_mixed_precision_no_on_the_command_line():
    from unclip.config import load_config

    # YAML reads a bare `no` as false; the override must still mean "no mixed precision"
    config = load_config("configs/prior/tiny.yaml", ["train.mixed_precision=no"])
    assert config.train.mixed_precision == "no"


def test_init_from_starts_prior_decoder_and_upsampler_from_an_export(tmp_path):
    import pytest

    from train.decoder import main as train_decoder
    from train.prior import main as train_prior
    from train.upsampler import main as train_upsampler
    from unclip.checkpoint import load_model
    from unclip.config import load_config
    from unclip.tasks import build_task
    from unclip.training import Trainer

    for name, main, config in (
        ("prior", train_prior, "configs/prior/tiny.yaml"),
        ("decoder", train_decoder, "configs/decoder/tiny.yaml"),
        ("upsampler", train_upsampler, "configs/upsampler/tiny.yaml"),
    ):
        export = main([config, f"train.output_dir={tmp_path / name}", "train.max_steps=2", "train.eval_every=100"])
        source = load_model(export).model.state_dict()
        run = load_config(config, [f"train.output_dir={tmp_path / (name + '2')}", f"train.init_from={export}"])
        trainer = Trainer(build_task(run), run)
        trainer._build()
        for key, value in trainer.task.model.state_dict().items():
            torch.testing.assert_close(value, source[key], msg=key)

    wrong = load_config("configs/prior/tiny.yaml", [f"train.init_from={tmp_path / 'upsampler' / 'export'}"])
    with pytest.raises(ValueError, match="kind 'upsampler', not 'prior'"):
        Trainer(build_task(wrong), wrong)._build()
    wider = load_config(
        "configs/prior/tiny.yaml", ["model.width=64", f"train.init_from={tmp_path / 'prior' / 'export'}"]
    )
    with pytest.raises(ValueError, match="do not fit the model this config builds"):
        Trainer(build_task(wider), wider)._build()
    wider = load_config(
        "configs/decoder/tiny.yaml", ["model.model_channels=64", f"train.init_from={tmp_path / 'decoder' / 'export'}"]
    )
    with pytest.raises(ValueError, match="do not fit the model this config builds"):
        Trainer(build_task(wider), wider)._build()
