"""Shared helpers: timm reference models with randomised weights and BN statistics."""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import os
from collections.abc import Iterator
from typing import Any

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the reference runs on the CPU
# The two xdist workers share the CI machine's two cores: each test process, and each process it starts,
# computes on one thread (torch's OpenMP pool here, XLA's Eigen operations below), so that they do not
# contend for a core (measured, two parts of the suite: 4-5% less wall time). Set before torch starts.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
import timm
import torch
from flax.traverse_util import flatten_dict
from timm.models.res2net import Bottle2neck
from timm.models.resnet import ResNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# XLA (whose backends start after these imports) compiles the suite's programs, here and in the processes
# the tests start, with LLVM's optimisation off: most are train steps of tiny networks that run a few
# times, and they compile in about 40% less time; and it runs Eigen's operations on one thread. The journeys
# that measure what a user gets (the quickstart's accuracy, the notebooks, the experiments' scripts) run
# as a user's process does (`shipped_env`).
SUITE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_multi_thread_eigen=false"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SUITE_XLA_FLAGS}".strip()


def shipped_env(**extra: str) -> dict[str, str]:
    """This process's environment without the suite's settings (XLA's default compilation and threads,
    torch's own thread count), and `extra`."""
    env = {name: value for name, value in os.environ.items() if name != "OMP_NUM_THREADS"}
    return dict(env, XLA_FLAGS=os.environ["XLA_FLAGS"].replace(SUITE_XLA_FLAGS, "").strip(), **extra)


def mindspore_python() -> str:
    """The MindSpore environment's python (tests/mindcv_env/make_venv.sh); the test fails without it in CI."""
    python = os.environ.get("RES2NET_MINDSPORE_PYTHON", os.path.join(ROOT, ".venv-mindspore", "bin", "python"))
    if not os.path.exists(python):
        message = f"no MindSpore environment at {python}: make it with tests/mindcv_env/make_venv.sh"
        if os.environ.get("RES2NET_REQUIRE_MINDSPORE"):  # CI makes it and must not skip
            pytest.fail(message)
        pytest.skip(message)
    return python


# MindCV-only depths are not registered in timm; build them from timm's own parts.
_TIMM_BUILDERS = {
    "res2net152": lambda: ResNet(Bottle2neck, [3, 8, 36, 3], base_width=26, block_args={"scale": 4}),
    "res2net152_v1b": lambda: ResNet(
        Bottle2neck,
        [3, 8, 36, 3],
        base_width=26,
        block_args={"scale": 4},
        stem_type="deep",
        stem_width=32,
        avg_down=True,
    ),
}


# Every test's seconds (setup, call and teardown) in the last recorded full run on the CI machine (2 cores):
# `python -m pytest -n 2 --dist loadfile --record-durations` rewrites it. The files run longest first, so that
# pytest-xdist (which hands out whole files, here in collection order) finishes both workers together, and
# tests of SLOW_S or more (or using SLOW_FIXTURES) are marked `slow`: `pytest -m "not slow"` is the fast loop.
DURATIONS = os.path.join(ROOT, "tests", "durations.json")
SLOW_S = 5.0
# Fixtures that train a run (about a minute each): a test using one is slow, whichever test paid for it.
SLOW_FIXTURES = {"six_step_run", "reference_run", "short_run", "trained"}


def _recorded() -> dict[str, float]:
    if not os.path.exists(DURATIONS):
        return {}
    with open(DURATIONS) as f:
        return json.load(f)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--record-durations", action="store_true", help=f"rewrite {os.path.relpath(DURATIONS, ROOT)}")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"slow: took {SLOW_S:g} s or more in {os.path.basename(DURATIONS)}")
    # pytest-xdist (3.6 on) hands out files with the most tests first unless told not to: the 1-test
    # quickstart, the longest file, then started last and ended the run alone.
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    recorded = _recorded()
    per_file: dict[str, float] = collections.defaultdict(float)
    for nodeid, seconds in recorded.items():
        per_file[nodeid.split("::")[0]] += seconds
    for item in items:
        if recorded.get(item.nodeid, 0.0) >= SLOW_S or SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
    # A file not yet recorded goes first: it may be long.
    items.sort(key=lambda item: -per_file.get(item.nodeid.split("::")[0], float("inf")))


