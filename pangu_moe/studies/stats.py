"""Confidence intervals for the studies' figures over seeds.

- A mean over n seeds gets Student's t interval: mean ± t(0.975, n-1) · s / √n, s the sample standard
  deviation (ddof 1). With one seed there is no interval (`ci95` None): nothing is claimed.
- A difference between two arms is paired by seed (same seed, same data order, same initial weights where
  the arms share a shape), so its interval is the t interval of the per-seed differences, which is much
  narrower than the two arms' intervals side by side when the seeds' noise is shared.
- A success rate (k of n) gets the Wilson score interval, which stays inside [0, 1] and is not degenerate
  at k = 0 or k = n.

An interval "resolves" a difference when it excludes 0 (`resolved`).
"""
import math

import numpy as np
from scipy import stats

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def mean_ci95(samples):
    """samples: sequence of floats (one per seed) -> {"mean", "ci95" (half-width, None for n < 2), "n"}."""
    x = np.asarray(samples, np.float64)
    n = len(x)
    if n == 0:
        raise ValueError("mean_ci95: no samples")
    half = None
    if n > 1:
        half = float(stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return {"mean": float(x.mean()), "ci95": half, "n": n}


def paired_difference(a, b):
    """The per-seed differences a_i - b_i (equal-length sequences, paired by position) as `mean_ci95`."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} against {len(b)} samples")
    return mean_ci95(np.asarray(a, np.float64) - np.asarray(b, np.float64))


def wilson_ci95(successes, n):
    """k successes of n trials -> {"rate", "low", "high", "n"} (Wilson score interval, 95%)."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_ci95: {successes} successes of {n} trials")
    p, z2 = successes / n, Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the ends (rounding leaves ~1e-18)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return {"rate": p, "low": low, "high": high, "n": n}


def resolved(interval):
    """True if a `mean_ci95` interval excludes 0."""
    return interval["ci95"] is not None and abs(interval["mean"]) > interval["ci95"]
