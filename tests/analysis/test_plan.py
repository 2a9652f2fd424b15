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


def test_plan_gives_a_placed_runs_break_even_on_its_own_links(tmp_path):
    from pangu_moe.accounting.cost import Links, modelled_exchange_seconds
    from pangu_moe.dispatch.topology import Topology
    cfg = tiny_config("parallel.nodes=2", "moe.num_groups=1")  # 2 ranks on 2 nodes, experts 0, 1 | 2, 3
    # every rank asks only for the other node's experts; after step 5 they live where they are asked for
    layer = {"tokens_per_rank_expert": [[0, 0, 8, 8], [8, 8, 0, 0]], "capacity": 16}
    records = [{"step": s, "loss": 1.0, "layers": [layer, layer]} for s in range(1, 11)]

    def write(run_dir, ranks):
        run_dir.mkdir()
        cfg.save(str(run_dir / "config.yaml"))
        records[4]["placements"] = [{"step": 5, "expert_rank": [ranks, ranks], "moved": [4, 4],
                                     "move_bytes_intra": 0, "move_bytes_inter": 4_000_000}]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return plan.placement_payback(str(run_dir))

    got = write(tmp_path / "moved", [1, 1, 0, 0])
    assert got["move_s"] == 4_000_000 / (cfg.parallel.inter_node_gbps * 1e9)  # 0.2 ms at 20 GB/s
    links = Links.from_config(cfg.parallel)
    per_layer = [modelled_exchange_seconds(layer["tokens_per_rank_expert"], 16, topology, 32, 4, links)
                 for topology in (Topology(2, 1, 4), Topology(2, 1, 4, (2, 3, 0, 1)))]
    assert per_layer[1] < per_layer[0]  # nothing crosses after the move
    assert got["saved_s_per_step"] == pytest.approx(2 * (per_layer[0] - per_layer[1]), rel=1e-12)
    assert got["break_even_steps"] == pytest.approx(got["move_s"] / got["saved_s_per_step"], rel=1e-12)
    same = write(tmp_path / "unmoved", [0, 0, 1, 1])  # an event that kept the contiguous map
    assert same["saved_s_per_step"] == 0.0 and same["break_even_steps"] is None
    records[4].pop("placements")
    (tmp_path / "never").mkdir()
    cfg.save(str(tmp_path / "never" / "config.yaml"))
    (tmp_path / "never" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert plan.placement_payback(str(tmp_path / "never")) is None
    summary = {"steps": 10, "inter_node_fraction": 0.5, "tokens_local": 600, "tokens_intra": 0, "tokens_inter": 200,
               "modelled_step_s": 0.5, "modelled_exchange_s_per_step": 0.002}
    (tmp_path / "moved" / "summary.json").write_text(json.dumps(summary))
    table = plan.table(plan.run([str(tmp_path / "moved")], devices=(64,)))
    assert f"break-even after {got['break_even_steps']:.0f} steps (modelled)" in table


def test_a_placed_runs_steps_before_its_first_move_run_on_its_starting_map(tmp_path):
    placed = tiny_config("parallel.nodes=2", "moe.num_groups=1", "parallel.placement=[1, 1, 0, 0]")
    layer = {"tokens_per_rank_expert": [[0, 0, 8, 8], [8, 8, 0, 0]], "capacity": 16}
    records = [{"step": s, "loss": 1.0, "layers": [layer]} for s in range(1, 11)]
    # a placement after step 9 that keeps the starting map: steps 9 and 10 both ran on it, all local
    records[8]["placements"] = [{"step": 9, "expert_rank": [[1, 1, 0, 0]], "moved": [0], "move_bytes_intra": 0,
                                 "move_bytes_inter": 0}]
    run_dir = tmp_path / "started_placed"
    run_dir.mkdir()
    placed.save(str(run_dir / "config.yaml"))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    records[8]["placements"][0]["step"] = 8  # the same map in force from step 9 on through an event
    (tmp_path / "event").mkdir()
    placed.save(str(tmp_path / "event" / "config.yaml"))
    (tmp_path / "event" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    started = plan.placement_payback(str(run_dir))["saved_s_per_step"]
    assert started > 0 and started == plan.placement_payback(str(tmp_path / "event"))["saved_s_per_step"]
