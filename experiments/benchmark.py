"""Training and inference speed of res2net_jax (jit and eager) and timm (eager and torch.compile) on one device.

    PYTHONPATH=. python experiments/benchmark.py --out=experiments/results/h100.json  # seed's four, batch 256
    PYTHONPATH=. python experiments/benchmark.py --models=res2net50 --batch=8 --image_size=64 \\
        --layers=1,1,1,1 --steps=2 --out=/tmp/tiny.json                                # a CPU smoke run

It imports neither TensorFlow nor ml_collections, so it runs where JAX, Flax, optax, torch and timm
are installed (the lent GPU machines' image).

Each (framework, model) runs in its own process, so that JAX and PyTorch do not share the device's
memory and each peak is its own. Data are synthetic and already on the device: the input pipeline is not
timed (JAX's step takes uint8 images, as the pipeline hands them over, and normalises them; --augment
adds the recipe's on-device augmentation, to measure its cost). Both frameworks train with the same
optimiser (SGD, momentum 0.9, weight decay 1e-4, label smoothing 0.1) in bfloat16 compute on
accelerators (timm: autocast and channels_last) and float32 on CPUs (--dtype to choose). JAX eager mode
runs op by op under `jax.disable_jit()`, the counterpart of MindSpore's PyNative mode; jit is the
counterpart of its Graph mode; `jit:LEVER` is jit with one of levers.py's candidate optimisations.
Writes one JSON file: `models.<name>.{jit, eager, timm_eager, timm_compiled}` with train_img_s,
s_per_epoch (ImageNet's 1,281,167 images), infer_b256_img_s (at --batch), infer_b32_ms, infer_b1_ms,
compile_s, peak_mem_gb and compute_dtype. The file is rewritten after each measurement ("complete":
false until the last), so a run cut short keeps what it measured; a measurement that fails or exceeds
--timeout_s is recorded as {"error": ...}, the others go on, and the exit status is 1.

Roofline: jit also records XLA's FLOP count per image of the forward pass and of the whole train
step, and the TFLOP/s the train step reaches as a fraction of `matmul_peak_tflop_s`, the card's peak
measured here on a large matrix product in the compute dtype.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import report
from absl import app, flags

from res2net_jax import cli

IMAGENET_TRAIN = 1_281_167
SEED_MODELS = "res2net50,res2net101,res2net50_v1b,res2net101_v1b"

_MODELS = flags.DEFINE_string("models", SEED_MODELS, "Comma-separated registered names.")
_MODES = flags.DEFINE_list(  # JAX eager last: the slowest to compile, and no target depends on it
    "modes", ["jit", "timm_eager", "timm_compiled", "eager"], "What to measure, in this order (also jit:LEVER)."
)
_BATCH = flags.DEFINE_integer("batch", 256, "Training and throughput batch size.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Input height and width.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (jit / compiled); eager modes time max(1, steps // 10).")
_LAYERS = flags.DEFINE_list("layers", [], "Blocks per stage instead of the model's own (smoke runs).")
_OUT = flags.DEFINE_string("out", None, "The JSON file to write (never overwritten).", required=True)
_DTYPE = flags.DEFINE_enum(
    "dtype", "auto", ["auto", "float32", "bfloat16"], "Compute dtype; auto: bfloat16 on a GPU or TPU, float32 on a CPU."
)
_TIMEOUT = flags.DEFINE_integer("timeout_s", 300, "Seconds one measurement (a process) may run before it is stopped.")
_AUGMENT = flags.DEFINE_bool(
    "augment",
    False,
    "jit's step also augments on device as configs/default.py does (flip, colour jitter 0.4, "
    "random erasing 0.5); without it the step only normalises its uint8 images. timm's step has neither.",
)
_WORKER = flags.DEFINE_string("worker", None, "Internal: measure one 'MODEL/MODE' (or 'peak') and print JSON.")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "torch", "timm")


def _latency_ms(fn: Callable[[], Any], sync: Callable[[Any], Any], repeats: int) -> float:
    """Median milliseconds of synchronised calls, after one untimed call."""
    sync(fn())
    times = []
    for _ in range(max(repeats, 3)):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def _bfloat16(accelerator: bool) -> bool:
    """Whether to compute in bfloat16 (--dtype, else the device's usual choice)."""
    return _DTYPE.value == "bfloat16" or (_DTYPE.value == "auto" and accelerator)


def _figures(
    dtype: str, batch: int, step_s: float, infer_s: float, b32_ms: float, b1_ms: float, compile_s: float | None,
    peak_mem_gb: float | None,
) -> dict[str, Any]:  # fmt: skip
    """The fields every mode reports, from its timings."""
    return {
        "compute_dtype": dtype,
        "train_img_s": batch / step_s,
        "s_per_epoch": IMAGENET_TRAIN * step_s / batch,
        "infer_b256_img_s": batch / infer_s,
        "infer_b32_ms": b32_ms,
        "infer_b1_ms": b1_ms,
        "compile_s": compile_s,
        "peak_mem_gb": peak_mem_gb,
    }


# --- JAX ------------------------------------------------------------------------------------------


def _jax(name: str, eager: bool) -> dict[str, Any]:
    import types

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from res2net_jax import augment, create_model, fold_batch_norm, inference, steps

    device = jax.devices()[0]
    dtype = jnp.bfloat16 if _bfloat16(device.platform in ("gpu", "tpu")) else jnp.float32
    overrides = {"layers": tuple(int(n) for n in _LAYERS.value)} if _LAYERS.value else {}
    model = create_model(name, dtype=dtype, axis_name=steps.AXIS, **overrides)
    config = types.SimpleNamespace(  # the fields the step and optimiser read; timm gets the same recipe
        optimizer="momentum", momentum=0.9, weight_decay=1e-4, decay_bn_and_bias=False, grad_clip_norm=0.0,
        grad_accum_steps=1, label_smoothing=0.1, mixup_alpha=0.0, cutmix_alpha=0.0, mix_switch_prob=0.5,
        ema_decay=0.0, seed=0, freeze="", freeze_bn=False, hflip=_AUGMENT.value, color_jitter=0.4 * _AUGMENT.value,
        random_erasing=0.5 * _AUGMENT.value,
    )  # fmt: skip
    size, batch = _IMAGE_SIZE.value, _BATCH.value
    tx = steps.create_optimizer(config, optax.constant_schedule(0.1))
    mesh = jax.sharding.Mesh(np.array([device]), (steps.AXIS,))
    variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, 3)))
    # Placed as the step returns them (as train.py does), so the second step does not compile again.
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(steps.AXIS))
    state = jax.device_put(steps.init_train_state(config, tx, variables), replicated)
    rng = np.random.RandomState(0)
    pixels = rng.randint(0, 256, (max(batch, 32), size, size, 3)).astype(np.uint8)
    pool = jax.device_put(augment.normalize(pixels), split)
    data = {"image": pixels[:batch], "label": rng.randint(0, 1000, batch).astype(np.int32),
            "epoch": np.zeros(batch, np.int32), "index": np.arange(batch, dtype=np.int32)}  # fmt: skip
    data = jax.device_put(data, split)
    if eager:  # shard_map run op by op goes device by device through its own machinery: time the bare step
        model = create_model(name, dtype=dtype, **overrides)
        train_step = _plain_train_step(model, tx, config.label_smoothing)
    else:
        train_step = steps.make_train_step(model, tx, config, mesh)
    repeats = max(1, _STEPS.value // 10) if eager else _STEPS.value

    def sync(out: Any) -> Any:
        return jax.block_until_ready(out)

    holder = {"state": state}

    def train() -> Any:
        holder["state"], metrics = train_step(holder["state"], data)
        return metrics["loss"]

    with jax.disable_jit(eager):
        start = time.perf_counter()
        sync(train())  # compiles under jit
        compile_s = time.perf_counter() - start
        step_s = report.seconds_per_call(train, sync, repeats)
        # The inference function as make_predict_fn runs it: BatchNorm folded, its compiler options.
        unfolded = {"params": holder["state"].params, "batch_stats": holder["state"].batch_stats}
        infer_model, folded = fold_batch_norm(model, unfolded)
        options = inference.inference_compiler_options()
        infer = jax.jit(lambda v, x: infer_model.apply(v, x, train=False), compiler_options=options)
        images = {n: pool[:n] for n in {1, 32, batch}}
        infer_s = report.seconds_per_call(lambda: infer(folded, images[batch]), sync, repeats)
        b32_ms = _latency_ms(lambda: infer(folded, images[32]), sync, repeats)
        b1_ms = _latency_ms(lambda: infer(folded, images[1]), sync, repeats)
    stats = device.memory_stats() or {}
    peak_mem = stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None
    compile_s = None if eager else compile_s
    figures = _figures(jnp.dtype(dtype).name, batch, step_s, infer_s, b32_ms, b1_ms, compile_s, peak_mem)
    if not eager:  # XLA's count of the program before optimisation, so the same on every backend
        forward = infer.lower(folded, images[1]).cost_analysis()["flops"]
        train_flops = train_step.lower(holder["state"], data).cost_analysis()["flops"] / batch
        figures.update(flops_forward_per_img=forward, flops_train_per_img=train_flops,
                       train_tflop_s=train_flops * figures["train_img_s"] / 1e12)  # fmt: skip
        # Folding's own share: the same function of the unfolded variables (XLA:CPU fuses BN either way).
        plain = jax.jit(lambda v, x: model.apply(v, x, train=False), compiler_options=options)
        figures["infer_unfolded_b256_img_s"] = batch / report.seconds_per_call(
            lambda: plain(unfolded, images[batch]), sync, repeats
        )
    return figures


def _matmul_peak() -> dict[str, Any]:
    """TFLOP/s of a chain of large square matrix products in the compute dtype: the card's usable peak."""
    import jax
    import jax.numpy as jnp

    device = jax.devices()[0]
    accelerator = device.platform in ("gpu", "tpu")
    n, chain = (8192, 20) if accelerator else (1024, 4)
    dtype = jnp.bfloat16 if _bfloat16(accelerator) else jnp.float32
    keys = jax.random.split(jax.random.key(0))
    x = jax.random.normal(keys[0], (n, n), dtype)
    w = (jax.random.normal(keys[1], (n, n)) / n**0.5).astype(dtype)  # keeps the chain's scale

    @jax.jit
    def products(x: jax.Array) -> jax.Array:
        return jax.lax.fori_loop(0, chain, lambda _, y: y @ w, x)

    seconds = report.seconds_per_call(lambda: products(x), jax.block_until_ready, 5)
    tflop_s = 2 * n**3 * chain / seconds / 1e12
    return {"matmul_peak_tflop_s": tflop_s, "matmul_dtype": jnp.dtype(dtype).name, "matmul_n": n}


def _plain_train_step(model: Any, tx: Any, label_smoothing: float) -> Callable[[Any, dict], tuple[Any, dict]]:
    """The train step's loss and update on one device without `shard_map`, for eager mode."""
    import jax
    import jax.numpy as jnp
    import optax

    from res2net_jax import augment, steps

    def train_step(state: Any, batch: dict) -> tuple[Any, dict]:
        targets = steps.smoothed_one_hot(batch["label"], model.num_classes, label_smoothing)

        def loss_fn(params: Any) -> tuple[jax.Array, Any]:
            variables = {"params": params, "batch_stats": state.batch_stats}
            images = augment.normalize(batch["image"])
            logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
            return jnp.mean(optax.softmax_cross_entropy(logits, targets)), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state), {
            "loss": loss
        }

    return train_step


