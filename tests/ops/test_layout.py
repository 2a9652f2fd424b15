"""moe_dispatch_layout: the custom CPU kernel against the reference, and exact small cases."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

from pangu_moe.ops import make_op
from pangu_moe.ops.gating import position_slots
from tests.ops.parity import MODES


class Layout(nn.Cell):
    def __init__(self, op, capacity):
        super().__init__()
        self.op, self.capacity = op, capacity

    def construct(self, pair_index, slot, keep, requested):
        return self.op(pair_index, slot, keep, requested, self.capacity)


def layouts(pair_index, requested, capacity, ranks, experts, world, nodes, run_mode):
    """(reference outputs, cpu outputs) as numpy, slots from the position policy per buffer."""
    pair = Tensor(pair_index.astype(np.int32))
    req = Tensor(requested)
    slot, keep = position_slots(pair, ranks * experts, capacity, req)
    results = []
    for backend in ("reference", "cpu"):
        cell = Layout(make_op("moe_dispatch_layout", backend, ranks, experts, world, nodes), capacity)
        if run_mode == "graph":
            outputs = ms.jit(cell.construct)(pair, slot, keep, req)
        else:
            outputs = cell(pair, slot, keep, req)
        results.append([o.asnumpy() for o in outputs])
    return results


@pytest.mark.parametrize("run_mode", MODES)
@pytest.mark.parametrize("ranks,experts,world,nodes,capacity,top_k", [
    (1, 8, 4, 2, 3, 2), (4, 8, 4, 2, 5, 1), (2, 8, 8, 4, 2, 2), (4, 2, 4, 2, 3, 2),  # E < W
    (2, 4, 2, 1, 1, 2), (1, 4, 4, 4, 40, 1)])  # C = 1; C >= T
def test_random_layout_matches_reference(run_mode, ranks, experts, world, nodes, capacity, top_k):
    rng = np.random.RandomState(ranks * 100 + experts * 10 + capacity)
    tokens = 8 * ranks
    source = (np.arange(tokens) // (tokens // ranks)).reshape(-1, 1)
    pair_index = source * experts + rng.randint(0, experts, (tokens, top_k))
    requested = rng.rand(tokens, top_k) < 0.8
    reference, cpu = layouts(pair_index, requested, capacity, ranks, experts, world, nodes, run_mode)
    for name, r, c in zip(("flat_index", "tokens", "kept", "send", "node"), reference, cpu):
        np.testing.assert_array_equal(c, r, err_msg=name)
    assert reference[1].sum() == requested.sum()
    assert reference[3].sum() == reference[4].sum() == reference[2].sum() == (reference[0] < ranks * experts * capacity).sum()


def test_exact_small_layout():
    # R=1, E=4 on W=2 ranks of N=2 nodes, C=1, K=2: t0 -> (3, 0), t1 -> (3, 1), t2 -> (2, unrequested 0)
    pair_index = np.array([[3, 0], [3, 1], [2, 0]])
    requested = np.array([[True, True], [True, True], [True, False]])
    for outputs in layouts(pair_index, requested, 1, 1, 4, 2, 2, "pynative"):
        flat, tokens, kept, send, node = outputs
        np.testing.assert_array_equal(flat, [3, 0, 4, 1, 2, 4])  # t1's first choice overflows expert 3; sink = 4
        np.testing.assert_array_equal(tokens, [[1, 1, 1, 2]])
        np.testing.assert_array_equal(kept, [[1, 1, 1, 1]])
        np.testing.assert_array_equal(send, [[2, 2]])
        np.testing.assert_array_equal(node, [[2, 2]])


def test_kept_but_not_requested_is_an_error():
    op = make_op("moe_dispatch_layout", "cpu", 1, 4, 2, 1)
    with pytest.raises(RuntimeError, match="MoeDispatchLayout"):
        op(Tensor(np.array([[1]], np.int32)), Tensor(np.zeros((1, 1), np.int32)), Tensor(np.ones((1, 1), bool)),
           Tensor(np.zeros((1, 1), bool)), 2)[0].asnumpy()


def test_out_of_range_pair_is_an_error():
    op = make_op("moe_dispatch_layout", "cpu", 1, 4, 2, 1)
    index = Tensor(np.array([[4]], np.int32))
    with pytest.raises(RuntimeError, match="MoeDispatchLayout"):
        op(index, Tensor(np.zeros((1, 1), np.int32)), Tensor(np.ones((1, 1), bool)), Tensor(np.ones((1, 1), bool)),
           2)[0].asnumpy()
