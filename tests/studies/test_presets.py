"""The claim studies (pangu_moe/studies/presets.py): their arms, verdict rules on synthetic figures with known
answers, the direction probes on hand-made inputs, and one tiny run of each through the CLI with resume."""
import json

import numpy as np
import pytest

from pangu_moe import cli
from pangu_moe.config import ConfigError
from pangu_moe.studies import presets


def test_the_capacity_arms_cut_the_factor_1_1_capacity_and_share_everything_else(tiny_yaml):
    configs = presets.preset_configs(presets.PRESETS["capacity"], tiny_yaml, 7, 3)
    # W = 4 ranks of 32 tokens, E = 4: factor 1.1 -> ceil(35.2 / 4) = 9 slots; 0.66 -> 6; 0.44 -> 4
    from pangu_moe.capacity import expert_capacity
    got = {arm: expert_capacity(32, 4, 1, c.moe.capacity_factor) for arm, c in configs.items()}
    assert got == {"switch_1.1": 9, "ecr_1.0": 9, "ecr_0.6": 6, "ecr_0.4": 4, "tcr_0.4": 4, "switch_0.4": 4}
    for arm, c in configs.items():
        assert c.train.steps == 7 and c.runtime.seed == 3 and c.moe.z_loss_coeff == 0.0
        assert c.data.mixture == "uniform" and c.moe.num_groups == 1 and c.parallel.nodes == 2
        assert c.moe.router == ("topk" if arm.startswith("switch") else "locmoe_plus")
        if c.moe.router == "locmoe_plus":
            plus = c.moe.locmoe_plus
            assert plus.recompute_every == 0 and plus.gate == "learned" and plus.keep_rule == arm[:3]


def _x(mean, half=0.01, n=5):
    return {"mean": mean, "ci95": half, "n": n}


def _result(preset, per_arm):
    """A result from per-arm per-seed figures (lists of dicts)."""
    return presets.summarise(presets.PRESETS[preset], per_arm, 10, len(next(iter(per_arm.values()))))


def _seeds(base, noise=0.0, **figures):
    return [{**base, **{k: v + noise * (i - 2) for k, v in figures.items()}} for i in range(5)]


BASE = {"val_bpb": 3.0, "late_lm_loss": 4.0, "kept_per_expert": 100.0, "max_over_mean_load": 1.5,
        "inter_node_fraction": 0.5, "dropped_fraction": 0.1}


def test_capacity_verdicts_follow_the_margins():
    per_arm = {"switch_1.1": _seeds(BASE, 0.01, val_bpb=3.0, late_lm_loss=4.0),
               "ecr_1.0": _seeds(BASE, 0.01, val_bpb=3.0, late_lm_loss=4.0),
               "ecr_0.6": _seeds(BASE, 0.01, val_bpb=3.05, late_lm_loss=4.05),   # +1.7%, +1.3%: inside 3%
               "ecr_0.4": _seeds(BASE, 0.01, val_bpb=3.2, late_lm_loss=4.05),    # bpb +6.7%: past 3%
               "tcr_0.4": _seeds(BASE, 0.01, val_bpb=3.3, late_lm_loss=4.2),
               "switch_0.4": _seeds(BASE, 0.01, val_bpb=3.2, late_lm_loss=4.1)}
    verdicts = [v["verdict"] for v in _result("capacity", per_arm)["verdicts"]]
    # ecr 0.4 vs tcr 0.4: -0.1 exactly on every seed (interval 0): resolved; vs switch 0.4: 0 +- 0: not resolved
    assert verdicts == ["not reproduced", "reproduced", "reproduced", "not resolved"]


def test_estimator_verdicts_read_the_slope_and_the_probes():
    runs = [{**BASE, "capacity_slope": s, "capacity_first": 141.0, "capacity_last": 100.0, "need_slope": -90.0,
             "need_first": 350.0, "need_last": 320.0, "token_correlation_start": 0.0,
             "token_correlation_end": 0.5 + 0.01 * i, "ch_index_start": 10.0, "ch_index_end": 10.0 + (i - 2)}
            for i, s in enumerate([-10.0, -12.0, -9.0, -11.0, -10.5])]
    rows = _result("estimator", {"ecr": runs})["verdicts"]
    assert [r["verdict"] for r in rows] == ["reproduced", "reproduced", "not resolved"]
    assert "capacity in force slope -10.50" in rows[0]["figure"] and "raw need slope -90.00" in rows[0]["figure"]
    # the raw need falls but the capacity in force stays at the ceiling: no decrease
    flat = [{**r, "capacity_slope": 0.0, "capacity_last": 141.0} for r in runs]
    assert _result("estimator", {"ecr": flat})["verdicts"][0]["verdict"] == "not reproduced"
    mixed = [{**r, "capacity_slope": s} for r, s in zip(runs, [-3.0, 1.0, -2.0, 2.0, -1.0])]  # -0.6 +- 2.8
    assert _result("estimator", {"ecr": mixed})["verdicts"][0]["verdict"] == "not resolved"


