import pytest
import torch
from diffusion_helpers import make_problem

from unclip.config import DiffusionConfig
from unclip.diffusion import (
    DEFAULT_STEPS,
    GaussianDiffusion,
    classifier_free_guidance,
    ddim_invert,
    ddim_sample,
    ddpm_sample,
    dpm_solver_sample,
    make_betas,
    respace_timesteps,
    sample,
)
from unclip.diffusion.samplers import threshold_x0

N = 32768  # samples for the moment checks


# -- schedules and the forward process --------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_schedule_alphas_cumprod_decrease(schedule):
    d = GaussianDiffusion(make_betas(schedule, 1000))
    ac = d.alphas_cumprod
    assert len(ac) == 1000
    assert bool((ac[1:] < ac[:-1]).all())
    assert ac[0] > 0.999 and ac[-1] < 1e-3


def test_explicit_betas_and_bad_schedule():
    config = DiffusionConfig(schedule="betas", betas=[0.1, 0.2, 0.3])
    assert config.timesteps == 3
    d = GaussianDiffusion.from_config(config)
    torch.testing.assert_close(d.alphas_cumprod, torch.tensor([0.9, 0.72, 0.504], dtype=torch.float64))
    with pytest.raises(ValueError, match="cosine"):
        make_betas("quadratic", 10)
    with pytest.raises(ValueError, match="cosine"):
        DiffusionConfig(schedule="quadratic")
    with pytest.raises(ValueError, match="eps"):
        DiffusionConfig(prediction="score")
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        make_betas("betas", betas=[0.5, 1.5])


