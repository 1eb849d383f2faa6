"""Progressive distillation: the target, checked against the closed-form Gaussian problem, and the decoder task."""

import json

import pytest
import torch

from tests.diffusion_helpers import make_problem
from unclip.checkpoint import load_model
from unclip.config import load_config
from unclip.diffusion import ddim_sample
from unclip.diffusion.distill import distillation_loss, distillation_target, step_grid
from unclip.nets.unet import UNet

TINY = "configs/decoder/tiny.yaml"


def test_the_student_grid_is_every_other_teacher_step():
    student, middle = step_grid(1000, 4)
    assert student == [999, 749, 499, 249] and middle == [874, 624, 374, 124]
    with pytest.raises(ValueError, match="train.distill.steps"):
        step_grid(1000, 0)
    with pytest.raises(ValueError, match="do not contain"):  # spacing "unclip" keeps both ends at every count
        step_grid(1000, 4, "unclip")


class PerfectStudent:
    """A student whose x_0 at each of its steps is the distillation target: what training converges to."""

    def __init__(self, teacher, diffusion, steps):
        self.teacher, self.diffusion, self.steps = teacher, diffusion, steps
        self.grid, _ = step_grid(diffusion.num_timesteps, steps)

    def __call__(self, z, t, **cond):
        index = torch.tensor([self.grid.index(int(s)) for s in t])
        x0 = distillation_target(self.teacher, self.diffusion, z, index, self.steps).to(z.dtype)
        return self.diffusion.v_from(x0, self.diffusion.eps_from_x0(z, t, x0), t)


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_a_student_that_meets_its_targets_samples_as_its_teacher_does_in_twice_the_steps(steps):
    diffusion, teacher = make_problem(dims=8, prediction="v")
    x_T = torch.randn(6, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    two_steps_each = ddim_sample(teacher, diffusion, (6, 8), steps=2 * steps, x_T=x_T)
    one_step_each = ddim_sample(PerfectStudent(teacher, diffusion, steps), diffusion, (6, 8), steps=steps, x_T=x_T)
    torch.testing.assert_close(one_step_each, two_steps_each, atol=2e-4, rtol=1e-4)
    # and the teacher itself in N steps does not: there is something to learn
    assert (ddim_sample(teacher, diffusion, (6, 8), steps=steps, x_T=x_T) - two_steps_each).abs().max() > 1e-3


def test_the_loss_is_zero_for_the_perfect_student_and_weights_high_snr_steps_more():
    diffusion, teacher = make_problem(dims=8, prediction="v")
    x_0 = teacher.mu + teacher.sigma * torch.randn(
        4, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    x_0, noise = x_0.float(), torch.randn(4, 8, generator=torch.Generator().manual_seed(2))
    index = torch.tensor([0, 1, 2, 3])
    perfect = distillation_loss(
        PerfectStudent(teacher, diffusion, 4), teacher, diffusion, x_0, 4, index=index, noise=noise
    )
    assert perfect.shape == (4,) and perfect.max() < 1e-8
    lazy = distillation_loss(teacher, teacher, diffusion, x_0, 4, index=index, noise=noise)
    assert (lazy > 1e-6).all()
    snr = diffusion.snr(torch.tensor(step_grid(1000, 4)[0]))
    assert snr[-1] > 1 > snr[0]  # the last step's loss is weighted by its SNR, the first's by 1


def test_distilling_a_tiny_decoder_trains_a_student_and_leaves_the_teacher(tmp_path):
    from train.decoder import main

    teacher = main([TINY, f"train.output_dir={tmp_path / 'teacher'}", "train.max_steps=2", "train.eval_every=100"])
    before = {k: v.clone() for k, v in load_model(teacher).model.state_dict().items()}
    student = main(
        [
            TINY,
            f"train.output_dir={tmp_path / 'student'}",
            f"train.init_from={teacher}",
            "train.distill={steps: 4}",
            "train.max_steps=3",
            "train.eval_every=3",
            "train.ema_warmup_steps=0",
        ]
    )
    assert type(load_model(student).model) is UNet
    after = load_model(teacher).model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    trained = load_model(tmp_path / "student" / "export").model.state_dict()
    assert any(not torch.equal(before[k], trained[k]) for k in before)  # the student moved from the teacher
    rows = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_ema/loss" in r for r in rows)
    assert (tmp_path / "student" / "samples" / "step_0000003.png").is_file()
    saved = json.loads((tmp_path / "student" / "config.json").read_text())
    assert saved["train"]["distill"] == {"steps": 4, "teacher": None}


def test_validation_scores_both_networks_on_the_same_steps_and_noise(tmp_path):
    from unclip.checkpoint import save_model
    from unclip.tasks import build_task

    plain = load_config(TINY)
    save_model(build_task(plain).model, tmp_path, kind="decoder", diffusion=plain.diffusion, clip=plain.clip)
    task = build_task(load_config(TINY, [f"train.init_from={tmp_path}", "train.distill={steps: 4}"]))
    metrics = task.evaluate(task.model, task.model)
    assert metrics["val/loss"] == metrics["val_ema/loss"] > 0


def test_a_teacher_of_another_diffusion_is_refused(tmp_path):
    import dataclasses

    from unclip.checkpoint import save_model
    from unclip.tasks import build_task

    plain = load_config(TINY)
    assert plain.diffusion.prediction == "eps"
    v = dataclasses.replace(plain.diffusion, prediction="v")
    save_model(build_task(plain).model, tmp_path, kind="decoder", diffusion=v, clip=plain.clip)
    with pytest.raises(ValueError, match="diffusion.prediction='v'"):
        build_task(load_config(TINY, [f"train.init_from={tmp_path}", "train.distill={steps: 4}"]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.distill={steps: 4}"], "train.distill starts the student from its teacher"),
        (["train.distill={steps: 4, teacher: x}"], "set train.init_from"),
        (["train.distill={steps: 0}", "train.init_from=x"], "train.distill.steps must be a whole number"),
        (["train.distill={steps: 4}", "train.init_from=x", "train.lora={rank: 4}"], "leave train.lora unset"),
    ],
)
def test_bad_distillation_settings_name_the_problem(tmp_path, capsys, overrides, message):
    from train.decoder import main

    with pytest.raises(SystemExit) as exit_info:
        main([TINY, f"train.output_dir={tmp_path}", *overrides])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_distillation_is_for_decoders():
    from unclip.training import check_train_config

    config = load_config("configs/prior/tiny.yaml", ["train.distill={steps: 4}", "train.init_from=x"])
    with pytest.raises(ValueError, match="distils a decoder"):
        check_train_config(config.train, config.kind)
