import json
import os
import re

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
    checkpoint.save(path, [a], {"step": 7, "train_seconds": 1.5}, "c0ffee")
    assert os.listdir(tmp_path / "checkpoints") == ["step_000007"]
    assert sorted(os.listdir(path)) == ["manifest.json", "shared.ckpt"]  # no expert parameters; no temp files
    assert checkpoint.load(path, [b], ("step", "train_seconds")) == {"step": 7, "train_seconds": 1.5}
    np.testing.assert_array_equal(a.weight.asnumpy(), b.weight.asnumpy())
    assert checkpoint.list_checkpoints(str(tmp_path)) == [(7, path)]
    manifest = checkpoint.verify(path)
    assert manifest["step"] == 7 and manifest["config_sha256"] == "c0ffee" and manifest["shards"] == []
    mode = os.stat(os.path.join(path, "shared.ckpt")).st_mode & 0o777  # the run's other files' mode, not 0400
    assert mode == os.stat(os.path.join(path, "manifest.json")).st_mode & 0o777 and mode & 0o600 == 0o600


def test_a_safetensors_checkpoint_round_trips_and_a_flipped_bit_is_refused(tmp_path):
    folder = checkpoint.step_path(str(tmp_path), 2)
    checkpoint.save(folder, [_Shard(2, 3.0)], {"step": 2}, "x", file_format="safetensors")
    assert sorted(os.listdir(folder)) == ["experts_rank0.safetensors", "manifest.json", "shared.safetensors"]
    back = _Shard(2, 0.0)
    assert checkpoint.load(folder, [back], ("step",)) == {"step": 2}
    np.testing.assert_array_equal(back.layer.experts.w_in.asnumpy(), np.full((2, 2), 3.0))
    shard = os.path.join(folder, "experts_rank0.safetensors")
    data = bytearray(open(shard, "rb").read())
    data[-3] ^= 0x01
    open(shard, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="experts_rank0.safetensors does not match its sha256"):
        checkpoint.load(folder, [_Shard(2, 0.0)], ("step",))


