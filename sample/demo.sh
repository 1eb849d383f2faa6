#!/usr/bin/env bash
# One command from a fresh clone: install the project into .venv (the first time only), then make an image
# with the bundled shapes pipeline and print where it is.
#
#   bash sample/demo.sh "a red circle above a blue square"
#   bash sample/demo.sh "a small green square" --n 4 --seed 7     # any sample/generate.py options follow
#
# UNCLIP_PYTHON=/path/to/python skips the install and uses that interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -lt 1 ] || [ -z "$1" ]; then
    echo "usage: bash sample/demo.sh \"PROMPT\" [sample/generate.py options]" >&2
    exit 2
fi
prompt="$1"
shift

python="${UNCLIP_PYTHON:-.venv/bin/python}"
# install when .venv is missing or an earlier install stopped halfway (its python exists, the packages not)
if [ -z "${UNCLIP_PYTHON:-}" ] && ! .venv/bin/python -c "import torch, torchvision, unclip" 2>/dev/null; then
    echo "installing into .venv (once; see DEVELOPERS.md for why torch comes first)..." >&2
    [ -x .venv/bin/python ] || python3 -m venv .venv
    echo "  1/2 torch and torchvision (the largest part)..." >&2
    .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
    echo "  2/2 unclip and its dependencies..." >&2
    .venv/bin/pip install -q -e .
    echo "installed." >&2
fi
echo "generating \"$prompt\" (each image's path is printed when it is written)..." >&2
# the bundled models are local: never wait on the network for a pretrained tag
HF_HUB_OFFLINE=1 exec "$python" sample/generate.py --prompt "$prompt" "$@"
