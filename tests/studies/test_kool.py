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
        (mse, _), dropped = toy.train(method, toy.Task(1, toy.REGIMES["uniform"]), 20, 1500, 1)
        assert mse < 0.05 and (dropped == 0.0) == (method == "reinforce")
