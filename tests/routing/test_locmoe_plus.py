"""LocMoE+'s testable claims (affinity routing, TCR/ECR, the capacity re-estimate) and the live capacity."""
import math

import numpy as np
import pytest
from mindspore import Tensor, ops

from pangu_moe.capacity import dynamic_capacity
from pangu_moe.capacity_need import corollary6_need
from pangu_moe.routing import route
from pangu_moe.routing.locmoe import LocMoERouter, grap_cosines
from pangu_moe.routing.locmoe_plus import LocMoEPlusRouter, switch_due, threshold_requests

T, H, E = 48, 16, 4
ZEROS = Tensor(np.zeros(T, np.int32))


def _x(seed=0, t=T):
    return Tensor(np.random.default_rng(seed).standard_normal((t, H)).astype(np.float32))


def _plus(keep_rule="tcr", k=1, **kw):
    return LocMoEPlusRouter(H, E, 1, k, 0.01, 0.0, 0.0, "kl", np.ones((1, E), bool), keep_rule=keep_rule, **kw)


@pytest.mark.parametrize("keep_rule", ["tcr", "ecr", "hybrid"])
def test_with_room_for_all_tokens_locmoe_plus_routes_as_locmoe(keep_rule):
    x = _x(1)
    plus = route(_plus(keep_rule), x, ZEROS, ZEROS, T)
    loc = route(LocMoERouter(H, E, 1, 1, 0.01, 0.0, 0.0, "kl", np.ones((1, E), bool), use_bias=False),
                x, ZEROS, ZEROS, T)
    np.testing.assert_array_equal(plus.expert_index.asnumpy(), loc.expert_index.asnumpy())
    assert plus.keep.asnumpy().all() and loc.keep.asnumpy().all()


def test_ecr_keeps_the_highest_affinities_and_tcr_the_earliest_positions():
    x, c = _x(2), 5
    cos = grap_cosines(x, E).asnumpy()
    for rule in ("ecr", "tcr"):
        r = route(_plus(rule), x, ZEROS, ZEROS, c, training=True)
        idx, keep = r.expert_index.asnumpy()[:, 0], r.keep.asnumpy()[:, 0]
        for e in range(E):
            mine = np.flatnonzero(idx == e)
            kept, dropped = mine[keep[mine]], mine[~keep[mine]]
            assert len(kept) == min(c, len(mine))
            if rule == "ecr" and len(dropped):
                assert cos[kept, e].min() >= cos[dropped, e].max()
            if rule == "tcr":
                assert kept.tolist() == mine[:c].tolist()


def test_live_capacity_masks_training_slots_only():
    router = _plus("ecr")
    router.start(10)
    ops.assign(router.capacity_limit, Tensor(3, router.capacity_limit.dtype))
    assert router.live_capacity() == 3
    r = route(router, _x(3), ZEROS, ZEROS, 10, training=True)
    idx, keep = r.expert_index.asnumpy()[:, 0], r.keep.asnumpy()[:, 0]
    assert max(keep[idx == e].sum() for e in range(E)) == 3
    r = route(router, _x(3), ZEROS, ZEROS, 10, training=False)
    assert max(r.keep.asnumpy()[r.expert_index.asnumpy() == e].sum() for e in range(E)) > 3


def test_score_threshold_requests_the_shortest_prefix():
    gate = Tensor(np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.9, 0.05, 0.05]], np.float32))
    assert threshold_requests(gate, 0.6).asnumpy().tolist() == [
        [True, False, False], [True, True, False], [True, False, False]]
    r = route(_plus("tcr", k=2, score_threshold=0.3, gate_temperature=0.05), _x(4), ZEROS, ZEROS, T)
    requested, gate = r.requested.asnumpy(), r.gate.asnumpy()
    assert requested[:, 0].all() and (requested[:, 1] == (gate[:, 0] < 1.0 - 1e-6)).all()
    np.testing.assert_allclose(gate.sum(1), 1.0, rtol=1e-5)
    assert not (r.keep.asnumpy() & ~requested).any()


def _clustered(separation, tokens, experts, hidden, seed):
    """Token features of `experts` classes: class c adds `separation` along GrAP block c (expert c's row)."""
    rng = np.random.default_rng(seed)
    block = hidden // experts
    classes = rng.integers(0, experts, tokens)
    x = rng.standard_normal((tokens, hidden)) / math.sqrt(hidden)
    for c in range(experts):
        x[classes == c, c * block:(c + 1) * block] += separation / math.sqrt(block)
    return x.astype(np.float32)


