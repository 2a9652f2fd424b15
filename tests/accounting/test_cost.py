import pytest

from pangu_moe.accounting.cost import Cluster, exchange_seconds, locality_preference

TOY = Cluster("toy", 4, intra_bandwidth=1.0, inter_bandwidth=0.5, intra_latency=1e-6, inter_latency=2e-6, source="test")


def test_locality_preference_round_trips_and_clamps():
    assert locality_preference(0.5, 2) == 0.0            # uniform over 2 nodes
    assert locality_preference(0.0, 2) == 1.0            # everything home
    assert locality_preference(0.15, 2) == pytest.approx(0.7)
    assert locality_preference(0.6, 2) == 0.0            # below uniform counts as uniform
    with pytest.raises(ValueError, match="need at least 2"):
        locality_preference(0.0, 1)


def test_exchange_seconds_hand_computed():
    # 8 devices = 2 nodes of 4; lambda 0.5 -> home = 0.5 + 0.5/2 = 0.75; 1000 tokens, H 100, 2 bytes.
    est = exchange_seconds(1000, 100, 2, 0.5, TOY, 8)
    assert est["inter_fraction"] == pytest.approx(0.25)
    assert est["intra_bytes"] == pytest.approx(2 * 1000 * 0.75 * 3 / 4 * 200)   # 225,000
    assert est["inter_bytes"] == pytest.approx(2 * 1000 * 0.25 * 200)           # 100,000
    transfer = max(225_000 / 1e9, 100_000 / 0.5e9)
    assert est["seconds"] == pytest.approx(transfer + 2 * (3 * 1e-6 + 4 * 2e-6))
    hier = exchange_seconds(1000, 100, 2, 0.5, TOY, 8, hierarchical=True)
    assert hier["messages"] == 3 + 1 < est["messages"] == 3 + 4
    with pytest.raises(ValueError, match="multiple of 4"):
        exchange_seconds(1000, 100, 2, 0.5, TOY, 6)
