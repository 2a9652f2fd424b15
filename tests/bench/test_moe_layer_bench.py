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
