"""Every command line against bad input: each case must end with exit status 1 or 2, a last stderr line
"error: ..." (or argparse's "PROG: error: ..."), no traceback, and nothing changed outside its own folder.

Most cases call the scripts' `main(argv)` in this process (a subprocess costs seconds of imports); the
`SUBPROCESS` cases run the real scripts, `python -m unclip.eval` and sample/demo.sh as the user would, to
check what reaches the terminal.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pipeline_helpers import make_tiny_pipeline

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # chmod does not stop root from writing
ERROR_LINE = re.compile(r"^([^:]+: )?error: \S")  # "error: ..." or argparse's "generate.py: error: ..."


# -- shared inputs ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    """The tiny pipeline (with inpainting) and input images: read by every case, changed by none."""
    root = tmp_path_factory.mktemp("fuzz_shared")
    pipe = make_tiny_pipeline(root, inpaint=True)
    inputs = root / "inputs"
    inputs.mkdir()
    gradient = np.linspace(0, 255, 16 * 16 * 3).reshape(16, 16, 3).astype(np.uint8)
    Image.fromarray(gradient).save(inputs / "image.png")
    mask = Image.new("L", (16, 16))
    mask.paste(255, (4, 4, 12, 12))
    mask.save(inputs / "mask.png")
    wide = Image.new("L", (32, 16))
    wide.paste(255, (8, 4, 24, 12))
    wide.save(inputs / "wide_mask.png")
    Image.new("L", (16, 16)).save(inputs / "black_mask.png")
    (inputs / "corrupt.png").write_bytes(gradient.tobytes()[:100])  # raw pixels, no PNG header
    good = (inputs / "image.png").read_bytes()
    (inputs / "truncated.png").write_bytes(good[: len(good) // 2])
    (inputs / "empty.png").write_bytes(b"")
    (inputs / "prompts_binary.txt").write_bytes(b"\xff\xfe\x00bad")
    (inputs / "prompts_empty.txt").write_text("# only a comment\n\n")
    return {"pipe": pipe, "parts": pipe.parent / "parts", "inputs": inputs, "root": root}


# -- the corrupt things a case may start from ---------------------------------------------------------------


def _copy_pipe(shared, tmp) -> Path:
    bad = tmp / "pipe"
    shutil.copytree(shared["pipe"], bad)
    return bad


def _edit_index(shared, tmp, edit) -> None:
    bad = _copy_pipe(shared, tmp)
    index = json.loads((bad / "pipeline.json").read_text())
    (bad / "pipeline.json").write_text(json.dumps(edit(index)))


def _truncate(shared, tmp, stage="decoder", keep=0.5) -> None:
    weights = _copy_pipe(shared, tmp) / stage / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)])


def _swap_weights(shared, tmp) -> None:
    bad = _copy_pipe(shared, tmp)
    shutil.copy(bad / "prior" / "model.safetensors", bad / "decoder" / "model.safetensors")


def _truncate_clip(shared, tmp) -> None:
    weights = _copy_pipe(shared, tmp) / "clip" / "open_clip_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _edit_config(shared, tmp, edit, stage="decoder") -> None:
    config = _copy_pipe(shared, tmp) / stage / "config.json"
    config.write_text(json.dumps(edit(json.loads(config.read_text()))))


def _bomb_png() -> bytes:
    """A PNG whose header claims 60000 x 60000 pixels (a decompression bomb), in 70 bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


