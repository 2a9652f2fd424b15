import json

import pytest

from pangu_moe.studies import routers as study_routers
from pangu_moe.config import ConfigError
from pangu_moe.train.metrics import read


def test_study_configs_share_data_steps_and_topology(tiny_yaml):
    configs = study_routers.study_configs(tiny_yaml, 7, seed=5, mu=0.01)
    assert list(configs) == ["dense", "rre", "topk", "topk_k2", "locmoe_mu0", "locmoe_mu0.001", "locmoe_mu0.01", "locmoe_mu0.1",
                             "locmoe_plus_tcr", "locmoe_plus_ecr", "locmoe_plus_hybrid"]
    assert configs["dense"].moe.num_experts == 1 and configs["topk"].moe.num_experts == 4
    assert configs["topk_k2"].moe.top_k == 2 and configs["topk"].moe.top_k == 1
    assert [configs[f"locmoe_mu{m:g}"].moe.locmoe.locality_coeff for m in study_routers.MUS] == [0, 0.001, 0.01, 0.1]
    assert [configs[f"locmoe_plus_{r}"].moe.locmoe_plus.keep_rule for r in ("tcr", "ecr", "hybrid")] == \
        ["tcr", "ecr", "hybrid"]
    assert configs["locmoe_plus_ecr"].moe.locmoe_plus.locality_coeff == 0.01
    assert configs["locmoe_plus_hybrid"].moe.locmoe_plus.switch_step == 3
    for cfg in configs.values():
        assert (cfg.moe.num_groups, cfg.parallel.nodes, cfg.parallel.devices_per_node) == (1, 2, 2)
        assert cfg.data.mixture == "by_node" and cfg.train.steps == cfg.train.eval_every == 7
        assert cfg.data == configs["topk"].data and cfg.runtime == configs["topk"].runtime
        assert cfg.runtime.seed == 5


def _figures(bpb, dropped, inter):
    return {"val_bpb": bpb, "dropped_fraction": dropped, "inter_node_fraction": inter}


def test_choose_mu_takes_the_most_local_mu_that_drops_no_more_than_switch():
    per_arm = {"topk": [_figures(3.0, 0.20, 0.50)] * 2,
               "locmoe_mu0": [_figures(3.0, 0.18, 0.45)] * 2,
               "locmoe_mu0.001": [_figures(3.05, 0.19, 0.40)] * 2,
               "locmoe_mu0.01": [_figures(3.2, 0.19, 0.30)] * 2,   # val bpb 6.7% worse: out
               "locmoe_mu0.1": [_figures(3.0, 0.45, 0.20)] * 2}    # drops more than Switch: out
    assert study_routers.choose_mu(per_arm)[0] == 0.001
    # A drop rate above Switch's by less than its seeds' spread still counts as at most Switch's.
    per_arm["topk"] = [_figures(3.0, 0.175, 0.50), _figures(3.0, 0.211, 0.49), _figures(3.0, 0.183, 0.49)]
    per_arm["locmoe_mu0.01"] = [_figures(3.0, 0.209, 0.25), _figures(3.0, 0.207, 0.25), _figures(3.0, 0.154, 0.25)]
    per_arm["locmoe_mu0"] = per_arm["locmoe_mu0.001"] = [_figures(3.0, 0.18, 0.45)] * 3
    per_arm["locmoe_mu0.1"] = [_figures(3.0, 0.45, 0.20)] * 3
    assert study_routers.choose_mu(per_arm)[0] == 0.01  # mean 0.1900 against 0.1897
    per_arm["locmoe_mu0"] = per_arm["locmoe_mu0.001"] = per_arm["locmoe_mu0.01"] = [_figures(3.0, 0.3, 0.1)] * 3
    mu, why = study_routers.choose_mu(per_arm)
    assert mu == 0.0 and why.startswith("no mu kept the drop rate")


def _run(bpb, dropped):
    balance = {f: {"worst_rank": dropped * 2, "mean_over_ranks": dropped, "per_rank": []}
               for f in study_routers.RANK_FIELDS}
    return {**{f: 1.0 for f in (*study_routers.FIELDS, *study_routers.COST_FIELDS, *study_routers.CAPACITY_FIELDS)},
            "val_bpb": bpb,
            "dropped_fraction": dropped, "rank_balance": balance, "rank_balance_last": balance}


