"""The studies' interval code on samples whose intervals are known by hand."""
import pytest

from pangu_moe.studies.stats import mean_ci95, paired_difference, resolved, wilson_ci95


def test_t_interval_of_known_samples():
    # 1, 2, 3, 4, 5: mean 3, s = sqrt(2.5), t(0.975, 4) = 2.776445105 -> half-width 1.963243
    got = mean_ci95([1, 2, 3, 4, 5])
    assert got["mean"] == 3.0 and got["n"] == 5
    assert got["ci95"] == pytest.approx(2.776445105 * 2.5 ** 0.5 / 5 ** 0.5, rel=1e-9)
    assert got["ci95"] == pytest.approx(1.963243161, rel=1e-8)
    # two samples: t(0.975, 1) = 12.70620474, s = |a - b| / sqrt(2)
    assert mean_ci95([0.0, 1.0])["ci95"] == pytest.approx(12.70620474 * 0.5, rel=1e-8)
    assert mean_ci95([7.0]) == {"mean": 7.0, "ci95": None, "n": 1}


def test_pairing_removes_the_shared_seed_noise():
    a, b = [10.0, 20.0, 30.0], [9.0, 19.1, 28.9]
    diff = paired_difference(a, b)
    assert diff["mean"] == pytest.approx(1.0)
    assert diff["ci95"] < 0.4 < mean_ci95(a)["ci95"]  # the arms' own intervals are ~25 wide
    assert resolved(diff) and not resolved(mean_ci95([-1.0, 1.0])) and not resolved(mean_ci95([3.0]))
    with pytest.raises(ValueError, match="3 against 2 samples"):
        paired_difference(a, b[:2])


def test_wilson_interval_of_known_counts():
    # 8 of 10: the Wilson 95% interval is [0.4902, 0.9433]
    got = wilson_ci95(8, 10)
    assert got["rate"] == 0.8 and got["low"] == pytest.approx(0.4902, abs=1e-4)
    assert got["high"] == pytest.approx(0.9433, abs=1e-4)
    none = wilson_ci95(0, 100)  # no success is still an interval: [0, 0.0370]
    assert none["low"] == 0.0 and none["high"] == pytest.approx(0.0370, abs=1e-4)
    with pytest.raises(ValueError):
        wilson_ci95(3, 2)
