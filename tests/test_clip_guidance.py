"""GLIDE's CLIP guidance: the noise-aware CLIP (unclip.noised_clip), its training, classifier guidance in the
samplers, and the pipeline's clip_guidance_scale."""

import json
import math
import shutil

import pytest
import torch
from diffusion_helpers import make_problem
from pipeline_helpers import make_tiny_pipeline

from unclip.checkpoint import build_pipeline_folder, load_model
from unclip.clip import TINY_CLIP_CONFIG, ClipAdapter
from unclip.config import DiffusionConfig, load_config
from unclip.diffusion import classifier_guidance, sample
from unclip.noised_clip import NoisedClip, load_noised_clip, save_noised_clip
from unclip.pipeline import UnCLIPPipeline
from unclip.sampling import sample_decoder
from unclip.tasks import build_task
from unclip.tasks.noised_clip import NoisedClipTask
from unclip.training import Trainer

PROMPTS = ["a red circle", "a small blue square above a green triangle"]


# -- classifier guidance on a closed-form problem ---------------------------------------------------------


def exact_grad(denoiser, w):
    """∇_{x_t} log p(y | x_t) for data N(mu, σ²) and p(y | x_0) ∝ exp(w·x_0): w·a·σ²/(a²σ² + b²)."""

    def grad_fn(x_t, t):
        ac = denoiser.diffusion.alphas_cumprod[t].reshape(-1, 1)
        return (w * ac.sqrt() * denoiser.sigma**2 / (ac * denoiser.sigma**2 + 1 - ac)).to(x_t.dtype).expand_as(x_t)

    return grad_fn


@pytest.mark.parametrize("name", ["ddim", "dpm++"])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_guidance_samples_the_tilted_distribution(name, prediction, scale):
    """The exact classifier gradient at scale s samples p(x_0)·p(y | x_0)^s = N(mu + s·σ²·w, σ²): the shift has
    the gradient's sign and s times its size."""
    diffusion, denoiser = make_problem(prediction=prediction)
    w = torch.linspace(-1.5, 1.5, 8).double()
    guided = classifier_guidance(denoiser, diffusion, exact_grad(denoiser, w), scale)
    x = sample(name, guided, diffusion, (16384, 8), generator=torch.Generator().manual_seed(0)).double()
    target = denoiser.mu + scale * denoiser.sigma**2 * w
    assert ((x.mean(0) - target).abs() / denoiser.sigma).max() < 0.05, (x.mean(0), target)
    assert ((x.std(0) - denoiser.sigma).abs() / denoiser.sigma).max() < 0.05


def test_guidance_scale_zero_is_the_model():
    diffusion, denoiser = make_problem()
    assert classifier_guidance(denoiser, diffusion, exact_grad(denoiser, torch.ones(8)), 0.0) is denoiser
    with pytest.raises(ValueError, match=">= 0"):
        classifier_guidance(denoiser, diffusion, exact_grad(denoiser, torch.ones(8)), -1.0)


# -- the noise-aware CLIP ------------------------------------------------------------------------------------


def tiny_noised_clip(timesteps=1000, perturb=True) -> NoisedClip:
    clip = ClipAdapter.from_model_config(TINY_CLIP_CONFIG)
    model = NoisedClip(clip.model, TINY_CLIP_CONFIG, DiffusionConfig(timesteps=timesteps), clip.preprocess_cfg)
    if perturb:  # a timestep MLP that is not zero, so that t matters
        with torch.no_grad():
            for p in model.time_embed.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    return model.eval().requires_grad_(False)


