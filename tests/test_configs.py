"""Every committed run config loads: a typo in a key or a bad value is caught here, not hours into a run."""

import re
from pathlib import Path

import pytest

from unclip.config import load_config

CONFIGS = sorted(str(p) for p in Path("configs").rglob("*.yaml"))


def test_configs_are_found():
    assert len(CONFIGS) >= 14


@pytest.mark.parametrize("path", CONFIGS)
def test_config_loads(path):
    config = load_config(path)
    assert config.kind in path  # configs/<kind>/...; inpaint configs live with the decoder's
    assert config.train.output_dir.startswith("runs/")
    if config.kind in ("prior", "decoder", "inpaint") and config.clip.checkpoint:
        # the conditioning CLIP a stage names must be a bundled one, or the export of a committed CLIP config
        clip_runs = {f"{c.train.output_dir}/export" for c in map(load_config, CONFIGS) if c.kind == "clip"}
        checkpoint = config.clip.checkpoint
        assert re.fullmatch(r"models/\w+/clip", checkpoint) or checkpoint in clip_runs, checkpoint
