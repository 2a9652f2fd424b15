"""The MoE layer against two slow references: a per-token loop and a [T, E, C] one-hot dispatch."""
import numpy as np
import mindspore as ms
import pytest
from mindspore import Tensor

from pangu_moe.dispatch.dispatcher import Dispatcher
from pangu_moe.experts import GroupedExperts
from pangu_moe.model.moe_layer import MoELayer
from pangu_moe.routing import route
from pangu_moe.routing.topk import TopKRouter


def _gelu(x):
    return x / (1 + np.exp(-1.702 * x))


def _layer(e=4, g=1, k=1, h=8, f=16):
    ms.set_seed(11)
    return MoELayer(TopKRouter(h, e, g, k, 0.01, 0.001), Dispatcher(e), GroupedExperts(e, h, f, 0.3))


def _loop_reference(layer, x, expert_index, gate, keep):
    w_in, w_out = layer.experts.w_in.asnumpy(), layer.experts.w_out.asnumpy()
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(expert_index.shape[1]):
            if keep[t, j]:
                e = expert_index[t, j]
                y[t] += gate[t, j] * (_gelu(x[t] @ w_in[e]) @ w_out[e])
    return y


def _onehot_reference(layer, x, expert_index, gate, keep, slot, capacity):
    w_in, w_out = layer.experts.w_in.asnumpy(), layer.experts.w_out.asnumpy()
    t, k = expert_index.shape
    e = w_in.shape[0]
    dispatch = np.zeros((t, e, capacity), np.float32)  # the [T, E, C] tensor the layer never builds
    combine = np.zeros((t, e, capacity), np.float32)
    for i in range(t):
        for j in range(k):
            if keep[i, j]:
                dispatch[i, expert_index[i, j], slot[i, j]] = 1
                combine[i, expert_index[i, j], slot[i, j]] = gate[i, j]
    expert_in = np.tensordot(dispatch, x, axes=([0], [0]))  # (E, C, H)
    expert_out = np.stack([_gelu(expert_in[i] @ w_in[i]) @ w_out[i] for i in range(e)])
    return np.tensordot(combine, expert_out, axes=([1, 2], [0, 1]))


@pytest.mark.parametrize("k, capacity", [(1, 3), (1, 40), (2, 5), (2, 1)])
def test_layer_matches_loop_and_onehot_references(k, capacity):
    layer = _layer(k=k)
    rng = np.random.default_rng(k * 100 + capacity)
    x = rng.standard_normal((40, 8)).astype(np.float32)
    zeros = Tensor(np.zeros(40, np.int32))
    y, _, demand, kept, _, _ = layer(Tensor(x), zeros, zeros, capacity, False)
    r = route(layer.router, Tensor(x), zeros, zeros, capacity)
    idx, gate, keep, slot = (v.asnumpy() for v in r[:4])
    np.testing.assert_allclose(y.asnumpy(), _loop_reference(layer, x, idx, gate, keep), atol=1e-5)
    np.testing.assert_allclose(y.asnumpy(), _onehot_reference(layer, x, idx, gate, keep, slot, capacity), atol=1e-5)
    assert demand.asnumpy().sum() == 40 * k
    assert kept.asnumpy().sum() == keep.sum() and (kept.asnumpy() <= capacity).all()


def test_fully_dropped_token_gets_exactly_zero():
    layer = _layer()
    weight = np.zeros((1, 8, 4), np.float32)
    weight[0, :, 0] = 1.0  # positive inputs -> every token prefers expert 0
    layer.router.weight.set_data(Tensor(weight))
    x = Tensor(np.abs(np.random.default_rng(1).standard_normal((10, 8))).astype(np.float32))
    zeros = Tensor(np.zeros(10, np.int32))
    y, _, demand, kept, _, _ = layer(x, zeros, zeros, 4, False)
    assert demand.asnumpy().tolist() == [[10, 0, 0, 0]] and kept.asnumpy().tolist() == [[4, 0, 0, 0]]
    assert (y.asnumpy()[4:] == 0).all() and (np.abs(y.asnumpy()[:4]).sum(1) > 0).all()


