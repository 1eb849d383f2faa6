"""Images from the sample/ scripts at fixed seeds, pinned: a refactor must not change what the scripts make.

Each case runs a script's `main` on the bundled models/shapes pipeline at few steps and compares every image it
writes with the PNG stored under tests/data/pinned/. On the machine that wrote the references the images are
bitwise equal. Another CPU may pick other convolution kernels, whose float rounding can move a pixel by a level
or two after many solver steps, so the comparison allows that and nothing more: a changed seed, setting or
algorithm moves most pixels by far more.

Regenerate the references (only when a change of images is intended) with

    python tests/test_pinned_images.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sample.generate  # noqa: E402
import sample.inpaint  # noqa: E402
import sample.interpolate  # noqa: E402
import sample.variations  # noqa: E402

PINNED = Path(__file__).resolve().parent / "data" / "pinned"
SOURCE = PINNED / "source.png"  # an exact 64 px render of "a red circle above a blue square"
MASK = PINNED / "mask.png"  # white over the bottom half

CASES = {
    "generate": (
        sample.generate.main,
        ["--prompt", "a red circle above a blue square", "--prompt", "a green diamond", "--n", "1"]
        + ["--size", "256", "--candidates", "2", "--steps", "4", "--prior-steps", "4", "--seed", "1"],
    ),
    "variations": (sample.variations.main, ["--image", str(SOURCE), "--n", "2", "--size", "64", "--steps", "4"]),
    "variations_fresh": (
        sample.variations.main,
        ["--image", str(SOURCE), "--n", "2", "--size", "64", "--steps", "4", "--fresh-noise", "--seed", "5"],
    ),
    "inpaint": (
        sample.inpaint.main,
        ["--image", str(SOURCE), "--mask", str(MASK), "--prompt", "a red circle above a green diamond"]
        + ["--n", "2", "--size", "64", "--steps", "4", "--resample", "1", "--candidates", "2"],
    ),
    "interpolate": (
        sample.interpolate.main,
        ["--image", str(SOURCE), "--from-caption", "a red circle above a blue square"]
        + ["--to-caption", "a red circle above a green square", "--steps", "3", "--inversion-steps", "4"]
        + ["--size", "64"],
    ),
}


def run_case(name: str, out: Path) -> list[Path]:
    main, argv = CASES[name]
    return [Path(p) for p in main([*argv, "--out", str(out), "--device", "cpu"])]


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("name", list(CASES))
def test_sample_scripts_make_the_pinned_images(name, tmp_path):
    made = run_case(name, tmp_path)
    expected = sorted(p.name for p in (PINNED / name).glob("*.png"))
    assert sorted(p.name for p in made) == expected
    for path in made:
        got, want = pixels(path), pixels(PINNED / name / path.name)
        assert got.shape == want.shape, path.name
        diff = np.abs(got - want)
        assert diff.max() <= 3 and (diff > 1).mean() < 0.001, (path.name, int(diff.max()), float(diff.mean()))


def write_references() -> None:
    import shutil

    from unclip.eval.shapes_checker import render_prompt

    PINNED.mkdir(parents=True, exist_ok=True)
    import random

    render_prompt("a red circle above a blue square", 64, random.Random(0)).save(SOURCE)
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[32:] = 255
    Image.fromarray(mask).save(MASK)
    for name in CASES:
        shutil.rmtree(PINNED / name, ignore_errors=True)
        run_case(name, PINNED / name)


if __name__ == "__main__":
    write_references()