SETUPS = {
    "list_index": lambda s, t: (_copy_pipe(s, t) / "pipeline.json").write_text('["clip", "decoder"]'),
    "bad_json": lambda s, t: (_copy_pipe(s, t) / "pipeline.json").write_text('{"clip": "clip",'),
    "empty_json": lambda s, t: (_copy_pipe(s, t) / "pipeline.json").write_text(""),
    "binary_json": lambda s, t: (_copy_pipe(s, t) / "pipeline.json").write_bytes(b"\xff\xfe\x00{"),
    "no_index": lambda s, t: (_copy_pipe(s, t) / "pipeline.json").unlink(),
    "absolute_stage": lambda s, t: _edit_index(s, t, lambda i: {**i, "decoder": str(s["pipe"] / "decoder")}),
    "relative_stage": lambda s, t: _edit_index(s, t, lambda i: {**i, "decoder": "../pipe/decoder"}),
    "missing_stage": lambda s, t: _edit_index(s, t, lambda i: {**i, "decoder": "nowhere"}),
    "no_decoder_key": lambda s, t: _edit_index(s, t, lambda i: {k: v for k, v in i.items() if k != "decoder"}),
    "future_version": lambda s, t: _edit_index(s, t, lambda i: {**i, "format_version": 99}),
    "bad_defaults": lambda s, t: _edit_index(s, t, lambda i: {**i, "defaults": {"decoder": {"steps": 0}}}),
    "truncated_weights": _truncate,
    "empty_weights": lambda s, t: _truncate(s, t, keep=0),
    "truncated_clip": _truncate_clip,
    "swapped_weights": _swap_weights,
    "config_list": lambda s, t: (_copy_pipe(s, t) / "decoder" / "config.json").write_text("[1, 2]"),
    "config_bad_model": lambda s, t: _edit_config(
        s, t, lambda m: {**m, "model": {**m["model"], "model_channels": -8}}
    ),
    "config_unknown_field": lambda s, t: _edit_config(s, t, lambda m: {**m, "model": {**m["model"], "colour": 1}}),
    "config_no_model": lambda s, t: _edit_config(s, t, lambda m: {k: v for k, v in m.items() if k != "model"}),
    "defaults_wrong_type": lambda s, t: _edit_index(s, t, lambda i: {**i, "defaults": {"decoder": {"steps": "x"}}}),
    "defaults_unknown": lambda s, t: _edit_index(s, t, lambda i: {**i, "defaults": {"decoder": {"colour": 1}}}),
    "upsamplers_string": lambda s, t: _edit_index(s, t, lambda i: {**i, "upsamplers": "upsampler_32"}),
    "clip_config_missing": lambda s, t: (_copy_pipe(s, t) / "clip" / "open_clip_config.json").unlink(),
    "clip_config_bad": lambda s, t: (_copy_pipe(s, t) / "clip" / "open_clip_config.json").write_text("{"),
    "bomb": lambda s, t: (t / "bomb.png").write_bytes(_bomb_png()),
    "train_bad_data": lambda s, t: (t / "data").mkdir(),
    "no_config": lambda s, t: (_copy_pipe(s, t) / "decoder" / "config.json").unlink(),
    "bad_config": lambda s, t: (_copy_pipe(s, t) / "decoder" / "config.json").write_text("{not json"),
    "bad_yaml": lambda s, t: (t / "bad.yaml").write_text("kind: prior\ntrain: [\n"),
    "yaml_list": lambda s, t: (t / "bad.yaml").write_text("- 1\n- 2\n"),
    "existing_file": lambda s, t: (t / "file").write_text("keep me"),
    "existing_pipe": lambda s, t: shutil.copytree(s["pipe"], t / "existing"),
    "read_only": lambda s, t: (t / "ro").mkdir(mode=0o555),
}


# -- the cases ----------------------------------------------------------------------------------------------

GEN = "sample/generate.py --prompt 'a red circle' --pipeline {pipe} --n 1 --out {out}"
VAR = "sample/variations.py --image {inputs}/image.png --pipeline {pipe} --n 1 --steps 2 --out {out}"
INP = (
    "sample/inpaint.py --image {inputs}/image.png --mask {inputs}/mask.png --prompt 'a red circle' "
    "--pipeline {pipe} --n 1 --steps 2 --out {out}"
)
INT = (
    "sample/interpolate.py --image {inputs}/image.png --prompt 'a blue square' --pipeline {pipe} --steps 2 "
    "--inversion-steps 2 --out {out}"
)
TRAIN = "train/prior.py configs/prior/tiny.yaml train.output_dir={tmp}/run"
BUILD = "train/pipeline.py --out {tmp}/built --clip {parts}/clip --prior {parts}/prior --decoder {parts}/decoder"
EMBED = "train/embed.py configs/prior/tiny.yaml data.options.num_samples=4 --out {out}"
EVAL = "-m unclip.eval shapes --pipeline {pipe} --evaluator-clip {pipe}/clip --n 2 --size 16"


