import json

import pytest

from pangu_moe.analysis import plan
from pangu_moe.config import ConfigError
from tests.conftest import tiny_config


def _fake_run(path, inter, nodes=2):
    path.mkdir()
    tiny_config(f"parallel.nodes={nodes}").save(str(path / "config.yaml"))
    summary = {"steps": 10, "inter_node_fraction": inter, "tokens_local": 600, "tokens_intra": 0,
               "tokens_inter": 200}
    (path / "summary.json").write_text(json.dumps(summary))


def test_plan_reads_a_study_folder_and_reports_reductions(tmp_path, monkeypatch):
    _fake_run(tmp_path / "topk", 0.5)
    _fake_run(tmp_path / "locmoe", 0.25)
    preference, tokens, hidden = plan.run_profile(str(tmp_path / "locmoe"))
    assert preference == pytest.approx(0.5) and tokens == 800 / (10 * 2 * 2) and hidden == 32
    result = plan.run([str(tmp_path)], devices=(64,), tokens=4096, hidden=1024)
    ms = {r["router"]: r["ms"] for r in result["rows"]}
    assert ms["locmoe"] < ms["topk"]
    assert result["own_scale"] == []  # these summaries predate the modelled step time
    # The reduction against a stand-in exchange model: 2 ms + 10 ms x (1 - preference); topk's inter-node half is
    # what random routing gives on 2 nodes (preference 0): 12 ms against 7 ms, a reduction of 5 / 12.
    monkeypatch.setattr(plan, "exchange_seconds", lambda tokens, hidden, width, preference, *rest: {
        "seconds": 0.002 + 0.010 * (1 - preference), "inter_fraction": 0.0})
    result = plan.run([str(tmp_path)], devices=(64,), tokens=4096, hidden=1024)
    assert {r["router"]: r["ms"] for r in result["rows"]} == pytest.approx({"topk": 12.0, "locmoe": 7.0})
    assert result["reductions"] == pytest.approx({"locmoe_vs_topk@64": 5 / 12})


def test_plan_reports_each_runs_modelled_step_at_its_own_scale(tmp_path):
    _fake_run(tmp_path / "topk", 0.5)
    summary = json.loads((tmp_path / "topk" / "summary.json").read_text())
    summary.update(modelled_step_s=0.5, modelled_exchange_s_per_step=0.002)
    (tmp_path / "topk" / "summary.json").write_text(json.dumps(summary))
    result = plan.run([str(tmp_path)], devices=(64,))
    assert result["own_scale"] == [{"router": "topk", "modelled_step_s": 0.5, "modelled_exchange_s_per_step": 0.002}]
    assert "topk at its own scale: step 0.500 s = measured compute + 2.000 ms of exchange" in plan.table(result)


def test_plan_refuses_runs_without_locality_information(tmp_path):
    _fake_run(tmp_path / "one", 0.0, nodes=1)
    with pytest.raises(ConfigError, match="parallel.nodes = 1"):
        plan.run([str(tmp_path / "one")])
    with pytest.raises(ConfigError, match="no summary.json"):
        plan.run([str(tmp_path / "missing")])
    with pytest.raises(ConfigError, match="--cluster 'dgx'"):
        plan.run([str(tmp_path)], cluster="dgx")


def test_plan_models_fewer_experts_than_nodes_and_lists_impossible_layouts(tmp_path):
    _fake_run(tmp_path / "topk", 0.5)
    # atlas800: 8 devices a node. E = 4 at 64 devices (8 nodes): each expert spans 16 devices, 2 nodes.
    result = plan.run([str(tmp_path)], devices=(64, 48), tokens=4096, hidden=1024, experts=4)
    (row,) = result["rows"]
    assert row["devices"] == 64 and row["inter_fraction"] == pytest.approx(0.75)  # lambda 0: 3 of 4 experts away
    assert result["impossible"] == [{"devices": 48, "why": "E = 4 experts on W = 48 devices: impossible, an "
                                                           "expert's 12 devices would straddle two nodes of 8"}]
    assert "48 devices: E = 4 experts" in plan.table(result)
    grouped = plan.run([str(tmp_path)], devices=(64,), tokens=4096, hidden=1024, tensor_parallel=2)
    assert grouped["rows"][0]["ms"] < plan.run([str(tmp_path)], devices=(64,), tokens=4096, hidden=1024)["rows"][0]["ms"]
