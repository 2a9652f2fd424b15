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


def test_per_rank_surrogate_with_summed_counts_is_the_global_loss_in_mean_value_and_gradient():
    # moe.aux_scope = global, one rank per process: each of W = 4 ranks takes f over all ranks' choices
    # (here the sum is handed in, as the AllReduce would return it) and P over its own tokens; the mean of
    # the 4 rank losses is the loss of the 24 tokens at once, value and gradient, with 2 groups of unequal size.
    rng = np.random.default_rng(3)
    w, n, e, g = 4, 6, 4, 2
    scores = rng.random((w * n, e // g)).astype(np.float32)
    index = rng.integers(0, e // g, (w * n, 2)).astype(np.int32)
    groups = rng.integers(0, g, w * n).astype(np.int32)
    everything = lambda s: load_balancing_loss(s, Tensor(index), Tensor(groups), g, 0.01)
    want, want_grad = ms.value_and_grad(everything)(Tensor(scores))

    def counts(rows):  # [G, E_g + 1]: choices per (group, expert), then the group's tokens
        out = np.zeros((g, e // g + 1), np.float32)
        for t in rows:
            np.add.at(out[groups[t]], index[t], 1.0)
            out[groups[t], -1] += 1
        return out

    total = Tensor(counts(range(w * n)))
    summed = lambda local_counts: total
    got, got_grad = 0.0, []
    for r in range(w):
        rows = slice(r * n, (r + 1) * n)
        assert not np.allclose(counts(range(r * n, (r + 1) * n)), total.asnumpy())
        rank_loss = lambda s: load_balancing_loss(s, Tensor(index[rows]), Tensor(groups[rows]), g, 0.01, summed)
        value, grad = ms.value_and_grad(rank_loss)(Tensor(scores[rows]))
        got += float(value.asnumpy()) / w
        got_grad.append(grad.asnumpy() / w)
    assert abs(got - float(want.asnumpy())) < 1e-8
    np.testing.assert_allclose(np.concatenate(got_grad), want_grad.asnumpy(), rtol=1e-6)
    per_rank = np.mean([_aux(scores[r * n:(r + 1) * n], index[r * n:(r + 1) * n], groups[r * n:(r + 1) * n], g)
                        for r in range(w)])
    assert abs(per_rank - got) > 1e-4  # the per-rank scope is a different loss on this batch


def test_z_loss_formula_and_shift_sensitivity():
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], np.float32)
    lse = np.log(np.exp(logits).sum(1))
    expected = 0.001 * (lse ** 2).mean()
    assert abs(float(z_loss(Tensor(logits), 0.001).asnumpy()) - expected) < 1e-6 * expected
    assert float(z_loss(Tensor(logits + 1), 0.001).asnumpy()) > expected