@dataclass
class Case:
    id: str
    command: str  # a script path (or -m unclip.eval, or bash sample/demo.sh) and its arguments
    says: str = ""  # a regular expression the error line must match
    setup: str | None = None  # a SETUPS key, made in the case's folder first
    status: int | None = None  # 1 or 2 when it matters
    xfail: str | None = None  # a known failure, outside the sampling code, with its cause


CASES = [
    # settings out of range
    Case("gen-guidance-nan", GEN + " --guidance nan", "--guidance"),
    Case("gen-guidance-inf", GEN + " --guidance inf", "--guidance"),
    Case("gen-guidance-negative", GEN + " --guidance -2", "--guidance"),
    Case("gen-text-guidance-nan", GEN + " --text-guidance nan", "--text-guidance"),
    Case("gen-prior-guidance-inf", GEN + " --prior-guidance inf", "--prior-guidance"),
    Case("gen-steps-0", GEN + " --steps 0", "--steps"),
    Case("gen-steps-negative", GEN + " --steps -5", "--steps"),
    Case("gen-prior-steps-0", GEN + " --prior-steps 0", "--prior-steps"),
    Case("gen-candidates-0", GEN + " --candidates 0", "--candidates"),
    Case("gen-sampler-unknown", GEN + " --sampler euler", "--sampler"),
    Case("gen-n-0", GEN + " --n 0", "--n", status=2),
    Case("gen-n-negative", GEN + " --n -3", "--n", status=2),
    Case("gen-n-text", GEN + " --n many", "--n", status=2),
    Case("gen-seed-negative", GEN + " --seed -1", "--seed", status=2),
    Case("gen-batch-size-0", GEN + " --batch-size 0", "--batch-size", status=2),
    Case("gen-size-48", GEN + " --size 48", "48"),
    Case("gen-size-0", GEN + " --size 0", "--size", status=2),
    Case("gen-size-negative", GEN + " --size -16", "--size", status=2),
    Case("gen-dtype-unknown", GEN + " --dtype fp64", "--dtype", status=2),
    Case("gen-empty-prompt", "sample/generate.py --prompt '' --pipeline {pipe} --out {out}", "prompt"),
    Case("gen-blank-prompt", "sample/generate.py --prompt '   ' --pipeline {pipe} --out {out}", "prompt"),
    Case("gen-empty-among-prompts", GEN + " --prompt ''", "prompt"),
    Case("gen-no-prompt", "sample/generate.py --pipeline {pipe} --out {out}", "prompt", status=2),
    Case("gen-prompts-file-missing", GEN + " --prompts-file {tmp}/nowhere.txt", "prompts-file", status=2),
    Case("gen-prompts-file-binary", GEN + " --prompts-file {inputs}/prompts_binary.txt", "prompts-file"),
    Case(
        "gen-prompts-file-empty",
        "sample/generate.py --prompts-file {inputs}/prompts_empty.txt --pipeline {pipe} --out {out}",
        "prompts-file",
        status=2,
    ),
    Case("gen-unknown-flag", GEN + " --colour red", "unrecognized", status=2),
    # devices
    Case("gen-device-foo", GEN + " --device foo", "--device"),
    Case("gen-device-cuda", GEN + " --device cuda", "--device"),
    Case("gen-device-cuda-7", GEN + " --device cuda:7", "--device"),
    Case("gen-device-mps", GEN + " --device mps", "--device"),
    Case("gen-device-empty", GEN + " --device ''", "--device"),
    # --out
    Case("gen-out-file", GEN + " --out {tmp}/file", "--out", setup="existing_file"),
    Case("gen-out-under-file", GEN + " --out {tmp}/file/sub", "--out", setup="existing_file"),
    Case("gen-out-read-only", GEN + " --out {tmp}/ro", "--out", setup="read_only"),
    Case("gen-out-unmakeable", GEN + " --out /proc/unclip-fuzz", "--out"),
    Case("gen-out-device-file", GEN + " --out /dev/null", "--out"),
    Case("gen-out-name-too-long", GEN + " --out {tmp}/" + "x" * 300, "--out"),
    Case("var-out-name-too-long", VAR + " --out {tmp}/" + "x" * 300, "--out"),
    # broken pipelines
    Case("gen-pipeline-missing", GEN + " --pipeline {tmp}/nowhere", "nowhere"),
    Case("gen-pipeline-is-file", GEN + " --pipeline {tmp}/file", "file", setup="existing_file"),
    Case("gen-pipeline-list", GEN + " --pipeline {tmp}/pipe", "pipeline.json", setup="list_index"),
    Case("gen-pipeline-bad-json", GEN + " --pipeline {tmp}/pipe", "pipeline.json", setup="bad_json"),
    Case("gen-pipeline-empty-json", GEN + " --pipeline {tmp}/pipe", "pipeline.json", setup="empty_json"),
    Case("gen-pipeline-binary-json", GEN + " --pipeline {tmp}/pipe", "pipeline.json", setup="binary_json"),
    Case("gen-pipeline-no-index", GEN + " --pipeline {tmp}/pipe", "pipeline.json", setup="no_index"),
    Case("gen-stage-absolute", GEN + " --pipeline {tmp}/pipe", "inside", setup="absolute_stage"),
    Case("gen-stage-relative", GEN + " --pipeline {tmp}/pipe", "inside", setup="relative_stage"),
    Case("gen-stage-missing", GEN + " --pipeline {tmp}/pipe", "nowhere", setup="missing_stage"),
    Case("gen-stage-no-decoder", GEN + " --pipeline {tmp}/pipe", "decoder", setup="no_decoder_key"),
    Case("gen-pipeline-version", GEN + " --pipeline {tmp}/pipe", "version", setup="future_version"),
    Case("gen-pipeline-defaults", GEN + " --pipeline {tmp}/pipe", "steps", setup="bad_defaults"),
    Case(
        "gen-weights-truncated", GEN + " --pipeline {tmp}/pipe", "decoder/model.safetensors", setup="truncated_weights"
    ),
    Case("gen-weights-empty", GEN + " --pipeline {tmp}/pipe", "decoder/model.safetensors", setup="empty_weights"),
    Case("gen-clip-truncated", GEN + " --pipeline {tmp}/pipe", "open_clip_model.safetensors", setup="truncated_clip"),
    Case("gen-weights-swapped", GEN + " --pipeline {tmp}/pipe", "decoder", setup="swapped_weights"),
    Case("gen-config-missing", GEN + " --pipeline {tmp}/pipe", "config.json", setup="no_config"),
    Case("gen-config-bad", GEN + " --pipeline {tmp}/pipe", "config.json", setup="bad_config"),
    Case("gen-config-list", GEN + " --pipeline {tmp}/pipe", "config.json", setup="config_list"),
    Case(
        "gen-config-bad-model", GEN + " --pipeline {tmp}/pipe", "config.json|model_channels", setup="config_bad_model"
    ),
    Case("gen-config-unknown-field", GEN + " --pipeline {tmp}/pipe", "colour", setup="config_unknown_field"),
    Case("gen-config-no-model", GEN + " --pipeline {tmp}/pipe", "config.json|model", setup="config_no_model"),
    Case("gen-defaults-wrong-type", GEN + " --pipeline {tmp}/pipe", "steps", setup="defaults_wrong_type"),
    Case("gen-defaults-unknown", GEN + " --pipeline {tmp}/pipe", "colour", setup="defaults_unknown"),
    Case("gen-upsamplers-string", GEN + " --pipeline {tmp}/pipe", "upsamplers", setup="upsamplers_string"),
    Case("gen-clip-config-missing", GEN + " --pipeline {tmp}/pipe", "clip", setup="clip_config_missing"),
    Case("gen-clip-config-bad", GEN + " --pipeline {tmp}/pipe", "open_clip_config.json", setup="clip_config_bad"),
    Case("gen-seed-huge", GEN + " --seed 1180591620717411303424", "--seed"),
    Case("gen-out-empty", GEN + " --out ''", "--out"),
    Case("gen-prompts-file-folder", GEN + " --prompts-file {inputs}", "prompts-file", status=2),
    # variations
    Case("var-image-missing", VAR + " --image {tmp}/nowhere.png", "nowhere.png"),
    Case("var-image-corrupt", VAR + " --image {inputs}/corrupt.png", "corrupt.png"),
    Case("var-image-truncated", VAR + " --image {inputs}/truncated.png", "truncated.png"),
    Case("var-image-empty", VAR + " --image {inputs}/empty.png", "empty.png"),
    Case("var-image-folder", VAR + " --image {inputs}", "folder"),
    Case("var-image-bomb", VAR + " --image {tmp}/bomb.png", "bomb.png", setup="bomb"),
    Case("var-image-text", VAR + " --image configs/prior/tiny.yaml", "tiny.yaml"),
    Case("var-eta-nan", VAR + " --eta nan", "--eta"),
    Case("var-eta-negative", VAR + " --eta -1", "--eta"),
    Case("var-steps-0", VAR + " --steps 0", "--steps", status=2),
    Case("var-fresh-steps-0", VAR + " --fresh-noise --steps 0", "--steps", status=2),
    Case("var-guidance-inf", VAR + " --guidance inf", "--guidance"),
    Case("var-n-0", VAR + " --n 0", "--n", status=2),
    Case("var-device-cuda", VAR + " --device cuda", "--device"),
    Case("var-size-48", VAR + " --size 48", "48"),
    Case(
        "var-weights-truncated", VAR + " --pipeline {tmp}/pipe", "decoder/model.safetensors", setup="truncated_weights"
    ),
    # inpainting
    Case("inp-mask-aspect", INP + " --mask {inputs}/wide_mask.png", "mask"),
    Case("inp-mask-black", INP + " --mask {inputs}/black_mask.png", "mask"),
    Case("inp-mask-missing", INP + " --mask {tmp}/nowhere.png", "nowhere.png"),
    Case("inp-mask-corrupt", INP + " --mask {inputs}/corrupt.png", "corrupt.png"),
    Case("inp-image-corrupt", INP + " --image {inputs}/corrupt.png", "corrupt.png"),
    Case("inp-empty-prompt", INP + " --prompt ''", "prompt"),
    Case("inp-guidance-nan", INP + " --guidance nan", "--guidance"),
    Case("inp-steps-0", INP + " --steps 0", "--steps"),
    Case("inp-resample-negative", INP + " --method repaint --resample -1", "--resample"),
    Case("inp-method-unknown", INP + " --method magic", "--method", status=2),
    Case("inp-pipeline-list", INP + " --pipeline {tmp}/pipe", "pipeline.json", setup="list_index"),
    Case("inp-size-48", INP + " --size 48", "48"),
    # interpolation
    Case("int-no-target", INT.replace("--prompt 'a blue square' ", ""), "image2|prompt|caption"),
    Case(
        "int-image2-corrupt", INT.replace("--prompt 'a blue square' ", "--image2 {inputs}/corrupt.png "), "corrupt.png"
    ),
    Case("int-image-missing", INT + " --image {tmp}/nowhere.png", "nowhere.png"),
    Case("int-steps-0", INT + " --steps 0", "steps"),
    Case("int-steps-1", INT + " --steps 1", "steps"),
    Case("int-steps-negative", INT + " --steps -2", "steps"),
    Case("int-max-theta-nan", INT + " --max-theta nan", "--max-theta", status=2),
    Case("int-inversion-steps-0", INT + " --inversion-steps 0", "--inversion-steps", status=2),
    Case("int-guidance-nan", INT + " --guidance nan", "--guidance"),
    Case("int-empty-prompt", INT + " --prompt ''", "prompt"),
    Case("int-half-caption-pair", INT + " --from-caption 'a red circle'", "caption"),
    Case("int-out-file", INT + " --out {tmp}/file", "--out", setup="existing_file"),
    # training
    Case("train-bad-yaml", "train/prior.py {tmp}/bad.yaml", "YAML", setup="bad_yaml", status=2),
    Case("train-yaml-list", "train/prior.py {tmp}/bad.yaml", "bad.yaml", setup="yaml_list", status=2),
    Case("train-config-missing", "train/prior.py {tmp}/nowhere.yaml", "nowhere.yaml", status=2),
    Case("train-wrong-kind", "train/prior.py configs/decoder/tiny.yaml train.output_dir={tmp}/run", "decoder"),
    Case("train-lr-negative", TRAIN + " train.lr=-1", "train.lr", status=2),
    Case("train-lr-nan", TRAIN + " train.lr=nan", "train.lr", status=2),
    Case("train-keep-negative", TRAIN + " train.keep_checkpoints=-1", "keep_checkpoints", status=2),
    Case("train-keep-0", TRAIN + " train.keep_checkpoints=0", "keep_checkpoints", status=2),
    Case("train-batch-size-0", TRAIN + " train.batch_size=0", "batch_size", status=2),
    Case("train-unknown-key", TRAIN + " train.colour=red", "colour", status=2),
    Case("train-override-no-equals", TRAIN + " train.lr", "train.lr", status=2),
    Case("train-resume-nowhere", TRAIN + " --resume nowhere", "--resume", status=2),
    Case("train-stop-at-0", TRAIN + " --stop-at 0", "--stop-at", status=2),
    Case(
        "train-output-dir-file",
        "train/prior.py configs/prior/tiny.yaml train.output_dir={tmp}/file",
        "file",
        setup="existing_file",
        status=2,
    ),
    Case("train-config-folder", "train/prior.py configs", "configs", status=2),
    Case("train-model-negative", TRAIN + " model.layers=-2", "layers", status=2),
    Case("train-max-steps-0", TRAIN + " train.max_steps=0", "max_steps", status=2),
    Case("train-data-path-missing", TRAIN + " data.dataset=folder data.path={tmp}/nowhere", "nowhere", status=2),
    Case(
        "train-data-folder-empty", TRAIN + " data.dataset=folder data.path={tmp}/data", "data", setup="train_bad_data"
    ),
    Case(
        "train-decoder-lr-inf",
        "train/decoder.py configs/decoder/tiny.yaml train.output_dir={tmp}/run train.lr=inf",
        "train.lr",
        status=2,
    ),
    Case(
        "train-decoder-resume-file",
        "train/decoder.py configs/decoder/tiny.yaml train.output_dir={tmp}/run --resume configs/decoder/tiny.yaml",
        "--resume",
        status=2,
    ),
    Case("embed-device-foo", EMBED + " --device foo", "device"),
    Case("embed-device-cuda", EMBED + " --device cuda", "cuda"),
    Case("embed-batch-size-0", EMBED + " --batch-size 0", "batch_size"),
    Case("embed-shard-size-0", EMBED + " --shard-size 0", "shard_size"),
    Case("embed-out-file", EMBED + " --out {tmp}/file", "file", setup="existing_file"),
    Case("embed-bad-yaml", "train/embed.py {tmp}/bad.yaml --out {out}", "YAML", setup="bad_yaml", status=2),
    Case("embed-clip-missing", EMBED + " clip.model_config=null clip.checkpoint={tmp}/nowhere", "nowhere", status=2),
    # assembling a pipeline
    Case("build-decoder-typo", BUILD + " --decoder {tmp}/typo", "typo"),
    Case(
        "build-over-existing-typo", BUILD + " --out {tmp}/existing --decoder {tmp}/typo", "typo", setup="existing_pipe"
    ),
    Case("build-clip-missing", BUILD + " --clip {tmp}/nowhere", "nowhere"),
    Case("build-upsampler-is-prior", BUILD + " --upsampler {parts}/prior", "upsampler|prior"),
    Case("build-decoder-is-prior", BUILD + " --decoder {parts}/prior", "decoder|prior"),
    Case(
        "build-truncated-decoder",
        BUILD + " --decoder {tmp}/pipe/decoder",
        "model.safetensors",
        setup="truncated_weights",
    ),
    Case("build-out-file", BUILD + " --out {tmp}/file", "file", setup="existing_file"),
    Case("build-default-nan", BUILD + " --default decoder.guidance_scale=nan", "guidance_scale"),
    Case("build-default-steps-0", BUILD + " --default decoder.steps=0", "steps"),
    # evaluation
    Case("eval-n-0", EVAL + " --n 0", "--n", status=2),
    Case("eval-batch-size-0", EVAL + " --batch-size 0", "--batch-size", status=2),
    Case("eval-device-foo", EVAL + " --device foo", "--device", status=2),
    Case("eval-device-cuda", EVAL + " --device cuda", "--device|cuda", status=2),
    Case("eval-pipeline-missing", EVAL + " --pipeline {tmp}/nowhere", "nowhere"),
    Case("eval-pipeline-list", EVAL + " --pipeline {tmp}/pipe", "pipeline.json", setup="list_index"),
    Case("eval-weights-empty", EVAL + " --pipeline {tmp}/pipe", "decoder/model.safetensors", setup="empty_weights"),
    Case("eval-out-folder", EVAL + " --out {tmp}", "--out"),
    Case("eval-out-under-device-file", EVAL + " --out /dev/null/results.json", "--out"),
    Case("eval-out-read-only", EVAL + " --out {tmp}/ro/results.json", "--out", setup="read_only"),
    Case("eval-decoder-guidance-nan", EVAL + " --decoder-guidance nan", "guidance"),
    Case("eval-decoder-steps-0", EVAL + " --decoder-steps 0", "steps"),
    Case(
        "eval-caption-pipeline-list",
        "-m unclip.eval caption --pipeline {tmp}/pipe --n 2",
        "pipeline.json",
        setup="list_index",
    ),
    Case(
        "eval-prior-wrong-kind",
        "-m unclip.eval prior --prior {pipe}/decoder --clip {pipe}/clip --n 2",
        "prior|decoder",
    ),
    Case("eval-checker-n-0", "-m unclip.eval checker --n 0", "--n", status=2),
    Case("eval-size-48", EVAL + " --size 48", "48"),
    Case("eval-candidates-0", EVAL + " --candidates 0", "candidates"),
    Case("eval-dtype-unknown", EVAL + " --dtype fp64", "--dtype", status=2),
    Case("eval-variations-n-0", "-m unclip.eval variations --pipeline {pipe} --n 0", "--n", status=2),
    Case("eval-caption-device-foo", "-m unclip.eval caption --pipeline {pipe} --device foo", "--device", status=2),
    Case("eval-unknown-command", "-m unclip.eval colours", "colours", status=2),
    Case("eval-clip-missing", "-m unclip.eval clip --clip {tmp}/nowhere --n 2", "nowhere"),
]

