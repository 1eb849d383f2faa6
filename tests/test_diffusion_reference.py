"""Our samplers against diffusers' schedulers, a reference no one here wrote.

Given the same betas, timesteps, model and noise, the trajectories must agree to 1e-4 in fp32.

Conventions that differ, and how each is handled:
- Timestep spacing: ours is selectable. diffusers' DDIM computes the previous timestep as t - T//n, which is
  the next visited timestep only when n divides T; ours always steps to the next visited timestep, so the
  DDIM comparison uses step counts that divide T (see test_ddim_prev_timestep_convention).
- The final step: ours always lands on ᾱ = 1 (the clean sample), which is diffusers' DDIM with
  set_alpha_to_one=True and DPMSolverMultistep with final_sigmas_type="zero", both their defaults.
- diffusers' DDIM "linspace" spacing includes t = 0, unlike its DPM-Solver "linspace"; ours is DPM-Solver's.

Precision: at t = 999 of the cosine schedule sqrt(ᾱ) = 5e-5, and an eps-predicting model's x_0 is
(x_t - sqrt(1-ᾱ)·eps)/sqrt(ᾱ), which loses three float32 digits in either implementation (measured: the two
differ by up to 7.5e-4 after the first DPM-Solver step). So eps-prediction is compared on the linear
schedule (sqrt(ᾱ_999) = 6e-3), and the cosine schedule with x_0- and v-prediction, where no such division
happens. Together the cases cover all three prediction types and both schedules.
"""

import numpy as np
import pytest
import torch
from diffusion_helpers import make_problem

from unclip.diffusion import ddim_sample, dpm_solver_sample, respace_timesteps

diffusers = pytest.importorskip("diffusers")


def _trajectory(sampler, denoiser, diffusion, x_T, **kwargs):
    states = []
    sampler(
        denoiser,
        diffusion,
        x_T.shape,
        x_T=x_T,
        callback=lambda info: states.append(info["x"].clone()),
        **kwargs,
    )
    return states


CASES = [("linear", "eps"), ("cosine", "x0"), ("cosine", "v")]
DIFFUSERS_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def _reference_trajectory(scheduler, denoiser, x_T, steps, generator=None, **step_kwargs):
    scheduler.set_timesteps(steps)
    x, states = x_T.clone(), []
    for t in scheduler.timesteps:
        t_batch = torch.full((x.shape[0],), int(t), dtype=torch.long)
        out = denoiser(x, t_batch)
        x = scheduler.step(out, t, x, generator=generator, **step_kwargs).prev_sample
        states.append(x.clone())
    return [int(t) for t in scheduler.timesteps], states


def _betas(diffusion):
    return diffusion.betas.float().numpy()


@pytest.mark.parametrize(("schedule", "prediction"), CASES)
@pytest.mark.parametrize(("spacing", "steps"), [("trailing", 50), ("leading", 50), ("trailing", 10)])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers(schedule, prediction, spacing, steps, eta):
    diffusion, denoiser = make_problem(schedule=schedule, prediction=prediction)
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        trained_betas=_betas(diffusion),
        timestep_spacing=spacing,
        set_alpha_to_one=True,
        clip_sample=False,
        prediction_type=DIFFUSERS_PREDICTION[prediction],
    )
    x_T = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    ref_ts, ref = _reference_trajectory(
        scheduler, denoiser, x_T, steps, generator=torch.Generator().manual_seed(5), eta=eta
    )
    assert ref_ts == respace_timesteps(1000, steps, spacing)
    ours = _trajectory(
        ddim_sample,
        denoiser,
        diffusion,
        x_T,
        steps=steps,
        spacing=spacing,
        eta=eta,
        generator=torch.Generator().manual_seed(5),
    )
    assert len(ours) == len(ref)
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        # One documented exception: with eta = 1 and 10 cosine steps, the first step's direction coefficient
        # sqrt(1 - ᾱ_prev - σ²) is sqrt(~1e-7); diffusers computes it in float32 (its tables are float32),
        # we in float64, and the two states differ by 1.5e-4 (measured). Every other state is within 1e-4.
        atol = 2e-4 if (i == 0 and eta > 0 and steps == 10 and schedule == "cosine") else 1e-4
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)


@pytest.mark.parametrize(("schedule", "prediction"), CASES)
@pytest.mark.parametrize(("spacing", "steps"), [("linspace", 20), ("trailing", 20), ("linspace", 7), ("trailing", 25)])
def test_dpm_solver_matches_diffusers(schedule, prediction, spacing, steps):
    diffusion, denoiser = make_problem(schedule=schedule, prediction=prediction)
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        trained_betas=_betas(diffusion),
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
        timestep_spacing=spacing,
        prediction_type=DIFFUSERS_PREDICTION[prediction],
    )
    x_T = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    ref_ts, ref = _reference_trajectory(scheduler, denoiser, x_T, steps)
    assert ref_ts == respace_timesteps(1000, steps, spacing)
    ours = _trajectory(dpm_solver_sample, denoiser, diffusion, x_T, steps=steps, spacing=spacing)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_ddim_prev_timestep_convention():
    """For n not dividing T, diffusers' DDIM steps from t to t - T//n rather than to the next visited step;
    ours steps to the next visited step, so the walk is a consistent DDIM path that ends on the clean sample."""
    steps = 30
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    ts = [int(t) for t in scheduler.timesteps]
    assert ts == respace_timesteps(1000, steps, "trailing")
    theirs_prev = [t - 1000 // steps for t in ts]
    ours_prev = ts[1:] + [-1]
    assert theirs_prev != ours_prev
    assert np.all(np.array(theirs_prev) >= np.array(ours_prev))
