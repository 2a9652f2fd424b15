"""moe_permute / moe_unpermute: the custom CPU kernels against the reference, forward and gradients."""
import numpy as np
import pytest
from mindspore import Tensor, nn

from pangu_moe.ops import make_op
from pangu_moe.ops.gating import position_slots
from pangu_moe.ops.layout import reference_layout
from tests.ops.parity import MODES, assert_close, run


class PermuteRoundTrip(nn.Cell):
    """buffer = permute(x); y = unpermute(buffer * scale, weight): gradients reach x and weight."""

    def __init__(self, backend, buffers, capacity, scale):
        super().__init__()
        self.permute = make_op("moe_permute", backend, buffers)
        self.unpermute = make_op("moe_unpermute", backend)
        self.capacity, self.scale = capacity, scale

    def construct(self, x, weight, flat_index):
        buffer = self.permute(x, flat_index, self.capacity)
        return buffer, self.unpermute(buffer * self.scale, flat_index, weight)


def routing(expert_index, experts, capacity):
    slot, keep = position_slots(Tensor(expert_index.astype(np.int32)), experts, capacity)
    ones = Tensor(np.ones(expert_index.shape, bool))
    return reference_layout(Tensor(expert_index.astype(np.int32)), slot, keep, ones, capacity, 1, experts, 1, 1)[0]


def compare(expert_index, experts, capacity, hidden, run_mode):
    tokens, top_k = expert_index.shape
    rng = np.random.RandomState(tokens + capacity)
    x = Tensor(rng.randn(tokens, hidden).astype(np.float32))
    weight = Tensor(rng.rand(tokens, top_k).astype(np.float32))
    scale = Tensor(rng.randn(experts, capacity, hidden).astype(np.float32))
    cotangents = (Tensor(rng.randn(experts, capacity, hidden).astype(np.float32)),
                  Tensor(rng.randn(tokens, hidden).astype(np.float32)))
    flat_index = routing(expert_index, experts, capacity)
    results = [run(PermuteRoundTrip(b, experts, capacity, scale), x, weight, (flat_index,), (0, 1), cotangents,
                   run_mode, grad_position=(0, 1)) for b in ("reference", "cpu")]
    (ref_out, ref_grad), (cpu_out, cpu_grad) = results
    np.testing.assert_array_equal(cpu_out[0], ref_out[0], err_msg="buffer")  # a copy: exact
    assert_close(cpu_out[1], ref_out[1], "y")
    assert_close(cpu_grad[0], ref_grad[0], "d_x")
    assert_close(cpu_grad[1], ref_grad[1], "d_weight")
    return ref_out


@pytest.mark.parametrize("run_mode", MODES)
@pytest.mark.parametrize("capacity,top_k", [(1, 1), (3, 2), (24, 2)])  # C = 1, C < demand, C >= T
def test_random_routing(run_mode, capacity, top_k):
    rng = np.random.RandomState(capacity)
    expert_index = np.stack([rng.permutation(4)[:top_k] for _ in range(24)])
    compare(expert_index, 4, capacity, 8, run_mode)


@pytest.mark.parametrize("run_mode", MODES)
def test_all_tokens_to_one_expert(run_mode):
    expert_index = np.full((10, 1), 2)
    buffer, _ = compare(expert_index, 4, 3, 5, run_mode)
    assert not buffer[[0, 1, 3]].any()  # empty experts stay zero
    assert (buffer[2] != 0).all()


@pytest.mark.parametrize("run_mode", MODES)
def test_every_choice_dropped(run_mode):
    flat_index = Tensor(np.full(6, 2 * 2, np.int32))  # B*C = 4: all in the sink
    x = Tensor(np.ones((3, 4), np.float32))
    weight = Tensor(np.ones((3, 2), np.float32))
    zeros = Tensor(np.zeros((2, 2, 4), np.float32))
    cot = (Tensor(np.ones((2, 2, 4), np.float32)), Tensor(np.ones((3, 4), np.float32)))
    for backend in ("reference", "cpu"):
        (buffer, y), (d_x, d_weight) = run(PermuteRoundTrip(backend, 2, 2, zeros + 1), x, weight, (flat_index,),
                                           (0, 1), cot, run_mode, grad_position=(0, 1))
        assert not buffer.any() and not y.any() and not d_x.any() and not d_weight.any()


def test_exact_unpermute():
    buffer = Tensor(np.arange(12, dtype=np.float32).reshape(2, 2, 3))
    flat_index = Tensor(np.array([3, 0, 4, 1], np.int32))  # token 1's first choice dropped (sink = 4)
    weight = Tensor(np.array([[0.5, 2.0], [1.0, -1.0]], np.float32))
    expected = [[0.5 * 9 + 2 * 0, 0.5 * 10 + 2 * 1, 0.5 * 11 + 2 * 2], [-3, -4, -5]]
    for backend in ("reference", "cpu"):
        np.testing.assert_array_equal(make_op("moe_unpermute", backend)(buffer, flat_index, weight).asnumpy(), expected)


def test_the_gate_weights_fp16_rows_in_fp32():
    # fp16 rows (exact in fp16) times a gate fp16 cannot hold (1/3): y and the gate's gradient are fp32 products
    import mindspore as ms
    rows = np.array([[[3.0, 1.5], [6.0, 0.75]]], np.float16)  # (B=1, C=2, H=2)
    gate = np.array([[1 / 3], [0.1]], np.float32)  # (T=2, K=1)
    flat_index = Tensor(np.array([0, 1], np.int32))
    for backend in ("reference", "cpu"):
        op = make_op("moe_unpermute", backend)
        y = op(Tensor(rows), flat_index, Tensor(gate))
        assert y.dtype == ms.float32
        np.testing.assert_array_equal(y.asnumpy(), rows[0].astype(np.float32) * gate)
        d_gate = ms.grad(lambda g: op(Tensor(rows), flat_index, g).sum())(Tensor(gate))
        assert d_gate.dtype == ms.float32
        np.testing.assert_array_equal(d_gate.asnumpy(), rows[0].astype(np.float32).sum(1, keepdims=True))


def test_index_beyond_the_sink_is_an_error():
    op = make_op("moe_permute", "cpu", 2)
    with pytest.raises(RuntimeError, match="MoePermute"):
        op(Tensor(np.ones((2, 3), np.float32)), Tensor(np.array([0, 5], np.int32)), 2).asnumpy()
