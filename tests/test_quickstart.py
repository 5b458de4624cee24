"""The README's main command: the quickstart config reaches its accuracy on the real digits data."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from conftest import shipped_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_reaches_95_percent(tmp_path) -> None:
    """The README's main command, as configured, on the real (offline) digits data, which main.py builds
    into a new TFDS directory first, as on a new machine."""
    start = time.time()
    done = subprocess.run(
        [sys.executable, "main.py", "--config=configs/quickstart.py", f"--workdir={tmp_path / 'run'}",
         f"--config.data_dir={tmp_path / 'tfds'}"],
        cwd=ROOT, env=shipped_env(CUDA_VISIBLE_DEVICES=""), capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # Nothing but our own lines: no TensorFlow/TFDS start-up noise (TensorFlow 2.21's oneDNN and absl
    # lines, a GCS credentials warning, TFDS progress bars when stderr is not a terminal).
    assert not done.stderr.strip(), done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    top1 = float(last.split("top-1 ")[1].split("%")[0])
    print(f"quickstart: {last} in {time.time() - start:.0f} s")
    assert top1 >= 95.0, last
