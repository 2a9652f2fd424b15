"""The claims table: verdicts computed from synthetic study figures whose answers are known."""
import json

from pangu_moe import cli
from pangu_moe.studies import claims


def _x(mean, ci95=0.01):
    return {"mean": mean, "ci95": ci95, "n": 3}


def _arm(bpb=3.0, vs=0.0, inter=-0.1, dropped=0.0, ratio=1.1, first=20.0, last=20.0, step_ms=100.0):
    return {"val_bpb": _x(bpb), "val_bpb_vs_switch": _x(vs), "inter_node_vs_switch": _x(inter),
            "dropped_vs_switch": _x(dropped), "capacity_ratio": _x(ratio), "capacity_first": _x(first, 0.5),
            "capacity_last": _x(last, 0.5), "step_ms": _x(step_ms)}


STUDY = {"steps": 200, "seeds": 3, "mu": 0.01, "mu_why": "test",
         "arms": {"topk": _arm(), "dense": _arm(vs=0.2), "topk_k2": _arm(vs=-0.05, step_ms=150.0),
                  "locmoe_mu0.01": _arm(vs=0.05, inter=-0.2, dropped=0.25),
                  "locmoe_plus_hybrid": _arm(vs=0.2, ratio=0.33, first=20.0, last=10.0)}}
KOOL = {"seeds": 100, "steps": 3000, "paired": [
    {"regime": "uniform", "pair": "skip - balanced", "capacity_factor": 1.25, "purity": _x(0.0, 0.02)},
    {"regime": "uniform", "pair": "skip - skip_naive", "capacity_factor": 1.25, "purity": _x(-0.05, 0.02)}]}


def test_verdicts_follow_the_figures(tmp_path):
    for name, data in (("study.json", STUDY), ("kool.json", KOOL), ("precision.json", {"fp16_over_fp32_bpb": 1.008,
                                                                                       "steps": 500})):
        (tmp_path / name).write_text(json.dumps(data))
    out = tmp_path / "claims.md"
    assert cli.main(["claims", "--study", str(tmp_path), "--kool", str(tmp_path / "kool.json"), "--precision",
                     str(tmp_path / "precision.json"), "--out", str(out)]) == 0
    verdicts = {(paper, claim): verdict for paper, claim, _, _, verdict in
                claims.write(str(out), [str(tmp_path / "study.json")], str(tmp_path / "kool.json"),
                             str(tmp_path / "precision.json"))}
    page = out.read_text()
    assert page.count("\n| ") == len(verdicts) + 1  # header + one row each

    def verdict(paper, start):
        (found,) = [v for (p, c), v in verdicts.items() if p == paper and c.startswith(start)]
        return found
    assert verdict("Switch", "A sparse top-1 MoE beats a dense") == "reproduced"  # dense 0.2 worse, resolved
    assert verdict("LocMoE", "Locality-aware routing sends fewer") == "reproduced"  # -0.2 ± 0.01
    assert verdict("LocMoE", "... without hurting quality") == "reproduced"  # 0.05 + 0.01 <= 3% of 3.0 = 0.09
    assert verdict("ours", "The price of locality") == "not reproduced"  # drops 0.25 more, resolved
    assert verdict("LocMoE", "Locality-aware routing shortens the epoch") == "not testable at this scale"
    assert verdict("LocMoE+", "At least 60% fewer tokens") == "reproduced"  # 1 - 0.33/1.1 = 70%
    assert verdict("LocMoE+", "The required capacity decreases") == "reproduced"  # 20 -> 10, apart
    assert verdict("LocMoE+", "... at quality comparable") == "not reproduced"  # 0.2 > 0.09
    assert verdict("Switch", "Top-1 routing keeps quality against top-") == "not reproduced"  # K=2 0.05 better
    assert verdict("Kool", "The skip estimator routes at least as wel").startswith("reproduced (no difference")
    assert verdict("Kool", "Unbiased skipping routes better than bia") == "not reproduced"  # -0.05 resolved
    assert verdict("Switch", "Selective precision") == "reproduced"
    assert "val bpb dense − Switch +0.200 ± 0.010" in page


def test_an_interval_across_a_threshold_is_not_resolved():
    assert claims._within(_x(0.085, 0.01), 0.09) == "not resolved"
    assert claims._within(_x(0.2, 0.01), 0.09) == "not reproduced"
    assert claims.direction(_x(-0.005, 0.01), lower_is_claimed=True) == "not resolved"
    assert claims.direction({"mean": -0.5, "ci95": None, "n": 1}, lower_is_claimed=True) == "not resolved"


def test_without_a_sweep_the_one_locmoe_arm_is_used():
    study = {**STUDY, "mu": None, "mu_why": "no LocMoE sweep in this study"}
    rows = claims.router_rows(study)
    (row,) = [r for r in rows if r[1].startswith("Locality-aware routing sends fewer")]
    assert "mu = 0.01, not swept in this study" in row[1] and row[4] == "reproduced"


def test_each_claim_comes_from_the_study_with_the_most_seeds_that_measured_it(tmp_path):
    wide = {"steps": 200, "seeds": 6, "mu": None, "mu_why": "no sweep",
            "arms": {"topk": _arm(), "dense": {**_arm(), "val_bpb_vs_switch": {"mean": 0.075, "ci95": 0.041, "n": 6}}}}
    narrow = {**STUDY, "arms": {**STUDY["arms"], "dense": {**_arm(), "val_bpb_vs_switch": _x(0.09, 0.116)}}}
    paths = []
    for name, data in (("narrow.json", narrow), ("wide.json", wide)):
        (tmp_path / name).write_text(json.dumps(data))
        paths.append(str(tmp_path / name))
    rows = claims.write(str(tmp_path / "claims.md"), paths)
    assert [r[1] for r in rows] == [r[1] for r in claims.router_rows(narrow)]  # the fuller study's claims, in order
    (dense,) = [r for r in rows if r[1].startswith("A sparse top-1 MoE beats a dense")]
    assert dense[2] == "val bpb dense − Switch +0.075 ± 0.041" and "6 seeds" in dense[3] and dense[4] == "reproduced"
    (locmoe,) = [r for r in rows if r[1].startswith("Locality-aware routing sends fewer")]
    assert "3 seeds" in locmoe[3]