# run as real processes: the terminal's view, tracebacks included
SUBPROCESS = {
    "gen-weights-truncated",
    "inp-mask-aspect",
    "train-lr-negative",
    "build-over-existing-typo",
    "eval-pipeline-list",
}
DEMO = Case("demo-steps-0", "bash sample/demo.sh 'a red circle' --steps 0 --pipeline {pipe} --out {out}", "--steps")
CASES_BY_ID = {case.id: case for case in [*CASES, DEMO]}
assert len(CASES_BY_ID) == len(CASES) + 1, "case ids repeat"


# -- running a case -----------------------------------------------------------------------------------------


def _argv(case: Case, shared: dict, tmp: Path) -> list[str]:
    values = {"tmp": tmp, "out": tmp / "out", **{k: shared[k] for k in ("pipe", "parts", "inputs")}}
    return [part.format(**values) for part in shlex.split(case.command)]


def _prepare(case: Case, shared: dict, tmp: Path) -> None:
    if case.setup == "read_only" and IS_ROOT:
        pytest.skip("running as root, where a read-only folder is still writable")
    if case.setup:
        SETUPS[case.setup](shared, tmp)


def _main(argv: list[str]):
    """The `main` of the script or module an argv starts with, and the arguments after it."""
    if argv[0] == "-m":
        return importlib.import_module(argv[1] + ".__main__").main, argv[2:]
    return importlib.import_module(argv[0].removesuffix(".py").replace("/", ".")).main, argv[1:]


