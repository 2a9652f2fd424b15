"""`pangu-moe capacity`: the three forms for given values, and a run's measured delta-hat per layer."""
import json

import numpy as np
import pytest

from pangu_moe.cli import main
from pangu_moe.train.trainer import Trainer
from tests.conftest import tiny_config


def test_given_values_match_the_spec_table(capsys):
    # LocMoE's Theorem 1 at d=5120, n=16: delta 0.03 -> 1.97 / 1.97 / 0.63; 0.05 -> 181.5 / 181.9 / 37.9
    assert main(["capacity", "--d", "5120", "--n", "16", "--delta", "0.03", "0.05", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["d"], result["n"]) == (5120, 16)
    got = [[r[f] for f in ("exact", "erfc", "exp")] for r in result["rows"]]
    # The table gives 3 digits (its 1.97 for our exact 1.9648); the forms differ from each other far more.
    np.testing.assert_allclose(got, [[1.97, 1.97, 0.63], [181.5, 181.9, 37.9]], rtol=0.006)


def test_run_uses_the_delta_hat_of_each_layer_and_the_runs_d_and_n(tmp_path, capsys):
    """A run folder written by hand: H = 5120, 32 experts in 2 groups (n = 16), delta-hat 0.03 and 0.05 per layer:
    the spec table's values."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tiny_config("model.hidden=5120", "model.num_heads=2", "moe.num_experts=32", "moe.num_groups=2").save(
        str(run_dir / "config.yaml"))
    (run_dir / "summary.json").write_text(json.dumps({"delta_hat": [0.03, 0.05]}))
    assert main(["capacity", "--run", str(run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["d"], result["n"]) == (5120, 16) and [r["delta"] for r in result["rows"]] == [0.03, 0.05]
    np.testing.assert_allclose([r["exact"] for r in result["rows"]], [1.965, 181.5], rtol=0.002)
    assert main(["capacity", "--run", str(run_dir)]) == 0
    assert capsys.readouterr().out.count("\n") == 2 + 2 + 1  # title, header, one row per layer, formulas


def test_a_locmoe_bound_run_records_the_delta_hat_the_command_reads(tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = tiny_config("moe.router=locmoe", "moe.capacity_mode=locmoe_bound", "train.steps=2", "train.eval_every=2",
                      "train.checkpoint_every=2", "runtime.mode=pynative")
    summary = Trainer(cfg, str(run_dir), log=lambda line: None).train()
    assert main(["capacity", "--run", str(run_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["d"], result["n"]) == (32, 2)  # tiny: H = 32, 4 experts in 2 groups
    assert [r["delta"] for r in result["rows"]] == summary["delta_hat"] and len(summary["delta_hat"]) == 2


@pytest.mark.parametrize("argv,message", [
    (["--d", "64", "--n", "4", "--delta", "1.0"], "--delta = 1.0: must be in [0, 1)"),
    (["--d", "64", "--delta", "0.1"], "pass --d D --n N --delta X"),
    (["--d", "1", "--n", "4", "--delta", "0.1"], "need d >= 2 and n >= 1"),
    (["--run", "nowhere"], "--run nowhere: summary.json not found"),
    (["--run", "nowhere", "--delta", "0.1"], "either --run RUN_DIR or --d, --n and --delta"),
])
def test_bad_arguments_are_one_line(argv, message, capsys):
    assert main(["capacity", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_run_without_delta_hat_says_which_runs_have_it(tmp_path, capsys):
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "config.yaml").write_text("")
    assert main(["capacity", "--run", str(tmp_path)]) == 2
    assert "only runs with moe.capacity_mode=locmoe_bound" in capsys.readouterr().err
