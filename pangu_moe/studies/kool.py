"""Kool et al.'s toy experiment (our design: the paper's own task was not retrievable).

Data: K = E = 4 clusters in d = 16 (centres ~ N(0, 9 I), points = centre + N(0, 0.25 I)); target
y = a_k . x + N(0, 0.01) with a random linear map a_k per cluster, so one expert per cluster is needed.
Regimes: uniform cluster frequencies, and skewed (0.4, 0.3, 0.2, 0.1), where a perfectly balanced
assignment must misroute. Model: 4 linear experts and a linear softmax router (fp64 numpy, exact
gradients written out). Batch N = 64, capacity C = ceil(N/E * CF); Adam lr 1e-2; EMA baseline 0.9.

Methods: reinforce (no capacity, reference), skip (HT-weighted), skip_naive (w = 1: biased), balanced
(Gumbel-matching, B1), switch (argmax, gate p * f, position dropping, aux loss 1e-2), base (balanced
linear assignment on the logits in training, sigmoid gate, argmax at test). The balanced methods use
C = N/E whatever CF is. Test: argmax routing, no capacity, 4096 points.

Success measures routing directly: routing purity, the share of test points sent to their cluster's expert
under the best one-to-one cluster -> expert map (`purity`), is at least `SUCCESS_PURITY`. A loss threshold
does not separate the methods: a linear expert fits two clusters well enough that most methods reach a
test MSE under 5% of Var(y) with two clusters on one expert (2026-11-29 results).

Comparisons are paired by seed (the same task, initial weights and data stream for every method:
`studies.stats.paired_difference` on purity); success rates get Wilson intervals.
"""
import math
import time

import numpy as np
from scipy.optimize import linear_sum_assignment

from pangu_moe.routing import kool
from pangu_moe.routing.balanced import balanced_assignment
from pangu_moe.studies.stats import mean_ci95, paired_difference, wilson_ci95

D, E, N = 16, 4, 64
REGIMES = {"uniform": (0.25, 0.25, 0.25, 0.25), "skewed": (0.4, 0.3, 0.2, 0.1)}
CF_METHODS = ("skip", "skip_naive", "switch")
FIXED_METHODS = ("reinforce", "balanced", "base")
METHODS = ("reinforce", "skip", "skip_naive", "balanced", "switch", "base")
SUCCESS_PURITY = 0.9
PAIRS = (("skip", "balanced"), ("skip", "skip_naive"), ("balanced", "skip_naive"))  # (a, b): a - b by seed


class Task:
    """One seeded task: cluster centres, per-cluster linear maps and a sampler."""

    def __init__(self, seed, freqs):
        rng = np.random.default_rng((seed, 0))
        self.centres = rng.normal(0, 3.0, (E, D))
        self.maps = rng.normal(0, 1.0, (E, D))
        self.freqs = np.asarray(freqs)

    def sample(self, n, rng):
        """x [n, D], y [n], cluster [n]."""
        cluster = rng.choice(E, n, p=self.freqs)
        x = self.centres[cluster] + rng.normal(0, 0.5, (n, D))
        y = (self.maps[cluster] * x).sum(1) + rng.normal(0, 0.1, n)
        return x, y, cluster


class Adam:
    def __init__(self, params, lr=1e-2, b1=0.9, b2=0.999, eps=1e-8):
        self.params, self.lr, self.b1, self.b2, self.eps = params, lr, b1, b2, eps
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads):
        self.t += 1
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            m *= self.b1
            m += (1 - self.b1) * g
            v *= self.b2
            v += (1 - self.b2) * g * g
            p -= self.lr * (m / (1 - self.b1 ** self.t)) / (np.sqrt(v / (1 - self.b2 ** self.t)) + self.eps)


