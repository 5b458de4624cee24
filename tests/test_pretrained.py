"""from_pretrained / save_pretrained against timm: its local-dir loading, its save_for_hf, and an
offline Hugging Face cache in the layout huggingface_hub reads (no network)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from conftest import hub_cache, images_nchw, moderate_head, nhwc, rel_error, state_dict_numpy, timm_model, timm_pair
from huggingface_hub import HfApi
from launch import ROOT
from PIL import Image
from timm.data import create_transform, resolve_data_config

from res2net_jax import convert, create_model, from_pretrained, push_to_hub, save_pretrained
from res2net_jax.errors import InvalidInputError, MissingFileError, OutputExistsError

NAME = "res2net50_14w_8s"


def _logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


def test_save_pretrained_is_read_by_timm_local_dir(tmp_path) -> None:
    _, variables = timm_pair(NAME, num_classes=3)
    directory = tmp_path / "digits"
    save_pretrained(directory, NAME, variables, class_names=["zero", "one", "two"])
    loaded = timm.create_model(f"local-dir:{directory}", pretrained=True)
    assert loaded.pretrained_cfg["crop_pct"] == 0.875 and loaded.num_classes == 3
    assert json.loads((directory / "config.json").read_text())["label_names"] == ["zero", "one", "two"]
    x = images_nchw(2, 64, 64)
    ours = create_model(NAME, num_classes=3).apply(variables, jnp.asarray(nhwc(x)))
    assert rel_error(ours, _logits(loaded, x)) <= 1e-5
    with pytest.raises(OutputExistsError):
        save_pretrained(directory, NAME, variables)
    # predict reads the directory's model and class names: no --model.
    Image.fromarray((np.random.RandomState(0).rand(40, 50, 3) * 255).astype(np.uint8)).save(tmp_path / "a.png")
    done = subprocess.run([sys.executable, "-m", "res2net_jax.predict", f"--weights={directory}", "--format=json",
                           str(tmp_path / "a.png")], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert {t["label"] for t in json.loads(done.stdout)[0]["top"]} == {"zero", "one", "two"}


def test_from_pretrained_reads_timm_save_for_hf(tmp_path) -> None:
    """What timm's save_for_hf wrote: the same logits; num_classes=10 a new head, 0 the pooled features."""
    reference, _ = timm_pair(NAME, num_classes=5)
    timm.models.save_for_hf(reference, str(tmp_path / "saved"), safe_serialization=True)
    x = images_nchw(2, 64, 64)
    model, variables = from_pretrained(str(tmp_path / "saved"))
    assert rel_error(model.apply(variables, jnp.asarray(nhwc(x))), _logits(reference, x)) <= 1e-5
    ten, new_head = from_pretrained(str(tmp_path / "saved"), num_classes=10)
    assert new_head["params"]["fc"]["kernel"].shape == (2048, 10) and ten.num_classes == 10
    pooled, body = from_pretrained(str(tmp_path / "saved"), num_classes=0)
    reference.reset_classifier(0)
    assert rel_error(pooled.apply(body, jnp.asarray(nhwc(x))), _logits(reference, x)) <= 1e-5
    os.makedirs(tmp_path / "empty")
    with pytest.raises(MissingFileError, match="holds no model.safetensors or pytorch_model.bin"):
        from_pretrained(str(tmp_path / "empty"))


OFFLINE = """
import sys, numpy as np, jax.numpy as jnp
from res2net_jax import from_pretrained
from res2net_jax.errors import MissingFileError
x = np.load(sys.argv[1])
for name in ("res2net50_14w_8s", "hf-hub:timm/res2net50_14w_8s.in1k"):
    model, variables = from_pretrained(name)
    np.save(sys.argv[2] + name.replace("/", "_").replace(":", "_") + ".npy", model.apply(variables, jnp.asarray(x)))
try:
    from_pretrained("res2net50d")
except MissingFileError as err:
    print("ERROR", err)
"""