_SECONDS: dict[str, float] = collections.defaultdict(float)  # this session's, by test


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _SECONDS[report.nodeid] += report.duration


def pytest_sessionfinish(session: pytest.Session) -> None:
    # Under pytest-xdist the controller, which receives every worker's reports, writes the record.
    if session.config.getoption("--record-durations") and not hasattr(session.config, "workerinput"):
        with open(DURATIONS, "w") as f:
            json.dump({k: round(v, 2) for k, v in sorted(_SECONDS.items())}, f, indent=0)
            f.write("\n")


def timm_model(name: str, seed: int = 0, num_classes: int = 1000, **overrides) -> torch.nn.Module:
    """The timm network for `name` (architecture `overrides` such as layers passed to timm) with random
    weights AND random BN statistics and affine params.

    Conv weights are rescaled per layer so activations stay O(1) through 150 layers, which keeps the
    relative-error comparison meaningful.
    """
    torch.manual_seed(seed)
    if name in _TIMM_BUILDERS:
        model = _TIMM_BUILDERS[name]()
        if num_classes != 1000:
            model.reset_classifier(num_classes)
    else:
        model = timm.create_model(name, num_classes=num_classes, **overrides)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.normal_(0.0, 0.1)
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
            elif isinstance(module, torch.nn.Linear):
                module.weight.normal_(0.0, module.in_features**-0.5)
                module.bias.normal_(0.0, 0.1)
    return model.eval()


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def timm_pair(name: str, seed: int = 0, num_classes: int = 1000, **overrides) -> tuple[torch.nn.Module, dict]:
    """`timm_model` for any registered name (MindCV aliases too) and its Flax variables: the same weights,
    every one random, so every layer reaches the logits (a fresh initialisation zeroes each block's
    last BN scale)."""
    from res2net_jax import convert, get_spec

    model = timm_model(get_spec(name).name, seed=seed, num_classes=num_classes, **overrides)
    return model, convert.from_torch(state_dict_numpy(model), name, overrides=overrides)


def moderate_head(model: torch.nn.Module, images: torch.Tensor) -> None:
    """Scales `model`'s classifier in place so that its logits on `images` spread over a few units: random
    weights at 160-224 px give logits of 1e5, whose top-5 probabilities would read 1, 0, 0, 0, 0."""
    with torch.no_grad():
        scale = 2.0 / float(model(images).std())
        model.fc.weight.mul_(scale)
        model.fc.bias.mul_(scale)


def timm_variables(name: str, num_classes: int = 1000, **overrides) -> dict:
    """The Flax variables of `timm_pair`."""
    return timm_pair(name, num_classes=num_classes, **overrides)[1]


def nhwc(x: np.ndarray) -> np.ndarray:
    """PyTorch's NCHW images as Flax's NHWC."""
    return x.transpose(0, 2, 3, 1)


def bn_stats_by_torch_key(params: dict, batch_stats: dict) -> dict[str, np.ndarray]:
    """Flax BN running statistics by PyTorch key, at their own precision (float64 stays float64,
    which `convert.to_torch` would write as float32)."""
    from res2net_jax import convert

    layout = convert.torch_layout({"params": params, "batch_stats": batch_stats})
    flat = {("batch_stats", *path): leaf for path, leaf in flatten_dict(batch_stats).items()}
    return {key: np.asarray(flat[path]) for key, (path, _) in layout.items() if path in flat}


