import pytest

from pangu_moe.bench import kernels


def test_bench_figures_from_a_stand_in_clock_on_tiny_shapes(monkeypatch):
    """T = 64, H = 16, E = 8, K = 2 (C = ceil(64 x 2 x 1.25 / 8) = 20). Every stage runs; a stand-in clock times
    it: per routed input, permute and unpermute, reference 4, 2, 3 ms; custom 1, 0.5, 0.5 ms; custom on one thread
    2, 1, 1 ms; the copy of the E x C x H fp32 buffer 0.1 ms (2 x 10,240 bytes: 204.8 MB/s). Warmup rounds 1 s."""
    per_variant = {"reference": (4e-3, 2e-3, 3e-3), "custom": (1e-3, 5e-4, 5e-4), "custom_1_thread": (2e-3, 1e-3, 1e-3)}
    script = [s for v in kernels.VARIANTS for s in (per_variant[v][0] * kernels.ROUTING_BATCH, *per_variant[v][1:])]
    script.append(1e-4)  # the copy, last in each round
    calls = []

    def clock(fn, *args):
        out = fn(*args)
        round_, position = divmod(len(calls), len(script))
        calls.append(fn)
        return (1.0 if round_ < 2 else script[position]), out
    monkeypatch.setattr(kernels, "_timed", clock)
    result = kernels.run(repeats=1, shapes=[(64, 16, 8, 2)], log=lambda line: None)
    row = result["rows"][0]
    assert len(calls) == 3 * len(script) and row["C"] == 20 and 0 < row["kept"] <= 64 * 2
    assert row["seconds"]["reference"] == pytest.approx({"gating_layout": 4e-3, "permute": 2e-3, "unpermute": 3e-3,
                                                        "total": 9e-3})
    assert row["total_speedup"] == pytest.approx(4.5) and row["gating_layout_speedup"] == pytest.approx(4.0)
    assert row["permute_speedup"] == pytest.approx(5.0) and row["threads_speedup"] == pytest.approx(2.0)
    assert row["copy_gb_per_s"] == pytest.approx(0.2048)
    # permute reads the kept rows and writes the E x C buffer; unpermute reads the kept rows and writes T rows
    moved = (2 * row["kept"] + 160 + 64) * 16 * 4
    assert row["permute_bw_fraction"] == pytest.approx(moved / 1e-3 / 204.8e6)
    assert row["reference_permute_bw_fraction"] == pytest.approx(moved / 5e-3 / 204.8e6)
    assert result["permute_bw_fraction"] == row["permute_bw_fraction"]
    assert "permute_bw_fraction min" in kernels.table(result)
