"""The bundled pipelines load and sample with the library as it is (a change that breaks old exports fails here)."""

import os
from pathlib import Path

import torch
from safetensors import safe_open

from unclip.pipeline import DEFAULT_PIPELINE, UnCLIPPipeline


def test_bundled_shapes_pipeline_generates():
    assert Path(DEFAULT_PIPELINE).parts[-2:] == ("models", "shapes")
    pipe = UnCLIPPipeline.from_pretrained(DEFAULT_PIPELINE)
    assert pipe.sizes == [64, 256, 1024]
    out = pipe(["a red circle above a blue square"], seed=0, size=64, prior={"steps": 4}, decoder={"steps": 4})
    assert out.images.shape == (1, 3, 64, 64) and torch.isfinite(out.images).all()
    assert pipe.decoder.model.config.text_layers == 2  # the second stage, configs/decoder/shapes_text.yaml
    assert out.settings["candidates"] == 32 and out.clip_scores is not None  # reranks by default
    assert pipe.pruning == ((6, 8), (12, 4), (18, 2))  # dropping candidates early, measured in its card
    assert out.settings["decoder"]["guidance_scale"] == 1.0  # pipeline.json's default, measured in its card
    assert pipe.prior.defaults.steps == 10 and pipe.decoder.defaults.steps == 25  # fewer steps, measured in its card
    steps = {name: stage.defaults.steps for name, stage in zip(("256", "1024"), pipe.upsamplers, strict=True)}
    assert steps == {"256": 4, "1024": 1}  # as good as 8 by PSNR and sharpness, and faster (its card)


def test_bundled_shapes_clip_tells_relations_apart():
    """The bundled shapes CLIP was fine-tuned with hard negatives (its card): it prefers a render's caption to
    the same caption with the relation flipped far more often than chance (50%); its card gives the rate."""
    from unclip.clip import ClipAdapter
    from unclip.eval.probes import probe_clip

    probe = probe_clip(ClipAdapter.from_checkpoint(Path(DEFAULT_PIPELINE) / "clip"), n=60)
    assert probe["preferred_by_kind"]["relation"] > 0.85 and probe["preferred_by_kind"]["color"] > 0.95


def test_bundled_openmoji_pipeline_generates():
    root = Path(DEFAULT_PIPELINE).parent / "openmoji"
    pipe = UnCLIPPipeline.from_pretrained(root)
    assert pipe.sizes == [64, 256]
    out = pipe(["grinning face"], seed=0, size=64, prior={"steps": 4}, decoder={"steps": 4})
    assert out.images.shape == (1, 3, 64, 64) and torch.isfinite(out.images).all()
    assert out.settings["decoder"]["guidance_scale"] == 3.0  # pipeline.json's default, measured in its card
    assert "CC BY-SA 4.0" in (root / "MODEL_CARD.md").read_text()


def test_bundled_weights_are_fp16_and_fit_the_budget():
    models = Path(DEFAULT_PIPELINE).parent
    pipelines = [models / "shapes", models / "openmoji"]
    files = [w for p in pipelines for w in p.glob("*/*.safetensors")]
    assert sum(w.stat().st_size for w in (models / "openmoji").glob("*/*.safetensors")) <= 60e6
    stored = [Path(d) / f for d, _, names in os.walk(models) for f in names if not (Path(d) / f).is_symlink()]
    assert sum(f.stat().st_size for f in stored) <= 150e6  # everything under models/, links counted once
    for weights in [*files, *models.glob("evaluators/*/*.safetensors")]:
        with safe_open(str(weights), "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert "F32" not in dtypes, weights


def test_upsamplers_sample_at_their_configured_noise_level():
    pipe = UnCLIPPipeline.from_pretrained(DEFAULT_PIPELINE)
    levels = {s.folder: (s.defaults.noise_level, s.model.config.sample_noise_level) for s in pipe.upsamplers}
    assert levels == {"upsampler_256": (50, 50), "upsampler_1024": (25, 25)}
    settings = pipe.resolve(size=1024).metadata()
    assert settings["upsampler_1024"]["noise_level"] == 25 and settings["upsampler_256"]["noise_level"] == 50
    assert (
        pipe.resolve(size=1024, upsamplers={"upsampler_1024": {"noise_level": 0}})
        .upsamplers["upsampler_1024"]
        .noise_level
        == 0
    )  # a call can still override it


def test_bundled_orange_adapters_draw_orange_and_base_does_not():
    """models/shapes-orange: the shapes pipeline with its LoRA adapters (its card). The base never drew orange;
    with the adapters most orange prompts come out orange (the card's rate is 92% of colours at one candidate)."""
    from unclip.eval.shapes_checker import check
    from unclip.lora import has_lora

    root = Path(DEFAULT_PIPELINE).parent / "shapes-orange"
    pipe, base = UnCLIPPipeline.from_pretrained(root), UnCLIPPipeline.from_pretrained(DEFAULT_PIPELINE)
    assert has_lora(pipe.prior.model) and has_lora(pipe.decoder.model) and not has_lora(base.decoder.model)
    adapted = {name.split(".lora_A")[0] for name, _ in pipe.decoder.model.named_parameters() if ".lora_A" in name}
    assert {"input_conv", "out.2", "middle.0.conv_in", "down_blocks.0.0.emb_proj"} <= adapted  # convolutions too
    # the same sampling defaults as the pipeline it adapts (reranking, pruning, steps)
    assert (pipe.candidates, pipe.pruning, pipe.preview_steps) == (base.candidates, base.pruning, base.preview_steps)
    for stage, base_stage in zip(
        [pipe.prior, pipe.decoder, *pipe.upsamplers], [base.prior, base.decoder, *base.upsamplers], strict=True
    ):
        assert stage.defaults == base_stage.defaults
    prompts = ["a large orange circle", "an orange square", "a large orange triangle", "an orange diamond"]
    kwargs = dict(seed=0, size=64, candidates=1, decoder={"steps": 12})
    orange = sum(check(image, p).colors_ok for image, p in zip(pipe(prompts, **kwargs).images, prompts, strict=True))
    assert orange >= 3
    assert not any(check(image, p).colors_ok for image, p in zip(base(prompts, **kwargs).images, prompts, strict=True))
