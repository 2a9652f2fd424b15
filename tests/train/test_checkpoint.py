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


class _Experts(nn.Cell):
    def __init__(self, experts, value):
        super().__init__()
        self.w_in = ms.Parameter(ms.Tensor(np.full((experts, 2), value, np.float32)), name="w_in")


class _Layer(nn.Cell):
    def __init__(self, experts, value):
        super().__init__()
        self.experts = _Experts(experts, value)


class _Shard(nn.Cell):
    """A shared weight plus `layer.experts.w_in` with `experts` rows (an expert parameter by its name)."""

    def __init__(self, experts, value):
        super().__init__()
        self.shared = ms.Parameter(ms.Tensor(np.arange(3, dtype=np.float32)), name="shared")
        self.layer = _Layer(experts, value)


def test_sharded_checkpoint_loads_per_rank_or_joined(tmp_path):
    folder = checkpoint.step_path(str(tmp_path), 4, sharded=True)
    for rank in (1, 0):  # one process plays both ranks; rank 0 writes the manifest after the barrier
        checkpoint.save_sharded(folder, [_Shard(1, float(rank))], {"step": 4}, rank, [[0], [1]], lambda: None)
    assert sorted(os.listdir(folder)) == ["experts_rank0.ckpt", "experts_rank1.ckpt", "manifest.json", "shared.ckpt"]
    assert checkpoint.list_checkpoints(str(tmp_path)) == [(4, folder)]
    one = _Shard(1, -1.0)
    assert checkpoint.load(folder, [one], ("step",), rank=1, world_size=2) == {"step": 4}
    np.testing.assert_array_equal(one.layer.experts.w_in.asnumpy(), [[1.0, 1.0]])
    joined = _Shard(2, -1.0)
    checkpoint.load(folder, [joined], ("step",))
    np.testing.assert_array_equal(joined.layer.experts.w_in.asnumpy(), [[0.0, 0.0], [1.0, 1.0]])
    with pytest.raises(CheckpointError, match="written by 2 ranks, this run has 4"):
        checkpoint.load(folder, [_Shard(1, 0.0)], ("step",), rank=1, world_size=4)
    os.remove(os.path.join(folder, "manifest.json"))  # an interrupted save: not listed, refused
    assert checkpoint.list_checkpoints(str(tmp_path)) == []
    with pytest.raises(CheckpointError, match="no manifest.json"):
        checkpoint.load(folder, [joined], ("step",))
