"""Kool et al. estimators (Kool et al.): exact enumeration on tiny problems."""
import itertools

import numpy as np
import pytest

from pangu_moe.routing import kool
from pangu_moe.routing.balanced import balanced_assignment

N, E = 4, 2


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, E)), rng.random((N, E))  # logits h [N, E], losses l [N, E]


def _true_gradient(logits, losses):
    """dJ/dh for J = (1/N) sum_i sum_e pi_ie l_ie."""
    p = kool.softmax(logits)
    expected = (p * losses).sum(1, keepdims=True)
    return p * (losses - expected) / N


def _skip_expectation(logits, losses, capacity, weighted, baseline=0.3):
    """E over all E^N assignments and N! orders of (1/N) sum_i k_i w_i (l_i - b) dlogpi_i."""
    p = kool.softmax(logits)
    total = np.zeros_like(logits)
    orders = list(itertools.permutations(range(N)))
    for experts in itertools.product(range(E), repeat=N):
        experts = np.array(experts)
        prob = np.prod(p[np.arange(N), experts])
        dlogp = -p.copy()
        dlogp[np.arange(N), experts] += 1.0
        for order in orders:
            keep = kool.keep_from_order(experts, order, capacity)
            kw = kool.skip_weights(experts, keep, capacity, weighted)
            advantage = losses[np.arange(N), experts] - baseline
            total += prob / len(orders) * (kw * advantage)[:, None] * dlogp / N
    return total


@pytest.mark.parametrize("capacity", [1, 2, 3])
def test_skip_estimator_is_exactly_unbiased_and_plain_skipping_is_not(capacity):
    logits, losses = _problem(capacity)
    truth = _true_gradient(logits, losses)
    assert np.abs(_skip_expectation(logits, losses, capacity, True) - truth).max() < 1e-10
    assert np.abs(_skip_expectation(logits, losses, capacity, False) - truth).max() > 1e-3


def test_skip_weights_and_keep_counts():
    experts = np.array([0, 0, 0, 1, 1, 2])
    keep = kool.skip_keep(experts, 2, np.random.default_rng(0))
    assert [keep[experts == e].sum() for e in range(3)] == [2, 2, 1]  # min(n_e, C)
    kw = kool.skip_weights(experts, keep, 2)
    assert set(kw[keep]) == {1.5, 1.0} and (kw[~keep] == 0).all()
    assert (kool.skip_weights(experts, np.ones(6, bool), 6) == 1).all()  # C >= N: plain REINFORCE


def test_expected_weighted_kept_count_is_n():
    rng = np.random.default_rng(1)
    p = kool.softmax(rng.standard_normal((N, E)))
    total = 0.0
    for experts in itertools.product(range(E), repeat=N):
        experts = np.array(experts)
        for order in itertools.permutations(range(N)):
            keep = kool.keep_from_order(experts, order, 1)
            total += np.prod(p[np.arange(N), experts]) / 24 * kool.skip_weights(experts, keep, 1).sum()
    assert abs(total - N) < 1e-12


def test_gumbel_matching_is_balanced_and_lsa_equals_brute_force():
    rng = np.random.default_rng(2)
    for seed in range(20):
        log_probs = np.log(kool.softmax(rng.standard_normal((6, 3))))
        assignment, _ = kool.gumbel_matching(log_probs, 2, np.random.default_rng(seed))
        assert np.bincount(assignment, minlength=3).tolist() == [2, 2, 2]
        again, _ = kool.gumbel_matching(log_probs, 2, np.random.default_rng(seed), kool.brute_force_matching)
        assert (assignment == again).all()
        shifted, _ = kool.gumbel_matching(log_probs + rng.standard_normal((6, 1)), 2, np.random.default_rng(seed))
        assert (assignment == shifted).all()  # invariant to per-row shifts
    perm, _ = kool.gumbel_matching(np.zeros((4, 4)), 1, rng)
    assert sorted(perm.tolist()) == [0, 1, 2, 3]  # C = 1, E = N: a permutation
    noise = kool.gumbel((200_000,), rng)
    assert abs((1 - np.exp(-noise)).mean()) < 4 * (1 - np.exp(-noise)).std() / np.sqrt(200_000)