def test_locality_null_verdicts():
    per_arm = {"switch": _seeds(BASE, 0.005, inter_node_fraction=0.5, max_over_mean_load=1.5),
               "locmoe_mu0": _seeds(BASE, 0.005, inter_node_fraction=0.5, max_over_mean_load=1.6),
               "locmoe_mu0.001": _seeds(BASE, 0.005, inter_node_fraction=0.51, max_over_mean_load=1.4),
               "locmoe_mu0.003": _seeds(BASE, 0.005, inter_node_fraction=0.51, max_over_mean_load=1.4),
               "locmoe_mu0.01": _seeds(BASE, 0.005, inter_node_fraction=0.40, max_over_mean_load=1.3),
               "locmoe_mu0.03": _seeds(BASE, 0.005, inter_node_fraction=0.30, max_over_mean_load=1.2)}
    verdicts = [(r["claim"], r["verdict"]) for r in _result("locality-null", per_arm)["verdicts"]]
    null = [v for c, v in verdicts if "no locality" in c]
    assert null == ["reproduced", "reproduced", "reproduced", "not reproduced", "not reproduced"]
    balance = [v for c, v in verdicts if "balances" in c]
    assert balance == ["reproduced"] * 4


def test_the_locality_arms_place_domains_by_node_and_the_control_groups_by_node(tiny_yaml):
    configs = presets.preset_configs(presets.PRESETS["locality"], tiny_yaml, 7, 3)
    assert list(configs) == ["switch", "switch_global", "locmoe_mu0.001", "locmoe_mu0.001_global", "locmoe_mu0.01",
                             "locmoe_mu0.01_global", "control_groups_by_node"]
    for arm, c in configs.items():
        assert c.data.mixture == "by_node" and c.moe.capacity_factor == 2.5 and c.moe.z_loss_coeff == 0.0
        assert c.moe.aux_scope == ("global" if arm.endswith("_global") else "rank")
        assert c.moe.num_groups == (2 if arm.startswith("control") else 1)
    assert configs["locmoe_mu0.01_global"].moe.locmoe.locality_coeff == 0.01


def test_locality_verdicts():
    def arm(inter_asked, inter_kept, bpb=3.0):
        return _seeds(BASE, 0.002, inter_node_requested=inter_asked, inter_node_kept=inter_kept, val_bpb=bpb)
    per_arm = {"switch": arm(0.5, 0.5), "switch_global": arm(0.5, 0.5),
               "locmoe_mu0.001": arm(0.49, 0.49), "locmoe_mu0.001_global": arm(0.3, 0.3),
               "locmoe_mu0.01": arm(0.2, 0.2, 3.2), "locmoe_mu0.01_global": arm(0.1, 0.1, 3.05),
               "control_groups_by_node": arm(0.0, 0.0)}
    per_arm["control_groups_by_node"] = [{**r, "inter_node_kept": 0.0} for r in per_arm["control_groups_by_node"]]
    rows = {r["claim"]: r["verdict"] for r in _result("locality", per_arm)["verdicts"]}
    assert rows["Positive control: domain groups placed by node keep every choice on its node"] == "reproduced"
    assert rows["locmoe_mu0.001 requests fewer inter-node choices than switch"] == "reproduced"  # -0.01 exactly
    assert rows["locmoe_mu0.001 moves at most half of switch's inter-node choices"] == "not reproduced"
    assert rows["locmoe_mu0.01_global moves at most half of switch_global's inter-node choices"] == "reproduced"
    assert rows["locmoe_mu0.01 keeps quality (val bpb within 3% of switch's)"] == "not reproduced"
    assert rows["locmoe_mu0.01_global keeps quality (val bpb within 3% of switch_global's)"] == "reproduced"
    # the default-mu rule reads the per-rank arms only: mu 0.01 halves Switch's inter-node choices but its
    # quality is "not reproduced", mu 0.001 does not halve: no mu qualifies
    assert presets.default_mu(_result("locality", per_arm))["mu"] is None
    per_arm["locmoe_mu0.01"] = arm(0.2, 0.2, 3.05)  # within 3%: reproduced
    assert presets.default_mu(_result("locality", per_arm)) == {
        "mu": 0.01, "why": "locmoe_mu0.01: moves at most half of Switch's inter-node choices, val bpb reproduced"}
    # val bpb 0.09 (the 3% margin) above Switch's on average, spread over the seeds: not resolved, still qualifies
    per_arm["locmoe_mu0.01"] = [{**r, "val_bpb": s["val_bpb"] + 0.09 + e} for r, s, e in
                                zip(arm(0.2, 0.2), per_arm["switch"], (-0.05, 0.05, -0.03, 0.03, 0.0))]
    assert presets.default_mu(_result("locality", per_arm)) == {
        "mu": 0.01, "why": "locmoe_mu0.01: moves at most half of Switch's inter-node choices, val bpb not resolved"}
    per_arm["locmoe_mu0.001"] = arm(0.2, 0.2, 3.0)  # the smaller mu qualifies too and is picked
    assert presets.default_mu(_result("locality", per_arm))["mu"] == 0.001


