from pangu_moe.bench import precision
from tests.conftest import tiny_config


def test_bench_trains_both_precisions_and_reports_their_ratios(tmp_path):
    config = tmp_path / "tiny.yaml"
    tiny_config("train.eval_every=3", "train.checkpoint_every=3").save(config)
    result = precision.run(steps=3, config=str(config), log=lambda line: None)
    fp32, fp16 = result["fp32"], result["fp16"]
    assert result["steps"] == 3
    assert result["fp16_over_fp32_bpb"] == fp16["val_bpb"] / fp32["val_bpb"]
    assert result["fp16_over_fp32_step_time"] == fp16["step_seconds"] / fp32["step_seconds"]
    assert 0.99 < result["fp16_over_fp32_bpb"] < 1.01 and fp16["val_bpb"] != fp32["val_bpb"]
    assert result["skipped_steps"] == {"fp32": 0, "fp16": 0}
    assert (fp32["loss_scale"], fp16["loss_scale"]) == (1.0, 65536.0)
    # One fp32 copy of the weights in both: the state is the same size.
    assert result["param_and_state_bytes"]["fp32"] == result["param_and_state_bytes"]["fp16"] > 0
    assert "fp16_over_fp32_bpb = " in precision.table(result)
