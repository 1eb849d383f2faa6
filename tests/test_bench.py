"""bench/defaults.py and bench/upsampler_steps.py on a tiny pipeline (the timing scripts themselves are not tests;
this checks the scripts run, that defaults.py samples the peer's way: ancestral steps at every stage, one decoder
sample, and that upsampler_steps.py's measures mean what they say)."""

import json

import pytest
import torch
from pipeline_helpers import add_random_adapter, make_tiny_pipeline

from bench import defaults


def test_defaults_bench_samples_both_ways_and_writes_the_ratio(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(defaults, "THEIR_STEPS", 3)
    monkeypatch.setattr(defaults.torch, "set_num_threads", lambda n: None)  # keep the suite's thread count
    pipeline = make_tiny_pipeline(tmp_path / "pipe")
    out = tmp_path / "defaults.json"
    argv = ["--pipeline", str(pipeline), "--device", "cpu", "--size", "32", "--repeats", "2", "--out", str(out)]
    results = defaults.main(argv)
    assert json.loads(out.read_text()) == results and len(results["ours"]["seconds"]) == 2
    theirs = results["theirs"]
    assert theirs["decoder"]["sampler"] == theirs["prior"]["sampler"] == "ddpm"
    assert theirs["candidates"] == 1
    assert all(theirs[stage]["steps"] == 3 for stage in ("prior", "decoder", "upsampler_32"))
    assert results["ours"]["decoder"]["sampler"] == "dpm++" and results["theirs_over_ours"] > 0
    assert "theirs / ours" in capsys.readouterr().out


def test_defaults_bench_times_the_earlier_defaults_too(tmp_path, monkeypatch):
    monkeypatch.setattr(defaults, "THEIR_STEPS", 2)
    monkeypatch.setattr(defaults.torch, "set_num_threads", lambda n: None)
    pipeline = make_tiny_pipeline(tmp_path / "pipe")
    index = json.loads((pipeline / "pipeline.json").read_text())
    index["defaults"].update(candidates=4, pruning="1:2")
    (pipeline / "pipeline.json").write_text(json.dumps(index))
    argv = ["--pipeline", str(pipeline), "--device", "cpu", "--size", "16", "--repeats", "1"]
    results = defaults.main([*argv, "--out", str(tmp_path / "d.json")])
    assert results["ours"]["pruning"] == "1:2" and "pruning" not in results["ours_earlier"]
    assert results["ours_earlier"]["candidates"] == 4 and results["earlier_over_ours"] > 0
    assert results["ours_earlier"]["prior"]["steps"] == results["ours_earlier"]["decoder"]["steps"] == 25


def test_candidate_pruning_bench_records_every_candidate_and_replays_schedules(tmp_path, capsys):
    from bench import candidate_pruning

    pipeline = make_tiny_pipeline(tmp_path / "pipe")
    out = tmp_path / "records.jsonl"
    argv = ["--pipeline", str(pipeline), "--n", "2", "--candidates", "4", "--out", str(out)]
    candidate_pruning.main([*argv, "--schedules", "1:2", "2:1"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 2 and all(len(r["scores"]) == 3 and len(r["scores"][0]) == 4 for r in rows)
    # the relational set's seeds, as the eval gives them: set 1 of 200 prompts at 4 candidates
    assert rows[1]["seeds"] == [800 + 4 + j for j in range(4)]
    printed = capsys.readouterr().out
    assert "(full reranking)" in printed and "1:2" in printed and "candidates right: " in printed
    assert all(r["sampler"] == "dpm++" for r in rows)  # the tiny pipeline's decoder sampler, recorded
    # a replay: keep 2 after step 1 (costs 4 + 2 + 2), then the best final score among them
    row = {"scores": [[0.1, 0.9, 0.8, 0.2], [0.5, 0.1, 0.9, 0.3], [0.2, 0.3, 0.1, 0.9]], "correct": [0, 1, 0, 1]}
    assert candidate_pruning.replay(row, [(1, 2)]) == (1, 8)
    assert candidate_pruning.replay(row, []) == (1, 12)  # the full reranking keeps candidate 3
    assert candidate_pruning.replay(row, [(2, 1)]) == (0, 9)  # 4 + 4 + 1: candidate 2, best at step 2
    # a rerun resumes: nothing is made again
    candidate_pruning.main(argv)
    assert len(out.read_text().splitlines()) == 2
    # fewer steps: each row says which, and records of other steps are not mixed in
    with pytest.raises(SystemExit, match="made at other steps"):
        candidate_pruning.main([*argv, "--steps", "1"])
    fewer = tmp_path / "fewer.jsonl"
    candidate_pruning.main([*argv[:-1], str(fewer), "--n", "1", "--steps", "2", "--prior-steps", "1"])
    (row,) = [json.loads(line) for line in fewer.read_text().splitlines()]
    assert row["steps"] == {"prior": 1, "decoder": 2} and len(row["scores"]) == 2


def test_upsampler_steps_bench_scores_each_step_count_against_exact_renders(tmp_path):
    from bench import upsampler_steps

    pipeline = make_tiny_pipeline(tmp_path / "pipe")
    out = tmp_path / "steps.json"
    results = upsampler_steps.main(["--pipeline", str(pipeline), "--n", "2", "--steps", "2", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == results
    (rows,) = results["upsamplers"].values()
    assert set(rows) == {"bicubic", "2", "1"}
    assert all(0 < row["psnr"] < 100 for row in rows.values()) and rows["1"]["seconds_per_image"] > 0
    assert all(row["sharpness"] > 0 for row in rows.values())
    # the sharpness of an image against itself is 1, of a blurred one below 1
    image = upsampler_steps.renders(2, 32, seed=0)
    blurred = torch.nn.functional.avg_pool2d(image, 3, stride=1, padding=1, count_include_pad=False)
    assert upsampler_steps.sharpness(image, image) == pytest.approx(1.0)
    assert upsampler_steps.sharpness(blurred, image) < 0.8


@pytest.mark.parametrize("script", ["defaults", "guidance_cost", "upsampler_steps", "lora_merge"])
def test_bench_scripts_name_a_missing_pipeline_folder(script, tmp_path):
    import importlib

    main = importlib.import_module(f"bench.{script}").main
    with pytest.raises(SystemExit, match=r"error: pipeline folder .*missing does not exist; pass --pipeline"):
        main(["--pipeline", str(tmp_path / "missing")])


def test_prior_steps_bench_compares_fewer_steps_with_the_reference(tmp_path):
    from bench import prior_steps

    pipeline = make_tiny_pipeline(tmp_path / "pipe")
    out = tmp_path / "prior.json"
    results = prior_steps.main(["--pipeline", str(pipeline), "--steps", "4", "2", "1", "--n", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == results and results["prompts"] == 2
    reference, fewer = results["steps"]["4"], results["steps"]["1"]
    assert reference["cosine_to_reference"] == pytest.approx(1.0) and set(results["steps"]) == {"4", "2", "1"}
    assert fewer["cosine_to_reference"] < 0.9999 and -1 <= fewer["cosine_to_text"] <= 1


def test_lora_merge_bench_times_the_same_images_both_ways(tmp_path):
    from bench import lora_merge

    pipeline = make_tiny_pipeline(tmp_path / "pipe", upsampler=False)
    with pytest.raises(SystemExit):  # no adapters named: nothing to compare
        lora_merge.main(["--pipeline", str(pipeline), "--device", "cpu"])
    add_random_adapter(pipeline / "decoder", pipeline / "decoder_lora", "decoder", 6)
    index = json.loads((pipeline / "pipeline.json").read_text())
    (pipeline / "pipeline.json").write_text(json.dumps({**index, "adapters": {"decoder": "decoder_lora"}}))
    out = tmp_path / "merge.json"
    argv = ["--pipeline", str(pipeline), "--device", "cpu", "--candidates", "2", "--repeats", "1", "--out", str(out)]
    result = lora_merge.main(argv)
    assert json.loads(out.read_text()) == result and result["adapted_layers"] > 0
    assert result["max_image_difference"] < 1e-3 and result["unmerged_over_merged"] > 0
