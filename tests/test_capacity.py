import math

import numpy as np
import pytest

from pangu_moe.capacity import (capacity_bucket, capacity_ladder, capacity_lower_bound, discriminative_probability,
                                dropless_capacity, estimate_delta, expert_capacity, plan_capacities)
from pangu_moe.config import MoEConfig


@pytest.mark.parametrize("args, expected", [
    ((4096, 8, 1, 1.25), 640),
    ((4096, 8, 1, 1.1), 564),    # 4505.6 / 8 = 563.2 -> 564
    ((4096, 8, 2, 1.25), 1280),
    ((100, 8, 1, 1.0), 13),      # 12.5 -> 13
    ((40, 4, 1, 1.1), 11),       # exactly 11 with rational arithmetic (float gives 11.000000000000002)
    ((10, 4, 1, 0.01), 4),       # min_capacity default in the call below
    ((10, 2, 2, 8.0), 10),       # capped at T
])
def test_expert_capacity_exact(args, expected):
    assert expert_capacity(*args, min_capacity=4) == expected


def test_expert_capacity_rejects_bad_arguments():
    with pytest.raises(ValueError, match="factor=0"):
        expert_capacity(10, 2, 1, 0)


def test_lower_bound_regression_values():
    assert abs(capacity_lower_bound(0.03, 5120, 16) - 1.965) < 0.01
    assert abs(capacity_lower_bound(0.05, 5120, 16) - 181.5) < 0.5


def test_lemma3_constant_near_one_over_sqrt_d():
    for d, expected in [(64, 0.3211), (512, 0.3178), (5120, 0.3174)]:
        assert abs(discriminative_probability(1 / math.sqrt(d), d) - expected) < 1e-4


def test_lemma3_matches_monte_carlo():
    rng = np.random.default_rng(0)
    d, delta, n = 32, 0.2, 200_000
    x = rng.standard_normal((n, d))
    cos = np.abs(x[:, 0]) / np.linalg.norm(x, axis=1)  # |cos| with a fixed axis w = e_0
    p = discriminative_probability(delta, d)
    mc = (cos >= delta).mean()
    assert abs(mc - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_lower_bound_monotonicity_and_scaling():
    deltas = [0.0, 0.01, 0.02, 0.04, 0.06]
    values = [capacity_lower_bound(dl, 2048, 8) for dl in deltas]
    assert all(a < b for a, b in zip(values, values[1:]))
    assert capacity_lower_bound(0.03, 1024, 8) < capacity_lower_bound(0.03, 4096, 8)
    assert capacity_lower_bound(0.03, 4096, 4) * 4 == pytest.approx(capacity_lower_bound(0.03, 4096, 16) * 16)


def test_bound_forms_ordering_and_agreement():
    for d in (1024, 4096, 5120):
        for delta in (0.0, 0.01, 0.03, 0.05):
            exp_form = capacity_lower_bound(delta, d, 16, "exp")
            erfc_form = capacity_lower_bound(delta, d, 16, "erfc")
            exact = capacity_lower_bound(delta, d, 16, "exact")
            assert exp_form <= erfc_form
            assert abs(exact - erfc_form) <= 0.01 * exact
    with pytest.raises(ValueError, match="delta = 1.0: must be in"):
        capacity_lower_bound(1.0, 64, 4)


def test_estimate_delta_is_the_clipped_minimum_or_quantile():
    assert estimate_delta([0.5, 0.2, 0.9]) == 0.2
    assert estimate_delta([-0.1, 0.4]) == 0.0
    assert estimate_delta(np.linspace(0, 1, 101), quantile=0.1) == pytest.approx(0.1)
    assert estimate_delta([1.0]) < 1.0


class Proposer:
    """A router stand-in proposing a fixed capacity measured on its layer input."""

    def __init__(self, proposal):
        self.proposal = proposal

    def propose_capacity(self, layer_input, static_capacity):
        x = layer_input()
        return self.proposal, {"delta_hat": float(x), "capacity_lower_bound": self.proposal - 0.5}


def test_plan_takes_the_largest_proposal_within_floor_and_ceiling():
    moe = MoEConfig(num_experts=8, top_k=1, capacity_factor=1.25, eval_capacity_factor=2.0, min_capacity=4,
                    capacity_mode="locmoe_bound")
    calls = []

    def inputs():
        calls.append(1)
        return [0.25, 0.5]

    plan = plan_capacities(moe, 100, [Proposer(7), Proposer(9)], inputs)
    assert (plan.train, plan.eval) == (9, 25) and len(calls) == 1  # one forward for all layers
    assert plan.proposals == {"delta_hat": [0.25, 0.5], "capacity_lower_bound": [6.5, 8.5]}
    assert plan_capacities(moe, 100, [Proposer(2), Proposer(3)], inputs).train == 4  # min_capacity floor
    assert plan_capacities(moe, 6, [Proposer(2), Proposer(30)], inputs).train == 6  # capped at T
    factor = plan_capacities(MoEConfig(num_experts=8, min_capacity=4), 100, [Proposer(99)], lambda: 1 / 0)
    assert (factor.train, factor.eval, factor.proposals) == (16, 25, {})  # ceil(125 / 8), ceil(200 / 8)
    dropless = plan_capacities(MoEConfig(num_experts=8, slot_policy="none"), 100, [Proposer(99)], lambda: 1 / 0)
    assert (dropless.train, dropless.eval) == (dropless_capacity(100), 100) == (100, 100)


def test_capacity_ladder_and_buckets_exact():
    # ceiling / sqrt(2)^k rounded up to multiples of 8: 113.1 -> 120, 80, 56.6 -> 64, 40, 28.3 -> 32, 20 -> 24,
    # 14.1 -> 16, then 8.
    assert capacity_ladder(160) == [8, 16, 24, 32, 40, 64, 80, 120, 160]
    assert capacity_ladder(20) == [8, 16, 20] and capacity_ladder(8) == [8] and capacity_ladder(5) == [5]
    assert len(capacity_ladder(4096)) <= 2 * 9 + 2  # 2 * log2(4096 / 8) + 2
    assert [capacity_bucket(c, 160) for c in (1, 8, 9, 100, 120, 121, 160, 999)] == [8, 8, 16, 120, 120, 160, 160, 160]
