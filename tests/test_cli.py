import json

import pytest

from pangu_moe.cli import main
from tests.conftest import TINY


def test_bad_config_is_one_line_without_traceback(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("moe:\n  top_k: 0\n")
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == "pangu-moe train: error: moe.top_k = 0: must be >= 1\n"


def test_missing_corpus_is_one_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  source: jsonl\n  path: {tmp_path / 'nope.jsonl'}\n")
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.jsonl: no such file" in err


def test_config_show_prints_resolved_yaml(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 50\n")
    assert main(["config", "--show", str(path), "--set", "moe.top_k=2"]) == 0
    out = capsys.readouterr().out
    assert "steps: 50" in out and "top_k: 2" in out and "capacity_factor: 1.25" in out


def test_eval_reproduces_the_final_validation_loss(tmp_path, capsys):
    import yaml
    cfg = dict(TINY, train=dict(TINY["train"], steps=2, warmup_steps=1, checkpoint_every=2, eval_every=2))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    assert main(["train", "--config", str(path), "--out", str(run)]) == 0
    printed = capsys.readouterr()
    assert printed.out == f"summary: {run / 'summary.json'}\n"  # stdout holds no progress lines
    assert "step     2/2" in printed.err and "done: val_bpb" in printed.err
    summary = json.loads((run / "summary.json").read_text())
    assert main(["eval", "--checkpoint", str(run / "checkpoints" / "step_000002")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 2
    assert result["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-6)


def test_eval_of_missing_checkpoint_is_one_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 50\n")
    assert main(["eval", "--checkpoint", str(tmp_path / "x.ckpt"), "--config", str(path)]) == 2
    assert "x.ckpt: no such file" in capsys.readouterr().err


def test_resume_without_checkpoints_and_rerun_into_a_used_run_dir(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 50\n")
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert capsys.readouterr().err.strip().endswith("no checkpoints in " + str(tmp_path / "empty") + "/checkpoints")
    used = tmp_path / "used" / "checkpoints" / "step_000010"
    used.mkdir(parents=True)
    (used / "manifest.json").write_text("{}")
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "used")]) == 2
    assert "already holds checkpoints (up to step 10); pass --resume" in capsys.readouterr().err


def test_a_signalled_stop_exits_with_the_signals_code_and_prints_the_resume_line(tmp_path, capsys, monkeypatch):
    import signal
    from pangu_moe.train import trainer
    from pangu_moe.train.stop import TrainingStopped

    def stop(self, resume=False):
        raise TrainingStopped(signal.SIGINT, 7, "RUN/checkpoints/step_000007", "HINT")
    monkeypatch.setattr(trainer.Trainer, "__init__", lambda self, *args, **kwargs: None)
    monkeypatch.setattr(trainer.Trainer, "train", stop)
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 50\n")
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 130
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == ("pangu-moe train: stopped by SIGINT after step 7: checkpoint RUN/checkpoints/step_000007; "
                            "resume with: HINT\n")


def test_a_sigterm_stop_says_it_may_have_been_a_ctrl_c():
    import signal
    from pangu_moe.train.stop import TrainingStopped
    stop = TrainingStopped(signal.SIGTERM, 3, "CKPT", "HINT")
    assert stop.exit_code == 143
    assert str(stop) == ("stopped by SIGTERM (or Ctrl-C, which MindSpore passes on as SIGTERM) after step 3: checkpoint "
                         "CKPT; resume with: HINT")
