import pytest
import torch
import torch.nn.functional as F

from unclip.checkpoint import load_model
from unclip.config import DiffusionConfig, load_config
from unclip.diffusion import GaussianDiffusion, classifier_free_guidance, dpm_solver_sample
from unclip.nets.prior import PriorConfig, PriorTransformer
from unclip.sampling import sample_prior
from unclip.tasks.prior import prior_metrics

TINY = "configs/prior/tiny.yaml"


def test_train_script_writes_a_loadable_export(tmp_path):
    from train.prior import main

    export = main([TINY, f"train.output_dir={tmp_path}", "train.max_steps=4", "train.eval_every=4"])
    loaded = load_model(export)
    prior = loaded.model
    assert isinstance(prior, PriorTransformer) and prior.has_normalization
    diffusion = GaussianDiffusion.from_config(loaded.diffusion)
    text = F.normalize(torch.randn(3, 32), dim=-1)
    tokens, mask = torch.randn(3, 16, 48), torch.ones(3, 16, dtype=torch.bool)
    out = sample_prior(prior, diffusion, text, tokens, mask, steps=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 32)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    assert "val_ema/retrieval_top1" in (tmp_path / "metrics.jsonl").read_text()


def test_mismatched_clip_is_a_clear_error(tmp_path, capsys):
    from train.prior import main

    with pytest.raises(SystemExit) as e:
        main([TINY, f"train.output_dir={tmp_path}", "model.text_width=64"])
    assert e.value.code == 2
    assert "model.text_width is 64 but the CLIP's token encodings are 48 wide" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([TINY, "train.no_such_key=1"])
    assert "unknown keys in train" in capsys.readouterr().err


def _tiny_prior(seed=0):
    torch.manual_seed(seed)
    return PriorTransformer(PriorConfig(clip_dim=16, text_width=8, text_ctx=6, width=64, layers=2, heads=4))


def test_tiny_prior_overfits_a_handful_of_pairs():
    """Trained with the real loss (x0-prediction MSE) and sampled with the real sampler (DPM-Solver++)."""
    gen = torch.Generator().manual_seed(0)
    n = 4
    text = F.normalize(torch.randn(n, 16, generator=gen), dim=-1)
    tokens, mask = torch.randn(n, 6, 8, generator=gen), torch.ones(n, 6, dtype=torch.bool)
    mask[:, 4:] = False
    image = F.normalize(torch.randn(n, 16, generator=gen), dim=-1)
    prior = _tiny_prior()
    prior.set_normalization(*PriorTransformer.compute_normalization(image))
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(prediction="x0"))
    opt = torch.optim.AdamW(prior.parameters(), lr=2e-3)
    x_0 = prior.normalize(image)
    cond = {"text_embed": text, "text_tokens": tokens, "text_mask": mask}
    batch = {k: v.repeat(8, *[1] * (v.ndim - 1)) for k, v in cond.items()}
    for _ in range(400):
        loss = diffusion.training_loss(prior, x_0.repeat(8, 1), cond=batch)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    prior.eval()
    out = sample_prior(prior, diffusion, **cond, steps=25, guidance_scale=1.0, generator=torch.Generator())
    cos = (out * image).sum(-1)
    assert cos.min() >= 0.95, cos


def test_guidance_scale_one_equals_the_conditional_model_and_candidates_pick_the_best():
    prior = _tiny_prior().eval()
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(0.05 * torch.randn_like(p))
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(prediction="x0"))
    text = F.normalize(torch.randn(2, 16), dim=-1)
    cond = {"text_embed": text, "text_tokens": torch.randn(2, 6, 8), "text_mask": torch.ones(2, 6, dtype=torch.bool)}
    a = sample_prior(prior, diffusion, **cond, steps=5, guidance_scale=1.0, generator=torch.Generator().manual_seed(1))
    x = dpm_solver_sample(prior, diffusion, (2, 16), steps=5, cond=cond, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, F.normalize(prior.denormalize(x), dim=-1), rtol=0, atol=0)
    assert classifier_free_guidance(prior, 1.0) is prior

    # 3 candidates per prompt: the kept one has the highest cosine to the text among the 3 drawn
    best = sample_prior(prior, diffusion, **cond, steps=5, candidates=3, generator=torch.Generator().manual_seed(2))
    rep = {k: v.repeat_interleave(3, dim=0) for k, v in cond.items()}
    guided = classifier_free_guidance(prior, 2.0)
    x = dpm_solver_sample(guided, diffusion, (6, 16), steps=5, cond=rep, generator=torch.Generator().manual_seed(2))
    all_candidates = F.normalize(prior.denormalize(x), dim=-1).view(2, 3, 16)
    scores = (all_candidates * text[:, None]).sum(-1)
    torch.testing.assert_close(best, all_candidates[torch.arange(2), scores.argmax(1)])
    assert not torch.allclose(all_candidates[:, 0], all_candidates[:, 1])
    with pytest.raises(ValueError, match="candidates"):
        sample_prior(prior, diffusion, **cond, candidates=0)


