"""The Kool toy study: its hand-written gradients against finite differences, and a learning check."""
import numpy as np
import pytest

from pangu_moe.studies import kool as toy


def _loss(method, params, x, y, capacity):
    """The deterministic training loss of switch (with aux) and base, routing held as computed."""
    w, r, a, c = params
    h = x @ w + r
    p = np.exp(h - h.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    pred = x @ a.T + c
    rows = np.arange(len(y))
    if method == "switch":
        experts = h.argmax(1)
        onehot = np.eye(toy.E)[experts]
        keep = (np.cumsum(onehot, 0) * onehot).sum(1) <= capacity
        out = keep * (p[rows, experts] * pred[rows, experts] - y)
        return (out ** 2).mean() + 1e-2 * toy.E * (onehot.mean(0) * p.mean(0)).sum()
    from pangu_moe.routing.balanced import balanced_assignment
    experts = balanced_assignment(h, len(y) // toy.E)
    gate = 1 / (1 + np.exp(-h[rows, experts]))
    return ((gate * pred[rows, experts] - y) ** 2).mean()


@pytest.mark.parametrize("method", ["switch", "base"])
def test_hand_written_gradients_match_finite_differences(method):
    rng = np.random.default_rng(0)
    task = toy.Task(0, toy.REGIMES["uniform"])
    x, y, _ = task.sample(16, rng)
    params = toy.init_params(rng)
    params[0] *= 30  # sharper router, so the gates matter
    grads, _, _ = toy.batch_gradients(method, params, x, y, 5, rng, 0.0)
    for k, (p, g) in enumerate(zip(params, grads)):
        for idx in [(0,) * p.ndim, tuple(s - 1 for s in p.shape)]:
            old = p[idx]
            p[idx] = old + 1e-6
            up = _loss(method, params, x, y, 5)
            p[idx] = old - 1e-6
            down = _loss(method, params, x, y, 5)
            p[idx] = old
            assert (up - down) / 2e-6 == pytest.approx(g[idx], rel=1e-4, abs=1e-7), (method, k, idx)


def test_estimators_learn_the_uniform_task():
    for method in ("reinforce", "skip"):
        (mse, purity), dropped = toy.train(method, toy.Task(1, toy.REGIMES["uniform"]), 20, 1500, 1)
        assert mse < 0.05 and purity >= 0.5 and (dropped == 0.0) == (method == "reinforce")


def test_purity_takes_the_best_one_to_one_map():
    cluster = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    assert toy.purity(np.array([2, 2, 0, 0, 3, 3, 1, 1]), cluster) == 1.0  # any relabelling is pure
    assert toy.purity(np.array([1, 1, 1, 1, 2, 2, 3, 3]), cluster) == 0.75  # two clusters share expert 1
    assert toy.purity(np.array([0, 1, 1, 1, 2, 2, 3, 0]), cluster) == 0.75


def test_the_study_pairs_estimators_by_seed():
    result = toy.run(seeds=3, steps=40, factors=(1.25,), methods=("skip", "skip_naive", "balanced"))
    assert result["seeds"] == 3 and [r["method"] for r in result["results"]] == ["skip", "skip_naive", "balanced"] * 2
    by = {(r["regime"], r["method"]): r for r in result["results"]}
    pairs = [(p["regime"], p["pair"]) for p in result["paired"]]
    assert pairs == [(regime, pair) for regime in toy.REGIMES
                     for pair in ("skip - balanced", "skip - skip_naive", "balanced - skip_naive")]
    for p in result["paired"]:
        a, b = p["pair"].split(" - ")
        want = by[p["regime"], a]["purity"]["mean"] - by[p["regime"], b]["purity"]["mean"]
        assert p["purity"]["mean"] == pytest.approx(want) and p["purity"]["n"] == 3
    rate = by["uniform", "skip"]["success_rate"]
    assert rate["n"] == 3 and rate["low"] <= rate["rate"] <= rate["high"]
    assert "paired by seed" in toy.table(result)