def batch_gradients(method, params, x, y, capacity, rng, baseline, aux_coeff=1e-2):
    """One batch's gradient estimate for `method`.

    Args:
        params: [w [D, E], r [E], a [E, D], c [E]]; x [N, D]; y [N]; capacity C; rng; baseline b (float).
    Returns:
        (grads like params, value: the batch loss estimate that feeds the EMA baseline, dropped count).
    """
    w, r, a, c = params
    n = len(y)
    rows = np.arange(n)
    h = x @ w + r
    p = kool.softmax(h)
    pred = x @ a.T + c  # (N, E): every expert's output
    grad_h = np.zeros_like(h)
    dropped = 0
    if method in ("reinforce", "skip", "skip_naive", "balanced"):
        if method == "balanced":
            experts, score = kool.gumbel_matching(np.log(p), n // E, rng)
            scale = np.ones(n)
        else:
            experts = (np.log(p) + kool.gumbel(h.shape, rng)).argmax(1)
            if method == "reinforce":
                scale = np.ones(n)
            else:
                keep = kool.skip_keep(experts, capacity, rng)
                scale = kool.skip_weights(experts, keep, capacity, method == "skip")
        residual = pred[rows, experts] - y
        losses = residual ** 2
        value = float((scale * losses).mean())
        if method == "balanced":
            grad_h = kool.b1_logit_gradient(score, p, value - baseline)
        else:
            dlogp = -p
            dlogp[rows, experts] += 1.0
            grad_h = (scale * (losses - baseline))[:, None] * dlogp / n
        dropped = int((scale == 0).sum())
    elif method == "switch":
        experts = h.argmax(1)
        onehot = np.eye(E)[experts]
        keep = (np.cumsum(onehot, 0) * onehot).sum(1) <= capacity  # position policy
        gate = p[rows, experts]
        f = pred[rows, experts]
        residual = keep * (gate * f - y)
        grad_h = (2 * residual * f * gate)[:, None] * (onehot - p) / n
        frac = onehot.mean(0)
        grad_h += aux_coeff * E / n * p * (frac[None] - (p * frac[None]).sum(1, keepdims=True))
        scale = keep * gate
        value = float((residual ** 2).mean())
        dropped = int((~keep).sum())
    elif method == "base":
        experts = balanced_assignment(h, n // E)
        gate = 1 / (1 + np.exp(-h[rows, experts]))
        f = pred[rows, experts]
        residual = gate * f - y
        grad_h[rows, experts] = 2 * residual * f * gate * (1 - gate) / n
        scale = gate
        value = float((residual ** 2).mean())
    else:
        raise ValueError(f"study kool: method = {method!r}: must be one of {', '.join(METHODS)}")
    coeff = 2 * residual * scale / n  # (N,): d loss / d output of the routed expert
    grad_a, grad_c = np.zeros_like(a), np.zeros_like(c)
    np.add.at(grad_a, experts, coeff[:, None] * x)
    np.add.at(grad_c, experts, coeff)
    return [x.T @ grad_h, grad_h.sum(0), grad_a, grad_c], value, dropped


def init_params(rng):
    """[w, r, a, c]: router at the Switch scale 0.1 (fan-in), experts N(0, 0.01^2)."""
    return [rng.normal(0, math.sqrt(0.1 / D), (D, E)), np.zeros(E), rng.normal(0, 0.01, (E, D)), np.zeros(E)]


def train(method, task, capacity, steps, seed, decay=0.9):
    """Train one model; returns ((test MSE / Var(y), routing purity), training drop fraction)."""
    rng = np.random.default_rng((seed, 1))
    params = init_params(rng)
    opt = Adam(params)
    baseline, dropped = None, 0
    for _ in range(steps):
        x, y, _ = task.sample(N, rng)
        grads, value, drop = batch_gradients(method, params, x, y, capacity, rng,
                                             0.0 if baseline is None else baseline)
        if baseline is None and method in ("reinforce", "skip", "skip_naive", "balanced"):
            # The first batch has no baseline yet: recompute with b = its own loss (then it is an EMA of
            # earlier batches only, independent of the current sample).
            grads, value, drop = batch_gradients(method, params, x, y, capacity, rng, value)
        baseline = value if baseline is None else decay * baseline + (1 - decay) * value
        dropped += drop
        opt.step(grads)
    return evaluate(method, task, *params), dropped / (steps * N)


def purity(experts, cluster):
    """Share of points routed to their cluster's expert under the best one-to-one cluster -> expert map.

    Args: experts, cluster: int arrays [n] in [0, E). Returns: float in [1/E, 1]."""
    confusion = np.zeros((E, E), np.int64)
    np.add.at(confusion, (cluster, experts), 1)
    rows, cols = linear_sum_assignment(-confusion)
    return float(confusion[rows, cols].sum() / len(experts))


def evaluate(method, task, w, r, a, c):
    """(test MSE / Var(y), routing purity) with argmax routing."""
    x, y, cluster = task.sample(4096, np.random.default_rng(12345))
    h = x @ w + r
    experts = h.argmax(1)
    f = (x * a[experts]).sum(1) + c[experts]
    if method == "switch":
        f = f * kool.softmax(h)[np.arange(len(x)), experts]
    elif method == "base":
        f = f / (1 + np.exp(-h[np.arange(len(x)), experts]))
    return float(((f - y) ** 2).mean() / y.var()), purity(experts, cluster)


def run(seeds=100, steps=3000, factors=(1.0, 1.25, 2.0), methods=METHODS, log=None):
    """Every (regime, method, CF) over `seeds` seeds. Returns {"results": [per configuration: success_rate with
    its Wilson interval, purity and test MSE as mean_ci95, train_drop_fraction], "paired": [per regime, CF and
    `PAIRS` pair: the purity difference by seed, and the success difference by seed, as mean_ci95]}."""
    results, paired = [], []
    began = time.perf_counter()
    for regime, freqs in REGIMES.items():
        purities = {}
        for method in methods:
            for factor in (factors if method in CF_METHODS else (None,)):
                capacity = N if factor is None else kool.capacity_for(N, E, factor)
                outcomes = [train(method, Task(seed, freqs), capacity, steps, seed) for seed in range(seeds)]
                purity_by_seed = [o[0][1] for o in outcomes]
                purities[method, factor] = purity_by_seed
                wins = sum(p >= SUCCESS_PURITY for p in purity_by_seed)
                results.append({"regime": regime, "method": method, "capacity_factor": factor,
                                "success_rate": wilson_ci95(wins, seeds), "purity": mean_ci95(purity_by_seed),
                                "test_mse_over_var": mean_ci95([o[0][0] for o in outcomes]),
                                "train_drop_fraction": float(np.mean([o[1] for o in outcomes]))})
                if log:
                    r = results[-1]
                    log(f"{regime:8s} {method:11s} CF {factor or '-':>4} success {r['success_rate']['rate']:.2f} "
                        f"purity {r['purity']['mean']:.3f} ({time.perf_counter() - began:.0f} s)")
        for first, second in PAIRS:
            for factor in factors:
                a = purities.get((first, factor if first in CF_METHODS else None))
                b = purities.get((second, factor if second in CF_METHODS else None))
                if a is None or b is None:
                    continue
                paired.append({"regime": regime, "pair": f"{first} - {second}", "capacity_factor": factor,
                               "purity": paired_difference(a, b),
                               "success": paired_difference([float(p >= SUCCESS_PURITY) for p in a],
                                                            [float(p >= SUCCESS_PURITY) for p in b])})
    return {"seeds": seeds, "steps": steps, "success_purity": SUCCESS_PURITY, "results": results, "paired": paired}


def table(result):
    """Success rates with Wilson intervals, mean purity ± its 95% half-width, then the paired differences."""
    lines = [f"{result['seeds']} seeds, {result['steps']} steps; success = routing purity >= "
             f"{result['success_purity']}",
             f"{'regime':8s} {'method':11s} {'CF':>5s} {'success':>8s} {'95% interval':>14s} {'purity':>14s} "
             f"{'mse/var':>8s} {'dropped':>8s}"]
    for r in result["results"]:
        cf = "-" if r["capacity_factor"] is None else f"{r['capacity_factor']:.2f}"
        s = r["success_rate"]
        lines.append(f"{r['regime']:8s} {r['method']:11s} {cf:>5s} {s['rate']:8.2f} {s['low']:6.2f}-{s['high']:<7.2f} "
                     f"{r['purity']['mean']:7.3f}±{r['purity']['ci95'] or 0:<6.3f} "
                     f"{r['test_mse_over_var']['mean']:8.3f} {r['train_drop_fraction']:8.2%}")
    lines.append("paired by seed (a - b): purity, success")
    for p in result["paired"]:
        lines.append(f"{p['regime']:8s} {p['pair']:22s} CF {p['capacity_factor']:.2f}  "
                     f"{p['purity']['mean']:+.3f}±{p['purity']['ci95'] or 0:.3f}  "
                     f"{p['success']['mean']:+.2f}±{p['success']['ci95'] or 0:.2f}")
    return "\n".join(lines)
