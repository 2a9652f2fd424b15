"""Routing semantics against Megatron-Core on fixed logits (docs/architecture.md, Differences from Megatron-Core
and MindFormers).

The oracle below restates, in numpy, Megatron-Core's `topk_routing_with_score_function`,
`compute_routing_scores_for_aux_loss`, `switch_load_balancing_loss_func`, `z_loss_func`, the router's
sequence-level aux loss and the "probs" drop policy of `apply_router_token_dropping`
(megatron/core/transformer/moe/moe_utils.py, router.py). Our top-k router with the identity as its weight
(logits = x) must give the same choices, gates, kept sets and losses. The position drop policy is not compared:
Megatron keeps an arbitrary C of an expert's routed tokens (torch.topk over a 0/1 column), ours keeps every
first choice before any second choice in token order (tests/routing/test_slots.py asserts it exactly).
"""
import numpy as np
import pytest
from mindspore import Tensor

from pangu_moe.routing import route
from pangu_moe.routing.deepseek import DeepSeekRouter
from pangu_moe.routing.topk import TopKRouter

# The gating softmax is float32 on every device and the references here are float64 formulas: MindSpore's CPU
# float32 softmax was within 1.4e-6 of them (about 11 float32 ulps).
FP32_SOFTMAX = 3e-6

LOGITS = np.array([[2.0, 1.0, 0.0, -1.0],
                   [0.0, 3.0, 1.0, 0.5],
                   [1.5, 0.0, 2.5, -0.5],
                   [0.2, 0.0, -0.3, 1.0],
                   [-1.0, 2.0, 0.5, 0.0],
                   [0.3, -0.2, 0.1, 0.9],
                   [2.2, 0.1, -1.0, 1.0],
                   [0.0, 1.0, 2.0, 3.0]], np.float32)  # T = 8 tokens (2 sequences of S = 4), E = 4, no ties
SEQ_LEN, AUX, Z, SEQ_AUX = 4, 0.01, 0.001, 0.1