def images(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_untrained_timestep_input_leaves_the_clip_as_it_was():
    """With its zero-initialised timestep MLP, the noised CLIP's image tower is the CLIP's at every t."""
    clip = ClipAdapter.from_model_config(TINY_CLIP_CONFIG)
    model = NoisedClip(clip.model, TINY_CLIP_CONFIG, DiffusionConfig(), clip.preprocess_cfg)
    x = images()
    expected = clip.embed_image(x)
    for t in (0, 500, 999):
        got = model.encode_image(x, torch.full((2,), t))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_log_prob_grad_is_the_gradient_of_the_scaled_similarity():
    model = tiny_noised_clip()
    text = model.embed_text(PROMPTS)
    x, t = images(), torch.tensor([100, 700])
    grad = model.log_prob_grad(x, t, text)

    def score(v):
        return model.logit_scale() * (model.encode_image(v, t, normalize=True) * text).sum(-1)  # (B,)

    d = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).float()
    h = 1e-3
    finite = (score(x + h * d) - score(x - h * d)) / (2 * h)  # per row
    torch.testing.assert_close((grad * d).flatten(1).sum(1), finite, rtol=2e-2, atol=1e-3)
    assert (score(x + 1e-2 * grad) > score(x)).all()  # a step along it raises each row's similarity
    # each row is its own caption's gradient, whatever else is in the batch
    torch.testing.assert_close(model.log_prob_grad(x[1:], t[1:], text[1:]), grad[1:], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(model.log_prob_grad(x, torch.tensor([900, 900]), text), grad)  # t is an input


def test_folder_round_trip_and_a_plain_clip_still_loads(tmp_path):
    model = tiny_noised_clip()
    save_noised_clip(model, tmp_path / "noised")
    loaded = load_noised_clip(tmp_path / "noised")
    x, t = images(), torch.tensor([3, 600])
    torch.testing.assert_close(loaded.encode_image(x, t), model.encode_image(x, t))
    assert loaded.diffusion == model.diffusion
    ClipAdapter.from_checkpoint(tmp_path / "noised")  # the CLIP alone, without the timestep
    ClipAdapter.from_model_config(TINY_CLIP_CONFIG).save(tmp_path / "plain")
    with pytest.raises(ValueError, match="not a noise-aware CLIP"):
        load_noised_clip(tmp_path / "plain")


def test_training_fine_tunes_the_image_tower_on_noised_images(tmp_path):
    ClipAdapter.from_model_config(TINY_CLIP_CONFIG).save(tmp_path / "start")
    overrides = [
        "model.noise_aware=true",
        f"train.init_from={tmp_path / 'start'}",
        f"train.output_dir={tmp_path / 'run'}",
        "train.max_steps=3",
        "train.eval_every=3",
        "train.checkpoint_every=3",
        "data.val_size=8",
    ]
    config = load_config("configs/clip/tiny.yaml", overrides)
    task = build_task(config)
    assert isinstance(task, NoisedClipTask)
    start = {k: v.clone() for k, v in task.model.clip.state_dict().items()}
    Trainer(task, config).fit()
    export = load_noised_clip(tmp_path / "run" / "export")
    trained = export.clip.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in start.items() if k.startswith("token_embedding"))
    assert all(torch.equal(trained[k], v) for k, v in start.items() if k.startswith("transformer."))  # text
    assert not torch.equal(trained["visual.conv1.weight"], start["visual.conv1.weight"])
    assert export.time_embed[2].weight.abs().sum() > 0  # the timestep input was learnt from zero
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evaluated = next(m for m in metrics if "val_ema/t500/t2i_top1" in m)
    assert math.isfinite(evaluated["val_ema/t900/loss"])


def test_unknown_model_setting_of_a_clip_run_is_named():
    config = load_config("configs/clip/tiny.yaml", ["model.noise_awre=true"])
    with pytest.raises(ValueError, match="noise_awre"):
        build_task(config)


# -- the pipeline ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """(plain pipeline folder, the same with a noise-aware CLIP)."""
    root = tmp_path_factory.mktemp("guided")
    plain = make_tiny_pipeline(root, upsampler=False)
    parts = root / "parts"
    decoder_diffusion = load_model(parts / "decoder").diffusion
    model = tiny_noised_clip()
    model.diffusion = decoder_diffusion
    save_noised_clip(model, parts / "noised")
    index = json.loads((plain / "pipeline.json").read_text())
    guided = build_pipeline_folder(
        root / "guided",
        clip=parts / "clip",
        prior=parts / "prior",
        decoder=parts / "decoder",
        noised_clip=parts / "noised",
        defaults=index["defaults"],
    )
    return plain, guided