@pytest.mark.parametrize("ranks", [1, 2])
def test_reestimate_reports_the_corollary6_need_of_its_pooled_batch_per_routing_group(ranks):
    # 4 x 48 tokens, three quarters clustered: the router's need is the pooled batch's need over its W ranks
    router = _plus("tcr", recompute_every=1, min_capacity=2, num_ranks=ranks)
    x = Tensor(_clustered(2.0, 4 * T, E, H, seed=3))
    zeros = Tensor(np.zeros(4 * T, np.int32))
    router.start(4 * T // ranks)
    found = router.before_step(0, lambda: (x, zeros, zeros))
    cos = grap_cosines(x, E).asnumpy()
    pooled = corollary6_need(cos, cos.argmax(1), np.zeros(4 * T, int), E, 1)
    assert found["need"] == math.ceil(pooled["need"] / ranks) and found["q_max"] == round(pooled["q_max"], 4)
    assert router.live_capacity() == found["capacity"] == min(max(found["need"], found["floor"]), 4 * T // ranks)


def test_hybrid_switches_to_ecr_at_the_exact_capacity_ratio_and_step():
    assert switch_due(0, 0, 0.6, capacity=6, ceiling=10)  # 6 / 10 == 0.6: switch
    assert not switch_due(0, 0, 0.6, capacity=7, ceiling=10)
    assert switch_due(0, 0, 0.6, capacity=84, ceiling=141) and not switch_due(0, 0, 0.6, capacity=85, ceiling=141)
    assert not switch_due(0, 0, 0.0, capacity=1, ceiling=141)  # ratio 0: never by capacity
    assert switch_due(100, 100, 0.0) and not switch_due(99, 100, 0.0) and not switch_due(10 ** 6, 0, 0.0)
    router = _plus("hybrid", switch_ratio=0.6)
    router.start(10)
    router._switch_if_due(3, 6)
    assert router.ecr_active()


def test_dynamic_capacity_floor_ema_and_monotone():
    assert dynamic_capacity(2, 5, 50) == 5 and dynamic_capacity(80, 5, 50) == 50
    assert dynamic_capacity(10, 5, 50, previous=30, ema=0.5) == 20
    assert dynamic_capacity(40, 5, 50, previous=30) == 40  # no clamp by default: the estimate may rise
    assert dynamic_capacity(40, 5, 50, previous=30, non_increasing=True) == 30


def test_reestimate_sets_the_live_capacity_and_switches_to_ecr():
    router = _plus("hybrid", switch_ratio=0.99, min_capacity=2)
    router.start(T)
    found = router.reestimate(_x(5), ZEROS, ZEROS, 0)
    assert router.live_capacity() == found["capacity"] <= T
    assert found["floor"] >= 2 and found["ecr"] == (found["capacity"] <= 0.99 * T)
    late = _plus("hybrid", switch_ratio=0.0, switch_step=7)
    assert late.before_step(6, layer_input=None) is None  # no re-estimate (recompute_every 0)
    assert not late.ecr_active()
    assert late.before_step(7, layer_input=None) is None  # no re-estimate (recompute_every 0)
    assert late.ecr_active()


def test_a_smaller_capacity_bucket_shrinks_the_buffers_and_trains_the_kept_tokens_alike():
    """LocMoE+ with live capacity 5 under a static capacity of 20: the layer run with the bucket of 5 (8 slots)
    exchanges and computes [R, W, E_loc, 8, H] buffers instead of [.., 20, H], and gives the same output as the
    ceiling-sized buffer masked to 5 slots, on every token (the dropped ones are 0 in both)."""
    from pangu_moe.capacity import capacity_bucket
    from pangu_moe.dispatch.topology import Topology
    from pangu_moe.model.pangu import build_moe_layer
    from tests.conftest import tiny_config
    cfg = tiny_config("moe.router=locmoe_plus", "moe.num_experts=4", "moe.num_groups=1", "model.hidden=16",
                      "moe.locmoe_plus.keep_rule=ecr", "parallel.nodes=2", "parallel.devices_per_node=1")
    layer = build_moe_layer(cfg.model, cfg.moe, 0, 0.02, Topology(2, 1, 4), "simulated")
    layer.router.start(20)
    ops.assign(layer.router.capacity_limit, Tensor(5, layer.router.capacity_limit.dtype))
    shapes = []
    run_experts = layer.run_experts
    object.__setattr__(layer, "run_experts", lambda b, rows, x: shapes.append(b.shape) or run_experts(b, rows, x))
    x, ids = _x(7, t=64), Tensor(np.zeros(64, np.int32))
    bucket = capacity_bucket(5, 20)
    small, _, _, small_kept, _, _ = layer(x, ids, ids, bucket, True)
    full, _, _, full_kept, _, _ = layer(x, ids, ids, 20, True)
    assert bucket == 8 and [s[2] for s in shapes] == [8, 20]  # (R, E, C, H): the slots follow the bucket
    np.testing.assert_array_equal(small_kept.asnumpy(), full_kept.asnumpy())
    assert small_kept.asnumpy().max() == 5 and (full.asnumpy() == 0).all(1).any()  # binding: some tokens dropped
    np.testing.assert_array_equal(small.asnumpy(), full.asnumpy())


def test_a_learned_gate_starts_at_the_fixed_gate_and_its_temperature_gets_a_gradient():
    import mindspore as ms
    x = _x(6)
    fixed = route(_plus("ecr", gate_temperature=0.5), x, ZEROS, ZEROS, T)
    learned_router = _plus("ecr", gate_temperature=0.5, gate="learned")
    learned = route(learned_router, x, ZEROS, ZEROS, T)
    np.testing.assert_array_equal(fixed.expert_index.asnumpy(), learned.expert_index.asnumpy())
    np.testing.assert_allclose(fixed.gate.asnumpy(), learned.gate.asnumpy(), rtol=1e-6)
    assert float(fixed.gate.asnumpy().max()) < 0.7  # 4 experts at tau 0.5: a soft gate

    def gate_sum():
        return route(learned_router, x, ZEROS, ZEROS, T).gate.sum()
    (grad,) = ms.grad(gate_sum, grad_position=None, weights=[learned_router.log_inverse_temperature])()
    assert float(grad.asnumpy()) > 0  # a sharper softmax raises the top gate: the scale can learn that
    assert _plus("ecr").log_inverse_temperature is None  # fixed gates add no parameter to checkpoints
    with pytest.raises(ValueError, match="gate = 'sharp': must be fixed or learned"):
        _plus("ecr", gate="sharp")
