import numpy as np
import mindspore as ms
from mindspore import Tensor

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


def test_aux_gradient_is_alpha_e_f_over_t():
    # L = alpha * E * sum_i f_i * P_i with P_i = mean_t scores[t, i] and f a constant count, so
    # dL/dscores[t, i] = alpha * E * f_i / T for every token t.
    rng = np.random.default_rng(0)
    scores = Tensor(rng.random((10, 4)).astype(np.float32))
    index = Tensor(np.array([0, 0, 0, 1, 1, 2, 0, 1, 2, 0], np.int32).reshape(-1, 1))
    groups = Tensor(np.zeros(10, np.int32))
    grad = ms.grad(lambda s: load_balancing_loss(s, index, groups, 1, 0.01))(scores).asnumpy()
    f = np.array([5, 3, 2, 0]) / 10
    np.testing.assert_allclose(grad, np.tile(0.01 * 4 * f / 10, (10, 1)), rtol=1e-6)


def test_z_loss_formula_and_shift_sensitivity():
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], np.float32)
    lse = np.log(np.exp(logits).sum(1))
    expected = 0.001 * (lse ** 2).mean()
    assert abs(float(z_loss(Tensor(logits), 0.001).asnumpy()) - expected) < 1e-6 * expected
    assert float(z_loss(Tensor(logits + 1), 0.001).asnumpy()) > expected
