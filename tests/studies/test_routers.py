import json

import pytest
import yaml

from pangu_moe.studies import routers as study_routers
from pangu_moe.config import ConfigError
from tests.conftest import TINY


def test_study_configs_share_data_steps_and_topology(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    configs = study_routers.study_configs(str(path), 7)
    assert list(configs) == ["topk", "rre", "locmoe", "locmoe_plus"]
    assert [c.moe.router for c in configs.values()] == ["topk", "rre", "locmoe", "locmoe_plus"]
    for cfg in configs.values():
        assert (cfg.moe.num_groups, cfg.parallel.nodes, cfg.parallel.devices_per_node) == (1, 2, 2)
        assert cfg.data.mixture == "by_node" and cfg.train.steps == cfg.train.eval_every == 7
        assert cfg.data == configs["topk"].data and cfg.runtime == configs["topk"].runtime


def test_table_reports_ratios_against_topk():
    row = {"val_bpb": 3.0, "max_over_mean_load": 2.0, "dead_experts": 1, "inter_node_fraction": 0.5,
           "capacity_ratio": 1.1, "dropped_fraction": 0.1, "tokens_per_s": 1000.0, "layer_ms": 10.0, "step_ms": 50.0,
           "expert_rows_per_step": 320.0, "exchange_bytes_per_step": 4e6}
    text = study_routers.table({"topk": row, "locmoe": {**row, "inter_node_fraction": 0.2, "val_bpb": 3.06,
                                                         "layer_ms": 7.0, "exchange_bytes_per_step": 2e6}})
    assert "locmoe vs topk: inter-node x0.40, val_bpb +2.00%, capacity ratio 1.10, layer time x0.70, " \
           "exchange bytes x0.50" in text


def test_the_study_writes_its_report_through_the_report_code(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "study"
    results = study_routers.run(str(path), 2, str(out), log=lambda line: None, routers=("topk", "locmoe"))
    rows = json.loads((out / "report" / "report.json").read_text())["rows"]
    assert [row["run"] for row in rows] == ["topk", "locmoe"]
    for row in rows:
        for field in study_routers.FIELDS:
            assert row[field] == results[row["run"]][field]
    # 2 MoE layers, W = 4 ranks of 32 tokens, E = 4, C = ceil(32 * 1.25 / 4) = 10 (no live capacity), H = 32
    for name, r in results.items():
        assert r["expert_rows_per_step"] == 2 * 4 * 4 * 10
        assert r["exchange_bytes_per_step"] == 2 * 2 * 3 * 4 * 10 * 32 * 4
        assert r["layer_ms"] > 0 and r["step_ms"] == pytest.approx(1e3 * 128 / r["tokens_per_s"])
    figures = sorted(p.name for p in (out / "report").glob("*.png"))
    assert figures == sorted(["loss.png", "routing.png", "load_topk.png", "load_locmoe.png"])
    with pytest.raises(ConfigError, match="--routers: 'moe' is not a study router"):
        study_routers.run(str(path), 2, str(tmp_path / "x"), routers=("moe",))
