"""The MindSpore side of tests/test_mindspore.py; runs in the MindSpore virtual environment.

    python run_mindcv.py JOBS.json

Each job builds MindCV's `create_model(model, num_classes)` on the CPU and either loads `load` (a .ckpt
we exported) with `load_param_into_net`, recording what was left unloaded on either side, or
randomises its BN statistics and affine parameters and saves itself to `save`. Then it writes the
eval-mode logits of `input` (NCHW float32 .npy) to `logits`. Results go to JOBS.json's `result` file.
"""

import json
import sys

import mindcv
import mindspore as ms
import numpy as np
from mindspore.train import serialization


def _available_memory() -> int:
    """MemAvailable from /proc/meminfo.

    MindSpore 2.10 refuses a .ckpt larger than the free pages (SC_AVPHYS_PAGES), which leaves out the
    reclaimable page cache: after a pip install on a 24 GB machine that can be 200 MB, less than the
    240 MB res2net152 checkpoint. MemAvailable is the memory it could really use.
    """
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


serialization._get_available_memory = _available_memory


def _randomise_batch_norms(net: ms.nn.Cell, seed: int) -> None:
    rng = np.random.RandomState(seed)
    for param in net.get_parameters():
        leaf = param.name.rsplit(".", 1)[-1]
        shape = param.shape
        if leaf == "gamma":
            value = rng.uniform(0.5, 1.5, shape)
        elif leaf == "beta":
            value = rng.uniform(-0.5, 0.5, shape)
        elif leaf == "moving_mean":
            value = rng.uniform(-0.5, 0.5, shape)
        elif leaf == "moving_variance":
            value = rng.uniform(0.5, 2.0, shape)
        else:
            continue
        param.set_data(ms.Tensor(value.astype(np.float32)))


def run(job: dict) -> dict:
    net = mindcv.create_model(job["model"], num_classes=job["num_classes"])
    outcome = {"parameters": len(list(net.get_parameters()))}
    if "load" in job:
        not_loaded, not_used = ms.load_param_into_net(net, ms.load_checkpoint(job["load"]))
        outcome.update(not_loaded=list(not_loaded), not_used=list(not_used))
    else:
        _randomise_batch_norms(net, job.get("seed", 0))
        ms.save_checkpoint(net, job["save"])
    net.set_train(False)
    logits = net(ms.Tensor(np.load(job["input"]))).asnumpy()
    np.save(job["logits"], logits)
    return outcome


def main(path: str) -> None:
    with open(path) as f:
        spec = json.load(f)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_device("CPU")
    results = [run(job) for job in spec["jobs"]]
    with open(spec["result"], "w") as f:
        json.dump({"versions": {"mindspore": ms.__version__, "mindcv": mindcv.__version__}, "jobs": results}, f)


if __name__ == "__main__":
    main(sys.argv[1])
