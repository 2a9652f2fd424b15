import numpy as np
import pytest

from pangu_moe.accounting.traffic import layer_record, load_stats, rank_balance, route_classes, window_load_stats
from pangu_moe.dispatch.topology import Topology

# 2 nodes x 2 devices, 4 experts: expert e lives on rank e, node e // 2.
TOPO = Topology(nodes=2, devices_per_node=2, num_experts=4)


def test_placement_classes_exact():
    assert TOPO.placement_classes().tolist() == [[0, 1, 2, 2], [1, 0, 2, 2], [2, 2, 0, 1], [2, 2, 1, 0]]
    # 2 experts over 4 ranks: expert 0 spans ranks 0-1 (node 0), expert 1 ranks 2-3 (node 1).
    wide = Topology(nodes=2, devices_per_node=2, num_experts=2)
    assert wide.placement_classes().tolist() == [[0, 2], [0, 2], [2, 0], [2, 0]]


def test_hand_built_routing_counts_and_bytes():
    kept = np.array([[3, 1, 2, 0],   # rank 0: 3 local, 1 intra, 2 inter
                     [0, 4, 0, 1],   # rank 1: 4 local, 1 inter
                     [1, 1, 1, 1],   # rank 2: 1 local, 1 intra, 2 inter
                     [0, 0, 5, 0]])  # rank 3: 5 intra
    assert route_classes(kept, TOPO) == {"local": 8, "intra": 7, "inter": 5}
    demand = kept + np.array([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 2], [0, 0, 0, 0]])
    record = layer_record(demand, kept, 6, TOPO, hidden=16)
    assert record["dropped"] == 3 and record["tokens_per_expert"] == [5, 6, 8, 4]
    # ragged: the kept rows both ways plus each remote block's occupancy (1 expert x C = 6 slots), 4 intra-node
    # blocks (0<->1, 2<->3) and 8 inter-node ones; padded: every slot of those blocks both ways
    assert record["bytes_intra"] == (7 * 2 * 16 + 4 * 6) * 4 and record["bytes_inter"] == (5 * 2 * 16 + 8 * 6) * 4
    assert record["padded_bytes_intra"] == 4 * 2 * 6 * 16 * 4 and record["padded_bytes_inter"] == 8 * 2 * 6 * 16 * 4
    assert record["tokens_local"] + record["tokens_intra"] + record["tokens_inter"] == kept.sum()
    # a step whose buffers hold 8 slots (its capacity bucket) while C = 6 is in force: the blocks are 8 slots
    bucketed = layer_record(demand, kept, 6, TOPO, hidden=16, slots=8)
    assert bucketed["capacity"] == 6 and bucketed["padded_bytes_inter"] == 8 * 2 * 8 * 16 * 4
    assert bucketed["bytes_inter"] == (5 * 2 * 16 + 8 * 8) * 4


def test_load_stats():
    assert load_stats([2, 2, 2, 2]) == {"max_over_mean_load": 1.0, "dead_experts": 0}
    assert load_stats([[8, 0, 0, 0], [0, 0, 0, 0]]) == {"max_over_mean_load": 4.0, "dead_experts": 3}


def test_window_load_stats_uses_only_the_final_window():
    early = {"step": 1, "layers": [{"tokens_per_expert": [100, 0]}]}
    late = [{"step": s, "layers": [{"tokens_per_expert": [300, 100]}]} for s in (9, 10)]
    stats = window_load_stats([early] + late, 10, 0.2)
    assert stats["max_over_mean_load"] == 1.5 and stats["dead_experts"] == 0
    stats = window_load_stats([early] + late, 10, 1.0)  # demand [700, 200]
    assert abs(stats["max_over_mean_load"] - 700 / 450) < 1e-12


def test_inter_node_messages_flat_and_hierarchical():
    kept = np.array([[3, 1, 2, 0],   # rank 0 (node 0) -> rank 2 (node 1): 1 flat, 1 hierarchical
                     [0, 4, 1, 1],   # rank 1 -> ranks 2 and 3 (both node 1): 2 flat, 1 hierarchical
                     [1, 0, 1, 1],   # rank 2 -> rank 0: 1 and 1
                     [0, 0, 5, 0]])  # rank 3: intra only
    from pangu_moe.accounting.traffic import inter_node_messages
    assert inter_node_messages(kept, TOPO) == (4, 3)
    rng = np.random.default_rng(0)
    big = Topology(nodes=4, devices_per_node=4, num_experts=32)
    for _ in range(20):
        k = rng.integers(0, 3, (16, 32)) * (rng.random((16, 32)) < 0.3)
        flat, hier = inter_node_messages(k, big)
        assert hier <= flat
    assert layer_record(kept, kept, 6, TOPO, 16)["messages_inter_flat"] == 4


def test_rank_balance_shows_the_rank_that_capacity_binds():
    # One layer, W = 2 ranks, E = 2 experts. Rank 0 is balanced and keeps everything; rank 1 sends all
    # to expert 0 and drops half. Summed over ranks the load looks mild (demand 6 vs 2).
    topology = Topology(1, 2, 2)
    demand = np.array([[2, 2], [4, 0]])
    kept = np.array([[2, 2], [2, 0]])
    record = {"step": 10, "layers": [layer_record(demand, kept, 2, topology, 8)]}
    early = {"step": 1, "layers": [layer_record(np.array([[1, 1], [1, 1]]), np.array([[1, 1], [1, 1]]), 2,
                                                topology, 8)]}
    got = rank_balance([early, record], 10, 0.2)  # the window holds step 10 only
    assert got["drop_rate"]["per_rank"] == [0.0, 0.5]
    assert got["drop_rate"]["worst_rank"] == 0.5 and got["drop_rate"]["mean_over_ranks"] == 0.25
    assert got["max_over_mean_load"]["per_rank"] == [1.0, 2.0]
    assert got["dead_experts"]["per_rank"] == [0.0, 1.0]
    whole = rank_balance([early, record], 10, 1.0)  # both steps: rank 1 wanted 6, kept 4
    assert whole["drop_rate"]["per_rank"] == pytest.approx([0.0, 1 / 3])
    assert rank_balance([{"step": 3}], 10, 1.0) == {}
