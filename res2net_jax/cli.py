"""What every command-line entry point shares: a quiet start and one line per user error.

`quiet_startup()` must run before TensorFlow is imported. TensorFlow 2.21 prints informational
lines at import (the oneDNN notice through absl, which then adds "All log messages before
absl::InitializeLog() is called ..."; the CPU-feature notice), which TF_CPP_MIN_LOG_LEVEL alone no
longer hides. oneDNN's custom kernels serve TensorFlow's matrix products and convolutions, which the
input pipeline does not run, so they are turned off; TensorFlow's warnings and errors still show.
`hide_tf_from_accelerators()` then keeps TensorFlow off the GPUs and TPUs that JAX uses.

`run(main)` is absl's `app.run` with a `UserError` printed as one line (exit 1;
`RES2NET_TRACEBACK=1` shows the traceback), a full disk as one line (exit 1), Ctrl-C outside a
training loop ending in one line (exit 130), and output closed early by a reader (`predict ... | head`)
ending quietly, as other command-line tools do.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from res2net_jax.errors import UserError

if TYPE_CHECKING:
    from res2net_jax.inference import DataConfig


def quiet_startup() -> None:
    """Hide TensorFlow's informational start-up lines, unless the user set these variables."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def hide_tf_from_accelerators() -> None:
    """Keep TensorFlow off GPUs/TPUs: JAX owns them; tf.data and SavedModel tracing run on the host CPU."""
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    tf.config.set_visible_devices([], "TPU")


# main.py's packages beyond the core, by module name: the `train` extra and TensorFlow.
TRAINING_MODULES = ("tensorflow", "tensorflow_datasets", "ml_collections", "sklearn")


def require_training_modules() -> None:
    """Exits with one line naming the install command if a package main.py needs is missing."""
    missing = [name for name in TRAINING_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        sys.exit(
            f"error: main.py needs {', '.join(missing)}, which the core install leaves out: "
            "pip install -r requirements.txt (where TensorFlow is already installed, as on Colab: "
            "pip install 'res2net_jax[train]')"
        )


def one_line(message: object) -> str:
    """The message with its whitespace runs (newlines included) folded to single spaces."""
    return " ".join(str(message).split())


def printable(text: str) -> str:
    """`text` safe to print: control characters (terminal escape sequences, newlines, carriage returns)
    are shown as escapes (\\x1b, \\n) instead of acting on the terminal or the output's rows."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing for every command here: --help prints the command's docstring and flags and
    exits 0 (absl exits 1), and a bad or missing flag is one line (absl's is two, starting FATAL)."""
    from absl import app, flags

    asked = [arg for arg in argv[1:] if arg in HELP_FLAGS]
    if asked:
        app.usage(shorthelp=asked[0] != "--helpfull", writeto_stdout=True, exitcode=0)
    try:
        return flags.FLAGS(argv)
    except flags.Error as err:
        sys.exit(f"error: {one_line(err)} (see --help)")


def run(main: Callable[[list[str]], Any], **app_run_kwargs: Any) -> None:
    """absl's app.run(main) with `parse_flags` (unless given another parser), printing a UserError as one
    line instead of a traceback."""
    from absl import app

    app_run_kwargs.setdefault("flags_parser", parse_flags)

    def guarded(argv: list[str]) -> Any:
        try:
            return main(argv)
        except UserError as err:
            if os.environ.get("RES2NET_TRACEBACK"):
                raise
            print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
            sys.exit(1)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            sys.exit(130)
        except BrokenPipeError:  # the reader of stdout is gone: nothing more to say to it
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)  # the status of a process ended by SIGPIPE, as the shell reports it
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            where = f" writing {err.filename}" if err.filename else ""
            print(f"error: no space left on the device{where}: free some space or choose another output path "
                  "(nothing was left under the output's name)", file=sys.stderr, flush=True)  # fmt: skip
            sys.exit(1)

    app.run(guarded, **app_run_kwargs)


class LoadedWeights(NamedTuple):
    """What a --weights path holds, with what it says about itself."""

    model: str  # the registered model name
    overrides: dict[str, Any]  # architecture fields beyond the registered model's
    variables: Any  # Flax variables
    class_names: list[str] | None
    data_config: DataConfig  # the evaluation transform a run used or a pretrained config names, else the model's


def load_weights(
    weights: str, model: str | None, num_classes: int | None = None, reset_head: bool = False, ema: bool = False
) -> LoadedWeights:
    """The model, overrides, variables, class names and evaluation transform of a --weights path.

    A training run (WORKDIR, WORKDIR/best, ...) names its own model, overrides, class names and image
    size and crop, and so do published weights (a registered name or hf-hub:ORG/REPO) and directories
    in timm's format (`save_pretrained`, its pretrained_cfg): --model may be left out; any other
    weights need --model, and name no classes; their transform is the model's own.
    """
    from res2net_jax import convert, pretrained, weight_files, workdir
    from res2net_jax.errors import InvalidInputError
    from res2net_jax.inference import DataConfig
    from res2net_jax.registry import get_spec

    source = workdir.locate(weights)
    overrides: dict[str, Any] = {}
    names, data_config = None, None
    if pretrained.is_pretrained_id(weights) or pretrained.is_pretrained_dir(weights):
        found = pretrained.resolve(weights)
        weights, model, overrides, names = found.weights, model or found.model, found.overrides, found.class_names
        data_config = found.data_config
        if model is None:
            raise InvalidInputError(f"{weights} does not say which model it holds: name it with --model")
    elif source is not None:
        run = workdir.describe(source)
        if model is not None and get_spec(model).name != run.model:  # runs record the canonical name
            raise InvalidInputError(f"{weights} holds a {run.model}, not a {model}: leave out --model")
        model, overrides, names = run.model, run.model_overrides, run.class_names
        if run.eval_size_and_crop is not None:
            data_config = DataConfig(*run.eval_size_and_crop)
    elif model is None:
        raise InvalidInputError(f"name the model of {weights} with --model (only a training workdir says it itself)")
    variables = weight_files.load_variables(weights, model, num_classes, reset_head, overrides=overrides, ema=ema)
    if names is not None and len(names) != convert.num_classes_of(variables):
        names = None  # a new head: the run's class names no longer apply
    return LoadedWeights(model, overrides, variables, names, data_config or pretrained.model_data_config(model))
