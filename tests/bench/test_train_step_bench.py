"""`bench train-step`: the FLOP count of a step from its shapes, and the utilisation arithmetic."""
import numpy as np
import pytest

from pangu_moe.bench import train_step
from pangu_moe.cli import main
from tests.conftest import tiny_config


def _flops_from_parameters(cfg):
    """Forward FLOPs of a step counted from the built model's weights, as the model uses them: every token passes
    each 2-D weight once (2 x T x its size; the router's [G, H, E_g] computes every group), K expert slices of
    [E, a, b] expert weights, and the tied embedding as the LM head; the position embeddings are gathers. Plus the
    attention scores, which hold no weight: QK^T and AV, 2 x B x S x S x H each, in every attention layer."""
    from pangu_moe.model.pangu import build_model
    t = cfg.train.batch_size * cfg.model.seq_len
    total = 0
    for p in build_model(cfg).trainable_params():
        size = int(np.prod(p.shape))
        if ".experts." in p.name:
            total += 2 * t * cfg.moe.top_k * size // p.shape[0]
        elif p.name == "embedding" or (len(p.shape) > 1 and "embedding" not in p.name):
            total += 2 * t * size
    layers = cfg.model.num_dense_layers + cfg.model.num_moe_layers + 1  # + the query layer
    return total + layers * 2 * 2 * cfg.train.batch_size * cfg.model.seq_len ** 2 * cfg.model.hidden


@pytest.mark.parametrize("overrides", [(), ("moe.top_k=2",), ("moe.num_experts=8", "model.ffn_hidden=48")])
def test_model_flops_equal_a_count_over_the_built_models_weights(overrides):
    cfg = tiny_config(*overrides)
    assert sum(train_step.model_flops(cfg).values()) == _flops_from_parameters(cfg)


def test_model_flops_by_part():
    flops = train_step.model_flops(tiny_config())
    k2 = train_step.model_flops(tiny_config("moe.top_k=2"))
    assert k2["experts"] == 2 * flops["experts"] and k2["dense_ffn"] == flops["dense_ffn"]
    assert flops["lm_head"] == 2 * 128 * 32 * 256  # T = 4 x 32 tokens, H = 32, V = 256
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
