"""The README's main command: the quickstart config reaches its accuracy on the real digits data."""

from __future__ import annotations

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_reaches_95_percent(digits_dir: str, tmp_path) -> None:
    """The README's main command, as configured, on the real (offline) digits data."""
    start = time.time()
    done = subprocess.run(
        [sys.executable, "main.py", "--config=configs/quickstart.py", f"--workdir={tmp_path}",
         f"--config.data_dir={digits_dir}"],
        cwd=ROOT, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # Nothing but our own lines: no TensorFlow/TFDS start-up noise (e.g. a GCS credentials warning).
    assert not done.stderr.strip(), done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    top1 = float(last.split("top-1 ")[1].split("%")[0])
    print(f"quickstart: {last} in {time.time() - start:.0f} s")
    assert top1 >= 95.0, last
