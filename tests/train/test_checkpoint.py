import os

import numpy as np
import mindspore as ms
import pytest
from mindspore import nn

from pangu_moe.train import checkpoint
from pangu_moe.train.checkpoint import CheckpointError


def _net(seed, out=4):
    ms.set_seed(seed)
    return nn.Dense(3, out)


def test_round_trip_is_exact_and_atomic(tmp_path):
    a, b = _net(1), _net(2)
    path = checkpoint.step_path(str(tmp_path), 7)
    checkpoint.save(path, [a], {"step": 7, "train_seconds": 1.5})
    assert os.listdir(tmp_path / "checkpoints") == ["step_000007.ckpt"]  # no temp file left behind
    assert checkpoint.load(path, [b], ("step", "train_seconds")) == {"step": 7, "train_seconds": 1.5}
    np.testing.assert_array_equal(a.weight.asnumpy(), b.weight.asnumpy())
    assert checkpoint.list_checkpoints(str(tmp_path)) == [(7, path)]


def test_unusable_checkpoints_are_one_line_errors(tmp_path):
    path = str(tmp_path / "a.ckpt")
    checkpoint.save(path, [_net(1)], {"step": 1})
    data = open(path, "rb").read()
    cut = str(tmp_path / "cut.ckpt")
    with open(cut, "wb") as fh:
        fh.write(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.ckpt: unreadable"):
        checkpoint.load(cut, [_net(1)], ("step",))
    with pytest.raises(CheckpointError, match=r"weight has shape \(4, 3\), the model needs \(5, 3\)"):
        checkpoint.load(path, [_net(1, out=5)], ("step",))
    with pytest.raises(CheckpointError, match="lacks trainer state epoch"):
        checkpoint.load(path, [_net(1)], ("step", "epoch"))
    with pytest.raises(CheckpointError, match="has 2 parameters this model lacks"):
        checkpoint.load(path, [nn.SequentialCell()], ("step",))
    with pytest.raises(CheckpointError, match="no such file"):
        checkpoint.load(str(tmp_path / "none.ckpt"), [_net(1)], ("step",))
