import pytest

from pangu_moe.bench import precision
from tests.conftest import tiny_config


def test_scale_moves_counts_backoffs_and_growths():
    assert precision.scale_moves(16.0, [8.0, 8.0, 16.0, 32.0, 4.0]) == (2, 2)
    assert precision.scale_moves(16.0, [8.0, 16.0, 32.0, 64.0]) == (1, 3)  # (backoffs, growths), in that order
    assert precision.scale_moves(1.0, [1.0, 1.0]) == (0, 0)


def test_bench_trains_every_arm_on_paired_seeds(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "FP16_WINDOW", 1)  # the fp16 scale doubles after every applied step
    config = tmp_path / "tiny.yaml"
    tiny_config().save(config)
    result = precision.run(steps=3, config=str(config), log=lambda line: None, seeds=2, isolated=False)
    runs = result["runs"]
    assert result["steps"] == 3 and list(runs) == ["fp32", "fp16", "bf16", "fp16_router_low"]
    assert runs["fp32"][0]["val_bpb"] != runs["fp32"][1]["val_bpb"]  # two seeds, two runs
    for arm in ("fp16", "fp16_router_low"):
        for r in runs[arm]:  # window 1: each step either doubles the scale (applied) or halves it (overflow)
            assert r["loss_scale_backoffs"] + r["loss_scale_growths"] == 3
            assert r["loss_scale"] == 2.0 ** (16 + r["loss_scale_growths"] - r["loss_scale_backoffs"])
            assert r["skipped_steps"] == r["loss_scale_backoffs"]
    assert result["loss_scale_growths"] == sum(r["loss_scale_growths"] for r in runs["fp16"]) > 0
    for arm in ("fp32", "bf16"):
        assert [(r["loss_scale"], r["loss_scale_growths"]) for r in runs[arm]] == [(1.0, 0)] * 2
    assert result["skipped_steps"]["fp32"] == result["skipped_steps"]["bf16"] == 0
    for arm in ("fp16", "bf16", "fp16_router_low"):
        ratio = result[f"{arm}_over_fp32_bpb"]
        assert ratio["n"] == 2 and ratio["ci95"] is not None and 0.9 < ratio["mean"] < 1.1  # 3 steps, some skipped
        assert all(r["val_bpb"] != f["val_bpb"] for r, f in zip(runs[arm], runs["fp32"]))  # the rounding is real
    # One fp32 copy of the weights in every precision: the state is the same size.
    assert len(set(result["param_and_state_bytes"].values())) == 1
    text = precision.table(result)
    assert "bf16_over_fp32_bpb = " in text and f"{result['loss_scale_growths']} growths" in text


def test_bench_refuses_no_seeds():
    with pytest.raises(precision.ConfigError, match="seeds = 0: must be >= 1"):
        precision.run(seeds=0)