def run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) as the shell would see them; any other exception propagates (a traceback)."""
    main, args = _main(argv)
    capsys.readouterr()
    code = None
    try:
        main(args)
    except SystemExit as exit:
        code = exit.code
    gc.collect(1)  # what the exception kept alive (an open progress bar) is closed, as at the interpreter's exit
    if isinstance(code, str):
        print(code, file=sys.stderr)  # what the interpreter prints for sys.exit("...")
    status = code if isinstance(code, int) else 0 if code is None else 1
    return status, capsys.readouterr().err


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "UNCLIP_PYTHON": sys.executable}


def _command(argv: list[str]) -> list[str]:
    return argv if argv[0] == "bash" else [sys.executable, *argv]


@pytest.fixture(scope="module")
def processes(shared, tmp_path_factory) -> dict:
    """The SUBPROCESS cases and the demo, started together: case id -> (process, the case's folder, its files
    after the setup, its stderr file); "outside" -> the state before they started."""
    running = {"outside": outside_state(shared)}
    logs = tmp_path_factory.mktemp("fuzz_stderr")
    for case_id in sorted(SUBPROCESS | {DEMO.id}):
        case = CASES_BY_ID[case_id]
        tmp = tmp_path_factory.mktemp(case_id)
        if case.setup == "read_only" and IS_ROOT:
            continue
        if case.setup:
            SETUPS[case.setup](shared, tmp)
        with open(logs / case_id, "w") as stderr:
            proc = subprocess.Popen(
                _command(_argv(case, shared, tmp)), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=stderr
            )
        running[case_id] = (proc, tmp, snapshot(tmp), logs / case_id)
    yield running
    for entry in running.values():
        if isinstance(entry, tuple) and entry[0].poll() is None:
            entry[0].kill()


@pytest.fixture(scope="module", autouse=True)
def _start_processes_first(request):
    """The processes (seconds of imports each) run while the in-process cases do, when any is selected."""
    if any(getattr(item, "originalname", "") == "test_bad_input_as_a_process" for item in request.session.items):
        request.getfixturevalue("processes")


@pytest.fixture(scope="module")
def subprocess_results(processes, shared) -> dict[str, tuple[int, str, Path, dict]]:
    """case id -> (exit status, stderr, the case's folder, its files after the setup), once every process has
    ended; "outside" -> the state (before, after)."""
    results = {}
    for case_id, entry in processes.items():
        if case_id != "outside":
            proc, tmp, setup_state, log = entry
            proc.wait(timeout=300)
            results[case_id] = (proc.returncode, log.read_text(), tmp, setup_state)
    results["outside"] = (processes["outside"], outside_state(shared))
    return results


# -- what must not change -----------------------------------------------------------------------------------


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """path -> (size, mtime) of every file under the roots, and of the roots' folders themselves."""
    state = {}
    for root in roots:
        if not root.exists():
            continue
        for path in [root, *root.rglob("*")]:
            stat = path.lstat()
            state[str(path)] = (stat.st_size if path.is_file() else -1, stat.st_mtime_ns if path.is_file() else 0)
    return state


def outside_state(shared) -> dict:
    """What a case may read but never change: the repository's models and default output folders, the names
    at its top level (a relative --out lands there), and the shared pipeline and inputs."""
    state = snapshot(ROOT / "models", ROOT / "outputs", ROOT / "runs", shared["root"])
    state["top level"] = tuple(sorted(p.name for p in ROOT.iterdir()))
    return state


def check_result(case: Case, status: int, err: str, outside: tuple[dict, dict], tmp: Path, setup: dict) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert status in (1, 2), f"exit status {status}\n{err}"
    if case.status is not None:
        assert status == case.status, f"exit status {status}, not {case.status}\n{err}"
    assert lines and ERROR_LINE.match(lines[-1]), f"the last line is not an error line:\n{err}"
    assert re.search(case.says, lines[-1]), f"the error does not say {case.says!r}:\n{err}"
    before, after = outside
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    assert not changed, f"changed outside the case's folder: {changed[:5]}"
    now = snapshot(tmp)
    changed = sorted(p for p, state in setup.items() if state[0] >= 0 and now.get(p) != state)
    assert not changed, f"files the case started with were changed: {changed[:5]}"
    written = sorted(p for p, state in now.items() if state[0] >= 0 and p not in setup)
    assert not written, f"files written for a bad input: {written[:5]}"


def _marks(case: Case) -> list:
    marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
    if re.search(r"--device cuda( |$)", case.command):
        marks.append(pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: --device cuda is valid"))
    return marks


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=_marks(c)) for c in CASES if c.id not in SUBPROCESS])
def test_bad_input_in_process(case, shared, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    _prepare(case, shared, tmp_path)
    setup = snapshot(tmp_path)
    before = outside_state(shared)
    status, err = run_in_process(_argv(case, shared, tmp_path), capsys)
    check_result(case, status, err, (before, outside_state(shared)), tmp_path, setup)


@pytest.mark.parametrize("case_id", sorted(SUBPROCESS | {DEMO.id}))
def test_bad_input_as_a_process(case_id, subprocess_results):
    case = CASES_BY_ID[case_id]
    if case_id not in subprocess_results:
        pytest.skip("running as root, where a read-only folder is still writable")
    status, err, tmp, setup = subprocess_results[case_id]
    check_result(case, status, err, subprocess_results["outside"], tmp, setup)
    assert len([line for line in err.splitlines() if "error:" in line]) == 1, err