def test_aggregate_pairs_every_arm_with_switch_by_seed():
    per_arm = {"topk": [_run(3.0, 0.2), _run(3.5, 0.2), _run(4.0, 0.2)],
               "dense": [_run(2.9, 0.0), _run(3.4, 0.0), _run(3.9, 0.0)]}  # 0.1 better on every seed
    got = study_routers.aggregate(per_arm)["dense"]
    assert got["val_bpb"]["mean"] == pytest.approx(3.4) and got["val_bpb"]["ci95"] > 1.0  # the seeds spread widely
    assert got["val_bpb_vs_switch"]["mean"] == pytest.approx(-0.1)
    assert got["val_bpb_vs_switch"]["ci95"] == pytest.approx(0.0, abs=1e-12)  # paired: no spread left
    assert got["dropped_vs_switch"]["mean"] == pytest.approx(-0.2)
    assert got["rank_balance_drop_rate_worst_rank"]["mean"] == 0.0
    assert study_routers.aggregate(per_arm)["topk"]["rank_balance_last_drop_rate_worst_rank"]["mean"] == \
        pytest.approx(0.4)
    text = study_routers.table({"steps": 5, "seeds": 3, "seconds": 60.0, "mu": 0.01, "mu_why": "test",
                                "arms": study_routers.aggregate(per_arm)})
    assert "dense" in text and "-0.100±0.000" in text


def test_the_study_trains_every_arm_per_seed_and_writes_its_report(tiny_yaml, tmp_path):
    out = tmp_path / "study"
    result = study_routers.run(tiny_yaml, 2, str(out), seeds=2, log=lambda line: None,
                               arms=("dense", "topk"))
    assert result["steps"] == 2 and result["seeds"] == 2 and result["mu"] is None
    assert list(result["arms"]) == ["dense", "topk"]
    saved = json.loads((out / "study.json").read_text())
    assert saved["arms"] == json.loads(json.dumps(result["arms"]))
    for arm, runs in result["runs"].items():
        assert len(runs) == 2 and (out / arm / "seed1" / "summary.json").exists()
        assert result["arms"][arm]["val_bpb"]["mean"] == pytest.approx(sum(r["val_bpb"] for r in runs) / 2)
        assert result["arms"][arm]["val_bpb"]["ci95"] is not None
    seed_bpb = [r["val_bpb"] for r in result["runs"]["topk"]]
    assert seed_bpb[0] != seed_bpb[1]  # the seeds differ
    assert result["arms"]["topk"]["val_bpb_vs_switch"] == {"mean": 0.0, "ci95": 0.0, "n": 2}
    rows = json.loads((out / "report" / "report.json").read_text())["rows"]
    assert [row["run"] for row in rows] == ["dense", "topk"]
    # 2 MoE layers, W = 4 ranks of 32 tokens, E = 4, C = ceil(32 * 1.25 / 4) = 10 (no live capacity), H = 32:
    # E x C = 40 expert rows a rank, 160 a layer (the dense arm's one expert: C = min(T, 40) = 32 rows a rank, 128 a
    # layer).
    # Switch's padded exchange against another count: each step's metrics (accounting/traffic.py, per pair of
    # ranks, both directions), summed over the layers. The dense arm's one expert: the 3 other ranks' 32 rows of
    # 128 bytes to its rank and back, in 2 layers.
    for arm, experts, capacity in (("topk", 4, 10), ("dense", 1, 32)):
        for seed, r in enumerate(result["runs"][arm]):
            assert r["expert_rows_per_step"] == {"topk": 320, "dense": 256}[arm]
            records = read(out / arm / f"seed{seed}" / "metrics.jsonl")
            counted = {sum(layer["padded_bytes_intra"] + layer["padded_bytes_inter"] for layer in rec["layers"])
                       for rec in records}
            assert len(counted) == 1  # one capacity, one padded size at every step
            assert r["exchange_bytes_per_step"] == (counted.pop() if arm == "topk" else 3 * 32 * 128 * 2 * 2) > 0
            assert r["layer_ms"] > 0 and r["step_ms"] == pytest.approx(1e3 * 128 / r["tokens_per_s"])
            assert r["capacity_first"] == r["capacity_last"] == capacity
    assert result["runs"]["dense"][0]["dropped_fraction"] == 0.0
    worst = result["runs"]["topk"][0]["rank_balance"]["drop_rate"]
    assert worst["worst_rank"] == max(worst["per_rank"]) and len(worst["per_rank"]) == 4
    with pytest.raises(ConfigError, match="--arms: 'moe' is not a study arm"):
        study_routers.run(tiny_yaml, 2, str(tmp_path / "x"), arms=("moe",))


def test_budget_steps_fit_the_runs_in_the_wall_time():
    # 30 runs in 60 min: 120 s a run, 20 s of it overhead, 0.5 s a step -> 200 steps
    assert study_routers.budget_steps(60, 30, 0.5, 20.0) == 200
    assert study_routers.budget_steps(1, 30, 0.5, 20.0) == 10  # too short a budget still trains 10 steps