def test_the_placement_arms_differ_only_in_router_and_placement(tiny_yaml):
    configs = presets.preset_configs(presets.PRESETS["placement"], tiny_yaml, 7, 3)
    assert [c.parallel.placement_every for c in configs.values()] == [0, 10, 0, 10]
    assert [c.moe.router for c in configs.values()] == ["topk", "topk", "locmoe", "locmoe"]
    assert configs["locmoe_placed"].moe.locmoe.locality_coeff == 0.01
    assert {c.data.mixture for c in configs.values()} == {"by_node"}


def test_placement_verdicts():
    def arm(inter_kept, bpb=3.0, noise=0.002):
        return _seeds(BASE, noise, inter_node_kept=inter_kept, val_bpb=bpb, late_lm_loss=4.0)
    per_arm = {"switch": arm(0.5), "switch_placed": arm(0.3), "locmoe": arm(0.2), "locmoe_placed": arm(0.1)}
    rows = {r["claim"]: r["verdict"] for r in _result("placement", per_arm)["verdicts"]}
    assert rows == {"switch_placed moves at most 0.7 x switch's inter-node choices": "reproduced",
                    "switch_placed has switch's drops, val bpb and late LM loss, bit for bit": "reproduced",
                    "locmoe_placed moves fewer inter-node choices than locmoe": "reproduced",
                    "locmoe_placed moves fewer inter-node choices than switch_placed": "reproduced",
                    "locmoe_placed keeps quality (val bpb within 3% of switch's)": "reproduced"}
    per_arm["switch_placed"] = arm(0.36)  # 0.72 x switch's
    per_arm["switch_placed"][4]["val_bpb"] += 1e-9  # one seed's val bpb differs in its last digits
    per_arm["locmoe_placed"] = arm(0.25)
    rows = {r["claim"]: r["verdict"] for r in _result("placement", per_arm)["verdicts"]}
    assert rows["switch_placed moves at most 0.7 x switch's inter-node choices"] == "not reproduced"
    assert rows["switch_placed has switch's drops, val bpb and late LM loss, bit for bit"] == "not reproduced"
    assert rows["locmoe_placed moves fewer inter-node choices than locmoe"] == "not reproduced"
    assert rows["locmoe_placed moves fewer inter-node choices than switch_placed"] == "reproduced"


def test_late_figures_read_each_step_on_the_map_it_ran_on():
    from pangu_moe.dispatch.topology import Topology
    # 2 nodes x 1 device, 2 experts; rank 0 asks 6 of expert 0 and 2 of expert 1, rank 1 the reverse
    layer = {"kept_per_expert": [8, 8], "tokens_per_rank_expert": [[6, 2], [2, 6]], "tokens_inter": 4,
             "bytes_inter": 1000}
    records = [{"step": s, "lm_loss": 1.0, "layers": [layer]} for s in range(1, 11)]
    got = presets.late_figures(records, Topology(2, 1, 2))
    assert got["inter_node_requested"] == 0.25 and got["late_inter_node_mb_per_step"] == 0.001
    assert "placement_moves" not in got
    # a placement after step 8 swaps the experts: steps 9 and 10 (the late 20%) ask 12 of 16 across nodes
    records[7]["placements"] = [{"step": 8, "expert_rank": [[1, 0]], "moved": [2], "move_bytes_intra": 0,
                                 "move_bytes_inter": 3_000_000}]
    got = presets.late_figures(records, Topology(2, 1, 2))
    assert got["inter_node_requested"] == 0.75
    assert (got["placement_moves"], got["placement_move_mb"], got["early_inter_node_mb_per_step"]) == (2, 3.0, 0.001)
    records[9]["placements"] = [{"step": 10, "expert_rank": [[0, 1]], "moved": [2], "move_bytes_intra": 0,
                                 "move_bytes_inter": 3_000_000}]  # after the last step: reads no step
    assert presets.late_figures(records, Topology(2, 1, 2))["inter_node_requested"] == 0.75