def test_q_sample_endpoints_and_conversions():
    d = GaussianDiffusion(make_betas("cosine", 1000))
    x_0 = torch.randn(4, 3, 8, 8)
    noise = torch.randn_like(x_0)
    t0 = torch.zeros(4, dtype=torch.long)
    assert (d.q_sample(x_0, t0, noise) - x_0).abs().max() < 0.01 * noise.abs().max()
    t = torch.tensor([0, 10, 500, 900])  # near T, x_0 from eps divides by sqrt(ᾱ) ~ 5e-5: float32 noise
    x_t = d.q_sample(x_0, t, noise)
    torch.testing.assert_close(d.x0_from_eps(x_t, t, noise), x_0, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(d.eps_from_x0(x_t, t, x_0), noise, atol=1e-4, rtol=1e-4)
    v = d.v_from(x_0, noise, t)
    torch.testing.assert_close(d.x0_from_v(x_t, t, v), x_0, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="noise shape"):
        d.q_sample(x_0, t, noise[:, :2])


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_training_loss_is_zero_for_the_exact_target(prediction):
    """A network that knows x_0 and outputs the matching target gets zero loss for every target type."""
    d = GaussianDiffusion(make_betas("cosine", 1000), prediction=prediction)
    x_0 = torch.randn(6, 3, 4, 4)

    def oracle(x_t, t):
        x0 = x_0
        eps = d.eps_from_x0(x_t, t, x0)
        return {"x0": x0, "eps": eps, "v": d.v_from(x0, eps, t)}[prediction]

    t = torch.tensor([1, 50, 200, 500, 800, 990])
    losses = d.training_loss(oracle, x_0, t=t)
    assert losses["loss"].shape == (6,)
    assert losses["loss"].max() < 1e-6
    wrong = d.training_loss(lambda x_t, t: torch.zeros_like(x_t), x_0, t=t)
    assert wrong["loss"].min() > 1e-3


def test_min_snr_weights():
    t = torch.tensor([10, 500, 990])
    for prediction in ("eps", "x0", "v"):
        d = GaussianDiffusion(make_betas("cosine", 1000), prediction=prediction, min_snr_gamma=5.0)
        snr = d.snr(t)
        w = d.min_snr_weight(t)
        # all three weightings equal min(SNR, γ) on the x_0 scale (Hang et al. 2023)
        x0_scale = {"eps": w * snr, "x0": w, "v": w * (snr + 1)}[prediction]
        torch.testing.assert_close(x0_scale, snr.clamp(max=5.0))


def test_learned_variance_loss_finite_under_fp16():
    d = GaussianDiffusion(make_betas("cosine", 1000), learned_variance=True)
    x_0 = torch.rand(4, 3, 8, 8) * 2 - 1
    big = torch.finfo(torch.float16).max

    def fp16_model(x_t, t):
        out = torch.randn(x_t.shape[0], 6, 8, 8) * 3
        out[0] = big  # saturated half-precision outputs, variance values far outside [-1, 1]
        out[1] = -big
        return out.half()

    losses = d.training_loss(fp16_model, x_0, t=torch.tensor([0, 1, 500, 999]))
    assert torch.isfinite(losses["loss"]).all()
    assert losses["vlb"].shape == (4,) and (losses["vlb"] >= 0).all()
    with pytest.raises(ValueError, match="6 channels"):
        d.training_loss(lambda x_t, t: x_t, x_0)


def test_vlb_prefers_the_true_posterior_variance():
    """The VLB term is smallest when the learned variance matches the true posterior's."""
    d = GaussianDiffusion(make_betas("linear", 1000), prediction="x0", learned_variance=True)
    x_0 = torch.rand(16, 3, 4, 4) * 2 - 1
    t = torch.full((16,), 300)
    x_t = d.q_sample(x_0, t)
    vlbs = [d.vlb_term(x_0, torch.full_like(x_0, v), x_0, x_t, t).mean() for v in (-1.0, 0.0, 1.0)]
    assert vlbs[0] < vlbs[1] < vlbs[2]  # value -1 selects the posterior variance β̃_t
    assert vlbs[0] < 1e-6


# -- timesteps ------------------------------------------------------------------------------------


def test_respace_timesteps():
    assert respace_timesteps(1000, 10, "trailing") == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert respace_timesteps(1000, 10, "leading") == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert respace_timesteps(1000, 1000, "trailing") == list(range(999, -1, -1))
    for spacing in ("trailing", "leading", "linspace"):
        for steps in (1, 7, 20, 50, 250):
            ts = respace_timesteps(1000, steps, spacing)
            assert len(ts) == steps and ts == sorted(ts, reverse=True)
            assert 0 <= ts[-1] and ts[0] <= 999
    assert respace_timesteps(1000, 25, "trailing")[0] == 999  # starts from pure noise
    with pytest.raises(ValueError, match="between 1 and the 1000"):
        respace_timesteps(1000, 0)
    with pytest.raises(ValueError, match="between 1 and the 1000"):
        respace_timesteps(1000, 1001)
    with pytest.raises(ValueError, match="trailing"):
        respace_timesteps(1000, 10, "uniform")


# -- samplers against the closed-form denoiser -----------------------------------------------------


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm++"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_sampler_moments_at_default_steps(name, prediction):
    diffusion, denoiser = make_problem(prediction=prediction)
    gen = torch.Generator().manual_seed(0)
    x = sample(name, denoiser, diffusion, (N, 8), generator=gen)
    assert denoiser.calls == DEFAULT_STEPS[name]
    mean, std = x.mean(0), x.std(0)
    assert ((mean - denoiser.mu).abs() / denoiser.mu).max() < 0.03, (mean, denoiser.mu)
    assert ((std - denoiser.sigma).abs() / denoiser.sigma).max() < 0.03, (std, denoiser.sigma)


def test_dpm_solver_20_at_least_as_accurate_as_ddim_50():
    diffusion, denoiser = make_problem()
    x_T = torch.randn(2048, 8, generator=torch.Generator().manual_seed(1))
    exact = denoiser.exact_ode_solution(x_T, respace_timesteps(1000, 20)[0])
    assert respace_timesteps(1000, 20)[0] == respace_timesteps(1000, 50)[0] == 999
    err_dpm = (dpm_solver_sample(denoiser, diffusion, x_T.shape, steps=20, x_T=x_T) - exact).abs().mean()
    err_ddim = (ddim_sample(denoiser, diffusion, x_T.shape, steps=50, x_T=x_T) - exact).abs().mean()
    err_dpm10 = (dpm_solver_sample(denoiser, diffusion, x_T.shape, steps=10, x_T=x_T) - exact).abs().mean()
    assert err_dpm <= err_ddim, (err_dpm, err_ddim)
    assert err_dpm < err_dpm10  # and it converges with more steps


@pytest.mark.parametrize(("steps", "refine", "max_err"), [(50, 0, 0.15), (50, 3, 0.03), (250, 3, 0.006)])
def test_ddim_inversion_reconstructs(steps, refine, max_err):
    """The stated bounds (max abs error, data std 0.2-0.6) were measured on this problem with margin."""
    diffusion, denoiser = make_problem()
    x_0 = denoiser.mu + denoiser.sigma * torch.randn(512, 8, generator=torch.Generator().manual_seed(2))
    x_0 = x_0.float()
    x_T = ddim_invert(denoiser, diffusion, x_0, steps=steps, refine=refine)
    assert 0.95 < x_T.std() < 1.1  # it really reached the noise end
    recon = ddim_sample(denoiser, diffusion, x_0.shape, steps=steps, x_T=x_T)
    assert (recon - x_0).abs().max() < max_err
    # a sample from fresh noise is far from x_0: the inversion, not luck, keeps the reconstruction close
    fresh = ddim_sample(denoiser, diffusion, x_0.shape, steps=steps, generator=torch.Generator().manual_seed(3))
    assert (fresh - x_0).abs().mean() > 10 * (recon - x_0).abs().mean()


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm++"])
def test_same_seed_same_samples(name):
    diffusion, denoiser = make_problem()
    kwargs = {"steps": 10, "eta": 1.0} if name == "ddim" else {"steps": 10}
    a = sample(name, denoiser, diffusion, (16, 8), generator=torch.Generator().manual_seed(7), **kwargs)
    b = sample(name, denoiser, diffusion, (16, 8), generator=torch.Generator().manual_seed(7), **kwargs)
    c = sample(name, denoiser, diffusion, (16, 8), generator=torch.Generator().manual_seed(8), **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm++"])
def test_one_generator_per_sample_makes_samples_independent_of_their_batch(name):
    """With a generator per sample (a block of rows each), every noise draw of a sample comes from its own
    generator, so a sample made in a batch equals the same sample made alone, for every sampler."""
    diffusion, denoiser = make_problem()
    kwargs = {"steps": 10, "eta": 1.0} if name == "ddim" else {"steps": 10}
    seeds = [5, 6, 7]
    batch = sample(
        name, denoiser, diffusion, (6, 8), generator=[torch.Generator().manual_seed(s) for s in seeds], **kwargs
    )
    for i, s in enumerate(seeds):  # two rows per generator
        alone = sample(name, denoiser, diffusion, (2, 8), generator=torch.Generator().manual_seed(s), **kwargs)
        torch.testing.assert_close(batch[2 * i : 2 * i + 2], alone, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="3 generators cannot split a batch of 4 rows"):
        sample(name, denoiser, diffusion, (4, 8), generator=[torch.Generator() for _ in seeds], **kwargs)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm++"])
def test_pruned_rows_end_as_in_the_full_batch(name):
    """Rows dropped part way stop; the rows kept end as they do in a run without pruning, with their own
    per-row conditioning, known region and generator (every sampler, stochastic ones too)."""
    diffusion, denoiser = make_problem()
    kwargs = {"steps": 8, "eta": 1.0} if name == "ddim" else {"steps": 8}
    shift = torch.linspace(-0.5, 0.5, 6)[:, None]

    def model(x_t, t, shift):  # a per-row condition the sampler must keep in step with the rows
        return denoiser(x_t, t) + shift

    known, mask = torch.randn(6, 8, generator=torch.Generator().manual_seed(1)), (torch.arange(8) < 4).float()

    def run(prune=None):
        generators = [torch.Generator().manual_seed(s) for s in range(10, 16)]
        return sample(
            name,
            model,
            diffusion,
            (6, 8),
            cond={"shift": shift},
            generator=generators,
            inpaint=(known, mask[None]),
            prune=prune,
            **kwargs,
        )

    full = run()
    seen = []

    def prune(i, x0):
        seen.append((i, x0.shape[0]))
        return {1: torch.tensor([1, 3, 4]), 4: torch.tensor([0, 2])}.get(i)

    pruned = run(prune)
    assert seen == [(0, 6), (1, 6), (2, 3), (3, 3), (4, 3), (5, 2), (6, 2), (7, 2)]
    torch.testing.assert_close(pruned, full[[1, 4]], rtol=0, atol=1e-6)


def test_progress_callback_and_thresholds():
    diffusion, denoiser = make_problem()
    seen = []
    dpm_solver_sample(denoiser, diffusion, (4, 8), steps=5, callback=lambda info: seen.append(info["i"]))
    assert seen == [0, 1, 2, 3, 4]
    x = torch.tensor([[0.5, -3.0, 2.0, 0.1], [0.5, -0.8, 0.2, 0.1]])
    torch.testing.assert_close(threshold_x0(x, "static"), x.clamp(-1, 1), rtol=0, atol=0)
    # Imagen's s: the 0.9 quantile of |x| is 2.7 (between 2 and 3); clip to [-s, s], then divide by s. Plain
    # rescaling by max |x| would give 2 / 3 for the third value, and would stretch the second row, whose s is 1.
    dyn = threshold_x0(x, "dynamic", percentile=0.9)
    expected = torch.tensor([[0.5 / 2.7, -1.0, 2.0 / 2.7, 0.1 / 2.7], [0.5, -0.8, 0.2, 0.1]])
    torch.testing.assert_close(dyn, expected, rtol=0, atol=1e-6)
    out = ddim_sample(denoiser, diffusion, (64, 8), steps=10, threshold="static")
    assert out.abs().max() <= 1 + 1e-6
    with pytest.raises(ValueError, match="static"):
        ddim_sample(denoiser, diffusion, (4, 8), steps=5, threshold="soft")
    with pytest.raises(ValueError, match="dpm"):
        sample("euler", denoiser, diffusion, (4, 8))
    with pytest.raises(ValueError, match="between 1 and"):
        sample("ddim", denoiser, diffusion, (4, 8), steps=5000)
    with pytest.raises(ValueError, match="x_T has shape"):
        ddim_sample(denoiser, diffusion, (4, 8), x_T=torch.zeros(4, 7))


def test_inpaint_replacement_keeps_known_region():
    diffusion, denoiser = make_problem()
    known = torch.randn(32, 8)
    mask = torch.zeros(32, 8)
    mask[:, :4] = 1  # repaint the first half
    for fn in (ddim_sample, ddpm_sample, dpm_solver_sample):
        out = fn(denoiser, diffusion, (32, 8), steps=10, inpaint=(known, mask), generator=torch.Generator())
        assert torch.equal(out[:, 4:], known[:, 4:])
        assert not torch.equal(out[:, :4], known[:, :4])


# -- guidance ----------------------------------------------------------------------------------------


class ToyConditional:
    """out = x_t * w + c (conditional) or x_t * w (unconditional); counts forward passes."""

    def __init__(self):
        self.passes = 0

    def __call__(self, x_t, t, *, c, cond_drop=None):
        self.passes += 1
        keep = torch.ones(x_t.shape[0]) if cond_drop is None else (~cond_drop).float()
        return x_t * 0.5 + keep[:, None] * c


def test_guidance_scale_one_is_the_conditional_model():
    model = ToyConditional()
    assert classifier_free_guidance(model, 1.0) is model  # no second pass at scale 1
    # and the guided formula at scale 1, uncond + 1 · (cond - uncond), is the conditional output
    x, t, c = torch.randn(3, 4), torch.zeros(3, dtype=torch.long), torch.randn(3, 4)
    almost_one = classifier_free_guidance(model, 1.0 + 1e-6)
    torch.testing.assert_close(almost_one(x, t, c=c), x * 0.5 + c, rtol=0, atol=1e-5)


def test_guidance_is_one_batched_pass():
    model = ToyConditional()
    guided = classifier_free_guidance(model, 3.0)
    x, t, c = torch.randn(3, 4), torch.zeros(3, dtype=torch.long), torch.randn(3, 4)
    out = guided(x, t, c=c)
    assert model.passes == 1
    torch.testing.assert_close(out, x * 0.5 + 3.0 * c)
    with pytest.raises(ValueError, match=">= 0"):
        classifier_free_guidance(model, -1)


def test_text_guidance_adds_what_the_text_adds_to_the_image():
    """guided = u + s (c - u) + s_t (c - i), with i the image-only branch: one pass of three branches."""
    calls = []

    def model(x_t, t, *, cond_drop):
        calls.append(cond_drop.clone())
        keep_image, keep_text = (~cond_drop).float().unbind(1)
        return x_t + 10 * keep_image[:, None] + 1 * keep_text[:, None]  # cond 11, image-only 10, uncond 0

    x, t = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)
    out = classifier_free_guidance(model, 2.0, text_scale=3.0)(x, t)
    torch.testing.assert_close(out, torch.full((2, 3), 0 + 2.0 * 11 + 3.0 * 1))
    assert len(calls) == 1 and calls[0].tolist() == [[False, False]] * 2 + [[True, True]] * 2 + [[False, True]] * 2
    # scale 1 with text guidance is still guided (it is not the plain model)
    torch.testing.assert_close(classifier_free_guidance(model, 1.0, text_scale=1.0)(x, t), torch.full((2, 3), 12.0))
    with pytest.raises(ValueError, match=">= 0"):
        classifier_free_guidance(model, 2.0, text_scale=-1)


def test_guidance_keeps_conditional_variance():
    def model(x_t, t, *, cond_drop):
        keep = (~cond_drop).float()[:, None]
        return torch.cat([x_t + keep, x_t * 0 + 10 * keep + 1], dim=1)  # prediction, variance values

    guided = classifier_free_guidance(model, 2.0)
    out = guided(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(out[:, :3], torch.full((2, 3), 2.0))
    torch.testing.assert_close(out[:, 3:], torch.full((2, 3), 11.0))
