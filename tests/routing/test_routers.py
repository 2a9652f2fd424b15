"""Expert Choice, Sinkhorn and DeepSeek invariants (docs/architecture.md, Routers)."""
import numpy as np
import mindspore as ms
import pytest
from mindspore import Tensor, ops

from pangu_moe.dispatch.topology import Topology
from pangu_moe.routing import route
from pangu_moe.routing.balanced import balanced_assignment
from pangu_moe.routing.deepseek import DeepSeekRouter, node_limit_mask
from pangu_moe.routing.losses import sequence_balance_loss
from pangu_moe.routing.expert_choice import ExpertChoiceRouter
from pangu_moe.routing.sinkhorn import SinkhornRouter, sinkhorn_bias

H = 16


def _x(t, seed=0, scale=1.0):
    return Tensor((scale * np.random.default_rng(seed).standard_normal((t, H))).astype(np.float32))


def _ids(values):
    return Tensor(np.asarray(values, np.int32))


# ---- Expert Choice

def test_expert_choice_fills_every_expert_with_its_best_tokens():
    router = ExpertChoiceRouter(H, 4, 1, 0.0, init_std=0.5)
    x, zeros = _x(20, 1), _ids(np.zeros(20))
    r = route(router, x, zeros, zeros, 6)
    keep, gate, slot = r.keep.asnumpy(), r.gate.asnumpy(), r.slot.asnumpy()
    assert keep.shape == (20, 4) and (keep.sum(0) == 6).all()         # each expert exactly C tokens
    assert keep.sum() == 4 * 6 and (r.requested.asnumpy() == keep).all()
    for e in range(4):
        assert gate[keep[:, e], e].min() >= gate[~keep[:, e], e].max()  # its C best
        assert sorted(slot[keep[:, e], e].tolist()) == list(range(6))
    np.testing.assert_allclose(gate.sum(1), 1.0, rtol=1e-5)           # softmax over the experts


def test_expert_choice_stays_inside_the_domain_group():
    router = ExpertChoiceRouter(H, 4, 2, 0.0)
    groups = _ids([0] * 5 + [1] * 15)
    r = route(router, _x(20, 2), groups, groups, 8)
    keep = r.keep.asnumpy()
    assert not keep[:5, 2:].any() and not keep[5:, :2].any()
    assert keep[:5, :2].sum(0).tolist() == [5, 5]                      # group 0 has only 5 tokens < C
    assert keep[5:, 2:].sum(0).tolist() == [8, 8]


# ---- Sinkhorn

def test_sinkhorn_balances_the_soft_matrix_and_selects_topk_of_biased_logits():
    logits = Tensor(np.random.default_rng(3).standard_normal((64, 4)).astype(np.float32) * 2)
    zeros = _ids(np.zeros(64))
    log_d1 = sinkhorn_bias(logits, zeros, 1, 200)
    k = np.exp(logits.asnumpy()) * np.exp(log_d1.asnumpy())
    p = k / k.sum(1, keepdims=True) / 64  # row scaling d0: rows sum to 1/T
    np.testing.assert_allclose(p.sum(0), 0.25 / 1, rtol=1e-3)          # columns -> 1/E (of total mass 1)
    router = SinkhornRouter(H, 4, 1, 1, 0.0, iterations=200, init_std=1.0)
    x = _x(64, 4)
    r = route(router, x, zeros, zeros, 64, training=True)
    raw = ops.matmul(x, router.weight[0]).asnumpy()
    # S-BASE's balancing in numpy: scale the rows of exp(logits) to 1/T and the columns to 1/E, alternately
    k, d1 = np.exp(raw.astype(np.float64) - raw.max()), np.ones(4)
    for _ in range(200):
        d0 = (1 / 64) / (k * d1).sum(1, keepdims=True)
        d1 = (1 / 4) / (k * d0).sum(0)
    biased = raw + np.log(d1)
    np.testing.assert_array_equal(r.expert_index.asnumpy()[:, 0], biased.argmax(1))
    np.testing.assert_allclose(r.gate.asnumpy()[:, 0], 1 / (1 + np.exp(-raw[np.arange(64), biased.argmax(1)])),
                               rtol=1e-5)
    counts = np.bincount(r.expert_index.asnumpy()[:, 0], minlength=4)
    plain = np.bincount(raw.argmax(1), minlength=4)
    assert counts.max() - counts.min() <= plain.max() - plain.min()


def test_sinkhorn_gradient_skips_the_scaling():
    router = SinkhornRouter(H, 4, 1, 1, 0.0, iterations=5)
    zeros = _ids(np.zeros(8))
    x = _x(8, 5)

    grad = ms.grad(lambda x_: route(router, x_, zeros, zeros, 8, training=True).gate.sum())(x).asnumpy()
    idx = route(router, x, zeros, zeros, 8, training=True).expert_index.asnumpy()[:, 0]
    w = router.weight.asnumpy()[0]
    logit = (x.asnumpy() * w[:, idx].T).sum(1)
    sig = 1 / (1 + np.exp(-logit))
    expected = (sig * (1 - sig))[:, None] * w[:, idx].T  # d sigmoid(x . w_e) / dx, selection held fixed
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)


# ---- DeepSeek

def _deepseek(e=4, k=1, node_limit=0, nodes=1, seq_len=8, rate=0.01, seq_aux=0.0):
    topo = Topology(nodes, 1, e)
    return DeepSeekRouter(H, e, 1, k, seq_len, seq_aux, rate, node_limit, topo.expert_node(), nodes, init_std=0.5)


