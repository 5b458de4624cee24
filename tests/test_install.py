"""The core install: `pip install .` in a fresh virtual environment has no TensorFlow, and what it
promises (import, from_pretrained from an offline hub cache, predict) works there, against timm."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import tomllib
import torch
from conftest import hub_cache, images_nchw, moderate_head, nhwc, rel_error, state_dict_numpy, timm_pair
from launch import ROOT
from PIL import Image
from timm.data import create_transform, resolve_data_config

from res2net_jax import convert, save_pretrained

NAME = "res2net50_14w_8s"
FROM_PRETRAINED = """
import importlib.util, sys
import numpy as np
import res2net_jax
absent = [m for m in ("tensorflow", "tensorflow_datasets", "ml_collections", "torch") if importlib.util.find_spec(m)]
assert not absent, absent
model, variables = res2net_jax.from_pretrained(sys.argv[1])
np.save(sys.argv[3], np.asarray(model.apply(variables, np.load(sys.argv[2]), train=False)))
"""


def _requirement_names(lines: list[str]) -> list[str]:
    return sorted(line.split(";")[0].split("#")[0].strip() for line in lines if line.strip())


def test_requirements_txt_is_the_core_and_train_extra_with_tensorflow() -> None:
    """requirements.txt (what main.py needs on a fresh machine) repeats pyproject's core and `train`
    requirements, same versions, and adds a TensorFlow distribution; pyproject lists none."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["train"]
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        lines = [line for line in f if not line.startswith("#")]
    tensorflow = [line for line in lines if line.startswith(("tensorflow>", "tensorflow-cpu"))]
    assert _requirement_names([line for line in lines if line not in tensorflow]) == _requirement_names(declared)
    assert {line.split(">=")[0] for line in tensorflow} == {"tensorflow-cpu", "tensorflow"}
    assert not [d for d in declared if d.startswith(("tensorflow>", "tensorflow-cpu"))]


def test_core_install_loads_and_predicts_without_tensorflow(tmp_path) -> None:
    # An offline hub cache holding timm/res2net50_14w_8s.in1k (random weights, saved as timm saves), with
    # the head scaled so that a photo's logits spread over a few units (not top-5 probabilities 1, 0, 0, ...).
    reference, _ = timm_pair(NAME)
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.RandomState(1).rand(180, 240, 3) * 255).astype(np.uint8)).save(photo)
    image = create_transform(**resolve_data_config({}, model=reference))(Image.open(photo))[None]
    moderate_head(reference, image)
    with torch.no_grad():
        probs = torch.softmax(reference(image), -1)[0].numpy()
    variables = convert.from_torch(state_dict_numpy(reference), NAME)
    saved = tmp_path / "saved"
    save_pretrained(saved, NAME, variables)
    hub_cache(str(tmp_path / "hf"), f"timm/{NAME}.in1k",
              {name: (saved / name).read_bytes() for name in ("model.safetensors", "config.json")})  # fmt: skip
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    # From a copy of what the package is built from: building in the checkout would leave build/ there.
    source = tmp_path / "source"
    shutil.copytree(os.path.join(ROOT, "res2net_jax"), source / "res2net_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    install = subprocess.run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", str(source)],
                             capture_output=True, text=True, timeout=900)  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    env.pop("HF_HUB_CACHE", None)
    work = tmp_path / "work"  # not the checkout: the installed package is what runs
    work.mkdir()

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([python, *args], cwd=work, env=env, capture_output=True, text=True, timeout=600)

    x = images_nchw(1, 64, 64)
    np.save(tmp_path / "x.npy", nhwc(x))
    done = run("-c", FROM_PRETRAINED, NAME, str(tmp_path / "x.npy"), str(tmp_path / "logits.npy"))
    assert done.returncode == 0, done.stderr[-3000:]
    with torch.no_grad():
        assert rel_error(np.load(tmp_path / "logits.npy"), reference(torch.from_numpy(x)).numpy()) <= 1e-5

    # predict by name: timm's evaluation transform and model on the same photo give the same top-5.
    done = run("-m", "res2net_jax.predict", f"--weights={NAME}", "--format=json", str(photo))
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr[-3000:]
    ours = json.loads(done.stdout)[0]["top"]
    assert [t["class"] for t in ours] == list(np.argsort(-probs)[:5])
    np.testing.assert_allclose([t["prob"] for t in ours], np.sort(probs)[::-1][:5], atol=1e-3)

    # main.py and SavedModel export need what the core leaves out: one line naming the install.
    done = run(os.path.join(ROOT, "main.py"), "--config=configs/quickstart.py", f"--workdir={tmp_path / 'run'}")
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr[-3000:]
    assert "main.py needs tensorflow, tensorflow_datasets, ml_collections, sklearn" in done.stderr
    assert "pip install -r requirements.txt" in done.stderr
    done = run("-m", "res2net_jax.export", "--format=savedmodel", f"--weights={NAME}", f"--out={tmp_path / 'sm'}")
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr[-3000:]
    assert "SavedModel export needs TensorFlow" in done.stderr and not (tmp_path / "sm").exists()
