import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from pangu_moe.routing.losses import load_balancing_loss, z_loss


def _aux(scores, index, groups, num_groups, coeff=0.01):
    return float(load_balancing_loss(Tensor(scores, ms.float32), Tensor(index, ms.int32), Tensor(groups, ms.int32),
                                     num_groups, coeff).asnumpy())


def test_aux_equals_alpha_at_perfect_balance():
    e, t = 4, 12
    scores = np.full((t, e), 1 / e, np.float32)
    index = (np.arange(t) % e).reshape(-1, 1)
    assert abs(_aux(scores, index, np.zeros(t), 1) - 0.01) < 1e-9


def test_aux_equals_alpha_times_e_at_collapse():
    e, t = 4, 12
    scores = np.zeros((t, e), np.float32)
    scores[:, 2] = 1.0
    assert abs(_aux(scores, np.full((t, 1), 2), np.zeros(t), 1) - 0.04) < 1e-9


def test_aux_tends_to_alpha_e_as_router_collapses():
    e, t = 8, 64
    values = []
    for sharpness in (1.0, 5.0, 20.0):
        logits = np.zeros((t, e), np.float32)
        logits[:, 0] = sharpness
        scores = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        values.append(_aux(scores, np.zeros((t, 1)), np.zeros(t), 1))
    assert values[0] < values[1] < values[2] < 0.08 and values[2] > 0.0799


def test_aux_per_group_balance_gives_alpha_whatever_the_domain_mix():
    # Group 0 has 6 tokens, group 1 has 2; both perfectly balanced over their 2 experts.
    scores = np.full((8, 2), 0.5, np.float32)
    groups = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    index = np.array([0, 1, 0, 1, 0, 1, 0, 1]).reshape(-1, 1)
    assert abs(_aux(scores, index, groups, 2) - 0.01) < 1e-9


def test_aux_gradient_flows_through_scores_only():
    logits = Tensor(np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32))
    index = Tensor(np.zeros((10, 1), np.int32))
    groups = Tensor(np.zeros(10, np.int32))

    def f(lg):
        return load_balancing_loss(ops.softmax(lg, -1), index, groups, 1, 0.01)

    grad = ms.grad(f)(logits).asnumpy()
    # d/dlogits of 0.01*4*f_0*P_0 with f_0 = 1: nonzero, rows sum to zero (softmax Jacobian).
    assert np.abs(grad).max() > 0
    np.testing.assert_allclose(grad.sum(1), 0, atol=1e-8)


def test_z_loss_formula_and_shift_sensitivity():
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], np.float32)
    lse = np.log(np.exp(logits).sum(1))
    expected = 0.001 * (lse ** 2).mean()
    assert abs(float(z_loss(Tensor(logits), 0.001).asnumpy()) - expected) < 1e-6 * expected
    assert float(z_loss(Tensor(logits + 1), 0.001).asnumpy()) > expected
