"""`accelerate launch sample/generate.py --prompts-file F` over 2 gloo processes: the batches are split between
them, and every image is written once, with the name and the bits a single process gives it."""

import os
import subprocess
import sys
from pathlib import Path

from pipeline_helpers import make_tiny_pipeline

from unclip.cli import others_batches

ROOT = Path(__file__).resolve().parent.parent


def test_batches_go_round_robin_to_the_processes(monkeypatch):
    mine = {}
    for rank in (0, 1, 2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "3")
        mine[rank] = sorted(set(range(0, 10, 2)) - others_batches(10, 2))
    assert mine == {0: [0, 6], 1: [2, 8], 2: [4]}
    monkeypatch.delenv("RANK"), monkeypatch.delenv("WORLD_SIZE")
    assert others_batches(10, 2) == frozenset()  # a plain `python` makes every batch


def test_two_processes_write_each_image_once_as_one_process_does(tmp_path):
    from sample.generate import main

    pipeline = make_tiny_pipeline(tmp_path / "pipe", upsampler=False)
    prompts = tmp_path / "prompts.txt"
    lines = [f"a red circle number {i}" for i in range(5)]
    prompts.write_text("# five prompts, three batches of 2\n" + "\n".join(lines))
    args = ["--prompts-file", str(prompts), "--n", "1", "--batch-size", "2", "--pipeline", str(pipeline)]
    args += ["--device", "cpu", "--quiet"]
    single = main([*args, "--out", str(tmp_path / "single")])
    assert len(single) == 6 and single[-1].name.endswith("_grid.png")

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--main_process_port", "29527", "sample/generate.py", *args, "--out", str(tmp_path / "split")]
    proc = subprocess.run(launch, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [Path(line) for line in proc.stdout.splitlines() if line.endswith(".png")]
    assert sorted(p.name for p in printed) == sorted(p.name for p in single[:-1])  # each image once, no grid
    written = sorted((tmp_path / "split").iterdir())
    assert [p.name for p in written] == sorted(p.name for p in single[:-1])
    for path in single[:-1]:
        assert (tmp_path / "split" / path.name).read_bytes() == path.read_bytes(), path.name
