"""The autoregressive prior: PCA, quantisation, the network, its sampler, its training task and the pipeline."""

import json

import pytest
import torch
import torch.nn.functional as F
from pipeline_helpers import make_tiny_pipeline, perturb

from unclip.checkpoint import build_pipeline_folder, load_model, save_model
from unclip.clip import TINY_CLIP_CONFIG, ClipAdapter
from unclip.config import DataConfig, DiffusionConfig, load_config
from unclip.eval.prior import evaluate_prior
from unclip.imageio import read_png_metadata
from unclip.nets.ar_prior import ARPrior, ARPriorConfig, dequantize, fit_pca, quantize
from unclip.pipeline import UnCLIPPipeline
from unclip.sampling import SettingError
from unclip.sampling_ar import ARPriorSettings, guide, nucleus, sample_ar_prior

TINY = "configs/prior/tiny_ar.yaml"


def _low_rank(n, dim, rank, seed=0):
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, rank, generator=gen))[0].T  # (rank, dim), orthonormal rows
    scales = torch.linspace(3.0, 0.5, rank)
    return torch.randn(n, rank, generator=gen) * scales @ basis + torch.randn(dim, generator=gen)


def test_pca_round_trip_is_exact_on_its_subspace_and_orders_the_variance():
    x = _low_rank(500, 16, 5)
    mean, components, explained = fit_pca(x, 5)
    torch.testing.assert_close(components @ components.T, torch.eye(5), atol=1e-5, rtol=0)
    back = (x - mean) @ components.T @ components + mean
    assert (back - x).abs().max() < 1e-4  # the data live in 5 dims: 5 components lose nothing
    assert explained[:5].sum() > 0.9999 and torch.all(explained[:-1] >= explained[1:] - 1e-7)
    mean, components, _ = fit_pca(x, 3)  # fewer: the error is the variance of the dropped components
    back = (x - mean) @ components.T @ components + mean
    dropped = ((x - mean) - (x - mean) @ components.T @ components).pow(2).sum(-1).mean()
    assert 0.2 < dropped < 2.0 and (back - x).pow(2).sum(-1).mean() == pytest.approx(dropped.item(), rel=1e-4)


def test_quantise_and_dequantise():
    low, high = torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 4.0])
    z = torch.stack([torch.linspace(-1, 1, 101), torch.linspace(0, 4, 101)], dim=1)
    codes = quantize(z, low, high, 8)
    assert codes.dtype == torch.int64 and codes.min() == 0 and codes.max() == 7
    back = dequantize(codes, low, high, 8)
    assert torch.all((back - z).abs() <= (high - low) / 16 + 1e-6)  # within half a bucket
    assert torch.equal(quantize(back, low, high, 8), codes)  # bucket centres map to their own bucket
    outside = quantize(torch.tensor([[-5.0, 9.0]]), low, high, 8)
    assert outside.tolist() == [[0, 7]]
    with pytest.raises(ValueError, match="pca_dims"):
        ARPriorConfig(clip_dim=8, pca_dims=9)


def test_codes_round_trip_a_clip_embedding():
    prior = ARPrior(ARPriorConfig(clip_dim=16, pca_dims=16, buckets=1024, text_width=None, width=32, heads=2))
    x = F.normalize(_low_rank(2000, 16, 16), dim=-1)
    with pytest.raises(ValueError, match="no PCA"):
        prior.require_codes()
    explained = prior.fit_codes(x)
    assert explained.sum() == pytest.approx(1.0, abs=1e-5)
    back = prior.decode(prior.encode(x))
    torch.testing.assert_close(back.norm(dim=-1), torch.ones(2000))
    assert (back * x).sum(-1).min() > 0.999


def _toy_prior(seed=0):
    torch.manual_seed(seed)
    config = ARPriorConfig(clip_dim=16, pca_dims=6, buckets=32, text_width=8, text_ctx=6, width=64, layers=2, heads=4)
    return ARPrior(config)


