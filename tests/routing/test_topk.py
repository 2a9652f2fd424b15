import numpy as np
import mindspore as ms
from mindspore import Tensor

from pangu_moe.routing import route
from pangu_moe.routing.topk import TopKRouter, topk_scores
from pangu_moe.routing.topk import multiplicative_jitter


def _router(h=16, e=4, g=1, k=1, aux=0.01, z=0.001, jitter=0.0):
    ms.set_seed(3)
    return TopKRouter(h, e, g, k, aux, z, jitter_eps=jitter)


def _inputs(t=64, h=16, seed=0):
    rng = np.random.default_rng(seed)
    return Tensor(rng.standard_normal((t, h)).astype(np.float32)), Tensor(np.zeros(t, np.int32))


def test_k1_gate_is_the_full_softmax_probability():
    router = _router()
    x, zeros = _inputs()
    r = route(router, x, zeros, zeros, capacity=64)
    logits = x.asnumpy() @ router.weight.asnumpy()[0]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_array_equal(r.expert_index.asnumpy()[:, 0], probs.argmax(1))
    np.testing.assert_allclose(r.gate.asnumpy()[:, 0], probs.max(1), rtol=1e-6)
    assert r.gate.asnumpy().max() < 1.0


def test_nothing_dropped_when_capacity_covers_all_choices():
    for k in (1, 2):
        router = _router(k=k)
        x, zeros = _inputs(t=40)
        # Adversarial: every token prefers expert 0.
        router.weight.set_data(Tensor(np.zeros((1, 16, 4), np.float32)))
        r = route(router, x, zeros, zeros, capacity=40)
        assert r.keep.asnumpy().all()


def test_at_most_capacity_kept_per_expert():
    router = _router(k=2)
    x, zeros = _inputs(t=100)
    r = route(router, x, zeros, zeros, capacity=7)
    idx, keep = r.expert_index.asnumpy(), r.keep.asnumpy()
    for e in range(4):
        assert keep[idx == e].sum() == min(7, (idx == e).sum())
    assert (idx[:, 0] != idx[:, 1]).all()  # two distinct experts per token


def test_k2_gates_are_normalised_top2():
    _, index, gate = topk_scores(Tensor(np.log(np.array([[0.1, 0.6, 0.3]], np.float32))), 2, True)
    assert index.asnumpy().tolist() == [[1, 2]]
    np.testing.assert_allclose(gate.asnumpy(), [[2 / 3, 1 / 3]], rtol=1e-6)


def test_groups_route_inside_the_tokens_group():
    router = _router(e=8, g=2)
    x, _ = _inputs(t=50)
    groups = Tensor((np.arange(50) % 2).astype(np.int32))
    r = route(router, x, groups, groups, capacity=50)
    idx = r.expert_index.asnumpy()[:, 0]
    assert ((idx // 4) == groups.asnumpy()).all()


def test_a_group_of_a_grouped_router_equals_a_plain_router_with_that_slice():
    x, zeros = _inputs()
    plain = _router(e=4, g=1)
    grouped = _router(e=8, g=2)
    grouped.weight.set_data(Tensor(np.concatenate([plain.weight.asnumpy(), np.ones((1, 16, 4), np.float32)])))
    a = route(plain, x, zeros, zeros, capacity=20)
    b = route(grouped, x, zeros, zeros, capacity=20)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u.asnumpy(), v.asnumpy())


def test_jitter_is_training_only_and_bounded():
    router = _router(jitter=0.5)
    x, zeros = _inputs()
    a = route(router, x, zeros, zeros, capacity=64, training=False)
    b = route(router, x, zeros, zeros, capacity=64, training=False)
    np.testing.assert_array_equal(a.gate.asnumpy(), b.gate.asnumpy())
    c = route(router, x, zeros, zeros, capacity=64, training=True)
    assert not np.array_equal(a.gate.asnumpy(), c.gate.asnumpy())
    ones = Tensor(np.ones((500, 16), np.float32))
    noise = multiplicative_jitter(ones, 0.1).asnumpy()
    assert noise.min() >= 0.9 and noise.max() <= 1.1 and noise.std() > 0.04


def test_router_outputs_are_fp32_for_fp16_input():
    router = _router()
    x, zeros = _inputs()
    r = route(router, x.astype(ms.float16), zeros, zeros, capacity=64)
    assert r.gate.dtype == ms.float32 and r.aux_loss.dtype == ms.float32


def test_fed_noise_is_read_per_rank_and_other_shapes_fall_back():
    router = _router(jitter=0.5)
    router.enable_fed_noise(2, 64)  # 2 ranks of 64 tokens
    assert router.fed_noise == ("jitter",) and router.noise_jitter.shape == (2, 64, 16)
    router.feed_noise(np.random.default_rng(0))
    fed = router.noise_jitter.asnumpy()
    assert fed.min() >= 0.0 and fed.max() < 1.0 and not np.array_equal(fed[0], fed[1])
    np.testing.assert_array_equal(router.uniform_noise("jitter", (64, 16), 1).asnumpy(), fed[1])
    np.testing.assert_array_equal(router.uniform_noise("jitter", (128, 16), None).asnumpy(), fed.reshape(128, 16))
    other = router.uniform_noise("jitter", (5, 16), 0).asnumpy()  # not the fed shape: a stateful draw
    assert other.shape == (5, 16) and 0.0 <= other.min() and other.max() < 1.0
    x, zeros = _inputs()
    a, b = (router(x, zeros, zeros, 64, True, 1)[1].asnumpy() for _ in range(2))
    np.testing.assert_array_equal(a, b)  # rank 1's fed draw both times: the same gates
    assert not np.array_equal(a, router(x, zeros, zeros, 64, True, 0)[1].asnumpy())  # rank 0 draws other noise
