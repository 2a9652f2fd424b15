import numpy as np
import pytest

from pangu_moe.dispatch.topology import Topology


def test_contiguous_placement_with_more_experts_than_ranks():
    topo = Topology(nodes=2, devices_per_node=2, num_experts=8)
    assert topo.expert_rank().tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert topo.expert_node().tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    mask = topo.local_expert_mask()
    assert mask.shape == (4, 8) and mask[1].tolist() == [True] * 4 + [False] * 4


def test_fewer_experts_than_ranks_leaves_nodes_without_experts():
    # LocMoE's 256N case in miniature: 4 experts over 4 nodes x 4 devices, one expert per 4 ranks.
    topo = Topology(nodes=4, devices_per_node=4, num_experts=2)
    assert topo.expert_node().tolist() == [0, 2]
    hosts = topo.local_expert_mask().any(1)
    assert hosts.tolist() == [True] * 4 + [False] * 4 + [True] * 4 + [False] * 4


def test_incompatible_sizes_are_rejected():
    with pytest.raises(ValueError, match="one must divide the other"):
        Topology(nodes=1, devices_per_node=3, num_experts=8)
    assert np.array_equal(Topology(1, 1, 4).local_expert_mask(), np.ones((1, 4), bool))