def _softmax(v):
    e = np.exp(v - v.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def megatron_routing(logits, topk, score_function, use_pre_softmax, scaling=None):
    """(top_indices [T, K], probs [T, K]) as topk_routing_with_score_function computes them."""
    logits = logits.astype(np.float64)
    if score_function == "softmax":
        if use_pre_softmax:
            scores = _softmax(logits)
            top = np.argsort(-scores, 1, kind="stable")[:, :topk]
            probs = np.take_along_axis(scores, top, 1)
        else:
            top = np.argsort(-logits, 1, kind="stable")[:, :topk]
            probs = _softmax(np.take_along_axis(logits, top, 1))
    else:
        scores = _sigmoid(logits)
        top = np.argsort(-scores, 1, kind="stable")[:, :topk]
        probs = np.take_along_axis(scores, top, 1)
        probs = probs / (probs.sum(-1, keepdims=True) + 1e-20) if topk > 1 else probs
    if scaling:
        probs = probs * scaling
    return top, probs


def megatron_aux_scores(logits, score_function):
    """compute_routing_scores_for_aux_loss's scores [T, E]."""
    logits = logits.astype(np.float64)
    if score_function == "softmax":
        return _softmax(logits)
    scores = _sigmoid(logits)
    return scores / (scores.sum(-1, keepdims=True) + 1e-20)


def megatron_aux_loss(scores, top, coeff):
    """switch_load_balancing_loss_func with tokens_per_expert = the routing map's column sums."""
    tokens, experts = scores.shape
    topk = top.shape[1]
    tokens_per_expert = np.bincount(top.ravel(), minlength=experts)
    return (scores.sum(0) * tokens_per_expert).sum() * experts * coeff / (topk * tokens * tokens)


def megatron_seq_aux_loss(scores, top, seq_len, coeff):
    """The router's sequence-level aux loss: the switch loss of each sequence, averaged over sequences."""
    per_sequence = [megatron_aux_loss(scores[b:b + seq_len], top[b:b + seq_len], coeff)
                    for b in range(0, len(scores), seq_len)]
    return float(np.mean(per_sequence))


def megatron_probs_drop(top, probs, num_experts, capacity):
    """apply_router_token_dropping with drop_policy="probs": kept [T, K] bool."""
    routing_probs = np.zeros((len(top), num_experts))
    np.put_along_axis(routing_probs, top, probs, 1)
    capacity_mask = np.zeros_like(routing_probs, bool)
    for e in range(num_experts):
        capacity_mask[np.argsort(-routing_probs[:, e], kind="stable")[:capacity], e] = True
    return np.take_along_axis(capacity_mask, top, 1)


def _identity_router(cls, **kwargs):
    router = cls(4, 4, 1, **kwargs)
    router.weight.set_data(Tensor(np.eye(4, dtype=np.float32).reshape(1, 4, 4)))  # logits = x exactly
    return router


def _route(router, capacity, training=True):
    zeros = Tensor(np.zeros(len(LOGITS), np.int32))
    return route(router, Tensor(LOGITS), zeros, zeros, capacity, training)


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_topk_router_matches_megatron(score_function, top_k):
    # Our K = 1 softmax gate is the full probability: Megatron's moe_router_pre_softmax; at K > 1 our
    # renormalised gates are Megatron's default softmax over the top-k logits.
    pre_softmax = top_k == 1
    top, probs = megatron_routing(LOGITS, top_k, score_function, pre_softmax, scaling=2.5)
    router = _identity_router(TopKRouter, top_k=top_k, aux_loss_coeff=AUX, z_loss_coeff=Z,
                              score_function=score_function, scaling=2.5, slot_policy="probs")
    r = _route(router, capacity=2)
    np.testing.assert_array_equal(r.expert_index.asnumpy(), top)
    np.testing.assert_allclose(r.gate.asnumpy(), probs, rtol=FP32_SOFTMAX)
    np.testing.assert_array_equal(r.keep.asnumpy(), megatron_probs_drop(top, probs, 4, 2))
    scores = megatron_aux_scores(LOGITS, score_function)
    assert float(r.aux_loss.asnumpy()) == pytest.approx(megatron_aux_loss(scores, top, AUX), rel=1e-6)
    z = Z * np.mean(np.log(np.exp(LOGITS.astype(np.float64)).sum(1)) ** 2)
    assert float(r.z_loss.asnumpy()) == pytest.approx(z, rel=1e-6)
    seq = _identity_router(TopKRouter, top_k=top_k, aux_loss_coeff=0.0, z_loss_coeff=0.0,
                           score_function=score_function, seq_aux_coeff=SEQ_AUX, seq_len=SEQ_LEN)
    expected = megatron_seq_aux_loss(scores, top, SEQ_LEN, SEQ_AUX)
    assert float(_route(seq, capacity=8).aux_loss.asnumpy()) == pytest.approx(expected, rel=1e-6)
    assert float(_route(seq, capacity=8, training=False).aux_loss.asnumpy()) == 0.0  # training only


def test_hand_checked_values():
    # Token 3, logits [0.2, 0, -0.3, 1]: sigmoid K = 1 chooses expert 3 with gate sigmoid(1).
    sigmoid = _identity_router(TopKRouter, top_k=1, aux_loss_coeff=0.0, z_loss_coeff=0.0, score_function="sigmoid")
    r = _route(sigmoid, capacity=8)
    assert int(r.expert_index.asnumpy()[3, 0]) == 3
    assert float(r.gate.asnumpy()[3, 0]) == pytest.approx(1 / (1 + np.exp(-1.0)), rel=1e-6)
    # Token 0, logits [2, 1, 0, -1], softmax K = 2 renormalised: experts (0, 1), gates e/(e+1), 1/(e+1).
    softmax = _identity_router(TopKRouter, top_k=2, aux_loss_coeff=0.0, z_loss_coeff=0.0)
    r = _route(softmax, capacity=8)
    assert r.expert_index.asnumpy()[0].tolist() == [0, 1]
    np.testing.assert_allclose(r.gate.asnumpy()[0], [np.e / (np.e + 1), 1 / (np.e + 1)], rtol=FP32_SOFTMAX)
    # Probs policy, K = 1, C = 2: expert 3 is chosen by tokens 3, 5 and 7 with probabilities 0.479, 0.429 and
    # 0.644, so it keeps 7 and 3 and drops 5; every other expert is chosen at most twice.
    one = _identity_router(TopKRouter, top_k=1, aux_loss_coeff=0.0, z_loss_coeff=0.0, slot_policy="probs")
    r = _route(one, capacity=2)
    assert r.expert_index.asnumpy()[:, 0].tolist() == [0, 1, 2, 3, 1, 3, 0, 3]
    assert r.keep.asnumpy()[:, 0].tolist() == [True, True, True, True, True, False, True, True]


@pytest.mark.parametrize("top_k", [1, 2])
def test_deepseek_gate_is_the_raw_sigmoid_at_k1(top_k):
    router = _identity_router(DeepSeekRouter, top_k=top_k, seq_len=SEQ_LEN, seq_aux_coeff=0.0, bias_rate=0.0,
                              node_limit=0, expert_node=np.zeros(4, np.int32), num_nodes=1)
    top, probs = megatron_routing(LOGITS, top_k, "sigmoid", False)
    r = _route(router, capacity=8)
    np.testing.assert_array_equal(r.expert_index.asnumpy(), top)
    np.testing.assert_allclose(r.gate.asnumpy(), probs, rtol=FP32_SOFTMAX)
    if top_k == 1:
        assert (r.gate.asnumpy() < 1.0).all()  # not s / s = 1: the gate carries the router's gradient