def test_direction_probes_on_hand_made_inputs():
    same = np.ones((2, 3, 4))
    assert presets.token_correlation(same) == pytest.approx(1.0)
    orthogonal = np.eye(3)[None].repeat(2, 0)  # (B=2, S=3, H=3): tokens of a sequence are orthogonal
    assert presets.token_correlation(orthogonal) == pytest.approx(0.0)
    # two clusters at 0 and 10 on one axis, 2 points each at +-1: between = 4 * 25 = 100 over k - 1 = 1,
    # within = 4 over n - k = 2: CH = 100 / 2 = 50
    x = np.array([[-1.0], [1.0], [9.0], [11.0]])
    assert presets.calinski_harabasz(x, np.array([0, 0, 1, 1])) == pytest.approx(50.0)
    assert presets.calinski_harabasz(x, np.zeros(4, int)) == 0.0


def test_late_figures_from_records():
    from pangu_moe.dispatch.topology import Topology
    # 2 nodes x 1 device, 2 experts: expert 0 on node 0, expert 1 on node 1; layer 0's rank 0 asks 6 of expert 0
    # and 2 of expert 1 (inter), rank 1 asks 2 of expert 0 (inter) and 2 of expert 1
    layer0 = {"kept_per_expert": [8, 4], "tokens_per_rank_expert": [[6, 2], [2, 2]], "tokens_inter": 3,
              "bytes_inter": 0}
    layer1 = {"kept_per_expert": [4, 4], "tokens_per_rank_expert": [[4, 0], [0, 4]], "tokens_inter": 0,
              "bytes_inter": 0}
    records = [{"step": s, "lm_loss": float(s), "layers": [layer0, layer1]} for s in range(1, 11)]
    records[0]["estimates"] = [{"step": 0, "layer": 0, "need": 20, "capacity": 16, "q_max": 0.5},
                               {"step": 0, "layer": 1, "need": 30, "capacity": 16, "q_max": 0.5}]
    records[5]["estimates"] = [{"step": 5, "layer": 0, "need": 10, "capacity": 10, "q_max": 0.1},
                               {"step": 5, "layer": 1, "need": 20, "capacity": 16, "q_max": 0.3}]
    got = presets.late_figures(records, Topology(2, 1, 2))
    # last 20% of 10 records: steps 9, 10 -> lm 9.5; kept per expert per routing group (6 + 4) / 2 / 2 = 2.5
    assert got["late_lm_loss"] == 9.5 and got["kept_per_expert"] == 2.5
    # requested: 4 of 20 choices a step cross nodes; kept: 3 of 20
    assert got["inter_node_requested"] == 0.2 and got["inter_node_kept"] == 0.15
    # needs 25 at step 0, 15 at step 5: slope -2 per step = -200 per 100 steps
    assert got["need_first"] == 25 and got["need_last"] == 15 and got["need_slope"] == pytest.approx(-200.0)
    # capacity in force (clipped to the ceiling 16): 16 at step 0, 13 at step 5: -60 per 100 steps
    assert got["capacity_first"] == 16 and got["capacity_last"] == 13 and got["capacity_slope"] == pytest.approx(-60.0)
    for r in records:  # the capacity held at the ceiling: slope 0 exactly, not least squares' rounding residue
        for e in r.get("estimates", ()):
            e["capacity"] = 141
    records.append({"step": 13, "estimates": [{"step": 13, "layer": 0, "need": 9, "capacity": 141, "q_max": 0.1}]})
    assert presets.late_figures(records, Topology(2, 1, 2))["capacity_slope"] == 0.0
    assert got["q_max_last"] == pytest.approx(0.2)


