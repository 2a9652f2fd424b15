import math

import numpy as np
import mindspore as ms
import pytest
from mindspore import Parameter, Tensor, nn

from pangu_moe.train.optim import HybridEpsAdamW, clip_by_global_norm
from pangu_moe.train.schedule import learning_rate


class _Net(nn.Cell):
    def __init__(self):
        super().__init__()
        self.dense_w = Parameter(Tensor(np.array([[1.0, -2.0]], np.float32)), name="dense_w")
        self.gain = Parameter(Tensor(np.array([0.5], np.float32)), name="gain")


def _numpy_adamw(p, grads, lr, eps, decay, b1=0.9, b2=0.95):
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p * (1 - lr * decay) - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return p


@pytest.mark.parametrize("fused", [False, True])
def test_adamw_matches_numpy_and_uses_hybrid_eps(fused):
    """The elementwise update and the fused AdamWeightDecay kernel with bias correction folded in agree with the
    numpy formula, and a skipped step changes no bit of either."""
    net = _Net()
    # Name one parameter like an expert weight to get the expert epsilon.
    net.gain.name = "moe_blocks.0.moe.experts.gain"
    opt = HybridEpsAdamW(net.trainable_params(), 0.9, 0.95, eps=0.5, expert_eps=1e-20, weight_decay=0.1, fused=fused)
    assert opt.eps == (0.5, 1e-20) and opt.decay == (0.1, 0.0)
    grads = [(np.array([[0.1, 0.2]], np.float32), np.array([1e-6], np.float32)),
             (np.array([[-0.3, 0.0]], np.float32), np.array([2e-6], np.float32))]
    apply, skip = Tensor(True), Tensor(False)
    for g in grads:
        opt(tuple(Tensor(x) for x in g), Tensor(0.01, ms.float32), apply)
        before = [p.asnumpy().copy() for p in opt.get_parameters()]
        poisoned = tuple(Tensor(np.full_like(x, np.nan)) for x in g)
        opt(poisoned, Tensor(0.01, ms.float32), skip)  # a skipped step changes no bit of the state
        assert all(np.array_equal(a, p.asnumpy()) for a, p in zip(before, opt.get_parameters()))
    expected_w = _numpy_adamw(np.array([[1.0, -2.0]]), [g[0] for g in grads], 0.01, 0.5, 0.1)
    expected_g = _numpy_adamw(np.array([0.5]), [g[1] for g in grads], 0.01, 1e-20, 0.0)
    np.testing.assert_allclose(net.dense_w.asnumpy(), expected_w, rtol=1e-6)
    np.testing.assert_allclose(net.gain.asnumpy(), expected_g, rtol=1e-6)
    # With eps 1e-20 a tiny gradient still moves the expert weight by about lr.
    assert abs(0.5 - net.gain.asnumpy()[0]) > 0.009
    assert int(opt.step.asnumpy()) == 2


def test_clip_by_global_norm():
    grads = (Tensor(np.array([3.0], np.float32)), Tensor(np.array([[4.0]], np.float32)))
    clipped, norm = clip_by_global_norm(grads, 1.0)
    assert abs(float(norm.asnumpy()) - 5.0) < 1e-6
    np.testing.assert_allclose([float(clipped[0].asnumpy()[0]), float(clipped[1].asnumpy()[0, 0])], [0.6, 0.8],
                               rtol=1e-5)
    same, _ = clip_by_global_norm(grads, 0.0)
    assert same is grads


def test_schedule_warmup_then_cosine():
    values = [learning_rate(s, 1.0, 0.1, 4, 14) for s in range(14)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == 1.0 and abs(values[-1] - 0.1) < 1e-12
    assert abs(values[9] - (0.1 + 0.45 * (1 + math.cos(math.pi * 5 / 9)))) < 1e-12
    assert all(a >= b for a, b in zip(values[3:], values[4:]))
