import numpy as np
import pytest
from mindspore import Tensor

from pangu_moe.capacity import dropless_capacity
from pangu_moe.routing.slots import assign_slots, position_slots, priority_slots


def test_position_slots_exact():
    expert_index = Tensor(np.array([[0], [1], [0], [0], [1]], np.int32))
    slot, keep = position_slots(expert_index, 2, 2)
    assert slot.asnumpy().ravel().tolist() == [0, 0, 1, 2, 1]
    assert keep.asnumpy().ravel().tolist() == [True, True, True, False, True]


def test_first_choices_before_second_choices():
    # Token 0's second choice (expert 1) comes first in token order, but tokens 1 and 2 choose expert 1
    # first, so with C = 2 they take both slots and token 0's second choice is dropped.
    expert_index = Tensor(np.array([[0, 1], [1, 0], [1, 0]], np.int32))
    slot, keep = position_slots(expert_index, 2, 2)
    assert slot.asnumpy().tolist() == [[0, 2], [0, 1], [1, 2]]
    assert keep.asnumpy().tolist() == [[True, False], [True, True], [True, False]]


def test_slots_are_contiguous_per_expert_random():
    rng = np.random.default_rng(0)
    for _ in range(5):
        idx = np.stack([rng.choice(6, 2, replace=False) for _ in range(50)]).astype(np.int32)
        slot, keep = position_slots(Tensor(idx), 6, 7)
        slot, keep = slot.asnumpy(), keep.asnumpy()
        for e in range(6):
            assert sorted(slot[idx == e].tolist()) == list(range((idx == e).sum()))
            assert keep[idx == e].sum() == min(7, (idx == e).sum())


def _t(a, dtype=np.int32):
    return Tensor(np.array(a, dtype))


def test_requested_choices_take_no_slot():
    expert_index = _t([[0, 1], [0, 1], [1, 0]])
    requested = _t([[True, False], [True, True], [True, False]], np.bool_)
    slot, keep = position_slots(expert_index, 2, 1, requested)
    # First choices: t0->0 (slot 0), t1->0 (slot 1), t2->1 (slot 0); t1's second choice -> 1 (slot 1).
    assert slot.asnumpy()[requested.asnumpy()].tolist() == [0, 1, 1, 0]  # row-major: t0k0 t1k0 t1k1 t2k0
    assert keep.asnumpy().tolist() == [[True, False], [False, False], [True, False]]


def test_priority_slots_keep_the_highest_priorities_per_expert():
    expert_index = _t([[0], [1], [0], [0], [1]])
    priority = _t([[0.1], [0.5], [0.9], [0.4], [0.7]], np.float32)
    slot, keep = priority_slots(expert_index, priority, 2, 2)
    assert slot.asnumpy().ravel().tolist() == [2, 1, 0, 1, 0]
    assert keep.asnumpy().ravel().tolist() == [False, True, True, True, True]


@pytest.mark.parametrize("policy", ["probs", "affinity", "random"])
def test_priority_policies_keep_min_demand_capacity_and_contiguous_slots(policy):
    rng = np.random.default_rng(3)
    idx = np.stack([rng.choice(5, 2, replace=False) for _ in range(40)]).astype(np.int32)
    gate = rng.random((40, 2)).astype(np.float32)
    affinity = rng.random((40, 2)).astype(np.float32)
    slot, keep = assign_slots(policy, Tensor(idx), Tensor(gate), Tensor(affinity), 5, 6, True)
    slot, keep = slot.asnumpy(), keep.asnumpy()
    ranking = {"probs": gate, "affinity": affinity}.get(policy)
    for e in range(5):
        mine = idx == e
        assert sorted(slot[mine].tolist()) == list(range(mine.sum()))
        assert keep[mine].sum() == min(6, mine.sum())
        if ranking is not None and (~keep & mine).any():
            assert ranking[keep & mine].min() > ranking[~keep & mine].max()


def test_random_policy_keeps_every_subset_with_equal_probability():
    # 3 tokens want expert 0, C = 1: each is kept with probability 1/3 (RTS / Kool's skip rule).
    idx, ones = _t([[0], [0], [0]]), _t([[1.0]] * 3, np.float32)
    counts = np.zeros(3)
    for _ in range(600):
        counts += assign_slots("random", idx, ones, ones, 1, 1, True)[1].asnumpy().ravel()
    assert counts.sum() == 600
    assert np.abs(counts / 600 - 1 / 3).max() < 0.07  # 4 standard errors
    # Evaluation falls back to position: deterministic.
    assert assign_slots("random", idx, ones, ones, 1, 1, False)[1].asnumpy().ravel().tolist() == [True, False, False]


def test_none_policy_keeps_everything_at_dropless_capacity():
    idx = _t([[0], [0], [0], [1]])
    ones = _t([[1.0]] * 4, np.float32)
    slot, keep = assign_slots("none", idx, ones, ones, 2, dropless_capacity(4), True)
    assert keep.asnumpy().all() and slot.asnumpy().ravel().tolist() == [0, 1, 2, 0]