def test_deepseek_bias_changes_selection_but_never_gates():
    router = _deepseek(k=2)
    x, zeros = _x(32, 6), _ids(np.zeros(32))
    before = route(router, x, zeros, zeros, 32)
    ops.assign(router.bias, Tensor(np.array([[0.0, 0.0, 0.0, 5.0]], np.float32)))
    after = route(router, x, zeros, zeros, 32)
    assert (after.expert_index.asnumpy() == 3).any(1).all()             # the bias pulls every token to 3
    scores = 1 / (1 + np.exp(-ops.matmul(x, router.weight[0]).asnumpy()))
    chosen = np.take_along_axis(scores, after.expert_index.asnumpy(), 1)
    np.testing.assert_allclose(after.gate.asnumpy(), chosen / chosen.sum(1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(before.gate.asnumpy().sum(1), 1.0, rtol=1e-5)
    assert router.bias.dtype == ms.float32 and not router.bias.requires_grad


def test_deepseek_bias_updates_reduce_max_over_mean_load():
    router = _deepseek(rate=0.02)
    x = Tensor((np.random.default_rng(7).standard_normal((256, H)) + 0.8).astype(np.float32))  # skewed
    zeros = _ids(np.zeros(256))

    def load():
        return np.bincount(route(router, x, zeros, zeros, 256).expert_index.asnumpy()[:, 0], minlength=4)

    first = load()
    for _ in range(60):
        router.after_step(load())
    last = load()
    assert last.max() / last.mean() < first.max() / first.mean()


def test_node_limited_routing_spans_at_most_m_nodes():
    router = _deepseek(e=8, k=4, node_limit=2, nodes=4)
    x, zeros = _x(64, 8), _ids(np.zeros(64))
    idx = route(router, x, zeros, zeros, 256).expert_index.asnumpy()
    nodes = Topology(4, 1, 8).expert_node()[idx]
    assert max(len(set(row)) for row in nodes) <= 2
    biased = Tensor(np.array([[0.9, 0.1, 0.8, 0.7, 0.2, 0.1, 0.3, 0.3]], np.float32))
    node_of = Tensor(np.array([[0, 0, 1, 1, 2, 2, 3, 3]], np.int32))
    mask = node_limit_mask(biased, node_of, _ids([0]), 4, 2, 4)  # node scores: top-2 sums 1.0, 1.5, 0.3, 0.6
    assert mask.asnumpy().tolist() == [[True, True, True, True, False, False, False, False]]


def test_sequence_balance_loss_is_alpha_at_balance():
    scores = Tensor(np.full((8, 4), 0.5, np.float32))
    balanced = _ids([[0], [1], [2], [3], [0], [1], [2], [3]])
    assert float(sequence_balance_loss(scores, balanced, 4, 0.1).asnumpy()) == pytest.approx(0.1, rel=1e-6)
    collapsed = _ids([[0]] * 8)
    assert float(sequence_balance_loss(scores, collapsed, 4, 0.1).asnumpy()) == pytest.approx(0.1, rel=1e-6)
    peaked = Tensor(np.tile(np.array([[0.9, 0.1, 0.1, 0.1]], np.float32), (8, 1)))
    assert float(sequence_balance_loss(peaked, collapsed, 4, 0.1).asnumpy()) > 0.1 * 2


# ---- BASE

def test_base_training_assignment_is_balanced_and_optimal_and_test_is_argmax():
    from pangu_moe.routing.balanced import BASERouter
    router = BASERouter(H, 4, 2, 0.0, init_std=0.5)
    groups = _ids([0] * 12 + [1] * 8)
    x = _x(20, 9)
    r = route(router, x, groups, groups, 3, training=True)
    idx = r.expert_index.asnumpy()[:, 0]
    assert np.bincount(idx[:12], minlength=4).tolist() == [6, 6, 0, 0]  # T_g / E_g per expert
    assert np.bincount(idx[12:], minlength=4).tolist() == [0, 0, 4, 4]
    assert r.keep.asnumpy().sum() == 4 * 3  # the buffer C = 3 keeps the first 3 of each
    logits = np.stack([x.asnumpy() @ router.weight.asnumpy()[g] for g in range(2)])  # (G, T, E_g)
    own = logits[groups.asnumpy(), np.arange(20)]  # (T, E_g)
    # optimal among all C(12, 6) = 924 balanced splits of group 0's tokens, enumerated
    import itertools
    best = max(own[list(first), 0].sum() + own[[t for t in range(12) if t not in first], 1].sum()
               for first in itertools.combinations(range(12), 6))
    assert own[np.arange(12), idx[:12]].sum() == pytest.approx(best, rel=1e-6)
    np.testing.assert_allclose(r.gate.asnumpy()[:, 0], 1 / (1 + np.exp(-own[np.arange(20), idx % 2])), rtol=1e-5)
    test = route(router, x, groups, groups, 20, training=False).expert_index.asnumpy()[:, 0]
    assert (test % 2 == own.argmax(1)).all()

    def experts_of(x_):
        return router(x_, groups, groups, 3, True)[0]

    assert (ms.jit(experts_of)(x).asnumpy()[:, 0] == idx).all()  # the host assignment inside a compiled graph


def test_transportation_lp_matches_the_linear_assignment():
    affinity = np.random.default_rng(10).standard_normal((300, 5))
    via_lp = balanced_assignment(affinity, 60)  # N > 256: the LP
    from scipy.optimize import linear_sum_assignment
    rows, cols = linear_sum_assignment(np.repeat(affinity, 60, axis=1), maximize=True)
    assert np.bincount(via_lp, minlength=5).tolist() == [60] * 5
    assert affinity[np.arange(300), via_lp].sum() == pytest.approx(affinity[rows, cols // 60].sum(), rel=1e-9)
