"""MindCV's published weights by MindCV's names, served by a loopback mirror (RES2NET_MINDCV_ENDPOINT) from a
checkpoint that MindCV itself saved: MindCV's logits after loading by name, a cache that needs no server
afterwards, MindCV's own download cache read as it is, downloads that never leave a file under the final
name unless it is whole and right, one line for every fault, and the seed's fine-tuning run starting from
those weights."""

from __future__ import annotations

import errno
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, images_nchw, mindspore_python, nhwc, rel_error
from launch import assert_one_line_error, env

from res2net_jax import convert, from_pretrained, mindcv_weights, weight_files
from res2net_jax.errors import InvalidInputError, UserError
from res2net_jax.registry import MINDCV_WEIGHTS

NAME = "res2net50"
ROUTE = urllib.parse.urlsplit(MINDCV_WEIGHTS[NAME][0]).path
V1B_ROUTE = urllib.parse.urlsplit(MINDCV_WEIGHTS["res2net50_v1b"][0]).path
FILE = os.path.basename(ROUTE)


class Mirror:
    """A loopback HTTP server: `routes[path] = (behaviour, body)`, any other path answers 404.

    Behaviours: 'ok'; 'truncated' (announces the whole length, sends half, closes); 'stall' (headers and
    a few bytes, then nothing until closed); 'slow' (64 KiB every 20 ms).
    """

    def __init__(self) -> None:
        self.routes: dict[str, tuple[str, bytes]] = {}
        self.released = threading.Event()
        mirror = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                behaviour, body = mirror.routes.get(self.path, ("missing", b""))
                if behaviour == "missing":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if behaviour == "ok":
                    self.wfile.write(body)
                elif behaviour == "truncated":
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                elif behaviour == "stall":
                    self.wfile.write(body[:1000])
                    self.wfile.flush()
                    mirror.released.wait(60)
                elif behaviour == "slow":
                    for start in range(0, len(body), 1 << 16):
                        if mirror.released.is_set():
                            return
                        self.wfile.write(body[start : start + (1 << 16)])
                        time.sleep(0.02)

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client that goes away mid-body (the tests kill one) is expected

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def saved_by_mindcv(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """res2net50 (1000 classes) as MindCV builds and saves it (random weights and BN statistics), with
    MindCV's eval-mode logits of two 64 px images."""
    directory = tmp_path_factory.mktemp("mindcv_saved")
    x = images_nchw(2, 64, 64)
    np.save(directory / "x.npy", x)
    job = {"model": NAME, "num_classes": 1000, "save": str(directory / FILE), "seed": 3,
           "input": str(directory / "x.npy"), "logits": str(directory / "logits.npy")}  # fmt: skip
    spec = directory / "jobs.json"
    spec.write_text(json.dumps({"jobs": [job], "result": str(directory / "result.json")}))
    done = subprocess.run(
        [mindspore_python(), os.path.join(ROOT, "tests", "mindcv_env", "run_mindcv.py"), str(spec)],
        capture_output=True, text=True, timeout=1200, env=dict(os.environ, PYTHONPATH=""),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-5000:]
    return {"bytes": (directory / FILE).read_bytes(), "x": x, "logits": np.load(directory / "logits.npy")}


@pytest.fixture(scope="module")
def mirror() -> Mirror:
    server = Mirror()
    yield server
    server.close()


@pytest.fixture
def cache(tmp_path, monkeypatch: pytest.MonkeyPatch, mirror: Mirror) -> str:
    """A fresh HOME (no MindCV download cache) and package cache, the mirror as the endpoint, a 2 s timeout;
    returns the package cache directory."""
    mirror.routes.clear()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv(mindcv_weights.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(mindcv_weights.ENDPOINT_ENV, mirror.endpoint)
    monkeypatch.setenv(mindcv_weights.TIMEOUT_ENV, "2")
    return str(tmp_path / "cache")


def _logits(model, variables, x: np.ndarray) -> np.ndarray:
    with jax.default_matmul_precision("highest"):
        return np.asarray(model.apply(variables, jnp.asarray(nhwc(x))))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_mindcv_name_loads_mindcvs_weights_and_then_needs_no_server(
    saved_by_mindcv: dict, mirror: Mirror, cache: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mirror.routes[ROUTE] = ("ok", saved_by_mindcv["bytes"])
    model, variables = from_pretrained(NAME)
    assert rel_error(_logits(model, variables, saved_by_mindcv["x"]), saved_by_mindcv["logits"]) <= 1e-5
    assert sorted(os.listdir(cache)) == [FILE]  # no partial file beside it
    assert open(os.path.join(cache, FILE), "rb").read() == saved_by_mindcv["bytes"]

    monkeypatch.setenv(mindcv_weights.ENDPOINT_ENV, f"http://127.0.0.1:{_closed_port()}")  # the server is gone
    model, variables = from_pretrained(NAME)
    assert rel_error(_logits(model, variables, saved_by_mindcv["x"]), saved_by_mindcv["logits"]) <= 1e-5
    image = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray((np.random.RandomState(0).rand(40, 50, 3) * 255).astype(np.uint8)).save(image)
    done = subprocess.run([sys.executable, "-m", "res2net_jax.predict", f"--weights={NAME}", "--format=json",
                           "--top_k=3", str(image)], cwd=ROOT, env=env(1), capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(json.loads(done.stdout)[0]["top"]) == 3


def test_mindcvs_own_download_cache_is_read_as_it_is(saved_by_mindcv: dict, cache: str) -> None:
    """A file MindCV's load_pretrained downloaded is used with no server; a file there that is not the
    network's checkpoint is one line naming it."""
    mindcv_file = mindcv_weights.mindcv_cache_path(NAME)
    os.makedirs(os.path.dirname(mindcv_file))
    with open(mindcv_file, "wb") as f:
        f.write(saved_by_mindcv["bytes"])
    assert mindcv_weights.fetch(NAME) == mindcv_file  # the mirror serves nothing: no request was needed
    assert not os.path.exists(cache)
    v1b_file = mindcv_weights.mindcv_cache_path("res2net50_v1b")
    with open(v1b_file, "wb") as f:
        f.write(saved_by_mindcv["bytes"])  # res2net50 under res2net50_v1b's name
    with pytest.raises(InvalidInputError, match=f"{v1b_file} .MindCV's download cache. is not MindCV's "
                                                "res2net50_v1b checkpoint .*delete it"):  # fmt: skip
        mindcv_weights.fetch("res2net50_v1b")


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        ("missing", "answered HTTP 404"),
        ("truncated", "stopped after"),
        ("garbage", "did not serve MindCV's res2net50 checkpoint"),
        ("stall", "sent nothing for 2 s"),
        ("other network", "did not serve MindCV's res2net50_v1b checkpoint"),
        ("offline", "cannot download MindCV's res2net50 weights from"),
    ],
)
def test_server_faults_are_one_line_and_leave_nothing_in_the_cache(
    saved_by_mindcv: dict, mirror: Mirror, cache: str, monkeypatch: pytest.MonkeyPatch, behaviour: str, message: str
) -> None:
    body = saved_by_mindcv["bytes"]
    name, route = NAME, ROUTE
    if behaviour == "garbage":
        behaviour, body = "ok", np.random.RandomState(0).bytes(200_000)
    elif behaviour == "other network":  # res2net50 served under res2net50_v1b's address
        behaviour, name, route = "ok", "res2net50_v1b", V1B_ROUTE
    elif behaviour == "offline":
        monkeypatch.setenv(mindcv_weights.ENDPOINT_ENV, f"http://127.0.0.1:{_closed_port()}")
    if behaviour != "missing":
        mirror.routes[route] = (behaviour, body)
    started = time.monotonic()
    with pytest.raises(UserError, match=message) as raised:
        mindcv_weights.fetch(name)
    assert time.monotonic() - started < 30
    assert "\n" not in str(raised.value)
    if behaviour in ("missing", "offline", "stall"):  # the fix: where a copy made by hand is picked up
        assert f"copy it to {os.path.join(cache, os.path.basename(route))}" in str(raised.value)
    assert os.listdir(cache) == []


def test_bad_settings_are_one_line(tmp_path, cache: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for endpoint in ("download.mindspore.cn", "ftp://mirror.example/x", "http://"):
        monkeypatch.setenv(mindcv_weights.ENDPOINT_ENV, endpoint)
        with pytest.raises(InvalidInputError, match="RES2NET_MINDCV_ENDPOINT=.* is not an http:// or https://"):
            mindcv_weights.fetch(NAME)
    done = subprocess.run([sys.executable, "-m", "res2net_jax.predict", f"--weights={NAME}", "x.png"], cwd=ROOT,
                          env=env(1), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert_one_line_error(done, "RES2NET_MINDCV_ENDPOINT='http://' is not an http:// or https:// address")
    monkeypatch.delenv(mindcv_weights.ENDPOINT_ENV)
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv(mindcv_weights.CACHE_ENV, str(tmp_path / "a_file" / "cache"))  # cannot be a directory
    with pytest.raises(InvalidInputError, match=r"cannot use .*a_file/cache as the cache .* set RES2NET_MINDCV_CACHE"):
        mindcv_weights.fetch(NAME)
    monkeypatch.setenv(mindcv_weights.CACHE_ENV, cache)
    monkeypatch.setenv(mindcv_weights.TIMEOUT_ENV, "soon")
    with pytest.raises(InvalidInputError, match="RES2NET_MINDCV_TIMEOUT='soon' is not a number of seconds"):
        mindcv_weights.fetch(NAME)
    assert not os.path.exists(cache)


def test_a_full_disk_during_the_download_leaves_no_partial_file(
    saved_by_mindcv: dict, mirror: Mirror, cache: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    mirror.routes[ROUTE] = ("ok", saved_by_mindcv["bytes"])

    class FillingDisk:
        """The partial file, on a disk that is full after its first MB."""

        def __init__(self, path: str, mode: str) -> None:
            self.file, self.written = open(path, mode), 0

        def write(self, data: bytes) -> None:
            self.written += len(data)
            if self.written > 1 << 20:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.file.write(data)

        def __getattr__(self, name: str):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.close()

    monkeypatch.setattr(mindcv_weights, "open", FillingDisk, raising=False)
    with pytest.raises(InvalidInputError, match=r"No space left on device\): free some space there, or set "):
        mindcv_weights.fetch(NAME)
    assert os.listdir(cache) == []


KILLED = "from res2net_jax import mindcv_weights; mindcv_weights.fetch('res2net50')"


def test_a_killed_download_never_stays_under_the_final_name(saved_by_mindcv: dict, mirror: Mirror, cache: str) -> None:
    """kill -9 in the middle of a download: no file under the final name; the next fetch starts over and
    ends with the whole checkpoint, and no partial file."""
    mirror.routes[ROUTE] = ("slow", saved_by_mindcv["bytes"])
    partial = os.path.join(cache, FILE + ".partial")
    process = subprocess.Popen([sys.executable, "-c", KILLED], cwd=ROOT, env=env(1))
    try:
        deadline = time.monotonic() + 120
        while not (os.path.exists(partial) and os.path.getsize(partial) > 1 << 20):
            assert process.poll() is None and time.monotonic() < deadline, "the download did not start"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert os.listdir(cache) == [FILE + ".partial"]
    mirror.routes[ROUTE] = ("ok", saved_by_mindcv["bytes"])
    assert mindcv_weights.fetch(NAME) == os.path.join(cache, FILE)
    assert sorted(os.listdir(cache)) == [FILE]
    assert open(os.path.join(cache, FILE), "rb").read() == saved_by_mindcv["bytes"]


def test_the_seeds_fine_tuning_starts_from_mindcvs_res2net50(
    saved_by_mindcv: dict, mirror: Mirror, cache: str, noise_folder: str, tmp_path
) -> None:
    """configs/finetune_cifar10.py as it is, on a 4-class folder at 32 px for two steps: the weights come
    from the mirror (MindCV's res2net50), and the run's body is those weights after two steps."""
    mirror.routes[ROUTE] = ("ok", saved_by_mindcv["bytes"])
    workdir = str(tmp_path / "run")
    command = [sys.executable, "main.py", "--config=configs/finetune_cifar10.py", f"--workdir={workdir}",
               f"--config.dataset={noise_folder}", "--config.image_size=32", "--config.num_train_steps=2",
               "--config.batch_size=8", "--config.eval_batch_size=40", "--config.log_every_steps=1"]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env(1), capture_output=True, text=True,
                          timeout=1200)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    trained = weight_files.load_variables(workdir, NAME)
    served = weight_files.load_variables(os.path.join(cache, FILE), NAME)
    assert convert.num_classes_of(trained) == 4
    # The blocks' weights (the stem of this random network takes gradients hundreds of times its size).
    for path in (("layer1_0", "conv1", "kernel"), ("layer3_5", "conv3", "kernel"), ("layer4_2", "convs_0", "kernel")):
        ours, theirs = trained["params"], served["params"]
        for key in path:
            ours, theirs = ours[key], theirs[key]
        change = np.linalg.norm(np.ravel(ours) - np.ravel(theirs)) / np.linalg.norm(theirs)
        # Trained from them (from a fresh initialisation the change would be about sqrt(2)), and trained.
        assert 0 < change < 0.5, path
