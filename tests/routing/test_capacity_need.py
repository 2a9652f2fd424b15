"""LocMoE+'s Corollary 6 capacity need (pangu_moe/capacity_need.py): hand-computed cases and its calibration
at the study's conditions (LN-centred router inputs, H = 128, E = 8, the pooled 4096 tokens of W = 4 ranks)."""
import math

import numpy as np
import pytest
from mindspore import Tensor

from pangu_moe.capacity import dynamic_capacity
from pangu_moe.capacity_need import corollary6_need, expert_need, null_survival, planted_features
from pangu_moe.routing.locmoe import grap_cosines

H, E, W, POOLED = 128, 8, 4, 4096
CEILING = math.ceil(1.1 * POOLED / W / E)  # 141: capacity factor 1.1 per routing group of 1024 tokens
FLOOR = 4


def test_an_expert_with_a_detectable_majority_keeps_95_percent_of_it():
    # 400 candidates: 200 with p = 1e-4 (discriminative), 100 null below 1/2, 100 null above.
    # Storey: 100/400 = 0.25 above 1/2; se = sqrt(0.25 * 0.75 / 400) = 0.0216506; pi0 = (0.25 + 2 se) / 0.5
    # = 0.5866025; m = 0.4133975 * 400 = 165.3590. Keep 0.95 m = 157.0910: the first k with
    # k - 0.5866025 * 400 * p_(k) >= 157.0910 is k = 158 (p = 1e-4): q = 1e-4;
    # need = 157.0910 + 2e-4 * (400 - 165.3590) = 157.1380.
    p = np.concatenate([np.full(200, 1e-4), 0.0025 * np.arange(100), 0.5 + 0.005 * np.arange(1, 101)])
    need, q, m = expert_need(np.random.default_rng(0).permutation(p), 0.95)
    assert q == 1e-4
    assert m == pytest.approx(165.3590, abs=1e-4) and need == pytest.approx(157.1380, abs=1e-4)


def test_candidates_that_noise_explains_need_twice_their_number():
    # uniform p-values: pi0's upper bound is 1, no discriminative token, q = 1 and need = 2 |S_i|.
    assert expert_need((np.arange(50) + 0.5) / 50, 0.95) == (100.0, 1.0, 0.0)
    assert expert_need(np.array([]), 0.95)[0] == 0.0


def test_the_need_is_per_routing_group_and_per_level1_group():
    # Two level-1 groups of 4 experts. Group 1's expert 2 has 16 candidates with no discriminative token
    # (rows of equal affinities but one: every pivot is the same, p is the same for all): need 2 * 16 = 32,
    # over W = 4 routing groups: 8. Group 0's tokens are only 4: need 2 * 4 / 4 = 2.
    rng = np.random.default_rng(1)
    affinity = rng.standard_normal((20, 4))
    first = affinity.argmax(1)
    first[:] = 2
    affinity[:, 2] = affinity.max(1) + 0.1
    groups = np.array([0] * 4 + [1] * 16)
    found = corollary6_need(affinity, first, groups, 4, 4)
    assert found["need"] == 8 and found["q_max"] == 1.0 and found["discriminative"] == 0.0
    assert corollary6_need(affinity, first, groups, 4, 1)["need"] == 32


def test_with_two_experts_a_group_the_need_is_the_doubled_load_per_routing_group():
    # E_g = 2: no pivot can tell a cluster from noise. Loads (group, expert): (0,0) 3, (0,1) 1, (1,1) 5.
    first, groups = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1]), np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    affinity = np.zeros((9, 2))
    assert corollary6_need(affinity, first, groups, 2, 1)["need"] == 10  # 2 x 5
    assert corollary6_need(affinity, first, groups, 2, 4)["need"] == 3  # ceil(10 / 4)
    assert corollary6_need(affinity, first, groups, 2, 5)["need"] == 2


def test_null_survival_is_uniform_on_isotropic_affinities():
    p = null_survival(np.random.default_rng(7).standard_normal((20000, E)))
    assert abs(np.mean(p > 0.5) - 0.5) < 0.02 and abs(np.mean(p < 0.05) - 0.05) < 0.008


def _planted(separation, share, seed):
    """LN-centred router inputs [4096, 128] of W = 4 routing groups: a `share` of the tokens carry a class
    pattern, `separation` along the GrAP block of their class (top-1 accuracy ~0.13, 0.40, 0.70, 0.92, 0.99
    at 0..4); the rest are isotropic. Returns (capacity after clamping, top-1 accuracy on the class tokens,
    the share of the correctly routed class tokens that ECR keeps at that capacity in every routing group)."""
    x, classes, planted = planted_features(separation, share, seed, POOLED, H, E)
    cos = grap_cosines(Tensor(x), E).asnumpy()
    first = cos.argmax(1)
    capacity = dynamic_capacity(corollary6_need(cos, first, np.zeros(POOLED, int), E, W)["need"], FLOOR, CEILING)
    wanted = planted & (first == classes)
    kept = 0
    for rank in np.split(np.arange(POOLED), W):
        for i in range(E):
            mine = rank[first[rank] == i]
            kept += wanted[mine[np.argsort(-cos[mine, i])[:capacity]]].sum()
    return capacity, float(np.mean(first[planted] == classes[planted])), kept / wanted.sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calibration_isotropic_features_need_the_ceiling(seed):
    assert _planted(0.0, 1.0, seed)[0] == CEILING


@pytest.mark.parametrize("seed", [0, 1])
def test_calibration_need_falls_as_planted_clusters_separate_and_keeps_the_discriminative_tokens(seed):
    runs = [_planted(a, 0.25, seed) for a in range(7)]
    capacities = [c for c, _, _ in runs]
    assert all(b <= a for a, b in zip(capacities, capacities[1:])), runs
    assert capacities[:2] == [CEILING, CEILING], runs  # top-1 accuracy <= 0.45: nothing to protect is visible
    assert all(c > FLOOR for c, accuracy, _ in runs if accuracy < 0.9), runs
    # full separation: about the class tokens' own share (a quarter of T/n = 32 slots), and ECR at that
    # capacity still keeps most of the class tokens routed to their expert
    capacity, _, kept = runs[-1]
    assert capacity <= 0.3 * CEILING and kept >= 0.75, runs


def test_calibration_when_every_token_is_discriminative_nothing_is_cut_below_its_load():
    capacity, accuracy, kept = _planted(6.0, 1.0, 0)
    assert accuracy > 0.99 and capacity >= 0.85 * CEILING and kept >= 0.95


def test_the_top_pivot_is_the_top_against_the_others_mean_and_std():
    # [3, 0, 2, 1]: top 3 against the others 0, 1, 2 (mean 1, sample std 1) -> 2;
    # [0, 10, 4, 2]: top 10 against 0, 2, 4 (mean 2, sample std 2) -> 4
    from pangu_moe.capacity_need import top_pivots
    np.testing.assert_allclose(top_pivots(np.array([[3.0, 0.0, 2.0, 1.0], [0.0, 10.0, 4.0, 2.0]])), [2.0, 4.0])