def test_scale_zero_is_bitwise_the_plain_sampler(pipelines):
    plain, guided = pipelines
    pipe = UnCLIPPipeline.from_pretrained(guided)
    assert pipe.noised_clip is not None
    base = UnCLIPPipeline.from_pretrained(plain)(PROMPTS, seed=4).images
    assert torch.equal(pipe(PROMPTS, seed=4, decoder={"clip_guidance_scale": 0}).images, base)
    # and sample_decoder itself: a guide given at scale 0 is not called
    text = pipe.encode_text(PROMPTS)
    inputs = (pipe.decoder.model, pipe.decoder.diffusion, text.embed, text.tokens, text.mask)

    def never(x_t, t):
        raise AssertionError("the guide is called at scale 0")

    plain_x = sample_decoder(*inputs, steps=3, generator=torch.Generator().manual_seed(1))
    zero_x = sample_decoder(
        *inputs, steps=3, generator=torch.Generator().manual_seed(1), clip_guidance_scale=0.0, clip_guide=never
    )
    assert torch.equal(plain_x, zero_x)
    with pytest.raises(ValueError, match="needs clip_guide"):
        sample_decoder(*inputs, steps=3, clip_guidance_scale=1.0)


def test_pipeline_samples_with_clip_guidance_alone_and_with_classifier_free(pipelines):
    _, guided = pipelines
    pipe = UnCLIPPipeline.from_pretrained(guided)
    base = pipe(PROMPTS, seed=4).images
    for decoder in ({"clip_guidance_scale": 50.0}, {"clip_guidance_scale": 50.0, "guidance_scale": 3.0}):
        out = pipe(PROMPTS, seed=4, decoder=decoder)
        assert torch.isfinite(out.images).all() and not torch.equal(out.images, base)
        assert out.settings["decoder"]["clip_guidance_scale"] == 50.0
    # with candidates and previews, each kept image is still guided toward its own prompt
    out = pipe(PROMPTS, seed=4, candidates=2, preview_steps=1, decoder={"clip_guidance_scale": 50.0})
    assert out.images.shape[0] == 2
    # and with pruning, the guide follows the candidates that go on: each kept image is the one made alone
    guided = {"clip_guidance_scale": 50.0, "steps": 4}
    out = pipe(PROMPTS, seed=4, candidates=4, pruning="1:2", decoder=guided)
    for i, prompt in enumerate(PROMPTS):
        alone = pipe([prompt], seed=out.seeds[i], candidates=1, decoder=guided).images
        torch.testing.assert_close(out.images[i : i + 1], alone, atol=1e-4, rtol=0)


def test_clip_guidance_without_a_noise_aware_clip_is_a_clear_error(pipelines):
    plain, _ = pipelines
    pipe = UnCLIPPipeline.from_pretrained(plain)
    assert pipe.noised_clip is None
    with pytest.raises(ValueError, match="needs a noise-aware CLIP and this pipeline has none"):
        pipe(PROMPTS, decoder={"clip_guidance_scale": 1.0})


def test_folders_without_the_slot_load_and_a_mismatched_schedule_is_refused(pipelines, tmp_path):
    plain, guided = pipelines
    old = tmp_path / "old"
    shutil.copytree(plain, old)
    index = json.loads((old / "pipeline.json").read_text())
    index.pop("noised_clip", None)
    (old / "pipeline.json").write_text(json.dumps(index))
    assert UnCLIPPipeline.from_pretrained(old).noised_clip is None
    other = tmp_path / "other"
    shutil.copytree(guided, other)
    meta = json.loads((other / "noised_clip" / "noised_clip.json").read_text())
    meta["diffusion"]["timesteps"] = 500
    (other / "noised_clip" / "noised_clip.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="another noise schedule than the decoder's"):
        UnCLIPPipeline.from_pretrained(other)


def test_generate_script_takes_clip_guidance(pipelines, tmp_path):
    from sample.generate import main

    plain, guided = pipelines
    main(["--pipeline", str(guided), "--prompt", "a red circle", "--clip-guidance", "20", "--out", str(tmp_path)])
    assert len(list(tmp_path.glob("*.png"))) >= 1
    with pytest.raises(SystemExit) as exit_info:
        main(["--pipeline", str(plain), "--prompt", "a red circle", "--clip-guidance", "20", "--out", str(tmp_path)])
    assert str(exit_info.value.code).startswith("error: ") and "noise-aware CLIP" in str(exit_info.value.code)
