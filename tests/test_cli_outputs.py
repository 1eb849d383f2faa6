"""What sample/generate.py leaves in --out: a rerun keeps the earlier images, --overwrite replaces them, and
Ctrl-C in the middle of a run keeps the finished images and a grid of them."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pipeline_helpers import make_tiny_pipeline

from unclip.imageio import read_png_metadata

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("pipe"), upsampler=False)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def test_a_rerun_keeps_the_earlier_images_and_overwrite_replaces_them(tiny_pipeline, tmp_path):
    from sample.generate import main

    args = ["--prompt", "a red circle", "--n", "2", "--pipeline", str(tiny_pipeline), "--out", str(tmp_path)]
    first = main(args)
    names = ["a_red_circle_00000.png", "a_red_circle_00001.png", "a_red_circle_grid.png"]
    assert [p.name for p in first] == names
    stats = {p: p.stat() for p in first}
    second = main(args)  # the same command again
    assert [p.name for p in second] == [
        "a_red_circle_00000-2.png",
        "a_red_circle_00001-2.png",
        "a_red_circle_grid-2.png",
    ]
    for path, stat in stats.items():  # the first run's files are untouched
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    for a, b in zip(first, second, strict=True):
        assert np.array_equal(pixels(a), pixels(b))  # the same seeds: the same images, kept twice

    Image.new("RGB", (16, 16), "white").save(first[0])  # stands in for an older image of that name
    replaced = main([*args, "--overwrite"])
    assert replaced == first  # the first names, written again
    assert np.array_equal(pixels(first[0]), pixels(second[0]))
    assert read_png_metadata(first[0])["prompt"] == "a red circle"
    listing = sorted(p.name for p in tmp_path.iterdir())
    assert listing == sorted(p.name for p in first + second)  # no -3 files, nothing left from the atomic writes


def test_ctrl_c_keeps_the_finished_images_and_a_grid(tiny_pipeline, tmp_path):
    prompts = [f"a red circle number {i}" for i in range(12)]
    command = [sys.executable, "sample/generate.py", "--pipeline", str(tiny_pipeline), "--out", str(tmp_path)]
    command += ["--n", "1", "--batch-size", "1", "--steps", "25", "--prior-steps", "10"]
    command += [a for prompt in prompts for a in ("--prompt", prompt)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1
    )
    try:
        first = proc.stdout.readline().strip()  # the first image is written
        assert first.endswith(".png"), first + proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    printed = [Path(first), *(Path(line) for line in out.splitlines() if line.strip())]
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("stopped: kept the"), err
    images = sorted(p for p in tmp_path.glob("*.png") if "grid" not in p.name)
    grids = list(tmp_path.glob("*grid*.png"))
    kept = int(err.strip().splitlines()[-1].split()[3])  # "stopped: kept the K finished images"
    assert 1 <= kept < len(prompts) and len(images) == kept  # stopped in the middle, every finished image kept
    assert set(images) <= set(printed) and len(grids) == 1 and grids[0] in printed
    assert json.loads(read_png_metadata(grids[0])["prompts"]) == prompts[:kept]  # a grid of the kept images
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_an_assembled_pipeline_folder_follows_the_umask(tiny_pipeline, tmp_path):
    from train.pipeline import main

    parts = tiny_pipeline.parent / "parts"
    old = os.umask(0o022)
    try:
        out = main(["--out", str(tmp_path / "p"), "--clip", str(parts / "clip"), "--decoder", str(parts / "decoder")])
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in out.rglob("*") if p.is_file()} == {0o644}


def test_prompts_whose_names_collide_get_their_own_files(tiny_pipeline, tmp_path):
    from sample.generate import main

    args = ["--n", "1", "--pipeline", str(tiny_pipeline), "--out", str(tmp_path), "--steps", "2"]
    first = main([*args, "--prompt", "🔴🔵"])  # no letters: both prompts are named "image"
    second = main([*args, "--prompt", "/"])
    assert [p.name for p in first + second] == [
        "image_00000.png",
        "image_grid.png",
        "image_00000-2.png",
        "image_grid-2.png",
    ]
    assert [read_png_metadata(p)["prompt"] for p in (first[0], second[0])] == ["🔴🔵", "/"]


def test_skip_existing_makes_only_the_missing_batches_and_the_same_images(tiny_pipeline, tmp_path, capsys):
    from sample.generate import main

    common = ["--prompt", "a red circle", "--prompt", "a blue square", "--n", "3", "--batch-size", "2"]
    common += ["--candidates", "2", "--pipeline", str(tiny_pipeline)]
    whole = [p for p in main([*common, "--out", str(tmp_path / "whole")]) if not p.stem.endswith("grid")]
    assert len(whole) == 6
    part = tmp_path / "part"
    made = [p for p in main([*common, "--out", str(part)]) if not p.stem.endswith("grid")]
    for path in made[2:5]:  # a stopped run: batch 0 written, batch 1 lost, batch 2 cut short
        path.unlink()
    kept = {p: p.stat().st_mtime_ns for p in made[:2] + made[5:]}
    capsys.readouterr()
    again = main([*common, "--out", str(part), "--skip-existing"])
    assert "1 of 3 batches are in" in capsys.readouterr().err
    assert sorted(p.name for p in again if not p.stem.endswith("grid")) == sorted(p.name for p in made[2:])
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items() if p in made[:2])  # batch 0 not made again
    for a in whole:  # every image as the uninterrupted run made it, to the bit
        assert (part / a.name).read_bytes() == a.read_bytes()
    capsys.readouterr()
    assert main([*common, "--out", str(part), "--skip-existing"]) == []  # nothing left to make
    assert "3 of 3 batches are in" in capsys.readouterr().err
    main([*common, "--out", str(part), "--skip-existing", "--seed", "7"])  # other settings: all made
    assert "0 of 3 batches are in" in capsys.readouterr().err


def test_dtype_auto_is_bf16_only_where_the_device_computes_it(tiny_pipeline, tmp_path, monkeypatch):
    from sample.generate import main
    from unclip import cli

    with_units = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n"
    assert cli.cpu_has_bf16(with_units) and cli.cpu_has_bf16("flags : fpu amx_bf16 amx_tile\n")
    assert not cli.cpu_has_bf16("flags\t\t: fpu sse2 avx2 avx512f\n") and not cli.cpu_has_bf16("")
    assert cli.resolve_dtype("fp16", "cpu") == "fp16" and cli.resolve_dtype("fp32", "cuda") == "fp32"
    args = ["--prompt", "a red circle", "--n", "1", "--pipeline", str(tiny_pipeline), "--dtype", "auto"]
    for units, dtype in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(cli, "cpu_has_bf16", lambda units=units: units)
        (path, _grid) = main([*args, "--device", "cpu", "--out", str(tmp_path / dtype)])
        assert json.loads(read_png_metadata(path)["settings"])["dtype"] == dtype  # what was used is recorded


def test_step_progress_names_the_candidates_left_after_pruning(capsys):
    from unclip.cli import StepProgress

    progress = StepProgress(total=2)
    descriptions = []
    for step, images in enumerate([12, 6, 4, 4], start=1):
        progress({"stage": "decoder", "step": step, "steps": 5, "images": images})
        descriptions.append(progress.bar.desc)
    assert descriptions[0] == "[0/2 images] decoder (12 images)"
    assert descriptions[1:] == ["[0/2 images] decoder (6 images)"] + ["[0/2 images] decoder (4 images)"] * 2
    progress({"stage": "decoder", "step": 5, "steps": 5, "images": 4})
    assert progress.bar is None  # closed at the stage's last step


def test_a_stop_signal_waits_until_the_batch_being_written_is_counted():
    from unclip.cli import Stopped, _StopSignals

    stops, steps = _StopSignals(), []
    with pytest.raises(Stopped) as stopped:
        with stops.deferred():
            stops(signal.SIGTERM, None)  # arrives while a batch is written
            steps.append("written and counted")
    assert steps == ["written and counted"] and stopped.value.signum == signal.SIGTERM
    with pytest.raises(Stopped):  # between batches it stops at once
        stops(signal.SIGINT, None)
    with pytest.raises(OSError), stops.deferred():  # a failed write is not hidden by a stop that waits
        stops(signal.SIGINT, None)
        raise OSError("disk full")


def test_upsampler_steps_set_each_upsampler_and_a_wrong_count_is_a_clear_error(tmp_path, capsys):
    from sample.generate import main

    pipe = make_tiny_pipeline(tmp_path / "pipe")
    folders = json.loads((pipe / "pipeline.json").read_text())["upsamplers"]
    args = ["--prompt", "a red circle", "--n", "1", "--pipeline", str(pipe), "--steps", "2", "--quiet"]
    image = main([*args, "--out", str(tmp_path / "a"), "--upsampler-steps", "3"])[0]
    settings = json.loads(read_png_metadata(image)["settings"])
    assert folders and all(settings[folder]["steps"] == 3 for folder in folders)
    default = json.loads(read_png_metadata(main([*args, "--out", str(tmp_path / "c")])[0])["settings"])
    assert all(default[folder]["steps"] != 3 for folder in folders)  # the option, not the default, gave 3

    with pytest.raises(SystemExit) as stop:
        main([*args, "--out", str(tmp_path / "b"), "--upsampler-steps", ",".join(["2"] * (len(folders) + 1))])
    capsys.readouterr()
    assert f"this pipeline has {len(folders)} upsampler" in str(stop.value.code)
    with pytest.raises(SystemExit):
        main([*args, "--out", str(tmp_path / "d"), "--upsampler-steps", "0"])
    assert "must be >= 1" in capsys.readouterr().err


def test_upsampler_steps_go_to_the_upsamplers_in_order():
    from types import SimpleNamespace

    from sample.generate import upsampler_settings

    pipe = SimpleNamespace(upsamplers=[SimpleNamespace(folder="upsampler_256"), SimpleNamespace(folder="up_1024")])
    assert upsampler_settings(pipe, [4, 1]) == {"upsampler_256": {"steps": 4}, "up_1024": {"steps": 1}}
    assert upsampler_settings(pipe, [2]) == {"upsampler_256": {"steps": 2}, "up_1024": {"steps": 2}}
    assert upsampler_settings(pipe, None) == {}
    with pytest.raises(ValueError, match="gives 3 numbers, but this pipeline has 2 upsampler"):
        upsampler_settings(pipe, [1, 2, 3])