def test_from_pretrained_reads_an_offline_hub_cache(tmp_path) -> None:
    """HF_HUB_OFFLINE=1 and HF_HOME pointing at a cache that holds timm/res2net50_14w_8s.in1k: the
    registry name and its hf-hub id both load it; a model not in the cache is one line naming the repo."""
    reference, variables = timm_pair(NAME)
    saved = tmp_path / "saved"
    save_pretrained(saved, NAME, variables)
    hub_cache(str(tmp_path / "hf"), "timm/res2net50_14w_8s.in1k",
               {name: (saved / name).read_bytes() for name in ("model.safetensors", "config.json")})  # fmt: skip
    x = images_nchw(1, 64, 64)
    np.save(tmp_path / "x.npy", nhwc(x))
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    env.pop("HF_HUB_CACHE", None)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        unreachable = f"http://127.0.0.1:{closed.getsockname()[1]}"
    # Offline by setting, then offline in fact (no HF_HUB_OFFLINE, the hub unreachable): the same results,
    # at once, and nothing on stderr (huggingface_hub retried for 26 s with 12 warning lines).
    for settings in ({"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": unreachable}):
        started = time.monotonic()
        command = [sys.executable, "-c", OFFLINE, str(tmp_path / "x.npy"), str(tmp_path) + "/"]
        done = subprocess.run(command, cwd=ROOT, env={**env, **settings}, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0 and done.stderr == "", done.stderr[-3000:]
        assert time.monotonic() - started < 60
        expected = _logits(reference, x)
        for name in ("res2net50_14w_8s", "hf-hub_timm_res2net50_14w_8s.in1k"):
            assert rel_error(np.load(tmp_path / f"{name}.npy"), expected) <= 1e-5
        assert "ERROR timm/res2net50d.in1k/model.safetensors is not in the Hugging Face cache" in done.stdout


def test_save_pretrained_records_architecture_overrides(tmp_path) -> None:
    """A reduced network (the quickstart's one block per stage and base width 14, with a scale of 2):
    config.json's model_args, in timm's names, rebuild it in timm and in from_pretrained with the same
    logits; an override timm cannot take is refused before anything is written."""
    overrides = {"layers": (1, 1, 1, 1), "base_width": 14, "scale": 2}
    reference = timm_model("res2net50_26w_4s", num_classes=4, layers=[1, 1, 1, 1], base_width=14,
                           block_args={"scale": 2})  # fmt: skip
    variables = convert.from_torch(state_dict_numpy(reference), "res2net50_26w_4s", overrides=overrides)
    directory = tmp_path / "small"
    save_pretrained(directory, "res2net50_26w_4s", variables, overrides=overrides)
    x = images_nchw(2, 64, 64)
    expected = _logits(reference, x)
    assert rel_error(_logits(timm.create_model(f"local-dir:{directory}", pretrained=True), x), expected) <= 1e-6
    model, loaded = from_pretrained(str(directory))
    assert (model.layers, model.base_width, model.scale) == ((1, 1, 1, 1), 14, 2)
    assert rel_error(model.apply(loaded, jnp.asarray(nhwc(x))), expected) <= 1e-5
    with pytest.raises(InvalidInputError, match="timm's dla60_res2net has no argument for the override scale=2"):
        save_pretrained(tmp_path / "dla", "dla60_res2net", {}, overrides={"scale": 2})
    assert not (tmp_path / "dla").exists()


def test_push_to_hub_uploads_the_save_pretrained_directory(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network here: huggingface_hub's two calls are recorded, and the folder handed to upload_folder
    is what save_pretrained writes (timm reads it with the same logits)."""
    reference, variables = timm_pair(NAME, num_classes=2)
    calls = []

    def create_repo(self, repo_id: str, **kwargs) -> None:
        calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, *, repo_id: str, folder_path: str, **kwargs) -> SimpleNamespace:
        shutil.copytree(folder_path, tmp_path / "uploaded")
        calls.append(("upload_folder", repo_id, kwargs))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/1")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    url = push_to_hub("org/digits", NAME, variables, class_names=["a", "b"], private=True)
    assert url == "https://huggingface.co/org/digits/commit/1"
    assert calls == [("create_repo", "org/digits", {"private": True, "exist_ok": True}),
                     ("upload_folder", "org/digits", {"commit_message": "Upload res2net_jax weights"})]  # fmt: skip
    uploaded = timm.create_model(f"local-dir:{tmp_path / 'uploaded'}", pretrained=True)
    assert uploaded.pretrained_cfg["label_names"] == ["a", "b"]
    x = images_nchw(1, 64, 64)
    assert rel_error(_logits(uploaded, x), _logits(reference, x)) <= 1e-6


def test_predict_takes_the_preprocessing_from_the_pretrained_config(tmp_path) -> None:
    """A directory whose config.json asks for 160 px, crop_pct 0.95, bicubic resampling and its own
    mean and std: predict prepares the photo as timm's resolve_data_config + create_transform do, and
    gives timm's top-5."""
    reference, _ = timm_pair(NAME, num_classes=20)
    cfg = {"input_size": [3, 160, 160], "crop_pct": 0.95, "interpolation": "bicubic", "mean": [0.5, 0.4, 0.3],
           "std": [0.2, 0.3, 0.25]}  # fmt: skip
    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.RandomState(2).rand(150, 230, 3) * 255).astype(np.uint8)).save(photo)
    transform = create_transform(**resolve_data_config(cfg))
    image = transform(Image.open(photo))[None]
    moderate_head(reference, image)
    directory = tmp_path / "saved"
    save_pretrained(directory, NAME, convert.from_torch(state_dict_numpy(reference), NAME))
    config = json.loads((directory / "config.json").read_text())
    config["pretrained_cfg"].update(cfg)
    (directory / "config.json").write_text(json.dumps(config))
    loaded = timm.create_model(f"local-dir:{directory}", pretrained=True).eval()
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in resolve_data_config({}, model=loaded).items()} == {
        k: tuple(v) if isinstance(v, list) else v for k, v in resolve_data_config(cfg).items()
    }
    with torch.no_grad():
        probs = torch.softmax(loaded(image), -1)[0].numpy()
    done = subprocess.run([sys.executable, "-m", "res2net_jax.predict", f"--weights={directory}", "--format=json",
                           str(photo)], cwd=ROOT, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    top = json.loads(done.stdout)[0]["top"]
    assert [t["class"] for t in top] == list(np.argsort(-probs)[:5])
    np.testing.assert_allclose([t["prob"] for t in top], np.sort(probs)[::-1][:5], atol=1e-3)


# MindCV's published Res2Net checkpoints (mindcv/models/res2net.py default_cfgs): file names by MindCV name.
MINDCV_FILES = {
    "res2net50": "res2net50-f42cf71b.ckpt",
    "res2net101": "res2net101-8ae60132.ckpt",
    "res2net50_v1b": "res2net50_v1b-99304e92.ckpt",
    "res2net101_v1b": "res2net101_v1b-7e6db001.ckpt",
}


def test_list_pretrained_lists_exactly_the_names_that_load_weights() -> None:
    """Every timm name with hub weights (timm's own list), MindCV's four names with MindCV's files; every
    other registered name is refused in one line that points to list_pretrained."""
    from res2net_jax import list_models, list_pretrained, pretrained

    listed = {entry.name: entry for entry in list_pretrained()}
    timm_published = {name for name in listed if listed[name].source == "timm"}
    assert timm_published == {name.removesuffix(".in1k") for name in timm.list_pretrained("*res2ne*")}
    for name, entry in listed.items():
        pretrained.check_published(name)
        if entry.source == "timm":
            assert entry.location == f"timm/{name}.in1k"
        else:
            assert entry.location == f"https://download.mindspore.cn/toolkits/mindcv/res2net/{MINDCV_FILES[name]}"
        assert entry.input_size == 224
    assert {name for name, entry in listed.items() if entry.source == "mindcv"} == set(MINDCV_FILES)
    for name in sorted(set(list_models()) - set(listed)):
        with pytest.raises(MissingFileError, match=f"{name} has no published weights .*list_pretrained"):
            pretrained.check_published(name)


BAD_CONFIGS = [  # (what config.json holds, the one line expected)
    ("{not json", "is not readable JSON"),
    ("", "is not readable JSON"),
    ("[1, 2]", "holds a JSON list, not an object"),
    ('{"architecture": 7}', "architecture=7 is not a model name"),
    ('{"pretrained_cfg": {"input_size": [3, 2]}}', "input_size=[3, 2] is not [channels, height, width]"),
    ('{"pretrained_cfg": {"input_size": [3, 8, 8]}}', "input_size 8 px is outside 32-2048"),
    ('{"pretrained_cfg": {"input_size": [3, 0, 0]}}', "input_size 0 px is outside 32-2048"),
    ('{"pretrained_cfg": {"input_size": [3, 100000, 100000]}}', "input_size 100000 px is outside 32-2048"),
    ('{"pretrained_cfg": {"crop_pct": 0}}', "crop_pct=0 is not a number in (0, 1]"),
    ('{"pretrained_cfg": {"crop_pct": -1}}', "crop_pct=-1 is not a number in (0, 1]"),
    ('{"pretrained_cfg": {"mean": "abc"}}', "mean='abc' is not 3 numbers, one per input channel"),
    ('{"pretrained_cfg": {"mean": [0.5]}}', "mean=[0.5] is not 3 numbers, one per input channel"),
    ('{"pretrained_cfg": {"std": [0, 0, 0]}}', "std=[0, 0, 0] must be positive"),
    ('{"num_classes": 3, "label_names": ["a", "b"]}', "2 label_names for num_classes=3: give one name per class"),
    ('{"label_names": "abc"}', "label_names must be a list of strings"),
]


@pytest.fixture(scope="module")
def saved_directory(tmp_path_factory: pytest.TempPathFactory) -> str:
    directory = tmp_path_factory.mktemp("saved") / "model"
    save_pretrained(directory, NAME, timm_pair(NAME, num_classes=3)[1])
    return str(directory)


@pytest.mark.parametrize(("text", "message"), BAD_CONFIGS)
def test_a_bad_config_json_is_one_line_naming_the_file(saved_directory: str, tmp_path, text: str, message: str) -> None:
    """A save_pretrained directory or hub download whose config.json is torn, not an object, or asks for a
    transform that cannot work (a 23 GB input, a division by zero, a silently broadcast mean)."""
    from res2net_jax import pretrained

    directory = tmp_path / "model"
    shutil.copytree(saved_directory, directory)
    (directory / "config.json").write_text(text)
    with pytest.raises(InvalidInputError) as refused:
        pretrained.resolve(str(directory))
    assert str(directory / "config.json") in str(refused.value) and message in str(refused.value)
    assert "\n" not in str(refused.value)


def test_hub_faults_are_one_line_with_the_fix(saved_directory: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub id that is a path (traversal), an upload with the hub unreachable (a closed loopback port as
    HF_ENDPOINT), and a torn weights file in the cache: each one line saying what to do."""
    import socket

    from res2net_jax import pretrained

    for bad in ("hf-hub:../../x", "hf-hub:org/a/b/c", "hf-hub:"):
        with pytest.raises(InvalidInputError, match="does not name a hub repo: write hf-hub:ORG/NAME"):
            pretrained.resolve(bad)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{port}")
    _, variables = timm_pair(NAME, num_classes=2)
    with pytest.raises(MissingFileError, match="the upload to hub repo org/digits failed .* check the network") as e:
        push_to_hub("org/digits", NAME, variables, token="hf_not_a_token")
    assert "\n" not in str(e.value)
    torn = tmp_path / "torn"
    shutil.copytree(saved_directory, torn)
    data = (torn / "model.safetensors").read_bytes()
    (torn / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidInputError, match="model.safetensors: .*delete it, and download or copy it again"):
        from_pretrained(str(torn))
