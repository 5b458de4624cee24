"""Trains or validates a Res2Net.

python main.py --config=configs/quickstart.py --workdir=/tmp/quickstart
python main.py --config=configs/res2net50.py --workdir=runs/r50 --config.batch_size=128
python main.py --config=configs/res2net50.py --workdir=runs/r50 --mode=eval
"""

import os
import sys

from res2net_jax import cli

cli.quiet_startup()  # before anything imports TensorFlow
cli.require_training_modules()

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from res2net_jax.errors import InvalidInputError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/res2net50.py[:ascend].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard logs.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (evaluating as it goes) or eval.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0 for a multi-host run that no cluster manager started "
    "(under Slurm, Open MPI or on a TPU pod JAX finds its peers itself).",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
_PEER_TIMEOUT = flags.DEFINE_integer("peer_timeout_s", 300, "Seconds a multi-host process waits for the others.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv: list[str]) -> list[str]:
    """The commands' flag parsing (`cli.parse_flags`), with an unknown --config.key reported in one line
    instead of a traceback."""
    try:
        return cli.parse_flags(argv)
    except (AttributeError, KeyError) as err:  # ml_collections' way of rejecting an unknown field
        cause = err.args[0] if err.args else err
        detail = cause.args[0] if isinstance(cause, KeyError) and cause.args else str(cause)
        sys.exit(f"error: unknown config field {' '.join(str(detail).split())} (fields: configs/default.py)")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise InvalidInputError(f"unexpected arguments: {' '.join(argv[1:])} (settings are --config.FIELD=value)")
    logging.set_verbosity(logging.WARNING)
    try:
        config = _CONFIG.value
        config.get("model")  # ml_collections defers a failure to load the file to the first access
    except OSError as err:
        reason = str(err.__cause__ or err).strip().splitlines()[-1].strip()
        raise InvalidInputError(f"cannot load --config={flags.FLAGS['config'].config_filename}: {reason}") from None
    # Imported here so TensorFlow is hidden from the accelerators before anything else touches them.
    from res2net_jax import train

    cli.hide_tf_from_accelerators()
    train.start_processes(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _PEER_TIMEOUT.value)
    workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
    if _MODE.value == "train":
        train.train_and_evaluate(config, workdir)
    else:
        train.evaluate(config, workdir)


if __name__ == "__main__":
    cli.run(main, flags_parser=parse_flags)