def timm_train_pass_64(reference: torch.nn.Module, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """timm's train-mode pass in float64 on a copy of `reference` (left as it is): its logits and every BN
    running statistic after the pass, by key."""
    model = copy.deepcopy(reference).double().train()
    with torch.no_grad():
        logits = model(torch.from_numpy(x).double()).numpy()
    return logits, {k: v.numpy() for k, v in model.state_dict().items() if "running" in k}


def train_pass_64(
    model: Any, variables: dict, x: np.ndarray, interceptor: Any = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The same pass of `model` (built with dtype float64) on timm's NCHW images `x`, jitted, in float64 and
    under a Flax method `interceptor` if given: its logits and every BN running statistic, by timm's key."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    def train_pass(variables: dict, images: jax.Array) -> tuple:
        with contextlib.nullcontext() if interceptor is None else nn.intercept_methods(interceptor):
            return model.apply(variables, images, train=True, mutable=["batch_stats"])

    with jax.enable_x64(True):
        variables = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        logits, updates = jax.jit(train_pass)(variables, jnp.asarray(nhwc(x), jnp.float64))
        return np.asarray(logits), bn_stats_by_torch_key(variables["params"], updates["batch_stats"])


def assert_train_passes_equal(ours: tuple, timms: tuple, tolerance: float = 1e-9) -> None:
    """`train_pass_64` against `timm_train_pass_64`: logits and every running statistic within `tolerance`."""
    (logits, stats), (expected, expected_stats) = ours, timms
    assert rel_error(logits, expected) <= tolerance
    assert set(stats) == set(expected_stats)
    for key, value in expected_stats.items():
        assert rel_error(stats[key], value) <= tolerance, key


def rel_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """max |actual - reference| / max |reference|."""
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    return float(np.max(np.abs(actual - reference)) / np.max(np.abs(reference)))


def images_nchw(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(batch, 3, height, width).astype(np.float32)


@pytest.fixture(scope="session")
def tmp_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """res2net50_26w_4s (random, BN randomised) saved as .pth and .safetensors, with its state dict."""
    from safetensors.torch import save_file

    directory = tmp_path_factory.mktemp("weights")
    model = timm_model("res2net50_26w_4s")
    paths = {"pth": str(directory / "r50.pth"), "safetensors": str(directory / "r50.safetensors")}
    torch.save(model.state_dict(), paths["pth"])
    save_file(model.state_dict(), paths["safetensors"])
    return paths


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A TFDS data directory with the offline digits dataset built in it."""
    from res2net_jax import digits

    directory = str(tmp_path_factory.mktemp("tfds"))
    digits.SklearnDigits(data_dir=directory).download_and_prepare()
    return directory


@pytest.fixture(scope="session")
def xla_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One persistent XLA compilation cache for the main.py runs of the whole session, in every file and
    both xdist workers: runs of the same config skip compiling (about 12 of a 6-step run's 20 s); the
    results are the same programs' results. A size limit turns on JAX's file lock around each read and
    write, so one worker never reads an entry the other is writing."""
    basetemp = tmp_path_factory.getbasetemp()
    directory = (basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp) / "xla_cache"
    directory.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAX_COMPILATION_CACHE_DIR", str(directory))
        patch.setenv("JAX_COMPILATION_CACHE_MAX_SIZE", str(XLA_CACHE_BYTES))
        patch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # Orbax's many small first-save programs too
        yield


XLA_CACHE_BYTES = 1 << 36  # far more than the suite writes: nothing is evicted


@pytest.fixture(scope="session")
def noise_folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """folder:PATH of generated noise images in 4 classes (`launch.noise_images`)."""
    from launch import noise_images

    return noise_images(str(tmp_path_factory.mktemp("noise")))


def hub_cache(root: str, repo_id: str, files: dict[str, bytes]) -> None:
    """Files of hub repo `repo_id` in huggingface_hub's cache layout under HF_HOME=`root`
    (hub/models--ORG--NAME/snapshots/<commit>/FILE and refs/main), as it reads them offline."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = os.path.join(root, "hub", "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "snapshots", commit))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    for name, data in files.items():
        with open(os.path.join(repo, "snapshots", commit, name), "wb") as f:
            f.write(data)


@pytest.fixture(scope="session")
def six_step_run(tmp_path_factory: pytest.TempPathFactory, noise_folder: str, xla_cache: None) -> str:
    """A finished run: main.py's six steps with an EMA on one device (`launch.command`, in this process:
    checkpoints at steps 2, 4 and 6, the evaluation at 6) on the noise folder. Shared by the tests of a
    worker: copy it before changing it."""
    from launch import run_here

    workdir = str(tmp_path_factory.mktemp("six_steps"))
    done = run_here(workdir, noise_folder, *SIX_STEPS)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


SIX_STEPS = ("--config.num_train_steps=6",)  # what `six_step_run` adds to launch.command
