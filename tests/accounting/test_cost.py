import numpy as np
import pytest

from pangu_moe.accounting.cost import (Cluster, LayoutError, Links, exchange_seconds, expert_layout,
                                       locality_preference, modelled_exchange_seconds)
from pangu_moe.dispatch.topology import Topology

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


def test_experts_fewer_than_nodes_stay_home_with_chance_one_over_e():
    # 16 devices = 4 nodes of 4; E = 2: each expert spans 8 devices (2 nodes), a node hosts one expert.
    assert expert_layout(2, 16, 4) == (0.5, 1.0)
    est = exchange_seconds(1000, 100, 2, 0.0, TOY, 16, experts=2)
    assert est["inter_fraction"] == pytest.approx(0.5)  # uniform: the node's one expert of 2
    assert est["intra_bytes"] == 0.0  # the device hosts its node's only expert
    assert expert_layout(8, 16, 4) == (0.25, 0.5)  # 2 experts a node, each on 2 devices
    assert expert_layout(32, 16, 4) == expert_layout(None, 16, 4) == (0.25, 0.25)


def test_impossible_expert_layouts_are_refused_with_the_reason():
    with pytest.raises(LayoutError, match="E = 6 experts on W = 16 devices: impossible, one must divide the other"):
        expert_layout(6, 16, 4)
    with pytest.raises(LayoutError, match="an expert's 8 devices would straddle two nodes of 6"):
        expert_layout(3, 24, 6)
    with pytest.raises(LayoutError, match="tensor parallelism 3: impossible, it must divide the 4 devices"):
        exchange_seconds(1000, 100, 2, 0.5, TOY, 8, tensor_parallel=3)


def test_group_wise_exchange_sends_one_mp_th_across_the_all_to_all():
    # 8 devices = 2 nodes of 4, mp = 2: the ep group has 2 ranks a node; lambda 0.5 -> home 0.75.
    plain = exchange_seconds(1000, 100, 2, 0.5, TOY, 8)
    grouped = exchange_seconds(1000, 100, 2, 0.5, TOY, 8, tensor_parallel=2)
    assert grouped["inter_bytes"] == pytest.approx(plain["inter_bytes"] / 2)  # 50,000
    all_to_all_intra = 2 * 1000 * 0.75 * (1 - 1 / 2) * 200 / 2  # a home choice stays with chance 1/(4/2)
    all_gather = 2 * 1000 * (1 / 2) * 200
    assert grouped["intra_bytes"] == pytest.approx(all_to_all_intra + all_gather)  # 37,500 + 200,000
    assert grouped["messages"] == (4 // 2 - 1) + (2 - 1) + (8 - 4) // 2


# 2 nodes x 2 devices, expert q on rank q; rank r keeps kept[r, q] choices for expert q.
KEPT = np.array([[3, 1, 2, 0], [0, 4, 0, 1], [1, 1, 1, 1], [0, 0, 5, 0]])
LINKS = Links(intra_gbps=1.0, inter_gbps=0.5, intra_latency=1e-6, inter_latency=2e-6)


def test_modelled_exchange_seconds_hand_computed_flat():
    topology = Topology(2, 2, 4)
    # ragged, H = 10, b = 2, C = 6 (blocks of 6 slots). Rank 0 sends: intra to rank 1 rows 1 + back 0 = 1 row,
    # inter to ranks 2, 3: rows (2 + 1) + (0 + 0) = 3; rank 2: intra (1 + 5) = 6, inter (1 + 2) + (1 + 0) = 4;
    # rank 3: intra (0 + 1) = 1, inter (0 + 0) + (0 + 1) = 1; rank 1: intra (0 + 1) = 1, inter (0 + 1) + (1 + 1) = 3.
    # Each remote block adds 6 occupancy values: 1 intra block, 2 inter blocks a rank.
    intra = np.array([1, 1, 6, 1]) * 20 + 6 * 2
    inter = np.array([3, 3, 4, 1]) * 20 + 12 * 2
    transfer = max(max(intra / 1e9), max(inter / 0.5e9))
    latency = 3 * (1 * 1e-6 + 2 * 2e-6)  # 3 collectives, (D - 1) intra and (W - D) inter messages each
    got = modelled_exchange_seconds(KEPT, 6, topology, 10, 2, LINKS)
    assert got == pytest.approx(transfer + latency, rel=1e-12)
    padded = modelled_exchange_seconds(KEPT, 6, topology, 10, 2, LINKS, layout="padded")
    assert padded == pytest.approx(2 * 2 * 6 * 20 / 0.5e9 + 2 * (1e-6 + 2 * 2e-6), rel=1e-12)
    assert modelled_exchange_seconds(np.zeros((4, 4)), 6, topology, 10, 2, LINKS, layout="padded") == padded


def test_modelled_hierarchical_exchange_forwards_inside_the_node_and_sends_fewer_messages():
    topology = Topology(2, 2, 4)
    kept = np.zeros((4, 4), int)
    kept[0, 3] = 7  # rank 0 (node 0, local 0) -> rank 3 (node 1, local 1): lands on rank 2, forwarded to rank 3
    flat = modelled_exchange_seconds(kept, 8, topology, 10, 1, LINKS)
    hier = modelled_exchange_seconds(kept, 8, topology, 10, 1, LINKS, hierarchical=True)
    # inter bytes of rank 0 and 3 are alike (7 rows each way: 70 + 2 blocks' occupancy 16); rank 2 forwards
    # 7 rows (70 bytes) inside node 1 on top of its 8 occupancy values to rank 3
    assert flat == pytest.approx((70 + 16) / 0.5e9 + 3 * (1e-6 + 2 * 2e-6), rel=1e-12)
    assert hier == pytest.approx((70 + 16) / 0.5e9 + 3 * (1e-6 + 1 * 2e-6), rel=1e-12)
    # with slow intra-node links the forwarding decides: rank 2 (and rank 1, the combine's way back) send
    # 70 forwarded bytes plus 8 occupancy values inside their node
    slow = Links(intra_gbps=0.1, inter_gbps=0.5, intra_latency=1e-6, inter_latency=2e-6)
    assert modelled_exchange_seconds(kept, 8, topology, 10, 1, slow, hierarchical=True) == pytest.approx(
        78 / 0.1e9 + 3 * (1e-6 + 1 * 2e-6), rel=1e-12)
    assert modelled_exchange_seconds(kept, 8, topology, 10, 1, slow) == pytest.approx(
        (70 + 16) / 0.5e9 + 3 * (1e-6 + 2 * 2e-6), rel=1e-12)