def test_truncated_or_bit_flipped_files_are_detected_and_resume_falls_back(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(checkpoint.step_path(str(tmp_path), step), [_Shard(2, float(step))], {"step": step}, "x")
    newest, middle = checkpoint.step_path(str(tmp_path), 3), checkpoint.step_path(str(tmp_path), 2)
    shard = os.path.join(newest, "experts_rank0.ckpt")
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0x10  # one bit
    open(shard, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="experts_rank0.ckpt does not match its sha256"):
        checkpoint.load(newest, [_Shard(2, 0.0)], ("step",))
    shared = os.path.join(middle, "shared.ckpt")
    data = open(shared, "rb").read()
    open(shared, "wb").write(data[:-7])
    with pytest.raises(CheckpointError, match=r"shared.ckpt has \d+ bytes, the manifest says \d+ \(truncated"):
        checkpoint.verify(middle)
    skipped = []
    assert checkpoint.newest_valid(str(tmp_path), skipped.append) == (1, checkpoint.step_path(str(tmp_path), 1))
    assert len(skipped) == 2 and "step_000003" in skipped[0] and "step_000002" in skipped[1]
    # --checkpoint RUN_DIR stands for the newest valid checkpoint; a checkpoint folder stands for itself
    assert checkpoint.resolve(str(tmp_path)) == checkpoint.step_path(str(tmp_path), 1)
    assert checkpoint.resolve(newest) == newest
    os.remove(os.path.join(checkpoint.step_path(str(tmp_path), 1), "shared.ckpt"))
    with pytest.raises(CheckpointError,
                       match="--resume: no valid checkpoint in .*step_000003: experts_rank0.ckpt does not match"):
        checkpoint.newest_valid(str(tmp_path))
    with pytest.raises(CheckpointError, match="--checkpoint: no valid checkpoint in"):
        checkpoint.resolve(str(tmp_path))


def test_non_finite_parameters_are_never_written(tmp_path):
    net = _net(1)
    net.weight.set_data(ms.Tensor(np.full((4, 3), np.nan, np.float32)))
    folder = checkpoint.step_path(str(tmp_path), 1)
    with pytest.raises(FloatingPointError, match="weight holds non-finite values"):
        checkpoint.save(folder, [net], {"step": 1}, "x")
    assert not os.path.exists(folder)


def test_a_manifest_naming_a_missing_or_duplicated_expert_is_rejected(tmp_path):
    folder = checkpoint.step_path(str(tmp_path), 4)
    for rank in (1, 0):
        checkpoint.save(folder, [_Shard(1, float(rank))], {"step": 4}, "x", rank, [[0], [1]], lambda: None)
    manifest_path = os.path.join(folder, "manifest.json")
    manifest = json.loads(open(manifest_path).read())
    for experts, problem in (([0, 0], "duplicated [0]"), ([0, 2], "missing [1]"),
                             ([0], "experts_rank1.ckpt holds 1 experts of layer.experts.w_in, its manifest entry "
                                   "lists 0")):
        broken = json.loads(json.dumps(manifest))
        broken["shards"][1]["experts"] = experts[1:]
        broken["shards"][0]["experts"] = experts[:1]
        open(manifest_path, "w").write(json.dumps(broken))
        with pytest.raises(CheckpointError, match=re.escape(problem)):
            checkpoint.load(folder, [_Shard(2, 0.0)], ("step",))


def test_unusable_checkpoints_are_one_line_errors(tmp_path):
    path = str(tmp_path / "a.ckpt")
    checkpoint.save_file(path, [_net(1)], {"step": 1})
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
    folder = checkpoint.step_path(str(tmp_path), 4)
    for rank in (1, 0):  # one process plays both ranks; rank 0 writes the manifest after the barrier
        checkpoint.save(folder, [_Shard(1, float(rank))], {"step": 4}, "x", rank, [[0], [1]], lambda: None)
    assert sorted(os.listdir(folder)) == ["experts_rank0.ckpt", "experts_rank1.ckpt", "manifest.json", "shared.ckpt"]
    assert checkpoint.list_checkpoints(str(tmp_path)) == [(4, folder)]
    one = _Shard(1, -1.0)
    assert checkpoint.load(folder, [one], ("step",), rank=1, world_size=2) == {"step": 4}
    np.testing.assert_array_equal(one.layer.experts.w_in.asnumpy(), [[1.0, 1.0]])
    joined = _Shard(2, -1.0)
    checkpoint.load(folder, [joined], ("step",))
    np.testing.assert_array_equal(joined.layer.experts.w_in.asnumpy(), [[0.0, 0.0], [1.0, 1.0]])
    with pytest.raises(CheckpointError, match="holds 2 expert shards, this run has 4 ranks"):
        checkpoint.load(folder, [_Shard(1, 0.0)], ("step",), rank=1, world_size=4)
    shard1 = os.path.join(folder, "experts_rank1.ckpt")
    intact = open(shard1, "rb").read()
    assert intact.count(b"\x00\x00\x80\x3f") == 2  # its two weights, 1.0 in float32
    # a rank's own shard with a weight changed after the save (same size, still readable): refused on the per-rank
    # load too
    open(shard1, "wb").write(intact.replace(b"\x00\x00\x80\x3f", b"\x00\x00\x00\x40"))
    with pytest.raises(CheckpointError, match="experts_rank1.ckpt does not match its sha256"):
        checkpoint.load(folder, [_Shard(1, 0.0)], ("step",), rank=1, world_size=2)
    checkpoint.load(folder, [_Shard(1, 0.0)], ("step",), rank=0, world_size=2)  # rank 0 reads only its own shard
    open(shard1, "wb").write(intact)
    os.remove(os.path.join(folder, "manifest.json"))  # an interrupted save: not listed, refused
    assert checkpoint.list_checkpoints(str(tmp_path)) == []
    with pytest.raises(CheckpointError, match="no manifest.json"):
        checkpoint.load(folder, [joined], ("step",))
