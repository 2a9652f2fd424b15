"""LocMoE+'s testable claims (affinity routing, TCR/ECR, the capacity re-estimate) and the live capacity."""
import math

import numpy as np
import pytest
from mindspore import Tensor, ops

from pangu_moe.capacity import dynamic_capacity, score_sum_capacity
from pangu_moe.routing import route
from pangu_moe.routing.locmoe import LocMoERouter, grap_cosines
from pangu_moe.routing.locmoe_plus import LocMoEPlusRouter, threshold_requests

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


def test_score_sum_capacity_exact():
    # expert 0: affinities 0.5, 0.3, 0.2 (0.9 of 1.0 needs all 3 of 3); expert 1: 0.9, 0.05, 0.05, -0.4
    # (0.9 of 1.0 needs 1 of 4). The need is the largest share times the fair load.
    a = [0.5, 0.9, 0.3, 0.05, 0.2, 0.05, -0.4]
    e = [0, 1, 0, 1, 0, 1, 1]
    assert score_sum_capacity(a, e, 2, 0.9, 10) == 10
    assert score_sum_capacity(a, e, 2, 0.8, 10) == 7  # expert 0 needs 2 of 3 -> ceil(6.67)
    assert score_sum_capacity([0.5, 0.3, 0.2, 0.9, 0.05, 0.05], [0, 0, 0, 1, 1, 1], 2, 0.8, 3) == 2
    assert score_sum_capacity([-1.0], [0], 2, 0.9, 5) == 0


def test_dynamic_capacity_shrinks_as_affinities_sharpen():
    # Claim 15: affinities drawn from Beta(a_t, b) with a_t increasing sharpen; C_t never rises, stays
    # within [floor, ceiling].
    rng = np.random.default_rng(0)
    tokens, experts, ceiling, floor = 4096, 8, math.ceil(1.1 * 4096 / 8), 12
    previous, history = None, []
    for a_t in (1.0, 0.5, 0.25, 0.12, 0.06, 0.03):
        affinity = rng.beta(a_t, 1.0, tokens)
        need = score_sum_capacity(affinity, rng.integers(0, experts, tokens), experts, 0.9, tokens / experts)
        previous = dynamic_capacity(need, floor, ceiling, previous)
        history.append(previous)
    assert all(b <= a for a, b in zip(history, history[1:]))
    assert all(floor <= c <= ceiling for c in history)
    assert history[-1] < 0.6 * ceiling < history[0]


def test_dynamic_capacity_floor_ema_and_monotone():
    assert dynamic_capacity(2, 5, 50) == 5 and dynamic_capacity(80, 5, 50) == 50
    assert dynamic_capacity(10, 5, 50, previous=30, ema=0.5) == 20
    assert dynamic_capacity(40, 5, 50, previous=30) == 30
    assert dynamic_capacity(40, 5, 50, previous=30, non_increasing=False) == 40


def test_reestimate_sets_the_live_capacity_and_switches_to_ecr():
    router = _plus("hybrid", switch_ratio=0.99)
    router.start(T)
    found = router.reestimate(_x(5), ZEROS, ZEROS, 0, T, 2)
    assert router.live_capacity() == found["capacity"] <= T
    assert found["floor"] >= 2 and found["ecr"] == (found["capacity"] <= 0.99 * T)
    late = _plus("hybrid", switch_ratio=0.0, switch_step=7)
    assert late.before_step(6, layer_input=None) is None  # no re-estimate (recompute_every 0)
    assert not late.ecr_active()
    assert late.before_step(7, layer_input=None) is None  # no re-estimate (recompute_every 0)
    assert late.ecr_active()
