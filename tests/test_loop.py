"""The training loop in this process, as flax's examples test theirs: a few steps on the offline digits,
then --mode=eval of the run, each checked against what the loop wrote."""

from __future__ import annotations

import json
import os

import pytest

from configs import quickstart
from res2net_jax import train


@pytest.fixture
def config(digits_dir: str):
    config = quickstart.get_config()
    config.update(data_dir=digits_dir, num_train_steps=4, batch_size=16, eval_batch_size=120, log_every_steps=2,
                  checkpoint_every_steps=2, eval_every_epochs=100.0, ema_decay=0.9)  # fmt: skip
    config.model_overrides.base_width = 4
    return config


def test_train_and_evaluate_in_process(config, tmp_path, capsys: pytest.CaptureFixture) -> None:
    workdir = str(tmp_path / "run")
    last = train.train_and_evaluate(config, workdir)
    assert last["step"] == 4 and 0 <= last["top1"] <= 100 and last["top1"] <= last["top5"]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert json.loads(f.readlines()[-1]) == json.loads(json.dumps(last))
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" loss ")[0] for line in lines if line.startswith("step ")] == [
        "step 2/4 [ 50%] epoch 0.02",
        "step 4/4 [100%] epoch 0.04",
    ]
    evaluated = train.evaluate(config, workdir)  # the newest checkpoint, step 4: the weights just evaluated
    assert {k: evaluated[k] for k in ("top1", "top5", "ema_top1")} == {k: last[k] for k in ("top1", "top5", "ema_top1")}
    assert abs(evaluated["loss"] - last["loss"]) < 1e-6
