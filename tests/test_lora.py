"""LoRA through peft (train.lora, unclip.lora): only the adapters train, the export is the adapter alone, and a
pipeline folder that names adapters applies them at load time while one that does not is the base, exactly."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.pipeline_helpers import add_random_adapter, make_tiny_pipeline, perturb
from unclip.checkpoint import load_model, save_model
from unclip.config import load_config
from unclip.diffusion import GaussianDiffusion
from unclip.eval.__main__ import main as evaluate
from unclip.lora import (
    ADAPTER_CONFIG,
    ADAPTER_META,
    ADAPTER_WEIGHTS,
    adapters_disabled,
    add_lora,
    load_adapter,
    merge_adapters,
    preserving_loss,
    teaches_nothing_new,
)
from unclip.nets.prior import PriorTransformer
from unclip.nets.unet import UNet
from unclip.pipeline import UnCLIPPipeline
from unclip.tasks import build_task
from unclip.training import Trainer

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["train.max_steps=3", "train.batch_size=4", "train.lr=1e-2", "train.warmup_steps=0"]
TRAIN += ["train.ema_warmup_steps=0", "train.eval_every=100", "train.checkpoint_every=100", "train.log_every=1"]


def _base_export(kind, tmp_path):
    """A trained-looking base stage (random weights, the zero-initialised layers included) exported to a folder."""
    config = load_config(f"configs/{kind}/tiny.yaml")
    torch.manual_seed(0)
    if kind == "prior":
        model = perturb(PriorTransformer(config.model), 1)
        model.set_normalization(torch.zeros(config.model.clip_dim), torch.ones(config.model.clip_dim))
    else:
        model = perturb(UNet(config.model), 2)
    return save_model(model, tmp_path / f"{kind}-base", kind=kind, diffusion=config.diffusion)


@pytest.mark.parametrize("kind", [pytest.param("prior", marks=pytest.mark.slow), "decoder"])  # prior: 4,096 renders
def test_lora_trains_only_the_adapter_and_exports_it_alone(kind, tmp_path):
    base = _base_export(kind, tmp_path)
    run = tmp_path / "run"
    overrides = [f"train.output_dir={run}", f"train.init_from={base}", "train.lora={rank: 2, alpha: 4}", *TRAIN]
    config = load_config(f"configs/{kind}/tiny.yaml", overrides)
    trainer = Trainer(build_task(config), config)
    trainer.fit()
    model = trainer.accelerator.unwrap_model(trainer.model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    base_state = load_model(base).model.state_dict()
    state = model.state_dict()
    frozen = {k.replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k}
    assert frozen.keys() == base_state.keys()
    assert all(torch.equal(frozen[k], base_state[k]) for k in base_state)  # the base is unchanged
    assert any(state[k].abs().sum() > 0 for k in state if "lora_B" in k)  # B starts at zero: it trained

    export = run / "export"
    assert sorted(p.name for p in export.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_META, ADAPTER_WEIGHTS])
    tensors = load_file(export / ADAPTER_WEIGHTS)
    assert tensors and all("lora_A" in k or "lora_B" in k for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == sum(
        p.numel() for n, p in model.named_parameters() if n in trainable
    )
    meta = json.loads((export / ADAPTER_META).read_text())
    assert meta["kind"] == kind and meta["base"] == str(base)
    assert json.loads((export / ADAPTER_CONFIG).read_text())["r"] == 2

    # the export is the EMA's adapter: loaded onto the base, it computes what the trainer's EMA model computes
    ema = trainer.ema.ema_model.eval()
    restored = load_adapter(load_model(base).model, export).eval()
    ema_state, restored_state = ema.state_dict(), restored.state_dict()
    assert ema_state.keys() == restored_state.keys()
    assert all(torch.equal(ema_state[k], restored_state[k]) for k in ema_state)


def test_lora_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="train.lora trains adapters on a trained stage: set train.init_from"):
        config = load_config("configs/decoder/tiny.yaml", ["train.lora={rank: 2}", f"train.output_dir={tmp_path}"])
        Trainer(build_task(config), config)
    with pytest.raises(ValueError, match="train.lora.rank must be a whole number >= 1"):
        load_config("configs/decoder/tiny.yaml", ["train.lora={rank: 0}"])
    with pytest.raises(ValueError, match="unknown keys in train.lora"):
        load_config("configs/decoder/tiny.yaml", ["train.lora={ranks: 2}"])
    for bad in ("-1", ".inf"):
        with pytest.raises(ValueError, match="train.lora.preserve must be a finite weight >= 0"):
            load_config("configs/decoder/tiny.yaml", [f"train.lora={{preserve: {bad}}}"])
    for bad in ("orange", "5", "{orange: 1}"):
        with pytest.raises(ValueError, match="train.lora.new_words must be a list of words"):
            load_config("configs/decoder/tiny.yaml", [f"train.lora={{preserve: 1, new_words: {bad}}}"])
    with pytest.raises(ValueError, match="train.lora.new_words only marks the captions train.lora.preserve"):
        load_config("configs/decoder/tiny.yaml", ["train.lora={new_words: [orange]}"])
    with pytest.raises(ValueError, match="train.lora.preserve needs train.lora.dropout 0"):
        load_config("configs/decoder/tiny.yaml", ["train.lora={preserve: 1, dropout: 0.1}"])
    with pytest.raises(ValueError, match="the autoregressive prior has no diffusion loss"):
        config = load_config("configs/prior/tiny_ar.yaml", ["train.lora={preserve: 1}", "train.init_from=x"])
        build_task(config)
    with pytest.raises(ValueError, match="train.lora.preserve is for the prior, decoder and inpaint stages"):
        overrides = ["train.lora={preserve: 1}", "train.init_from=x", f"train.output_dir={tmp_path}"]
        config = load_config("configs/upsampler/tiny.yaml", overrides)
        Trainer(build_task(config), config)
    model = UNet(load_config("configs/decoder/tiny.yaml").model)
    config = load_config("configs/decoder/tiny.yaml", ["train.lora={target_modules: [no_such_layer]}"])
    with pytest.raises(ValueError, match="train.lora.target_modules"):
        add_lora(model, config.train.lora)


def _adapted_decoder(seed=3):
    """A tiny decoder with a LoRA adapter whose B is not zero, so that the adapter changes its output."""
    overrides = ["train.lora={rank: 2, alpha: 4}", "diffusion.min_snr_gamma=5.0"]  # the loss weights its rows
    config = load_config("configs/decoder/tiny.yaml", overrides)
    torch.manual_seed(0)
    model = add_lora(perturb(UNet(config.model), 2), config.train.lora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model, config


def _decoder_inputs(config, batch=4):
    gen = torch.Generator().manual_seed(1)
    m = config.model
    x = torch.randn(batch, 3, m.image_size, m.image_size, generator=gen)
    cond = {
        "image_embed": torch.randn(batch, m.clip_dim, generator=gen),
        "text_tokens": torch.randn(batch, m.text_ctx, m.text_width, generator=gen),
        "text_mask": torch.ones(batch, m.text_ctx, dtype=torch.bool),
    }
    return x, cond


def test_adapters_disabled_runs_the_base_network_and_restores_the_adapter():
    model, config = _adapted_decoder()
    torch.manual_seed(0)
    base = perturb(UNet(config.model), 2)  # the same weights, without the adapter
    x, cond = _decoder_inputs(config)
    t = torch.tensor([10, 200, 500, 900])
    drop = torch.zeros(4, dtype=torch.bool)
    model.eval(), base.eval()
    with torch.no_grad():
        adapted = model(x, t, cond_drop=drop, **cond)
        with adapters_disabled(model):
            off = model(x, t, cond_drop=drop, **cond)
        again = model(x, t, cond_drop=drop, **cond)
        expected = base(x, t, cond_drop=drop, **cond)
    torch.testing.assert_close(off, expected)
    assert not torch.allclose(adapted, off, atol=1e-4)  # the adapter does change the output
    torch.testing.assert_close(again, adapted)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)  # as add_lora left them

    model.requires_grad_(False)  # as load_adapter leaves a pipeline's adapters: frozen, and they stay so
    layers = [m for m in model.modules() if hasattr(m, "enable_adapters") and hasattr(m, "lora_A")]
    layers[0].enable_adapters(False)  # a layer already off stays off
    with torch.no_grad(), adapters_disabled(model):
        torch.testing.assert_close(model(x, t, cond_drop=drop, **cond), expected)
    assert not any(p.requires_grad for p in model.parameters())
    assert layers[0].disable_adapters and not any(layer.disable_adapters for layer in layers[1:])


def test_teaches_nothing_new_matches_whole_words_and_phrases():
    captions = ["an orange circle", "a red square", "two oranges", "ORANGE star left of a light blue disc"]
    assert teaches_nothing_new(captions, ["orange"]) == [False, True, True, False]
    assert teaches_nothing_new(captions, ["light blue", "red"]) == [True, False, True, False]
    assert teaches_nothing_new(captions, None) == [True] * 4
    assert teaches_nothing_new(["a c++ logo", "an abc++ logo", "an 🟧 tile"], ["c++", "🟧"]) == [False, True, False]


def test_preserving_loss_adds_the_drift_from_the_base_network_on_kept_rows_only():
    model, config = _adapted_decoder()
    model.train()
    diffusion = GaussianDiffusion.from_config(config.diffusion)
    x, cond = _decoder_inputs(config)
    keep = torch.tensor([True, False, True, False])

    torch.manual_seed(5)
    terms = preserving_loss(diffusion, model, x, cond=cond, keep=keep, weight=2.0)
    torch.manual_seed(5)  # the same t, noise and conditioning dropout
    t = torch.randint(0, diffusion.num_timesteps, (4,))
    noise = torch.randn_like(x)
    with torch.random.fork_rng():
        plain = diffusion.training_loss(model, x, cond=cond, t=t, noise=noise)
    with torch.no_grad(), adapters_disabled(model):
        base = diffusion.training_loss(model, x, cond=cond, t=t, noise=noise)["prediction"]
    drift = (plain["prediction"] - base).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(terms["preserve"], drift.detach())
    assert (drift > 0).all()
    expected = plain["loss"] + 2.0 * keep * drift * diffusion.min_snr_weight(t)
    torch.testing.assert_close(terms["loss"], expected)
    assert torch.equal(terms["loss"][~keep], plain["loss"][~keep])  # new-word rows: the plain loss

    # the preservation term's gradient reaches the adapter alone, and a step along it pulls it back toward the base
    model.zero_grad()
    (terms["loss"] - terms["mse"]).sum().backward()  # the preservation term alone, from the same graph
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads) and any(g.abs().sum() > 0 for g in grads.values())
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(1e-2 * p.grad)
    torch.manual_seed(5)
    after = preserving_loss(diffusion, model, x, cond=cond, keep=keep, weight=2.0)["preserve"]
    assert after[keep].sum() < terms["preserve"][keep].sum()


def test_lora_preserve_trains_and_logs_its_term(tmp_path):
    base = _base_export("decoder", tmp_path)
    run = tmp_path / "run"
    lora = "train.lora={rank: 2, alpha: 4, preserve: 1.0, new_words: [no-such-word]}"
    overrides = [f"train.output_dir={run}", f"train.init_from={base}", lora, *TRAIN]
    config = load_config("configs/decoder/tiny.yaml", overrides)
    Trainer(build_task(config), config).fit()
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    values = [row["preserve"] for row in logged if "preserve" in row]
    assert len(values) == 3 and values[0] == 0.0 and values[-1] > 0  # B starts at zero: no drift at first
    assert (run / "export" / ADAPTER_WEIGHTS).is_file()


def test_a_pipeline_applies_the_adapters_it_names_and_is_the_base_without_them(tmp_path):
    root = make_tiny_pipeline(tmp_path, upsampler=False)
    base_images = UnCLIPPipeline.from_pretrained(root)(["a red circle"], seed=3).images
    add_random_adapter(root / "prior", root / "prior_lora", "prior", 5)
    add_random_adapter(root / "decoder", root / "decoder_lora", "decoder", 6)
    index_path = root / "pipeline.json"
    index = json.loads(index_path.read_text())

    plain = UnCLIPPipeline.from_pretrained(root)  # adapters in the folder but not named: the base, exactly
    assert torch.equal(plain(["a red circle"], seed=3).images, base_images)

    index_path.write_text(json.dumps({**index, "adapters": {"decoder": "decoder_lora"}}))
    decoder_only = UnCLIPPipeline.from_pretrained(root)
    images = decoder_only(["a red circle"], seed=3).images
    assert not torch.allclose(images, base_images, atol=1e-3)
    assert torch.equal(decoder_only(["a red circle"], seed=3).images, images)  # deterministic
    assert decoder_only.fingerprint() != plain.fingerprint()

    index_path.write_text(json.dumps({**index, "adapters": {"prior": "prior_lora", "decoder": "decoder_lora"}}))
    both = UnCLIPPipeline.from_pretrained(root)
    assert not torch.allclose(both(["a red circle"], seed=3).images, images, atol=1e-3)
    expected = merge_adapters(load_adapter(load_model(root / "decoder").model, root / "decoder_lora")).eval()
    loaded, wanted = both.decoder.model.state_dict(), expected.state_dict()
    assert loaded.keys() == wanted.keys() and all(torch.equal(loaded[k], wanted[k]) for k in wanted)


def _adapted_name(name, state):
    """`name`, a base network's parameter, as it is called in the `state` of the network with peft's layers."""
    if name in state:
        return name
    layer, _, kind = name.rpartition(".")
    return f"{layer}.base_layer.{kind}"


def test_merged_adapters_compute_what_the_unmerged_ones_do(tmp_path):
    stage = _base_export("decoder", tmp_path)
    add_random_adapter(stage, tmp_path / "lora", "decoder", 6)
    unmerged = load_adapter(load_model(stage).model, tmp_path / "lora").eval()
    merged = merge_adapters(load_adapter(load_model(stage).model, tmp_path / "lora")).eval()
    base = load_model(stage).model.eval()
    merged_state = merged.state_dict()
    changed = [
        n for n, p in base.state_dict().items() if not torch.equal(p, merged_state[_adapted_name(n, merged_state)])
    ]
    assert changed and all(n != _adapted_name(n, merged_state) for n in changed)  # the adapted layers, folded in
    torch.manual_seed(0)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    embed, tokens = torch.randn(2, unmerged.config.clip_dim), torch.randn(2, 4, unmerged.config.text_width)
    with torch.no_grad():
        want = unmerged(x, t, image_embed=embed, text_tokens=tokens)
        got = merged(x, t, image_embed=embed, text_tokens=tokens)
        assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(
            base(x, t, image_embed=embed, text_tokens=tokens), want, atol=1e-3
        )
        with adapters_disabled(merged):  # unmerges: the base network again
            assert torch.allclose(
                merged(x, t, image_embed=embed, text_tokens=tokens),
                base(x, t, image_embed=embed, text_tokens=tokens),
                atol=1e-5,
            )


def test_an_adapters_weight_scales_its_change(tmp_path):
    root = make_tiny_pipeline(tmp_path, upsampler=False)
    add_random_adapter(root / "decoder", root / "decoder_lora", "decoder", 6)
    index_path = root / "pipeline.json"
    index = json.loads(index_path.read_text())

    def decoder_weights(adapter):
        index_path.write_text(json.dumps({**index, "adapters": {"decoder": adapter}}))
        return UnCLIPPipeline.from_pretrained(root).decoder.model.state_dict()

    base = UnCLIPPipeline.from_pretrained(root)
    full, half = decoder_weights("decoder_lora"), decoder_weights({"folder": "decoder_lora", "weight": 0.5})
    off = decoder_weights({"folder": "decoder_lora", "weight": 0})
    for name, weight in base.decoder.model.state_dict().items():
        key = _adapted_name(name, full)
        assert torch.equal(off[key], weight)  # weight 0: the base, exactly
        assert torch.allclose(half[key] - weight, 0.5 * (full[key] - weight), atol=1e-6)
    index_path.write_text(json.dumps({**index, "adapters": {"decoder": {"folder": "decoder_lora", "weight": 0}}}))
    images = UnCLIPPipeline.from_pretrained(root)(["a red circle"], seed=3).images
    assert torch.equal(images, base(["a red circle"], seed=3).images)


def test_an_evaluation_records_the_adapters_and_their_weights(tmp_path):
    root = make_tiny_pipeline(tmp_path, upsampler=False)
    add_random_adapter(root / "decoder", root / "decoder_lora", "decoder", 6)
    index_path = root / "pipeline.json"
    index = json.loads(index_path.read_text())
    argv = ["shapes", "--pipeline", str(root), "--n", "1", "--size", "16", "--sets", "single", "--candidates", "1"]
    assert "adapters" not in evaluate(argv)["settings"]
    adapters = {"decoder": {"folder": "decoder_lora", "weight": 0.5}}
    index_path.write_text(json.dumps({**index, "adapters": {"decoder": adapters["decoder"]}}))
    assert UnCLIPPipeline.from_pretrained(root).adapters == adapters
    assert evaluate(argv)["settings"]["adapters"] == adapters
    index_path.write_text(json.dumps({**index, "adapters": {"decoder": "decoder_lora"}}))
    assert evaluate(argv)["settings"]["adapters"] == {"decoder": {"folder": "decoder_lora", "weight": 1.0}}


def test_peft_is_imported_only_when_a_pipeline_has_adapters(tmp_path):
    # peft (and what it imports) costs start-up time that a pipeline without adapters does not need
    root = make_tiny_pipeline(tmp_path, upsampler=False)
    code = (
        "import sys\n"
        "from unclip.pipeline import UnCLIPPipeline\n"
        f"UnCLIPPipeline.from_pretrained({str(root)!r})\n"
        "print('peft' in sys.modules)\n"
    )

    def run():
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)

    done = run()
    assert done.returncode == 0 and done.stdout.split() == ["False"], done.stderr
    add_random_adapter(root / "decoder", root / "decoder_lora", "decoder", 6)
    index_path = root / "pipeline.json"
    index_path.write_text(json.dumps({**json.loads(index_path.read_text()), "adapters": {"decoder": "decoder_lora"}}))
    done = run()
    assert done.returncode == 0 and done.stdout.split() == ["True"], done.stderr


@pytest.mark.parametrize(
    ("adapters", "message"),
    [
        ({"upsampler_32": "decoder_lora"}, "names the stage 'upsampler_32', which this pipeline does not have"),
        ({"decoder": "missing"}, "pipeline.json names 'missing', which is not there"),
        ({"decoder": "../decoder_lora"}, "it must be a folder inside"),
        ({"decoder": "prior_lora"}, "was trained on a PriorTransformer, not a UNet"),
        ({"decoder": "decoder"}, "is not an adapter folder"),
        (["decoder_lora"], '"adapters" must map stages to adapter folders'),
        ({"decoder": {"folder": "decoder_lora", "weight": "high"}}, "a folder and a finite weight"),
        ({"decoder": {"folder": "decoder_lora", "weight": float("nan")}}, "a folder and a finite weight"),
        ({"decoder": {"folder": "decoder_lora", "scale": 1}}, "a folder and a finite weight"),
        ({"decoder": {"weight": 1}}, "give an adapter folder"),
        ({"decoder": {"folder": "missing", "weight": 1}}, "pipeline.json names 'missing', which is not there"),
    ],
)
def test_bad_adapters_in_pipeline_json_are_clear_errors(tmp_path, adapters, message):
    root = make_tiny_pipeline(tmp_path, upsampler=False)
    add_random_adapter(root / "prior", root / "prior_lora", "prior", 5)
    add_random_adapter(root / "decoder", root / "decoder_lora", "decoder", 6)
    shutil.copytree(root / "decoder_lora", tmp_path / "decoder_lora")
    index = json.loads((root / "pipeline.json").read_text())
    (root / "pipeline.json").write_text(json.dumps({**index, "adapters": adapters}))
    with pytest.raises(ValueError, match=message):
        UnCLIPPipeline.from_pretrained(root)
