"""The README's Python blocks run as written, offline, once the inputs they name exist (made here: random
weights in timm's layout, the hub and MindCV caches, the exported artefacts, images)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import torch
from conftest import hub_cache, state_dict_numpy, timm_model
from safetensors.torch import save_file

from res2net_jax import convert, create_model, deploy, mindcv_weights, onnx_export, pretrained, weight_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64  # the images' and the exports' size: small, so that every block runs in seconds

# What the blocks take as given: images, uint8 images, class names; push_to_hub's two hub calls are
# recorded (there is no network), the rest runs as written.
PRELUDE = f"""
import numpy as np
from types import SimpleNamespace
from huggingface_hub import HfApi

images = np.random.RandomState(0).randn(2, {SIZE}, {SIZE}, 3).astype(np.float32)
uint8_images = np.random.RandomState(1).randint(0, 256, (2, {SIZE}, {SIZE}, 3), dtype=np.uint8)
names = [f"class {{i}}" for i in range(1000)]
HfApi.create_repo = lambda self, repo_id, **kwargs: None
HfApi.upload_folder = lambda self, **kwargs: SimpleNamespace(commit_url="https://huggingface.co/ORG/REPO/commit/1")
"""

RUNNER = """
import json, sys, traceback

blocks, prelude = json.load(open(sys.argv[1])), sys.argv[2]
for heading, code in blocks:
    namespace = {}
    exec(prelude, namespace)
    try:
        exec(compile(code, f"README.md, {heading}", "exec"), namespace)
    except Exception:
        print(f"FAILED {heading}:", traceback.format_exc(limit=-3), flush=True)
    else:
        print(f"ran {heading}", flush=True)
"""


def readme_blocks() -> list[tuple[str, str]]:
    """The README's ```python blocks, each with the heading of its section."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    blocks, heading = [], None
    for match in re.finditer(r"^(#+ [^\n]*)$|^```(\w*)\n(.*?)^```$", text, re.M | re.S):
        if match.group(1):
            heading = match.group(1).lstrip("# ")
        elif match.group(2) == "python":
            blocks.append((f"{heading} #{sum(h.startswith(heading) for h, _ in blocks) + 1}", match.group(3)))
    return blocks


def test_the_readmes_python_blocks_run_as_written(tmp_path) -> None:
    blocks = readme_blocks()
    assert len(blocks) >= 5, [heading for heading, _ in blocks]
    work, hub, mindcv = tmp_path / "work", tmp_path / "hf", tmp_path / "mindcv"
    work.mkdir()
    mindcv.mkdir()
    # timm's res2net50d weights (random, BN randomised) as the hub serves them, and as files
    reference = timm_model("res2net50d")
    variables = convert.from_torch(state_dict_numpy(reference), "res2net50d")
    pretrained.save_pretrained(tmp_path / "published", "res2net50d", variables)
    files = {name: (tmp_path / "published" / name).read_bytes() for name in ("model.safetensors", "config.json")}
    for repo in ("timm/res2net50d.in1k", "ORG/REPO"):
        hub_cache(str(hub), repo, files)
    torch.save(reference.state_dict(), work / "res2net50d.pth")
    for name in ("res2net50d.safetensors", "model.safetensors"):
        save_file(reference.state_dict(), work / name)
    # MindCV's checkpoints: res2net50_v1b (timm's res2net50d) in the download cache, res2net50 as a file
    cached = mindcv / os.path.basename(mindcv_weights.cache_path("res2net50_v1b"))
    weight_files.to_mindspore(variables, "res2net50_v1b", str(cached))
    v1 = convert.from_torch(state_dict_numpy(timm_model("res2net50_26w_4s")), "res2net50")
    weight_files.to_mindspore(v1, "res2net50", str(work / "res2net50-f42cf71b.ckpt"))
    # What the Deploy section's commands write, at the images' size
    model = create_model("res2net50d")
    deploy.export_stablehlo(model, variables, SIZE, str(work / "r50d.jaxexport"))
    deploy.export_savedmodel(model, variables, SIZE, str(work / "r50d_savedmodel"))
    onnx_export.export_onnx(model, variables, SIZE, str(work / "r50d.onnx"))

    (tmp_path / "blocks.json").write_text(json.dumps(blocks))
    env = dict(os.environ, HF_HOME=str(hub), HF_HUB_OFFLINE="1", RES2NET_MINDCV_CACHE=str(mindcv),
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)  # fmt: skip
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run([sys.executable, "-c", RUNNER, str(tmp_path / "blocks.json"), PRELUDE], cwd=work, env=env,
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    failed = done.stdout.split("FAILED ")[1:]
    assert not failed, "\n".join(failed)
    assert done.stdout.count("ran ") == len(blocks), done.stdout
