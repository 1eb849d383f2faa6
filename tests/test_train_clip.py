import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from train.clip import main
from unclip.clip import ClipAdapter
from unclip.clip_models import CONFIG_NAME
from unclip.config import RunConfig, load_config
from unclip.data import collate
from unclip.tasks import build_task
from unclip.tasks.clip import ClipTask, _flatten_negatives, hard_negative_loss, retrieval_metrics
from unclip.training import Trainer

ROOT = Path(__file__).parent.parent
TINY = str(ROOT / "configs/clip/tiny.yaml")


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def test_export_loads_with_the_adapter_and_open_clip_and_equals_the_ema_model(tmp_path):
    config = load_config(TINY, [f"train.output_dir={tmp_path}", "train.max_steps=4", "train.eval_every=4"])
    task = build_task(config)
    assert isinstance(task, ClipTask)
    trainer = Trainer(task, config)
    trainer.fit()
    export = tmp_path / "export"
    meta = json.loads((export / CONFIG_NAME).read_text())
    assert meta["model_cfg"] == config.clip.model_config
    assert meta["preprocess_cfg"] == json.loads(json.dumps(task.preprocess_cfg))  # what it was trained with

    batch = collate([task.val_dataset[i] for i in range(4)])
    images, captions = batch["image"], batch["caption"]
    ema_image, ema_text, _ = task.encode(trainer.ema.ema_model, images, captions)
    online_image, _, _ = task.encode(trainer.accelerator.unwrap_model(trainer.model), images, captions)
    assert not torch.allclose(ema_image, online_image, atol=1e-4)  # the export holds the EMA weights

    clip = ClipAdapter.from_checkpoint(export)
    torch.testing.assert_close(clip.embed_image(images, normalize=True), ema_image)
    torch.testing.assert_close(clip.embed_text(captions, normalize=True).embed, ema_text)

    model = open_clip.create_model(f"local-dir:{export}")
    pixels, ids = task.inputs(images, captions)
    torch.testing.assert_close(model.encode_image(pixels, normalize=True), ema_image)
    torch.testing.assert_close(model.encode_text(ids, normalize=True), ema_text)

    metrics = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"val/t2i_top1", "val/i2t_top5", "val_ema/t2i_top5", "val_ema/i2t_top1", "val_ema/loss"} <= set(metrics)
    assert all(v == v for v in metrics.values()), metrics  # no NaN (the EMA's causal mask stays finite)


def test_training_on_a_fixed_subset_improves_loss_and_retrieval(tmp_path):
    """16 fixed shapes pairs, one batch: the contrastive loss and retrieval on them beat the untrained CLIP."""
    overrides = [
        f"train.output_dir={tmp_path}",
        "data.options.num_samples=16",
        "train.batch_size=16",
        "train.max_steps=50",
        "train.lr=2e-3",
        "train.checkpoint_every=1000",
        "train.eval_every=1000",
    ]
    config = load_config(TINY, overrides)
    task = build_task(config)
    untrained = copy.deepcopy(task.model)
    Trainer(task, config).fit()
    batch = collate([task.train_dataset[i] for i in range(16)])

    def score(model):
        model.eval()
        with torch.no_grad():
            loss = task.loss(model, batch)[0].item()
        image, text, _ = task.encode(model, batch["image"], batch["caption"])
        return loss, retrieval_metrics(image, text, batch["caption"])

    loss_before, before = score(untrained)
    loss_after, after = score(task.model)
    assert loss_after < 0.25 * loss_before, (loss_before, loss_after)  # about 3.1 -> 0.15
    assert after["t2i_top1"] >= before["t2i_top1"] + 0.5 and after["i2t_top1"] >= before["i2t_top1"] + 0.5


def test_resume_through_the_script_gives_the_same_losses(tmp_path):
    args = ["train.max_steps=4", "train.log_every=1", "train.checkpoint_every=2", "train.eval_every=100"]
    export = main([TINY, f"train.output_dir={tmp_path / 'full'}", *args])
    assert export == tmp_path / "full" / "export" and (export / CONFIG_NAME).is_file()
    main([TINY, f"train.output_dir={tmp_path / 'part'}", *args, "--stop-at", "2"])
    assert max(losses(tmp_path / "part")) == 2
    main([TINY, f"train.output_dir={tmp_path / 'part'}", *args, "--resume", "latest"])
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    a, b = (load_file(str(tmp_path / run / "export" / "open_clip_model.safetensors")) for run in ("full", "part"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_config_mistakes_are_clear_errors(tmp_path, capsys):
    for overrides, message in [
        (["train.lrr=1e-3"], "unknown keys in train"),
        (["clip.model_config=null"], "clip.model_config"),
        (["clip.checkpoint=runs/clip-shapes/export"], "trains from scratch"),
    ]:
        with pytest.raises(SystemExit) as e:
            main([TINY, f"train.output_dir={tmp_path}", *overrides])
        assert e.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(ROOT / "configs/prior/tiny.yaml"), f"train.output_dir={tmp_path}"])
    assert "this script trains clip" in capsys.readouterr().err
    with pytest.raises(ValueError, match="valid kinds"):
        build_task(RunConfig(kind="vae"))


