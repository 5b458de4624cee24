#!/usr/bin/env bash
# Makes the MindSpore + MindCV virtual environment that tests/test_mindspore.py drives.
#   tests/mindcv_env/make_venv.sh [VENV]   (default: .venv-mindspore in the repository root)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${1:-$here/../../.venv-mindspore}"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -r "$here/requirements.txt"
"$venv/bin/python" -c "import mindspore, mindcv; print('mindspore', mindspore.__version__, 'mindcv', mindcv.__version__)"
