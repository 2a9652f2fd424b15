"""The Kool skip router inside the MoE layer: sampling, HT weights, ungated forward, weighted backward."""
import numpy as np
import mindspore as ms
from mindspore import Tensor

from pangu_moe.activations import fast_gelu
from pangu_moe.dispatch.dispatcher import Dispatcher
from pangu_moe.experts import GroupedExperts
from pangu_moe.model.moe_layer import MoELayer
from pangu_moe.routing import route
from pangu_moe.routing.kool_skip import KoolSkipRouter, horvitz_thompson

H, E = 8, 3


def _x(t, seed=0):
    return Tensor(np.random.default_rng(seed).standard_normal((t, H)).astype(np.float32))


def test_horvitz_thompson_weights_exact():
    idx = Tensor(np.array([[0], [0], [0], [1], [2], [2]], np.int32))
    keep = Tensor(np.array([[True], [False], [True], [True], [True], [True]]))
    w = horvitz_thompson(idx, keep, 3, 2).asnumpy().ravel()
    assert w.tolist() == [1.5, 0.0, 1.5, 1.0, 1.0, 1.0]


def test_training_samples_from_the_router_distribution_and_evaluation_takes_the_argmax():
    ms.set_seed(3)
    router = KoolSkipRouter(H, E, 1, 0.0, init_std=0.5)
    n = 4000
    x = Tensor(np.repeat(_x(1, 1).asnumpy(), n, 0))  # one token, n independent draws
    zeros = Tensor(np.zeros(n, np.int32))
    logits = (x.asnumpy()[0] @ router.weight.asnumpy()[0])
    p = np.exp(logits - logits.max())
    p /= p.sum()
    picks = route(router, x, zeros, zeros, n, training=True).expert_index.asnumpy()[:, 0]
    freq = np.bincount(picks, minlength=E) / n
    assert np.abs(freq - p).max() < 4 * np.sqrt(p * (1 - p) / n).max()
    r = route(router, x, zeros, zeros, n, training=False)
    assert (r.expert_index.asnumpy()[:, 0] == p.argmax()).all()
    np.testing.assert_allclose(r.log_prob.asnumpy()[0, 0], np.log(p.max()), rtol=1e-5)


def test_forward_is_ungated_and_backward_is_importance_weighted():
    ms.set_seed(5)
    layer = MoELayer(KoolSkipRouter(H, E, 1, 0.0, init_std=0.5), Dispatcher(E), GroupedExperts(E, H, 16, 0.3))
    x, zeros = _x(12, 2), Tensor(np.zeros(12, np.int32))
    cot = Tensor(np.random.default_rng(3).standard_normal((12, H)).astype(np.float32))
    capacity = 2
    r = route(layer.router, x, zeros, zeros, capacity, training=False)
    index, keep, weight = r.expert_index.asnumpy(), r.keep.asnumpy(), r.gate.asnumpy()
    # Horvitz-Thompson by hand: each kept choice of expert e weighs max(1, n_e / C), n_e its requests
    requests = np.bincount(index[:, 0], minlength=E)
    np.testing.assert_allclose(weight[:, 0], np.maximum(1.0, requests[index[:, 0]] / capacity) * keep[:, 0])
    assert keep.sum() < 12 and set(np.unique(weight[keep])) - {1.0}  # capacity binds, weights > 1 exist
    y, _, _, _, score, _ = layer(x, zeros, zeros, capacity, False)
    w_in, w_out = layer.experts.w_in.asnumpy(), layer.experts.w_out.asnumpy()
    xs = x.asnumpy()

    def expert(t):  # token t through its chosen expert, in numpy (fast GeLU: x sigmoid(1.702 x))
        h = xs[t] @ w_in[index[t, 0]]
        return (h / (1 + np.exp(-1.702 * h))) @ w_out[index[t, 0]]
    plain = np.array([expert(t) if keep[t, 0] else np.zeros(H, np.float32) for t in range(12)])
    np.testing.assert_allclose(y.asnumpy(), plain, rtol=1e-5, atol=1e-6)  # value: the expert's output, no gate
    np.testing.assert_allclose(score.asnumpy(), (keep * weight * r.log_prob.asnumpy()).sum(1), rtol=1e-6)

    def gated(x_):  # the same tokens through the same experts without the dispatcher, each scaled by its weight
        out = ms.ops.bmm(fast_gelu(ms.ops.bmm(x_.reshape(12, 1, H), ms.ops.gather(layer.experts.w_in,
                                                                                    r.expert_index[:, 0], 0))),
                         ms.ops.gather(layer.experts.w_out, r.expert_index[:, 0], 0)).reshape(12, H)  # (T, H)
        return (out * r.gate * cot).sum()
    grads = ms.grad(lambda x_: (layer(x_, zeros, zeros, capacity, False)[0] * cot).sum())(x).asnumpy()
    np.testing.assert_allclose(grads, ms.grad(gated)(x).asnumpy(), rtol=1e-5, atol=1e-6)  # d/dx scaled by w