def _balanced_loss(logits, losses, rng_seed, samples):
    """Per-sample F and B1 logit gradients of the Gumbel-matching sampler (common random numbers)."""
    rng = np.random.default_rng(rng_seed)
    log_probs = np.log(kool.softmax(logits))
    values, grads = [], []
    for _ in range(samples):
        assignment, score = kool.gumbel_matching(log_probs, 2, rng)
        f = losses[np.arange(N), assignment].mean()
        values.append(f)
        grads.append(kool.b1_logit_gradient(score, np.exp(log_probs), f - 0.5))
    return np.array(values), np.array(grads)


def test_b1_matches_a_common_random_numbers_finite_difference():
    logits, losses = _problem(7)
    losses = losses * 3
    _, grads = _balanced_loss(logits, losses, 0, 6000)
    mean, se = grads.mean(0), grads.std(0) / np.sqrt(len(grads))
    h = 0.3
    for i, e in [(0, 0), (2, 1)]:
        up, down = logits.copy(), logits.copy()
        up[i, e] += h
        down[i, e] -= h
        fd = (_balanced_loss(up, losses, 1, 6000)[0] - _balanced_loss(down, losses, 1, 6000)[0]) / (2 * h)
        fd_se = fd.std() / np.sqrt(len(fd))
        assert abs(mean[i, e] - fd.mean()) < 3 * np.hypot(se[i, e], fd_se)


def _b2_objective_and_gradient(logits, losses):
    """Exact J_B2 = E_{order, a}[F(a)] and E[(F - b) dlog q] by enumerating orders and choices."""
    p = kool.softmax(logits)
    value, grad = 0.0, np.zeros_like(logits)
    for order in itertools.permutations(range(N)):
        for choices in itertools.product(range(E), repeat=N):
            room, q, dlogq, ok = np.full(E, 2), 1.0, np.zeros_like(logits), True
            for i, a in zip(order, choices):
                if room[a] == 0:
                    ok = False
                    break
                avail = room > 0
                qi = np.where(avail, p[i], 0) / p[i][avail].sum()
                q *= qi[a]
                dlogq[i] -= qi
                dlogq[i, a] += 1
                room[a] -= 1
            if not ok:
                continue
            assignment = np.empty(N, int)
            assignment[list(order)] = choices
            f = losses[np.arange(N), assignment].mean()
            value += q * f / 24
            grad += q * (f - 0.5) * dlogq / 24
    return value, grad


def test_b2_estimator_is_exact():
    logits, losses = _problem(3)
    _, grad = _b2_objective_and_gradient(logits, losses)
    h = 1e-5
    for i, e in itertools.product(range(N), range(E)):
        up, down = logits.copy(), logits.copy()
        up[i, e] += h
        down[i, e] -= h
        fd = (_b2_objective_and_gradient(up, losses)[0] - _b2_objective_and_gradient(down, losses)[0]) / (2 * h)
        assert abs(fd - grad[i, e]) < 1e-9
    assignment, _ = kool.sequential_balanced(kool.softmax(logits), 2, np.arange(N), np.random.default_rng(0))
    assert np.bincount(assignment, minlength=E).tolist() == [2, 2]


def test_base_assignment_is_optimal_and_balanced():
    rng = np.random.default_rng(4)
    affinity = rng.standard_normal((6, 3))
    assignment = balanced_assignment(affinity, 2)
    assert np.bincount(assignment, minlength=3).tolist() == [2, 2, 2]
    best = max(affinity[np.arange(6), np.array(a)].sum() for a in itertools.product(range(3), repeat=6)
               if np.bincount(a, minlength=3).tolist() == [2, 2, 2])
    assert affinity[np.arange(6), assignment].sum() == pytest.approx(best, abs=1e-12)
