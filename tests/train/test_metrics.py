"""metrics.jsonl on resume: later records and a partial last line (a kill while writing) are dropped;
a skipped step's non-finite values are written as null."""
import json
import math
import sys

from pangu_moe.train.metrics import MetricsLog, TensorBoardLog, read, tensorboard_scalars


def test_resume_keeps_complete_records_up_to_the_checkpoint_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n{"step": 3, "loss": 2.0}\n{"step": 4, "lo')
    log = MetricsLog(str(path), keep_until_step=2)
    assert read(path) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}]
    log.write({"step": 3, "loss": float("nan"), "layers": [{"x": float("inf"), "n": 1}]})
    assert json.loads(path.read_text().splitlines()[-1]) == {"step": 3, "loss": None, "layers": [{"x": None, "n": 1}]}
    MetricsLog(str(path))  # a fresh run starts an empty log
    assert not path.exists()


def read_events(folder):
    """{tag: [(step, value)]} of the scalar events in a TensorBoard folder (TFRecord: length, crc, event, crc)."""
    import os
    import struct
    from tensorboardX.proto.event_pb2 import Event
    scalars = {}
    for name in sorted(os.listdir(folder)):
        data = open(os.path.join(folder, name), "rb").read()
        at = 0
        while at < len(data):
            length, = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


RECORD = {"step": 5, "loss": 2.0, "lm_loss": math.log(2) * 3, "aux_loss": 0.01, "z_loss": 0.002, "locality_loss": 0.0,
          "lr": 1e-3, "tokens_per_s": 100.0, "grad_norm": float("nan"), "val_bpb": 2.5,
          "layers": [{"tokens_per_expert": [6, 2], "dropped": 2, "tokens_local": 3, "tokens_intra": 1,
                      "tokens_inter": 2, "capacity": 4, "max_over_mean_load": 1.5},
                     {"tokens_per_expert": [4, 4], "dropped": 0, "tokens_local": 8, "tokens_intra": 0,
                      "tokens_inter": 0, "capacity": 4, "max_over_mean_load": 1.0}]}


def test_tensorboard_scalars_of_a_hand_made_record():
    assert tensorboard_scalars(RECORD) == {
        "loss/lm_bits_per_token": 3.0, "loss/aux_loss": 0.01, "loss/z_loss": 0.002, "loss/locality_loss": 0.0,
        "train/lr": 1e-3, "train/tokens_per_s": 100.0, "val/bits_per_byte": 2.5,  # the NaN gradient norm left out
        "routing/dropped_fraction": 2 / 16, "routing/inter_node_fraction": 2 / 14,
        "routing/capacity/layer0": 4.0, "routing/max_over_mean_load/layer0": 1.5,
        "routing/capacity/layer1": 4.0, "routing/max_over_mean_load/layer1": 1.0}


def test_tensorboard_events_hold_the_scalars_and_nothing_without_tensorboardx(tmp_path, monkeypatch):
    board = TensorBoardLog.open(str(tmp_path / "run"))
    board.write(RECORD)
    board.close()
    events = read_events(tmp_path / "run" / "tensorboard")
    assert events["val/bits_per_byte"] == [(5, 2.5)] and events["loss/lm_bits_per_token"] == [(5, 3.0)]
    assert set(events) == set(tensorboard_scalars(RECORD))
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if not installed
    assert TensorBoardLog.open(str(tmp_path / "other")) is None and not (tmp_path / "other").exists()
