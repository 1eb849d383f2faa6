"""bench/mfu.py at tiny size on CPU: it times each variant, counts the step's FLOPs and reports MFU against the
peak it is given (the GPU figures in BENCHMARKS.md come from the same script on a GPU)."""

import json

import pytest
import torch

from bench import mfu

TINY = ["--device", "cpu", "--dtype", "fp32", "--config", "configs/decoder/tiny.yaml", "--steps", "1"]
TINY += ["--warmup", "0", "--peak-tflops", "0.5"]


def test_mfu_script_measures_each_variant_and_writes_json(tmp_path, capsys):
    out = tmp_path / "mfu.json"
    report = mfu.main([*TINY, "--batch", "2", "--variants", "eager,channels_last", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    eager, channels_last = report["results"]
    assert [eager["variant"], channels_last["variant"]] == ["eager", "channels_last"]
    assert eager["parameters"] == channels_last["parameters"] > 0
    assert eager["flops_per_step"] == channels_last["flops_per_step"] > 0  # the same model FLOPs either way
    for r in report["results"]:
        assert r["images_per_second"] == pytest.approx(2 / r["seconds_per_step"])
        assert r["mfu"] == pytest.approx(r["flops_per_step"] / r["seconds_per_step"] / 0.5e12)
    assert "| channels_last |" in capsys.readouterr().out


def test_the_flop_count_is_per_image_and_channels_last_is_used():
    args = mfu.parse_args([*TINY, "--batch", "1"])
    one = mfu.DecoderStep(args, "eager").flops()
    args.batch = 3
    three = mfu.DecoderStep(args, "channels_last")
    assert three.flops() == pytest.approx(3 * one, rel=0.01)
    assert three.model.input_conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_unknown_variant_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit):
        mfu.parse_args([*TINY, "--variants", "eager,fast"])
    assert "--variants: unknown ['fast']" in capsys.readouterr().err