# --- timm -----------------------------------------------------------------------------------------


def _timm(name: str, compiled: bool) -> dict[str, Any]:
    import timm
    import torch

    from res2net_jax import get_spec

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    overrides = {"layers": [int(n) for n in _LAYERS.value]} if _LAYERS.value else {}
    model = timm.create_model(get_spec(name).name, **overrides).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    size, batch = _IMAGE_SIZE.value, _BATCH.value
    pool = torch.randn(max(batch, 32), 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    images = pool[:batch]
    labels = torch.randint(0, 1000, (batch,), device=device)
    bfloat16 = _bfloat16(cuda)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bfloat16)
    forward = torch.compile(model) if compiled else model
    repeats = _STEPS.value if compiled else max(1, _STEPS.value // 10)

    def sync(out: Any) -> Any:
        if cuda:
            torch.cuda.synchronize()
        return out

    def train() -> Any:
        with autocast:
            loss = loss_fn(forward(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    def infer(n: int) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad(), autocast:
                return forward(pool[:n])

        return run

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model.train()
    start = time.perf_counter()
    sync(train())
    compile_s = time.perf_counter() - start
    step_s = report.seconds_per_call(train, sync, repeats)
    model.eval()
    infer_s = report.seconds_per_call(infer(batch), sync, repeats)
    b32_ms, b1_ms = _latency_ms(infer(32), sync, repeats), _latency_ms(infer(1), sync, repeats)
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    dtype = "bfloat16" if bfloat16 else "float32"
    return _figures(dtype, batch, step_s, infer_s, b32_ms, b1_ms, compile_s if compiled else None, peak_mem)


# --- Driver ---------------------------------------------------------------------------------------

_MEASURE = {
    "jit": lambda name: _jax(name, eager=False),
    "eager": lambda name: _jax(name, eager=True),
    "timm_eager": lambda name: _timm(name, compiled=False),
    "timm_compiled": lambda name: _timm(name, compiled=True),
}


def _measure(name: str, mode: str) -> dict[str, Any]:
    """One mode's figures; 'jit:LEVER' is jit with a lever of levers.py applied while tracing."""
    base, _, lever = mode.partition(":")
    if not lever:
        return _MEASURE[base](name)
    import levers

    with levers.applied(lever):
        return _MEASURE[base](name)


def _check_modes(modes: list[str]) -> None:
    import levers

    for mode in modes:
        base, _, lever = mode.partition(":")
        if base not in _MEASURE or (lever and (base != "jit" or lever not in levers.LEVERS)):
            raise app.UsageError(f"unknown mode {mode!r}: choose from {', '.join(_MEASURE)}, or jit:LEVER with "
                                 f"LEVER one of {', '.join(levers.LEVERS)}")  # fmt: skip


def _run_worker(task: str) -> dict[str, Any]:
    """Runs one measurement in a fresh process: its figures, or {"error": why} if it failed or ran too long."""
    passed = [a for a in sys.argv[1:] if not a.startswith(("--out", "--modes", "--models"))]
    command = [sys.executable, __file__, f"--worker={task}", f"--out={_OUT.value}", *passed]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_TIMEOUT.value)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after --timeout_s={_TIMEOUT.value} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        print(f"{task} failed:\n{done.stderr[-3000:]}", file=sys.stderr, flush=True)
        return {"error": (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]}
    return json.loads(lines[-1].removeprefix("RESULT "))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _WORKER.value:
        figures = _matmul_peak() if _WORKER.value == "peak" else _measure(*_WORKER.value.split("/", 1))
        print("RESULT " + json.dumps(figures))
        return
    _check_modes(_MODES.value)
    from res2net_jax import get_spec  # imports JAX without starting a backend: the device stays free

    names = _MODELS.value.split(",")
    try:
        for name in names:
            get_spec(name)
    except ValueError as err:
        raise app.UsageError(str(err)) from None
    report.refuse_existing(_OUT.value)
    settings = {"batch": _BATCH.value, "image_size": _IMAGE_SIZE.value, "steps": _STEPS.value,
                "layers": _LAYERS.value or "the model's own", "dtype": _DTYPE.value}  # fmt: skip
    start = time.perf_counter()
    peak = _run_worker("peak") if any(mode.startswith("jit") for mode in _MODES.value) else {}
    peak = {"matmul_peak_error": peak["error"]} if "error" in peak else peak
    results: dict[str, Any] = {name: {} for name in names}
    for name in names:
        for mode in _MODES.value:
            figures = results[name][mode] = _run_worker(f"{name}/{mode}")
            if "matmul_peak_tflop_s" in peak and "train_tflop_s" in figures:
                figures["peak_fraction"] = figures["train_tflop_s"] / peak["matmul_peak_tflop_s"]
            print(f"[{time.perf_counter() - start:.0f} s] {name} {mode}: {figures}", flush=True)
            # Rewritten after every measurement, so an interrupted run keeps what it measured.
            report.write(_OUT.value, PACKAGES, settings, update=True, complete=False, **peak, models=results)
    report.write(_OUT.value, PACKAGES, settings, update=True, complete=True, **peak, models=results)
    failed = [f"{name} {mode}" for name, modes in results.items() for mode, f in modes.items() if "error" in f]
    if failed:
        raise SystemExit(f"failed (recorded as errors in {_OUT.value}): {', '.join(failed)}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