def test_an_unknown_study_and_empty_runs_are_refused(tiny_yaml, tmp_path, capsys):
    assert cli.main(["study", "routers", "--first-seed", "3"]) == 2
    assert capsys.readouterr().err == ("pangu-moe study: error: --first-seed: only for the claim studies (capacity, "
                                       "estimator, locality-null, locality, placement), not routers\n")
    with pytest.raises(ConfigError, match="study 'speed': choose from capacity, estimator, locality-null, locality, "
                                          "placement"):
        presets.run("speed", "x.yaml", "out")
    for seeds, steps in ((0, 10), (1, 0)):
        with pytest.raises(ConfigError, match=f"--seeds = {seeds}, --steps = {steps}: both must be >= 1"):
            presets.run("estimator", tiny_yaml, str(tmp_path / "x"), seeds=seeds, steps=steps)


def test_a_study_runs_tiny_through_the_cli(tiny_yaml, tmp_path, capsys):
    """The placement study (data by node, μ, experts re-placed in training; 4 arms, so the cheapest of the by-node
    studies); the other presets run through the same `presets.run`, and their arms' configs are tested above
    (about 95 s each through the CLI, so CI runs one)."""
    name = "placement"
    out = tmp_path / name
    assert cli.main(["study", name, "--config", tiny_yaml, "--seeds", "1", "--steps", "10", "--out", str(out),
                     "--first-seed", "77", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    preset = presets.PRESETS[name]
    assert list(result["arms"]) == list(preset.arms) and result["seeds"] == 1 and result["steps"] == 10
    plan = json.loads((out / "plan.json").read_text())
    assert result["first_seed"] == 77 and {a["runtime"]["seed"] for a in plan["arms"].values()} == {77}
    for arm in preset.arms:
        assert set(result["arms"][arm]["val_bpb"]) == {"mean", "ci95", "n"}
        assert result["paired"][arm]["val_bpb_vs_baseline"]["mean"] == pytest.approx(
            result["arms"][arm]["val_bpb"]["mean"] - result["arms"][preset.baseline]["val_bpb"]["mean"])
        assert (out / arm / "seed0" / "figures.json").exists()
    verdicts = {v["claim"]: v["verdict"] for v in result["verdicts"]}
    # placement changes no number Switch computes, in runs trained in their own processes
    assert verdicts.pop("switch_placed has switch's drops, val bpb and late LM loss, bit for bit") == "reproduced"
    assert set(verdicts.values()) == {"not resolved"}  # one seed: no interval
    placed = json.loads((out / "switch_placed" / "seed0" / "figures.json").read_text())
    assert placed["placement_move_mb"] == placed["placement_moves"] * 3 * 2 * 32 * 64 * 4 / 1e6  # w, m, v in fp32
    assert json.loads((out / "study.json").read_text())["verdicts"] == result["verdicts"]


def test_the_estimator_study_resumes_from_the_runs_already_finished(tiny_yaml, tmp_path):
    out, lines = tmp_path / "estimator", []
    first = presets.run("estimator", tiny_yaml, str(out), seeds=2, steps=10, log=lines.append)
    assert [line for line in lines if line.startswith("==")] == [
        "== [1/2] estimator: ecr seed 0 (10 steps)", lines[1]]
    assert lines[1].startswith("== [2/2] estimator: ecr seed 1 (10 steps, ETA ")
    assert first["runs"]["ecr"][0]["need_first"] > 0 and "token_correlation_end" in first["runs"]["ecr"][0]
    assert first["calibration"]["rows"][0]["capacity_over_ceiling"] == [1.0] * 5  # isotropic: the ceiling
    (out / "ecr" / "seed1" / "figures.json").unlink()  # seed 1 interrupted before it finished
    lines.clear()
    again = presets.run("estimator", tiny_yaml, str(out), seeds=2, steps=10, log=lines.append)
    assert lines[0].endswith("seed1: unfinished, trained again")
    assert [line for line in lines if line.startswith("==")] == ["== [2/2] estimator: ecr seed 1 (10 steps)"]
    assert again["runs"]["ecr"][0] == first["runs"]["ecr"][0]
    assert again["runs"]["ecr"][1]["val_bpb"] == pytest.approx(first["runs"]["ecr"][1]["val_bpb"], rel=1e-6)
    with pytest.raises(ConfigError, match=r"--out .*: holds a estimator study of 10 steps with other settings"):
        presets.run("estimator", tiny_yaml, str(out), seeds=2, steps=12)  # a different study into the same --out
    with pytest.raises(ConfigError, match=r"--out .*: holds a estimator study of 10 steps with other settings"):
        presets.run("estimator", tiny_yaml, str(out), seeds=2, steps=10, first_seed=presets.SEED + 5)  # new seeds
