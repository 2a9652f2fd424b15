"""Expert placement maps and the assignment that chooses one (pangu_moe/dispatch/placement.py)."""
import itertools

import numpy as np
import pytest

from pangu_moe.dispatch.placement import choose, expert_ranks, rows_after_move, slots_from_ranks
from pangu_moe.dispatch.topology import Topology


def test_slots_from_ranks_fills_each_rank_in_expert_order():
    # rank 0 hosts experts 1 and 3 (slots 0, 1), rank 1 experts 0 and 2 (slots 2, 3)
    assert slots_from_ranks([1, 0, 1, 0], 2).tolist() == [2, 0, 3, 1]
    assert slots_from_ranks([0, 0, 1, 1], 2).tolist() == [0, 1, 2, 3]
    assert expert_ranks([2, 0, 3, 1], 2).tolist() == [1, 0, 1, 0]


@pytest.mark.parametrize("ranks,world,message", [
    ([0, 0, 0, 1], 2, r"ranks host \[3, 1\] experts; each must host exactly E / W = 2"),
    ([0, 1, 2, 2], 2, r"must list one rank in \[0, 2\) per expert"),
    ([0, -1, 1, 1], 2, r"must list one rank in \[0, 2\) per expert"),
    ([0, 1, 2], 2, "3 experts on 2 ranks: each rank must host E / W experts"),
    ([0, 1], 4, "2 experts on 4 ranks"),
])
def test_a_map_that_is_not_a_placement_is_refused_in_one_line(ranks, world, message):
    with pytest.raises(ValueError, match=message) as error:
        slots_from_ranks(ranks, world)
    assert "\n" not in str(error.value)


def test_topology_follows_the_slot_map():
    # 4 experts, 2 nodes x 1 device: experts 0 and 3 on rank 0 (node 0), 1 and 2 on rank 1 (node 1)
    topology = Topology(2, 1, 4, tuple(slots_from_ranks([0, 1, 1, 0], 2).tolist()))
    assert topology.expert_rank().tolist() == [0, 1, 1, 0]
    assert topology.local_expert_mask().tolist() == [[True, False, False, True], [False, True, True, False]]
    assert topology.placement_classes().tolist() == [[0, 2, 2, 0], [2, 0, 0, 2]]
    assert Topology(2, 1, 4, (0, 1, 2, 3)).expert_rank().tolist() == Topology(2, 1, 4).expert_rank().tolist()
    with pytest.raises(ValueError, match="must be a permutation of 0..3"):
        Topology(2, 1, 4, (0, 1, 1, 3))


def test_moved_rows_follow_their_experts():
    rng = np.random.default_rng(0)
    for _ in range(20):
        old, new = rng.permutation(6), rng.permutation(6)
        rows = rng.standard_normal((6, 3))  # slot-ordered: row old[e] belongs to expert e
        moved = rows[rows_after_move(old, new)]
        for e in range(6):
            np.testing.assert_array_equal(moved[new[e]], rows[old[e]])


def _brute_force(kept_by_node, slots, world, devices, saved, cost):
    """(best net saving, fewest moves among the best) over every slot map."""
    e = len(slots)
    node_of_slot = np.arange(e) // (e // world) // devices
    best = None
    for perm in itertools.permutations(range(e)):
        perm = np.array(perm)
        moved = int((perm != slots).sum())
        net = int(sum(kept_by_node[node_of_slot[perm[x]], x] for x in range(e))) * saved - moved * cost
        if best is None or (net, -moved) > best:
            best = (net, -moved)
    return best[0], -best[1]


def _score(result, kept_by_node, slots, world, devices, saved, cost):
    e = len(slots)
    node_of_slot = np.arange(e) // (e // world) // devices
    moved = int((result != slots).sum())
    return int(sum(kept_by_node[node_of_slot[result[x]], x] for x in range(e))) * saved - moved * cost, moved


@pytest.mark.parametrize("world,devices,e", [(2, 1, 6), (4, 2, 4), (4, 2, 8), (6, 3, 6)])
def test_choose_is_the_exact_optimum_with_the_fewest_moves(world, devices, e):
    rng = np.random.default_rng(world * e)
    for trial in range(15 if e < 8 else 2):
        nodes = world // devices
        kept = rng.integers(0, 20, (nodes, e)) * (rng.random((nodes, e)) < 0.7)
        slots = rng.permutation(e)
        saved, cost = int(rng.integers(1, 4)), int(rng.integers(0, 40))
        result = choose(kept, slots, world, devices, saved, cost)
        assert sorted(result.tolist()) == list(range(e))
        assert _score(result, kept, slots, world, devices, saved, cost) == \
            _brute_force(kept, slots, world, devices, saved, cost), trial


def test_a_move_must_save_more_than_it_costs():
    # 2 nodes x 1 device, 2 experts: node 0's tokens want expert 1, which lives on node 1
    slots = np.array([0, 1])
    kept = np.array([[0, 10], [0, 0]])
    # swapping moves both experts: it saves 10 choices' bytes against two moves
    assert choose(kept, slots, 2, 1, saved_per_choice=2, cost_per_move=10).tolist() == [0, 1]  # 20 = 2 x 10
    assert choose(kept, slots, 2, 1, saved_per_choice=2, cost_per_move=9).tolist() == [1, 0]  # 20 > 18
    # equal demand everywhere: nothing moves, even for free
    assert choose(np.full((2, 2), 5), slots, 2, 1, 1, 0).tolist() == [0, 1]


def test_within_a_node_nothing_moves_for_free():
    # 1 node x 2 devices: every slot is on the tokens' node, so no move gains anything
    slots = np.array([3, 2, 1, 0])
    assert choose(np.array([[9, 0, 0, 9]]), slots, 2, 2, 1, 0).tolist() == [3, 2, 1, 0]