def _toy_pairs(n=4):
    gen = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(n, 16, generator=gen), dim=-1)
    tokens, mask = torch.randn(n, 6, 8, generator=gen), torch.ones(n, 6, dtype=torch.bool)
    mask[:, 4:] = False
    image = F.normalize(_low_rank(n, 16, 6, seed=1), dim=-1)
    return {"text_embed": text, "text_tokens": tokens, "text_mask": mask}, image


def test_tiny_ar_prior_learns_a_toy_mapping():
    """Trained with the real loss and sampled with the real sampler: each caption gets its own image embedding."""
    cond, image = _toy_pairs()
    prior = _toy_prior()
    prior.fit_codes(torch.cat([image, F.normalize(image + 0.05 * torch.randn(64, 4, 16), dim=-1).flatten(0, 1)]))
    opt = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    batch = {k: v.repeat(8, *[1] * (v.ndim - 1)) for k, v in cond.items()}
    for _ in range(100):
        loss = prior.loss(image.repeat(8, 1), **batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1
    prior.eval()
    out = sample_ar_prior(prior, **cond, temperature=1.0, top_p=0.9, guidance_scale=2.0, generator=torch.Generator())
    best = (prior.decode(prior.encode(image)) * image).sum(-1)
    cos = (out * image).sum(-1)
    assert torch.all(cos >= best - 0.02), (cos, best)
    assert (out @ image.T).argmax(1).tolist() == [0, 1, 2, 3]  # not one embedding for every caption


def test_guidance_temperature_top_p_and_candidates():
    cond, image = _toy_pairs(3)
    prior = perturb(_toy_prior(), 5).eval()
    prior.fit_codes(F.normalize(torch.randn(200, 16), dim=-1))
    codes = prior.encode(image)
    full = prior(codes, **cond)  # (3, K, buckets): every code's logits at once
    logits, cache = prior.start(**cond)  # and code by code, with the cache the sampler uses
    for i in range(prior.config.pca_dims):
        if i:
            logits = prior.extend(codes[:, i - 1], cache)
        torch.testing.assert_close(logits, full[:, i], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no code after the last"):
        prior.extend(codes[:, -1], cache)

    drop = torch.tensor([False] * 3 + [True] * 3)
    both = {k: torch.cat([v, v]) for k, v in cond.items()}
    logits = prior(codes[:, :2].repeat(2, 1), **both, cond_drop=drop)[:, -1]
    conditional, unconditional = F.log_softmax(logits, -1).chunk(2)
    torch.testing.assert_close(guide(logits[:3], 1.0), conditional)
    torch.testing.assert_close(guide(logits, 0.0), unconditional, atol=1e-5, rtol=0)
    expected = F.log_softmax(unconditional + 3.0 * (conditional - unconditional), -1)
    torch.testing.assert_close(guide(logits, 3.0), expected, atol=1e-5, rtol=0)

    logp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.testing.assert_close(nucleus(logp, 1.0, 0.7), torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    torch.testing.assert_close(nucleus(logp, 1.0, 0.1), torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    assert nucleus(logp, 0.0, 1.0).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    sharp = nucleus(logp, 0.5, 1.0)
    assert sharp[0, 0] > 0.5 and sharp.sum().item() == pytest.approx(1.0)

    # per-prompt generators: a prompt's embedding does not depend on its batch; candidates keep the best
    gens = [torch.Generator().manual_seed(s) for s in (7, 8, 9)]
    batch = sample_ar_prior(prior, **cond, candidates=3, generator=gens)
    alone = sample_ar_prior(
        prior, **{k: v[1:2] for k, v in cond.items()}, candidates=3, generator=[torch.Generator().manual_seed(8)]
    )
    torch.testing.assert_close(batch[1:2], alone)
    one = sample_ar_prior(prior, **cond, candidates=1, generator=[torch.Generator().manual_seed(s) for s in (7, 8, 9)])
    assert torch.all((batch * cond["text_embed"]).sum(-1) >= (one * cond["text_embed"]).sum(-1) - 1e-6)
    with pytest.raises(SettingError, match="top_p"):
        ARPriorSettings(top_p=0)


def test_train_script_writes_a_loadable_export(tmp_path):
    from train.prior import main

    export = main([TINY, f"train.output_dir={tmp_path}", "train.max_steps=4", "train.eval_every=4"])
    prior = load_model(export).model
    assert isinstance(prior, ARPrior) and prior.has_codes and prior.config.pca_dims == 8
    text = F.normalize(torch.randn(3, 32), dim=-1)
    tokens, mask = torch.randn(3, 16, 48), torch.ones(3, 16, dtype=torch.bool)
    out = sample_ar_prior(prior, text, tokens, mask, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evaluated = next(m for m in metrics if "val/code_cos" in m)
    assert evaluated["val/code_cos"] > 0.9 and "val_ema/retrieval_top1" in evaluated
    data = DataConfig(dataset="shapes", image_size=32, val_size=16)  # python -m unclip.eval prior reads it too
    results = evaluate_prior(export, ClipAdapter.from_model_config(TINY_CLIP_CONFIG), data, n=8)
    assert results["n"] == 8 and 0 <= results["retrieval_top1"] <= 1 and -1 <= results["cos_image"] <= 1


def test_model_kind_picks_the_prior(capsys):
    assert type(load_config(TINY).model) is ARPriorConfig
    diffusion = load_config("configs/prior/tiny.yaml", ["model.kind=diffusion"]).model
    assert type(diffusion).__name__ == "PriorConfig"
    with pytest.raises(ValueError, match="model.kind of a prior must be one of"):
        load_config(TINY, ["model.kind=gan"])
    from train.prior import main

    with pytest.raises(SystemExit):
        main([TINY, "model.pca_dims=64"])
    assert "error: model.pca_dims is 64 but the embeddings have only model.clip_dim=32 dims" in capsys.readouterr().err


def _ar_pipeline(root):
    """The tiny pipeline with a 64 px decoder and an autoregressive prior in its prior slot."""
    make_tiny_pipeline(
        root, upsampler=False, decoder_changes=["model.image_size=64", "model.attention_resolutions=[32]"]
    )
    torch.manual_seed(0)
    sizes = dict(clip_dim=32, pca_dims=8, buckets=64, text_width=48, text_ctx=16, width=32, layers=2, heads=2)
    config = ARPriorConfig(**sizes)
    prior = perturb(ARPrior(config), 1)
    prior.fit_codes(F.normalize(torch.randn(256, 32, generator=torch.Generator().manual_seed(0)), dim=-1))
    save_model(prior, root / "parts" / "ar_prior", kind="prior", diffusion=DiffusionConfig())
    return build_pipeline_folder(
        root / "ar_pipeline",
        clip=root / "parts" / "clip",
        prior=root / "parts" / "ar_prior",
        decoder=root / "parts" / "decoder",
        defaults={"prior": {"temperature": 0.9, "top_p": 0.95}, "decoder": {"steps": 3}},
    )


def test_pipeline_generates_with_an_autoregressive_prior(tmp_path):
    pipe = UnCLIPPipeline.from_pretrained(_ar_pipeline(tmp_path))
    assert isinstance(pipe.prior.defaults, ARPriorSettings) and pipe.prior.defaults.temperature == 0.9
    out = pipe(["a red circle", "two blue squares"], seed=3)
    assert out.images.shape == (2, 3, 64, 64)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(out.image_embeds, out.text_embeds)  # the prior's embeddings, not the text's
    again = pipe(["two blue squares"], seed=4)  # image i of a call draws from seed + i
    torch.testing.assert_close(again.image_embeds, out.image_embeds[1:])
    paths = out.save(tmp_path / "out")
    recorded = json.loads(read_png_metadata(paths[0])["settings"])["prior"]
    assert recorded == {"guidance_scale": 2.0, "temperature": 0.9, "top_p": 0.95, "candidates": 2}
    with pytest.raises(SettingError, match=r"prior has no setting \['steps'\]"):
        pipe(["a red circle"], prior={"steps": 3})
