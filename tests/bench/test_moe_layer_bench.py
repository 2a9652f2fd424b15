import pytest

from pangu_moe.bench import moe_layer


def test_bench_figures_are_medians_of_the_timed_rounds_without_the_warmups(monkeypatch):
    """Each variant's step is timed by a stand-in clock: base seconds x 100 in the two warmup rounds, then x 1, 3, 2
    (median x 2). Bases: reference_k1 2, custom_k1 1, reference_k2 4, custom_k2 3, reference_k1_shrunk 1.5,
    dense 0.5 (K = 1 in the shapes: the MoE layer is reference_k1)."""
    base = {"reference_k1": 2.0, "custom_k1": 1.0, "reference_k2": 4.0, "custom_k2": 3.0, "reference_k1_shrunk": 1.5,
            "dense": 0.5}
    calls = []

    def clock(step, x, cotangent):
        calls.append(step)
        round_, variant = divmod(len(calls) - 1, len(base))
        return list(base.values())[variant] * (100, 100, 1, 3, 2)[round_]
    monkeypatch.setattr(moe_layer, "_time", clock)
    shapes = {"T": 64, "H": 16, "F": 32, "E": 4, "K": 1, "capacity_factor": 1.25}
    result = moe_layer.run(repeats=3, shapes=shapes)
    assert len(calls) == 5 * 6 and len(set(map(id, calls[:6]))) == 6  # six distinct steps, five rounds
    assert result["seconds"] == {name: 2 * b for name, b in base.items()}
    assert result["shapes"]["C"] == 20 and result["shrunk_capacity"] == 16  # ceil(64 x 1.25 / 4); the bucket of 10
    assert (result["moe_over_dense"], result["moe_tokens_per_s"], result["dense_tokens_per_s"]) == (4.0, 16.0, 64.0)
    assert (result["custom_over_reference_k1"], result["custom_over_reference_k2"]) == (0.5, 0.75)
    assert result["shrunk_over_full_k1"] == 0.75 and result["shrunk_exchange_bytes_ratio"] == 0.8  # 16 / 20
    text = moe_layer.table(result)
    assert "moe_over_dense = 4.00" in text and "buffers at C=16 instead of 20" in text


@pytest.mark.parametrize("dispatch", ["local", "simulated"])
def test_the_phases_recompose_the_layer(dispatch):
    # K = 2, 4 ranks (2 x 2), capacity 5 of 16 choices a rank: drops; the phases' forward outputs chained give the
    # layer's output exactly; each phase is timed once a round.
    import numpy as np
    from mindspore import Tensor
    from pangu_moe.dispatch.topology import Topology
    from pangu_moe.model.pangu import build_moe_layer
    from tests.conftest import tiny_config
    cfg = tiny_config("moe.top_k=2", "moe.num_groups=1", "model.hidden=16", "parallel.nodes=2",
                      "parallel.devices_per_node=2")
    layer = build_moe_layer(cfg.model, cfg.moe, 0, 0.02, Topology(2, 2, 4), dispatch)
    x = Tensor(np.random.default_rng(0).normal(size=(32, 16)).astype(np.float32))
    ids = Tensor(np.zeros(32, np.int32))
    steps, y = moe_layer.moe_layer_phases(layer, x, ids, ids, 5)
    whole = layer(x, ids, ids, 5, True)
    np.testing.assert_array_equal(y.asnumpy(), whole[0].asnumpy())
    assert whole[3].asnumpy().sum() < whole[2].asnumpy().sum()  # some choices dropped
    assert tuple(steps) == moe_layer.PHASES
    times = moe_layer.moe_layer_phase_seconds(layer, x, ids, ids, 5, repeats=2)
    assert {phase: len(t) for phase, t in times.items()} == {phase: 2 for phase in moe_layer.PHASES}
