import pytest

from pangu_moe.bench import moe_layer


def test_bench_reports_consistent_figures_on_tiny_shapes():
    shapes = {"T": 64, "H": 16, "F": 32, "E": 4, "K": 1, "capacity_factor": 1.25}
    result = moe_layer.run(repeats=1, shapes=shapes)
    assert result["shapes"]["C"] == 20
    assert result["moe_over_dense"] == result["moe_seconds"] / result["dense_seconds"]
    assert result["moe_tokens_per_s"] == 64 / result["moe_seconds"]
    assert result["custom_over_reference_k2"] == result["seconds"]["custom_k2"] / result["seconds"]["reference_k2"]
    assert set(result["seconds"]) == {"reference_k1", "custom_k1", "reference_k2", "custom_k2", "dense",
                                      "reference_k1_shrunk"}
    assert result["shrunk_capacity"] == 16 and result["shrunk_exchange_bytes_ratio"] == 16 / 20  # bucket of 10
    shrunk, full = result["seconds"]["reference_k1_shrunk"], result["seconds"]["reference_k1"]
    assert result["shrunk_over_full_k1"] == shrunk / full and "buffers at C=16 instead of 20" in moe_layer.table(result)
    assert "moe_over_dense = " in moe_layer.table(result) and "custom kernels / reference ops" in moe_layer.table(result)


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