def test_retrieval_metrics_count_identical_captions_as_right():
    captions = ["a red circle", "a red circle", "a blue square", "a green diamond"]
    image = torch.eye(4)
    text = torch.eye(4)[[1, 0, 3, 2]]  # the circles swapped (same caption: right), square and diamond swapped
    metrics = retrieval_metrics(image, text, captions)
    assert metrics["t2i_top1"] == metrics["i2t_top1"] == 0.5
    assert metrics["t2i_top5"] == metrics["i2t_top5"] == 1.0


def test_hard_negative_loss_is_a_softmax_over_each_caption_and_its_own_negatives():
    image = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    negatives = [["n0 relation", None], [None, None], ["n2 relation", "n2 swap"]]  # row 1 has none
    rows, slots, texts = _flatten_negatives(negatives)
    assert (
        rows.tolist() == [0, 2, 2]
        and slots.tolist() == [0, 0, 1]
        and texts == ["n0 relation", "n2 relation", "n2 swap"]
    )
    negative = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    scale = torch.tensor(10.0, requires_grad=True)
    loss, beaten = hard_negative_loss(image, text, negative, rows, slots, scale)
    s = lambda a, b: 10.0 * (a * b).sum()  # noqa: E731
    row0 = -torch.log_softmax(torch.stack([s(image[0], text[0]), s(image[0], negative[0])]), 0)[0]
    row2 = -torch.log_softmax(
        torch.stack([s(image[2], text[2]), s(image[2], negative[1]), s(image[2], negative[2])]), 0
    )[0]
    torch.testing.assert_close(loss, (row0 + row2) / 2)
    assert beaten.tolist() == [
        bool(s(image[r], text[r]) > s(image[r], n)) for r, n in zip(rows, negative, strict=True)
    ]
    loss.backward()
    assert torch.isfinite(scale.grad)  # the missing negatives are masked without a NaN in the scale's gradient


def test_hard_negatives_teach_the_clip_what_the_batch_alone_does_not(tmp_path):
    """16 fixed two-object scenes: trained against their relation-flipped and swapped captions, the CLIP prefers
    every caption to them; trained on the same pairs without, it is far less sure (hard-negative loss 0.5 vs
    0.04 at 40 steps, measured)."""

    def train(negatives):
        run_dir = tmp_path / ("without" if negatives == "[]" else "with")
        overrides = [
            f"train.output_dir={run_dir}",
            "data.options.num_samples=16",
            "data.options.two_object_prob=1.0",
            f"data.options.hard_negatives={negatives}",
            "train.batch_size=16",
            "train.max_steps=40",
            "train.lr=2e-3",
            "train.checkpoint_every=1000",
            "train.eval_every=40",
        ]
        config = load_config(TINY, overrides)
        task = build_task(config)
        Trainer(task, config).fit()
        return task.model.eval(), run_dir

    judge = build_task(
        load_config(TINY, ["data.options.two_object_prob=1.0", "data.options.hard_negatives=[relation,swap]"])
    )
    batch = collate([judge.train_dataset[i] for i in range(16)])
    rows, slots, texts = _flatten_negatives(batch["negatives"])
    results = {}
    for negatives in ("[]", "[relation,swap]"):
        model, run_dir = train(negatives)
        with torch.no_grad():
            image, text, scale = judge.encode(model, batch["image"], batch["caption"])
            negative = model.encode_text(judge.tokenizer(texts), normalize=True)
            results[negatives] = hard_negative_loss(image, text, negative, rows, slots, scale)
    (with_loss, with_beaten), (without_loss, _) = results["[relation,swap]"], results["[]"]
    assert with_beaten.all() and with_loss < 0.1 and without_loss > 2 * with_loss, (with_loss, without_loss)
    metrics = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"val/beats_relation", "val_ema/beats_swap"} <= set(metrics)  # validation reports them per kind
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("hard_negative_acc" in row for row in rows)


def test_two_gloo_ranks_gather_features_like_one_big_batch(tmp_path):
    """2 data-parallel ranks × batch 4 (features gathered) take the same steps as 1 process with batch 8."""
    args = ["train.max_steps=3", "train.checkpoint_every=3", "train.log_every=1", "train.eval_every=100"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"]
    cmd += [str(ROOT / "train/clip.py"), TINY, f"train.output_dir={tmp_path / 'ddp'}", "train.batch_size=4", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    main([TINY, f"train.output_dir={tmp_path / 'single'}", "train.batch_size=8", *args])
    for step, loss in losses(tmp_path / "single").items():
        assert losses(tmp_path / "ddp")[step] == pytest.approx(loss, rel=1e-5)
    a, b = (load_file(str(tmp_path / run / "checkpoints/step_0000003/model.safetensors")) for run in ("ddp", "single"))
    for k in a:
        if k.endswith("in_proj_bias"):  # the key bias has zero gradient in exact arithmetic (softmax ignores a
            # shift of all keys), so Adam turns rounding noise into full-size steps: compare queries and values only
            third = len(a[k]) // 3
            a[k], b[k] = torch.cat([a[k][:third], a[k][2 * third :]]), torch.cat([b[k][:third], b[k][2 * third :]])
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)
