from pangu_moe.bench import kernels


def test_bench_reports_consistent_figures_on_tiny_shapes():
    result = kernels.run(repeats=1, shapes=[(64, 16, 8, 2)], log=lambda line: None)
    row = result["rows"][0]
    assert row["C"] == 20 and 0 < row["kept"] <= 64 * 2
    s = row["seconds"]
    assert row["total_speedup"] == s["reference"]["total"] / s["custom"]["total"]
    assert row["gating_layout_speedup"] == s["reference"]["gating_layout"] / s["custom"]["gating_layout"]
    moved = ((row["kept"] + 8 * 20) + (row["kept"] + 64)) * 16 * 4
    bandwidth = moved / (s["custom"]["permute"] + s["custom"]["unpermute"]) / (row["copy_gb_per_s"] * 1e9)
    assert abs(row["permute_bw_fraction"] - bandwidth) < 1e-9 * bandwidth
    assert result["permute_bw_fraction"] == row["permute_bw_fraction"]
    assert "permute_bw_fraction min" in kernels.table(result)
