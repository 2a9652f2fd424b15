"""moe_gating: the custom CPU kernel against the reference, forward and gradient, PyNative and graph."""
import numpy as np
import pytest
from mindspore import Tensor, nn

from pangu_moe.ops import make_op
from pangu_moe.ops.gating import GRAP, SOFTMAX, SOFTMAX_NORMALIZE, choose_top_k
from tests.ops.parity import MODES, assert_close, run

INT_OUTPUTS = (1, 3, 4, 5)  # expert_index, slot, keep, tokens_per_expert
FLOAT_OUTPUTS = (0, 2)  # scores, gate


class Gating(nn.Cell):
    """The op with a fixed capacity (a graph constant, as in the model)."""

    def __init__(self, op, capacity):
        super().__init__()
        self.op, self.capacity = op, capacity

    def construct(self, logits, group_ids):
        return self.op(logits, group_ids, self.capacity)


def compare(logits, group_ids, top_k, num_experts, mode, capacity, run_mode):
    """Assert cpu == reference (ints exact, floats and d_logits within 1e-6); return the reference outputs."""
    rng = np.random.RandomState(1)
    weights = (Tensor(rng.randn(*logits.shape).astype(np.float32)),
               Tensor(rng.randn(logits.shape[0], top_k).astype(np.float32)))
    results = [run(Gating(make_op("moe_gating", backend, top_k, num_experts, mode), capacity), Tensor(logits),
                   Tensor(group_ids), (), FLOAT_OUTPUTS, weights, run_mode) for backend in ("reference", "cpu")]
    (ref_out, ref_grad), (cpu_out, cpu_grad) = results
    for i in INT_OUTPUTS:
        np.testing.assert_array_equal(cpu_out[i], ref_out[i], err_msg=f"output {i}")
    for i in FLOAT_OUTPUTS:
        assert_close(cpu_out[i], ref_out[i], f"output {i}")
    assert_close(cpu_grad[0], ref_grad[0], "d_logits")
    return ref_out, ref_grad[0]


def random_case(seed, num_tokens, experts_per_group, groups):
    rng = np.random.RandomState(seed)
    logits = (rng.randn(num_tokens, experts_per_group) * 2).astype(np.float32)
    return logits, rng.randint(0, groups, num_tokens).astype(np.int32)


@pytest.mark.parametrize("run_mode", MODES)
@pytest.mark.parametrize("mode,top_k", [(SOFTMAX, 1), (SOFTMAX_NORMALIZE, 2), (SOFTMAX, 2), (GRAP, 1), (GRAP, 2)])
@pytest.mark.parametrize("capacity", [1, 4, 37])  # C = 1, C < demand, C >= T
def test_random_inputs(run_mode, mode, top_k, capacity):
    logits, group_ids = random_case(capacity, 37, 5, 2)
    out, _ = compare(logits, group_ids, top_k, 10, mode, capacity, run_mode)
    assert out[5].sum() == 37 * top_k
    assert (out[4] == (out[3] < capacity)).all()


@pytest.mark.parametrize("run_mode", MODES)
def test_all_tokens_to_one_expert_and_empty_experts(run_mode):
    logits = np.zeros((12, 4), np.float32)
    logits[:, 2] = 5.0
    out, _ = compare(logits, np.zeros(12, np.int32), 1, 4, SOFTMAX, 3, run_mode)
    np.testing.assert_array_equal(out[5], [0, 0, 12, 0])
    np.testing.assert_array_equal(out[3][:, 0], np.arange(12))
    assert out[4].sum() == 3


@pytest.mark.parametrize("run_mode", MODES)
def test_k2_ties_go_to_the_lower_expert(run_mode):
    logits = np.array([[1, 1, 1, 1], [0, 2, 2, 0], [3, 1, 3, 3], [-1, -1, -1, -1]], np.float32)
    out, _ = compare(logits, np.zeros(4, np.int32), 2, 4, SOFTMAX_NORMALIZE, 2, run_mode)
    np.testing.assert_array_equal(out[1], [[0, 1], [1, 2], [0, 2], [0, 1]])
    np.testing.assert_allclose(out[2], 0.5)
    # service order: all first choices (tokens 0..3), then all second choices
    np.testing.assert_array_equal(out[3], [[0, 1], [0, 0], [1, 1], [2, 2]])
    np.testing.assert_array_equal(out[4], [[True, True], [True, True], [True, True], [False, False]])


@pytest.mark.parametrize("run_mode", MODES)
def test_grap_mode_all_nonpositive_logits(run_mode):
    # relu zeroes every logit: uniform scores, the choice follows the pre-ReLU order, the gradient is 0
    logits = np.array([[-3, -1, -2, -4], [-1, -1, -5, -0.5]], np.float32)
    out, d_logits = compare(logits, np.array([1, 0], np.int32), 1, 8, GRAP, 2, run_mode)
    np.testing.assert_array_equal(out[1][:, 0], [5, 3])
    np.testing.assert_allclose(out[2][:, 0], 0.25)
    assert not d_logits.any()


def test_choose_top_k_exact():
    values = Tensor(np.array([[0.1, 0.5, 0.5, 0.2], [3, 2, 1, 0]], np.float32))
    np.testing.assert_array_equal(choose_top_k(values, 3).asnumpy(), [[1, 2, 3], [0, 1, 2]])


@pytest.mark.parametrize("run_mode", MODES)
def test_k_equals_the_group_size_and_zero_capacity(run_mode):
    logits, group_ids = random_case(5, 9, 3, 1)
    out, _ = compare(logits, group_ids, 3, 3, SOFTMAX_NORMALIZE, 0, run_mode)  # every expert chosen, none kept
    np.testing.assert_array_equal(np.sort(out[1], 1), np.tile([0, 1, 2], (9, 1)))
    assert not out[4].any() and out[5].sum() == 27


def test_bad_group_id_is_an_error():
    op = make_op("moe_gating", "cpu", 1, 4, SOFTMAX)
    with pytest.raises(RuntimeError, match="MoeGating"):
        outputs = op(Tensor(np.zeros((3, 2), np.float32)), Tensor(np.array([0, 2, 1], np.int32)), 2)
        outputs[0].asnumpy()
