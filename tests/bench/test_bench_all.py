import pytest

from pangu_moe.bench import all as bench_all
from pangu_moe.bench import dispatch_style

RESULTS = {"moe_layer": {"moe_over_dense": 1.1}, "dispatch_style": {"onehot_over_gather": 3.0},
           "kernels": {"kernel_speedup": 9.0, "permute_bw_fraction": 0.8}, "ep": {"simulated_over_local": 1.01,
                                                                                  "ragged_over_padded_bytes": 0.6}}


def test_all_collects_every_ratio_from_its_benchmark():
    calls = []

    def bench(name):
        def run(repeats):
            calls.append((name, repeats))
            return RESULTS[name]
        return run
    result = bench_all.run(repeats=3, benches={name: bench(name) for name in RESULTS}, log=lambda line: None)
    assert calls == [(name, 3) for name in RESULTS]
    assert {k: result[k] for k in ("moe_over_dense", "onehot_over_gather", "kernel_speedup", "permute_bw_fraction",
                                   "simulated_over_local", "ragged_over_padded_bytes")} == {
        "moe_over_dense": 1.1, "onehot_over_gather": 3.0, "kernel_speedup": 9.0, "permute_bw_fraction": 0.8,
        "simulated_over_local": 1.01, "ragged_over_padded_bytes": 0.6}
    assert result["results"] == RESULTS and "cores" in result["machine"]
    assert "onehot_over_gather        3.000" in bench_all.table(result)


def test_dispatch_styles_agree_and_report_their_ratio(monkeypatch):
    """A stand-in clock: two warmup rounds read it once a style, the timed round twice; gather takes 0.1 s there,
    one-hot 0.3 s."""
    import types
    readings = iter([0.0, 1.0, 2.0, 3.0, 4.0, 4.1, 5.0, 5.3])
    monkeypatch.setattr(dispatch_style, "time", types.SimpleNamespace(perf_counter=lambda: next(readings)))
    shapes = {"T": 64, "H": 16, "F": 32, "E": 4, "K": 2, "capacity_factor": 1.0}
    result = dispatch_style.run(repeats=1, shapes=shapes)
    assert result["same_result"] and result["shapes"]["C"] == 32
    assert result["gather_seconds"] == pytest.approx(0.1) and result["onehot_seconds"] == pytest.approx(0.3)
    assert result["onehot_over_gather"] == pytest.approx(3.0)
