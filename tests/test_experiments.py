"""experiments/benchmark.py on the CPU at a tiny size: every mode runs and the JSON has the agreed shape."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {"train_img_s", "s_per_epoch", "infer_b256_img_s", "infer_b32_ms", "infer_b1_ms", "compile_s", "peak_mem_gb"}


def test_benchmark_measures_and_renders_at_a_tiny_size(tmp_path) -> None:
    """JAX jit and timm eager. JAX eager and torch.compile are left to real runs: on 2 CPU cores their
    first steps compile for about 5 minutes even at this size (measured), more than the suite can give."""
    out = tmp_path / "tiny.json"
    command = [sys.executable, "experiments/benchmark.py", "--models=res2net50_v1b", "--batch=4", "--image_size=32",
               "--layers=1,1,1,1", "--steps=2", "--modes=jit,timm_eager", f"--out={out}"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["card"].startswith("CPU") and report["date"] == datetime.date.today().isoformat()
    assert {"jax", "flax", "torch", "timm"} <= set(report["versions"])
    modes = report["models"]["res2net50_v1b"]
    assert set(modes) == {"jit", "timm_eager"}
    for mode, figures in modes.items():
        assert set(figures) == FIELDS, mode
        assert figures["train_img_s"] > 0 and figures["infer_b1_ms"] > 0, mode
        assert abs(figures["s_per_epoch"] * figures["train_img_s"] - 1_281_167) < 1, mode
    assert modes["jit"]["compile_s"] > 0 and modes["timm_eager"]["compile_s"] is None
    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "exists" in again.stderr

    rendered = subprocess.run([sys.executable, "experiments/render.py", str(out)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr[-3000:]
    markdown = (tmp_path / "tiny.md").read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| res2net50_v1b |"))
    assert row.startswith("| res2net50_v1b | 80.28* | 95.03* | ")  # timm's published figures, marked
    assert f"{modes['jit']['s_per_epoch']:,.0f}" in row
    assert (tmp_path / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
