"""The exchange: simulated all-to-all primitives, flat vs hierarchical, and the MoE layer's per-rank
routing groups and send buffers on the local and simulated backends."""
import numpy as np
import mindspore as ms
import pytest
from mindspore import Tensor

from pangu_moe.dispatch.collectives import group_members
from pangu_moe.dispatch.dispatcher import Dispatcher
from pangu_moe.dispatch.exchange import Exchange
from pangu_moe.experts import GroupedExperts
from pangu_moe.model.moe_layer import MoELayer
from pangu_moe.routing.topk import TopKRouter


def test_group_members_of_two_nodes_by_two_devices():
    assert group_members("world", 2, 2, 2) == [0, 1, 2, 3]
    assert group_members("intra", 2, 2, 2) == [2, 3]
    assert group_members("inter", 2, 2, 2) == [0, 2]
    assert group_members("inter", 3, 2, 2) == [1, 3]
    with pytest.raises(ValueError, match="group kind 'ring'"):
        group_members("ring", 0, 2, 2)


@pytest.mark.parametrize("nodes,devices", [(2, 2), (2, 3), (3, 2), (1, 4), (4, 1)])
@pytest.mark.parametrize("algorithm", ["flat", "hierarchical"])
def test_exchange_transposes_source_and_destination(nodes, devices, algorithm):
    w = nodes * devices
    send = np.arange(w * w * 2 * 3, dtype=np.float32).reshape(w, w, 2, 3)  # send[src, dst] encodes (src, dst)
    received = Exchange("simulated", algorithm, 0, nodes, devices)(Tensor(send)).asnumpy()
    np.testing.assert_array_equal(received, send.transpose(1, 0, 2, 3))
    # its own inverse: the combine direction runs the same exchange
    back = Exchange("simulated", algorithm, 0, nodes, devices)(Tensor(received)).asnumpy()
    np.testing.assert_array_equal(back, send)


def _layer(num_ranks, exchange=None, seed=0, experts=4, hidden=8):
    ms.set_seed(seed)
    router = TopKRouter(hidden, experts, 1, 1, 0.01, 0.001, init_std=0.5)
    return MoELayer(router, Dispatcher(experts, num_ranks, num_ranks), GroupedExperts(experts, hidden, 16, 0.3), num_ranks,
                    exchange, 0, num_ranks)


def _inputs(tokens, hidden=8, seed=1):
    rng = np.random.default_rng(seed)
    x = Tensor(rng.normal(size=(tokens, hidden)).astype(np.float32))
    ids = Tensor(np.zeros(tokens, np.int32))
    return x, ids, ids


def test_each_rank_is_its_own_routing_group():
    """W = 2 ranks in one layer equal two W = 1 layers on each half: capacity and slots are per rank."""
    x, token_ids, group_ids = _inputs(24)
    y, losses, demand, kept, _, _ = _layer(2)(x, token_ids, group_ids, 3, False)
    single = _layer(1)
    halves = [single(x[i * 12:(i + 1) * 12], token_ids[:12], group_ids[:12], 3, False) for i in range(2)]
    np.testing.assert_allclose(y.asnumpy(), np.concatenate([h[0].asnumpy() for h in halves]), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(losses.asnumpy(), (halves[0][1].asnumpy() + halves[1][1].asnumpy()) / 2, rtol=1e-6)
    np.testing.assert_array_equal(demand.asnumpy(), np.concatenate([h[2].asnumpy() for h in halves]))
    np.testing.assert_array_equal(kept.asnumpy(), np.concatenate([h[3].asnumpy() for h in halves]))
    assert kept.asnumpy().max() <= 3 and demand.asnumpy().sum(1).tolist() == [12, 12]


@pytest.mark.parametrize("algorithm", ["flat", "hierarchical"])
def test_simulated_layer_equals_local_in_output_and_gradients(algorithm):
    x, token_ids, group_ids = _inputs(32)
    local = _layer(4)
    simulated = _layer(4, Exchange("simulated", algorithm, 0, 2, 2))

    def grads(layer):
        def loss(x):
            y, losses = layer(x, token_ids, group_ids, 4, True)[:2]
            return (y * y).sum() + losses.sum()
        fn = ms.value_and_grad(loss, 0, layer.trainable_params())
        value, (dx, dparams) = fn(x)
        return [value.asnumpy(), dx.asnumpy()] + [g.asnumpy() for g in dparams]

    for a, b in zip(grads(local), grads(simulated)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
