import numpy as np
from mindspore import Tensor

from pangu_moe.routing.slots import position_slots


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
