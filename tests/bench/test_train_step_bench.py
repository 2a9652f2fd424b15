"""`bench train-step`: the FLOP count of a step from its shapes, and the utilisation arithmetic."""
import pytest

from pangu_moe.bench import train_step
from pangu_moe.cli import main
from tests.conftest import tiny_config


def test_model_flops_of_the_tiny_config_by_hand():
    # T = B*S = 4*32 = 128 tokens, H = 32, S = 32, F = 64, E = 4, K = 1, V = 256; 1 dense + 2 MoE + query layer.
    flops = train_step.model_flops(tiny_config())
    assert flops == {"attention_projections": 4 * 2 * 128 * 32 * 128,
                     "attention_scores": 4 * 4 * 4 * 32 * 32 * 32,
                     "dense_ffn": 2 * 4 * 128 * 32 * 64,
                     "routers": 2 * 2 * 128 * 32 * 4,
                     "experts": 2 * 4 * 128 * 1 * 32 * 64,
                     "lm_head": 2 * 128 * 32 * 256}
    k2 = train_step.model_flops(tiny_config("moe.top_k=2"))
    assert k2["experts"] == 2 * flops["experts"] and k2["dense_ffn"] == flops["dense_ffn"]
    assert train_step.model_flops(tiny_config("moe.num_experts=1", "moe.num_groups=1"))["routers"] == 0


def test_utilisation_is_the_step_rate_over_the_matmul_rate(tmp_path, monkeypatch):
    config = tmp_path / "tiny.yaml"
    tiny_config().save(str(config))
    monkeypatch.setattr(train_step, "sgemm_seconds", lambda rows, inner, cols, repeats: 2 * rows * inner * cols / 1e10)
    result = train_step.run(steps=4, repeats=1, config=str(config), log=lambda line: None, profile=False)
    gflops = 3 * sum(train_step.model_flops(tiny_config("train.steps=4")).values()) / 1e9
    assert result["model_gflops_per_step"] == pytest.approx(gflops)
    assert result["sgemm_shape"] == [128, 32, 64] and result["sgemm_gflop_per_s"] == pytest.approx(10.0)
    assert result["cpu_utilisation"] == pytest.approx(gflops / result["step_seconds"] / 10.0)


def test_steps_is_refused_for_benchmarks_that_do_not_train(capsys):
    assert main(["bench", "moe-layer", "--steps", "5"]) == 2
    assert "--steps = 5: only for bench precision and train-step" in capsys.readouterr().err


def test_sgemm_seconds_times_a_compiled_matmul():
    assert 0 < train_step.sgemm_seconds(64, 32, 16, 2) < 1.0
