"""Checkpoints that cannot run code, runs that are never mixed, exact resume across real processes, and the
train/ scripts' one-line errors."""

import logging
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import ToyTask, read_losses, toy_config

from unclip.training import CheckpointError, RunExistsError, Trainer

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
SMALL = ["data.options.num_samples=256", "train.batch_size=4", "train.log_every=1", "train.eval_every=1000"]
SMALL += ["train.lr=1e-3", "train.warmup_steps=1", "train.ema_warmup_steps=0"]


class Payload:
    """Unpickling this writes `marker`: what a hostile checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_tensors(a: dict, b: dict, context: object = None) -> None:
    assert set(a) == set(b), context
    for key in a:
        assert torch.equal(a[key], b[key]), (key, context)


# -- safe loading ---------------------------------------------------------------------------------------


def test_the_payload_would_run_if_unpickled(tmp_path):
    pickle.loads(pickle.dumps(Payload(tmp_path / "ran")))
    assert (tmp_path / "ran").read_text() == "ran"


def test_crafted_pickles_in_a_checkpoint_are_never_loaded(tmp_path, caplog):
    run, marker = tmp_path / "run", tmp_path / "executed"
    Trainer(ToyTask(), toy_config(run)).fit(stop_at=4)
    checkpoint = run / "checkpoints" / "step_0000004"
    names = ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin", "sampler.bin"]
    for name in names:
        (checkpoint / name).write_bytes(pickle.dumps(Payload(marker)))
    torch.save(Payload(marker), checkpoint / "pytorch_model.pt")
    with caplog.at_level(logging.WARNING):
        resumed = Trainer(ToyTask(), toy_config(run))
        resumed.fit(resume="latest")
    assert not marker.exists()
    assert resumed.step == 12
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "never loaded" in warning and all(name in warning for name in [*names, "pytorch_model.pt"])


def test_a_pickle_in_place_of_a_checkpoint_file_is_refused(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "executed"
    Trainer(ToyTask(), toy_config(run)).fit(stop_at=4)
    checkpoint = run / "checkpoints" / "step_0000004"
    for name in ("optimizer.safetensors", "ema.safetensors", "model.safetensors"):
        good = (checkpoint / name).read_bytes()
        (checkpoint / name).write_bytes(pickle.dumps(Payload(marker)))
        with pytest.raises(CheckpointError, match=f"{name} is corrupt"):
            Trainer(ToyTask(), toy_config(run)).fit(resume=checkpoint)
        (checkpoint / name).write_bytes(good)
    assert not marker.exists()


# -- fallback from a corrupt checkpoint -----------------------------------------------------------------


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    Trainer(ToyTask(), toy_config(tmp_path / "full")).fit()
    run = tmp_path / "part"
    Trainer(ToyTask(), toy_config(run)).fit(stop_at=8)  # checkpoints at steps 4 and 8
    latest = run / "checkpoints" / "step_0000008" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])  # truncated
    resumed = Trainer(ToyTask(), toy_config(run))
    resumed.fit(resume="latest")
    out = capsys.readouterr().out
    assert "warning: skipping the checkpoint" in out and "step_0000008" in out and "corrupt" in out
    assert "resumed from" in out and "step_0000004 at step 4" in out
    assert resumed.step == 12
    assert_same_tensors(
        weights(tmp_path / "full" / "export" / "model.safetensors"), weights(run / "export" / "model.safetensors")
    )


def test_no_intact_checkpoint_is_an_error(tmp_path):
    Trainer(ToyTask(), toy_config(tmp_path)).fit(stop_at=4)
    (tmp_path / "checkpoints" / "step_0000004" / "trainer_state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        Trainer(ToyTask(), toy_config(tmp_path)).fit(resume="latest")


def test_a_checkpoint_of_another_model_is_refused_by_name(tmp_path):
    Trainer(ToyTask(), toy_config(tmp_path)).fit(stop_at=4)
    wider = ToyTask()
    wider.model = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    with pytest.raises(CheckpointError, match=r"step_0000004/model.safetensors does not fit this run's model"):
        Trainer(wider, toy_config(tmp_path)).fit(resume=tmp_path / "checkpoints" / "step_0000004")


# -- runs are never mixed -------------------------------------------------------------------------------


def test_a_fresh_run_into_a_used_folder_is_refused_unless_overwrite(tmp_path):
    Trainer(ToyTask(), toy_config(tmp_path, max_steps=8)).fit()
    before = {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()}
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunExistsError, match="already holds a training run"):
        Trainer(ToyTask(), toy_config(tmp_path, max_steps=8)).fit()
    assert {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()} == before

    trainer = Trainer(ToyTask(), toy_config(tmp_path, max_steps=6, checkpoint_every=3))
    trainer.fit(overwrite=True)
    assert [p.name for p in trainer.complete_checkpoints()] == ["step_0000003", "step_0000006"]
    assert max(read_losses(tmp_path)) == 6  # the old run's metrics are gone
    assert (tmp_path / "notes.txt").read_text() == "mine"  # what the trainer did not write stays


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("lr", -1.0, "train.lr must be a finite number > 0, got -1.0"),
        ("lr", float("nan"), "train.lr must be a finite number > 0, got nan"),
        ("lr", float("inf"), "train.lr must be a finite number > 0"),
        ("keep_checkpoints", 0, "train.keep_checkpoints must be a whole number >= 1, got 0"),
        ("keep_checkpoints", -1, "train.keep_checkpoints must be a whole number >= 1, got -1"),
        ("grad_clip", 0.0, "train.grad_clip must be a finite number > 0, or null"),
        ("ema_beta", 1.5, "train.ema_beta must be a number from 0 to 1"),
        ("adam_betas", (0.9, 1.0), r"train.adam_betas must be two numbers in \[0, 1\)"),
        ("seed", -3, "train.seed must be a whole number >= 0"),
        ("warmup_steps", -1, "train.warmup_steps must be a whole number >= 0"),
    ],
)
def test_invalid_settings_are_one_line_errors(tmp_path, setting, value, message):
    with pytest.raises(ValueError, match=message):
        Trainer(ToyTask(), toy_config(tmp_path, **{setting: value}))


def test_checkpoint_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        Trainer(ToyTask(), toy_config(tmp_path, max_steps=2)).fit()
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert files and {p.stat().st_mode & 0o777 for p in files} == {0o640}


# -- the train/ scripts' errors -------------------------------------------------------------------------


def run_script(capsys, argv: list[str]) -> tuple[int, str]:
    from train.prior import main

    with pytest.raises(SystemExit) as exit:
        main(argv)
    err = capsys.readouterr().err
    return exit.value.code, err


@pytest.mark.parametrize(
    "extra, status, message",
    [
        (["--resume", "nowhere"], 2, "error: --resume nowhere: no such checkpoint folder"),
        (["train.lr=-1"], 2, "error: train.lr must be a finite number > 0, got -1"),
        (["train.keep_checkpoints=-1"], 2, "error: train.keep_checkpoints must be a whole number >= 1, got -1"),
        (["train.lr=[1"], 2, "error: configs/prior/tiny.yaml or an override is not valid YAML"),
        (["--stop-at", "0"], 2, "error: --stop-at must be >= 1"),
        (["--resume", "latest", "--overwrite"], 2, "error: --resume and --overwrite exclude each other"),
    ],
)
def test_train_script_errors_are_one_line(tmp_path, capsys, extra, status, message):
    code, err = run_script(capsys, ["configs/prior/tiny.yaml", f"train.output_dir={tmp_path}", *extra])
    assert code == status and message in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.startswith("error:") or "error:" in line]) == 1
    assert not any(tmp_path.iterdir())  # nothing was written


def test_train_script_refuses_a_used_folder_and_bad_yaml(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    code, err = run_script(capsys, ["configs/prior/tiny.yaml", f"train.output_dir={tmp_path / 'run'}"])
    assert code == 2 and err.startswith("error: ") and "already holds a training run" in err, err
    assert "--resume latest" in err and "--overwrite" in err and len(err.splitlines()) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: prior\ntrain: [\n")
    code, err = run_script(capsys, [str(bad)])
    assert (
        code == 2 and err.startswith(f"error: {bad} or an override is not valid YAML") and len(err.splitlines()) == 1
    )


def test_embed_script_errors_are_one_line(tmp_path, capsys):
    from train.embed import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: prior\ntrain: [\n")
    for argv, message in (
        ([str(bad)], f"error: {bad} or an override is not valid YAML"),
        ([str(tmp_path / "none.yaml")], "error: config file"),
        (["configs/prior/tiny.yaml", "data.dataset=nothing"], "error: "),
    ):
        with pytest.raises(SystemExit) as exit:
            main([*argv, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.startswith(message) and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


# -- exact resume across real processes -----------------------------------------------------------------


def stage_command(stage: str, run: Path, *extra: str) -> list[str]:
    script = HERE.parent / "train" / f"{stage}.py"
    return [sys.executable, str(script), f"configs/{stage}/tiny.yaml", f"train.output_dir={run}", *SMALL, *extra]


def kill_at_a_random_step(cmd: list[str], run: Path, last: int) -> int:
    """Start `cmd`, SIGKILL it once metrics.jsonl shows a random step in [2, last - 8]; returns that step."""
    step = random.randint(2, last - 8)
    proc = subprocess.Popen(cmd, cwd=HERE.parent, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and max(read_losses(run), default=0) >= step:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it was killed at step {step}: {proc.stderr.read()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    return step


def resume_equals_uninterrupted(tmp_path: Path, stage: str, steps: int) -> None:
    """Each run in a process of its own, with the same environment (one thread: the suite's own thread count may
    have been changed by an earlier test, and another count sums in another order)."""
    extra = [f"train.max_steps={steps}", "train.checkpoint_every=1"]
    full = subprocess.run(
        stage_command(stage, tmp_path / "full", *extra), cwd=HERE.parent, env=ENV, capture_output=True, text=True
    )
    assert full.returncode == 0, full.stderr[-2000:]
    run = tmp_path / "part"
    killed = kill_at_a_random_step(stage_command(stage, run, *extra), run, steps)
    resumed = subprocess.run(
        stage_command(stage, run, *extra, "--resume", "latest"),
        cwd=HERE.parent,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, (killed, resumed.stderr[-2000:])
    assert "resumed from" in resumed.stdout, (killed, resumed.stdout[-2000:])
    for name in saved_weights(tmp_path / "full", steps):
        assert_same_tensors(weights(tmp_path / "full" / name), weights(run / name), f"killed at step {killed}")


def saved_weights(run: Path, step: int) -> list[str]:
    """The last checkpoint's tensors and the export's weights (whose file name depends on the stage)."""
    last = f"checkpoints/step_{step:07d}"
    export = [f"export/{p.name}" for p in sorted((run / "export").glob("*.safetensors"))]
    assert export, f"no weights in {run / 'export'}"
    return [f"{last}/model.safetensors", f"{last}/ema.safetensors", f"{last}/optimizer.safetensors", *export]


def test_prior_killed_at_a_random_step_resumes_to_the_same_weights(tmp_path):
    """SIGKILL (mid-step or mid-save) then --resume latest: bitwise the weights, EMA and optimizer state of an
    uninterrupted run, in fp32 on CPU."""
    resume_equals_uninterrupted(tmp_path, "prior", steps=24)


@pytest.mark.slow  # about 30 s on 2 busy cores; the prior's test above runs by default
def test_decoder_killed_at_a_random_step_resumes_to_the_same_weights(tmp_path):
    resume_equals_uninterrupted(tmp_path, "decoder", steps=16)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["clip", "upsampler"])
def test_other_stages_killed_at_a_random_step_resume_to_the_same_weights(tmp_path, stage):
    resume_equals_uninterrupted(tmp_path, stage, steps=16)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["clip", "prior", "decoder", "upsampler"])
def test_two_runs_of_a_train_script_give_the_same_losses_and_weights(tmp_path, stage):
    for run in ("a", "b"):
        cmd = stage_command(stage, tmp_path / run, "train.max_steps=6")
        proc = subprocess.run(cmd, cwd=HERE.parent, env=ENV, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert read_losses(tmp_path / "a") == read_losses(tmp_path / "b")
    for name in saved_weights(tmp_path / "a", 6):
        assert_same_tensors(weights(tmp_path / "a" / name), weights(tmp_path / "b" / name), name)


@pytest.mark.slow
def test_two_gloo_ranks_stopped_and_resumed_equal_an_uninterrupted_two_rank_run(tmp_path):
    env = {**ENV, "PYTHONPATH": str(HERE.parent)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29521"]
    for run, extra in (("full", []), ("part", ["--stop-at", "3"]), ("part", ["--resume", "latest"])):
        cmd = [*torchrun, *stage_command("prior", tmp_path / run, "train.max_steps=6", "train.checkpoint_every=1")[1:]]
        proc = subprocess.run([*cmd, *extra], cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step_0000003" in proc.stdout
    for name in saved_weights(tmp_path / "full", 6):
        assert_same_tensors(weights(tmp_path / "full" / name), weights(tmp_path / "part" / name), name)
