import pytest

from pangu_moe.bench import precision
from tests.conftest import tiny_config


def test_scale_moves_counts_backoffs_and_growths():
    assert precision.scale_moves(16.0, [8.0, 8.0, 16.0, 32.0, 4.0]) == (2, 2)
    assert precision.scale_moves(16.0, [8.0, 16.0, 32.0, 64.0]) == (1, 3)  # (backoffs, growths), in that order
    assert precision.scale_moves(1.0, [1.0, 1.0]) == (0, 0)


def test_bench_trains_every_arm(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "FP16_WINDOW", 1)  # the fp16 scale doubles after every applied step
    config = tmp_path / "tiny.yaml"
    tiny_config().save(config)
    result = precision.run(steps=3, config=str(config), log=lambda line: None, seeds=1, isolated=False)
    runs = result["runs"]
    assert result["steps"] == 3 and list(runs) == ["fp32", "fp16", "bf16", "fp16_router_low"]
    for arm in ("fp16", "fp16_router_low"):
        for r in runs[arm]:  # window 1: each step either doubles the scale (applied) or halves it (overflow)
            assert r["loss_scale_backoffs"] + r["loss_scale_growths"] == 3
            assert r["loss_scale"] == 2.0 ** (16 + r["loss_scale_growths"] - r["loss_scale_backoffs"])
            assert r["skipped_steps"] == r["loss_scale_backoffs"]
    assert result["loss_scale_growths"] == sum(r["loss_scale_growths"] for r in runs["fp16"]) > 0
    for arm in ("fp32", "bf16"):
        assert [(r["loss_scale"], r["loss_scale_growths"]) for r in runs[arm]] == [(1.0, 0)]
    assert result["skipped_steps"]["fp32"] == result["skipped_steps"]["bf16"] == 0
    for arm in ("fp16", "bf16", "fp16_router_low"):
        ratio = result[f"{arm}_over_fp32_bpb"]
        assert ratio["n"] == 1 and ratio["ci95"] is None and 0.9 < ratio["mean"] < 1.1  # 3 steps, some skipped
        assert runs[arm][0]["val_bpb"] != runs["fp32"][0]["val_bpb"]  # the rounding is real
    # One fp32 copy of the weights in every precision: the state is the same size.
    assert len(set(result["param_and_state_bytes"].values())) == 1
    text = precision.table(result)
    assert "bf16_over_fp32_bpb = " in text and f"{result['loss_scale_growths']} growths" in text


def test_bench_pairs_seeds_across_arms(tmp_path, monkeypatch):
    """Aggregation over seeds, with a stand-in for the training: val_bpb 2 (fp32) or 2.2 (every other arm) on
    seed 0 and 4 on seed 1, so each ratio to fp32 is (1.1, 1.0) and fp16_router_low - fp16 is (0, 0)."""
    seen = []

    def fake_train(config, run_dir):
        seed = config["runtime"]["seed"] - 7  # tiny_config's base seed
        seen.append((config["train"]["precision"], config["moe"]["router_dtype"], seed))
        fp32 = config["train"]["precision"] == "fp32"
        return {"val_bpb": [2.0 if fp32 else 2.2, 4.0][seed], "step_seconds": 1.0 + seed, "skipped_steps": seed,
                "loss_scale": 1.0, "loss_scale_backoffs": seed, "loss_scale_growths": 2, "param_and_state_bytes": 8}

    monkeypatch.setattr(precision, "_train", fake_train)
    config = tmp_path / "tiny.yaml"
    tiny_config().save(config)
    result = precision.run(steps=3, config=str(config), log=lambda line: None, seeds=2, isolated=False)
    assert sorted(seen) == sorted((p, r, s) for s in (0, 1) for p, r in
                                  (("fp32", "fp32"), ("fp16", "fp32"), ("bf16", "fp32"), ("fp16", "low")))
    for arm in ("fp16", "bf16", "fp16_router_low"):
        ratio = result[f"{arm}_over_fp32_bpb"]
        assert ratio["n"] == 2 and ratio["mean"] == pytest.approx(1.05)
        assert ratio["ci95"] == pytest.approx(12.7062 * 0.05, rel=1e-4)  # t(0.975, 1) x sd 0.0707 / sqrt 2
        assert result[f"{arm}_over_fp32_step_time"] == {"mean": 1.0, "ci95": 0.0, "n": 2}
    assert result["fp16_router_low_minus_fp16_bpb"] == {"mean": 0.0, "ci95": 0.0, "n": 2}
    assert result["arms"]["fp32"]["val_bpb"]["mean"] == 3.0 and result["arms"]["bf16"]["val_bpb"]["mean"] == 3.1
    assert result["skipped_steps"] == {arm: 1 for arm in precision.ARMS}
    assert (result["loss_scale_backoffs"], result["loss_scale_growths"]) == (1, 4)


def test_bench_refuses_no_seeds():
    with pytest.raises(precision.ConfigError, match="seeds = 0: must be >= 1"):
        precision.run(seeds=0)