def test_input_and_router_gradients_match_finite_differences():
    layer = _layer(k=2)
    rng = np.random.default_rng(5)
    x = Tensor(rng.standard_normal((12, 8)).astype(np.float32))
    zeros = Tensor(np.zeros(12, np.int32))
    cot = rng.standard_normal((12, 8)).astype(np.float32)

    def loss(inp):
        return (layer(inp, zeros, zeros, 5, False)[0] * Tensor(cot)).sum()

    grad_x, (grad_router,) = ms.grad(loss, 0, [layer.router.weight])(x)
    grad_x, grad_router = grad_x.asnumpy(), grad_router.asnumpy()
    keep = route(layer.router, x, zeros, zeros, 5).keep.asnumpy()
    assert keep.all(1).any()
    t = int(np.argmax(keep.all(1)))  # a token whose two choices were both kept

    def central_difference(perturb, eps):
        return (float(perturb(eps).asnumpy()) - float(perturb(-eps).asnumpy())) / (2 * eps)

    for col in range(3):  # input: a tiny step does not change the routing decision
        def shifted(d, col=col):
            moved = x.asnumpy().copy()
            moved[t, col] += d
            return loss(Tensor(moved))
        assert abs(central_difference(shifted, 1e-2) - grad_x[t, col]) < 2e-2 * max(1.0, abs(grad_x[t, col]))
    original = layer.router.weight.asnumpy().copy()
    for h in range(2):  # router weight: reaches the loss through the gates
        def shifted_weight(d, h=h):
            moved = original.copy()
            moved[0, h, 0] += d
            layer.router.weight.set_data(Tensor(moved))
            return loss(x)
        fd = central_difference(shifted_weight, 1e-3)  # small: a large step could flip a routing choice
        layer.router.weight.set_data(Tensor(original))
        assert abs(fd - grad_router[0, h, 0]) < 2e-2 * max(1.0, abs(fd))
    assert np.abs(grad_router).max() > 0


@pytest.mark.parametrize("k", [1, 2])
def test_without_binding_capacity_nothing_drops_and_token_order_does_not_matter(k):
    layer = _layer(k=k)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((24, 8)).astype(np.float32)
    perm = rng.permutation(24)
    zeros = Tensor(np.zeros(24, np.int32))
    y, _, demand, kept, _, _ = layer(Tensor(x), zeros, zeros, 24, False)  # C = T: cannot bind
    y_perm = layer(Tensor(x[perm]), zeros, zeros, 24, False)[0]
    assert (demand.asnumpy() == kept.asnumpy()).all()
    np.testing.assert_allclose(y_perm.asnumpy(), y.asnumpy()[perm], rtol=1e-5, atol=1e-6)


def _aux_oracle(probs, choice, num_experts):
    """alpha = 1: E * sum_i f_i P_i with f the share of the choices and P the mean probability (numpy)."""
    f = np.bincount(choice, minlength=num_experts) / len(choice)
    return num_experts * float(np.sum(f * probs.mean(0)))


@pytest.mark.parametrize("scope", ["rank", "global"])
def test_aux_scope_takes_f_and_p_over_each_rank_or_all_ranks(scope):
    # 2 ranks of 16 tokens, 4 experts, K = 1; rank 0's tokens lean to expert 0, rank 1's to expert 1, so each rank
    # alone is unbalanced while the two together are half as concentrated
    e, h, ranks, n = 4, 8, 2, 16
    ms.set_seed(3)
    router = TopKRouter(h, e, 1, 1, 1.0, 0.0)
    layer = MoELayer(router, Dispatcher(e, ranks, ranks), GroupedExperts(e, h, 16, 0.3), ranks, aux_scope=scope)
    weight = router.weight.asnumpy()[0]  # (H, E)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((ranks * n, h)).astype(np.float32)
    for r in range(ranks):
        x[r * n:(r + 1) * n] += 3.0 * weight[:, r] / np.linalg.norm(weight[:, r]) ** 2 * 0.1
    zeros = Tensor(np.zeros(ranks * n, np.int32))
    losses = layer(Tensor(x), zeros, zeros, n, True)[1].asnumpy()
    logits = x @ weight
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    choice = probs.argmax(1)
    per_rank = np.mean([_aux_oracle(probs[r * n:(r + 1) * n], choice[r * n:(r + 1) * n], e) for r in range(ranks)])
    whole = _aux_oracle(probs, choice, e)
    assert abs(per_rank - whole) > 0.05  # the case tells the scopes apart
    np.testing.assert_allclose(losses[0], per_rank if scope == "rank" else whole, rtol=1e-5)