def test_prior_metrics():
    """Orthonormal embeddings, where every value is known: the captions of rows 0 and 1 are swapped, and the
    prediction swaps rows 2 and 3."""
    image = torch.eye(4)
    text = image[[1, 0, 2, 3]]
    predicted = image[[0, 1, 3, 2]]
    m = prior_metrics(predicted, text, image)
    expected = {
        "cos_image": 0.5,  # rows 0 and 1 right
        "cos_text": 0.0,  # each prediction is orthogonal to its caption
        "cos_unrelated_text": 0.5,  # against the previous row's caption: rows 1 (e1 · e1) and 3 (e2 · e2)
        "cos_text_image": 0.5,
        "retrieval_top1": 0.5,
        "text_retrieval_top1": 0.5,
    }
    assert m == pytest.approx(expected, abs=1e-7)
    m = prior_metrics(2 * image, text, image)  # unnormalised input: the same as the normalised one
    assert m["cos_image"] == pytest.approx(1.0) and m["retrieval_top1"] == 1.0


def test_tiny_config_loads():
    config = load_config(TINY)
    assert config.kind == "prior" and config.diffusion.prediction == "x0"


def test_prior_ablation_command(tmp_path, capsys):
    """python -m unclip.eval prior: retrieval with the prior's embedding vs the raw text embedding."""
    from train.prior import main as train
    from unclip.clip import TINY_CLIP_CONFIG, ClipAdapter
    from unclip.config import DataConfig
    from unclip.eval.__main__ import input_size
    from unclip.eval.__main__ import main as evaluate

    export = train([TINY, f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.eval_every=100"])
    ClipAdapter.from_model_config(TINY_CLIP_CONFIG).save(tmp_path / "clip")  # the tiny config's random CLIP
    results = evaluate(
        [
            "prior",
            "--prior",
            str(export),
            "--clip",
            str(tmp_path / "clip"),
            "--n",
            "20",
            "--out",
            str(tmp_path / "ablation.json"),
        ]
    )
    assert results["n"] == 20
    assert "text_retrieval_top1" in capsys.readouterr().out
    assert (tmp_path / "ablation.json").is_file()
    # what does not depend on the prior, computed here from the CLIP and the held-out pairs themselves
    clip = ClipAdapter.from_checkpoint(tmp_path / "clip")
    data = load_config(TINY).data
    direct = _text_only_metrics(clip, DataConfig(**{**data.__dict__, "val_size": 20}), range(20))
    assert results["text_retrieval_top1"] == pytest.approx(direct["text_retrieval_top1"], abs=1e-6)
    assert results["cos_text_image"] == pytest.approx(direct["cos_text_image"], abs=1e-5)
    assert (results["retrieval_top1"] * 20) == pytest.approx(round(results["retrieval_top1"] * 20), abs=1e-6)

    reference = evaluate(
        ["prior", "--prior", str(export), "--clip", str(tmp_path / "clip"), "--n", "6", "--groups", "2"]
        + ["--shapes-reference"]
    )
    assert reference["n"] == 6 and reference["groups"] == 2
    data = DataConfig(dataset="shapes", image_size=input_size(clip), val_size=12, options={"size_word_prob": 0.5})
    groups = [_text_only_metrics(clip, data, range(g * 6, g * 6 + 6))["text_retrieval_top1"] for g in (0, 1)]
    values = torch.tensor(groups, dtype=torch.float64)
    assert reference["text_retrieval_top1"] == pytest.approx(values.mean().item(), abs=1e-6)
    assert reference["text_retrieval_top1_se"] == pytest.approx((values.std() / 2**0.5).item(), abs=1e-6)
    for key in ("retrieval_top1", "posterior_retrieval_top1"):  # means of two rates over 6 pairs: k / 12
        assert reference[key] * 12 == pytest.approx(round(reference[key] * 12), abs=1e-6), key


def _text_only_metrics(clip, data, indices) -> dict[str, float]:
    """prior_metrics with the raw text embedding as the prediction, for the val pairs at `indices`."""
    from unclip.data import build_dataset, collate
    from unclip.data.embeddings import encode_batch

    val = build_dataset(data, split="val")
    c = encode_batch(clip, collate([val[i] for i in indices]), clip.device)
    return prior_metrics(c["text_embed"], c["text_embed"], c["image_embed"])


def test_precomputed_embeddings_train_the_prior_and_mismatches_are_clear(tmp_path):
    """Pooled-only shards (as published LAION embeddings are) train a prior without text tokens."""
    import numpy as np

    from unclip.data.embeddings import write_shard
    from unclip.tasks import build_task
    from unclip.training import Trainer

    rng = np.random.default_rng(0)
    n = 64
    write_shard(
        tmp_path / "emb",
        0,
        image_embed=rng.standard_normal((n, 32)).astype(np.float16),
        text_embed=rng.standard_normal((n, 32)).astype(np.float16),
        captions=[f"caption {i}" for i in range(n)],
    )
    base = [
        f"data.path={tmp_path / 'emb'}",
        "data.dataset=embeddings",
        "data.val_size=8",
        f"train.output_dir={tmp_path / 'run'}",
        "train.max_steps=3",
        "train.eval_every=3",
    ]
    with pytest.raises(ValueError, match="no per-token text encodings"):
        build_task(load_config(TINY, base))
    with pytest.raises(ValueError, match="have 32 dims but model.clip_dim is 16"):
        build_task(load_config(TINY, [*base, "model.text_width=null", "model.clip_dim=16"]))
    config = load_config(TINY, [*base, "model.text_width=null"])
    task = build_task(config)
    assert task.clip is None and task.model.has_normalization
    Trainer(task, config).fit()
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()
