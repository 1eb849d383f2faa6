"""The paper-size configs: each builds at the published parameter count (on the meta device, so nothing is
allocated), and each trains a step on CPU at the same architecture with its widths divided by 16."""

import json

import pytest
import torch

from unclip.config import load_config
from unclip.tasks import build_task
from unclip.training import Trainer

# config -> the parameter count its source gives (DALL·E 2, appendix C; Karlo's decoder_900M_vit_l)
PAPER_SIZES = {
    "configs/prior/dalle2.yaml": 1.0e9,
    "configs/decoder/dalle2.yaml": 3.5e9,
    "configs/decoder/karlo.yaml": 0.9e9,
    "configs/upsampler/dalle2_256.yaml": 0.7e9,
    "configs/upsampler/dalle2_1024.yaml": 0.3e9,
}

# a random CLIP whose widths are ViT-L/14's divided by 16 (embedding 768 -> 48, text width 768 -> 48)
CLIP_16 = (
    "clip.model_name=null",
    "clip.pretrained=null",
    (
        "clip.model_config={embed_dim: 48, text_cfg: {context_length: 77, heads: 3, layers: 1, vocab_size: 49408, "
        "width: 48}, vision_cfg: {head_width: 16, image_size: 32, layers: 1, patch_size: 8, width: 32}}"
    ),
)
NARROW = {  # the architecture's widths divided by 16; depths, levels, heads, resolutions and context as they are
    "prior": ["model.width=128", "model.clip_dim=48", "model.text_width=48", *CLIP_16, "data.dataset=shapes"],
    "decoder": ["model.clip_dim=48", "model.text_width=48", *CLIP_16, "data.dataset=shapes"],
    "upsampler": ["data.dataset=shapes"],
}
ONE_STEP = ["train.batch_size=1", "train.grad_accum=1", "train.mixed_precision=no", "train.distributed=ddp"]
ONE_STEP += ["train.gradient_checkpointing=false", "train.log_every=1", "train.eval_every=1000"]
ONE_STEP += ["train.warmup_steps=1"]
ONE_STEP += ["train.checkpoint_every=1000", "data.path=null", "data.val_size=2", "data.num_workers=0"]
ONE_STEP += ["data.options={num_samples: 16}"]


def _network(config) -> torch.nn.Module:
    from unclip.nets.prior import PriorTransformer
    from unclip.nets.unet import UNet
    from unclip.nets.upsampler import UpsamplerUNet

    return {"prior": PriorTransformer, "decoder": UNet, "upsampler": UpsamplerUNet}[config.kind](config.model)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("path", sorted(PAPER_SIZES))
def test_builds_at_the_papers_size_on_the_meta_device(path):
    with torch.device("meta"):
        model = _network(load_config(path))
    count = _count(model)
    assert abs(count / PAPER_SIZES[path] - 1) < 0.1, f"{path}: {count / 1e9:.3f}B parameters"
    assert next(model.parameters()).device.type == "meta"


def _narrow(path) -> list[str]:
    model = load_config(path).model
    if hasattr(model, "model_channels"):  # the U-Nets
        widths = [f"model.model_channels={model.model_channels // 16}"]
        if model.attention_resolutions:
            widths.append(f"model.head_channels={model.head_channels // 16}")
        return [*widths, *NARROW[load_config(path).kind]]
    return NARROW["prior"]


# the 3.5B decoder's step takes about 20 s on a shared 2-core CPU (its 24 text layers); Karlo's runs by default
SLOW_STEP = "configs/decoder/dalle2.yaml"
STEP_CASES = [pytest.param(p, marks=pytest.mark.slow) if p == SLOW_STEP else p for p in PAPER_SIZES]


@pytest.mark.parametrize("path", STEP_CASES)
def test_trains_a_step_at_a_sixteenth_of_the_width(path, tmp_path):
    paper = load_config(path)
    config = load_config(path, [*_narrow(path), *ONE_STEP, f"train.output_dir={tmp_path}"])
    task = build_task(config)
    narrow = _network(config)
    # the same architecture: as many modules of each kind, every weight 16 times narrower or as it was
    assert [type(m) for m in narrow.modules()] == [type(m) for m in task.model.modules()]
    with torch.device("meta"):
        assert [type(m) for m in _network(paper).modules()] == [type(m) for m in narrow.modules()]
    assert _count(narrow) < _count(_network_on_meta(paper)) / 100
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    trainer = Trainer(task, config)
    trainer.fit(stop_at=1)
    assert trainer.step == 1
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[0]["step"] == 1 and torch.isfinite(torch.tensor(logged[0]["loss"]))
    after = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def _network_on_meta(config) -> torch.nn.Module:
    with torch.device("meta"):
        return _network(config)
