"""metrics.jsonl on resume: later records and a partial last line (a kill while writing) are dropped;
a skipped step's non-finite values are written as null."""
import json

from pangu_moe.train.metrics import MetricsLog, read


def test_resume_keeps_complete_records_up_to_the_checkpoint_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5}\n{"step": 3, "loss": 2.0}\n{"step": 4, "lo')
    log = MetricsLog(str(path), keep_until_step=2)
    assert read(path) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}]
    log.write({"step": 3, "loss": float("nan"), "layers": [{"x": float("inf"), "n": 1}]})
    assert json.loads(path.read_text().splitlines()[-1]) == {"step": 3, "loss": None, "layers": [{"x": None, "n": 1}]}
    MetricsLog(str(path))  # a fresh run starts an empty log
    assert not path.exists()
