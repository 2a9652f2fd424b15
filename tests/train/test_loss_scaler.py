"""The dynamic loss scale itself (`precision.LossScaler`), step by step against hand-computed sequences, and the
fp16 gradient path's unscaling (its gradients and their norm equal the unscaled run's exactly)."""
import numpy as np
import mindspore as ms
from mindspore import Tensor

from pangu_moe.model.pangu import build_model
from pangu_moe.precision import MAX_LOSS_SCALE, LossScaler
from pangu_moe.train.steps import make_gradient
from tests.conftest import tiny_config


def _run(scaler, steps):
    """(scale after each step, good-step counter after each step) for steps given as (finite, applied)."""
    scales, goods = [], []
    for finite, applied in steps:
        scales.append(float(scaler(Tensor(finite), Tensor(applied)).asnumpy()))
        goods.append(int(scaler.good_steps.asnumpy()))
    return scales, goods


def test_an_overflow_resets_the_window_and_backs_off_by_the_configured_factor():
    ok, overflow = (True, True), (False, False)
    scales, goods = _run(LossScaler(True, init=64.0, window=3, backoff=0.25), [ok, ok, overflow, ok, ok, ok, ok])
    # two good steps, then an overflow: 64 x 0.25 = 16 and the count restarts; three more good steps double it
    assert scales == [64.0, 64.0, 16.0, 16.0, 16.0, 32.0, 32.0]
    assert goods == [1, 2, 0, 1, 2, 0, 1]


def test_growth_stops_at_the_maximum_and_backoff_at_one():
    ok = (True, True)
    assert _run(LossScaler(True, init=MAX_LOSS_SCALE / 2, window=1), [ok, ok, ok])[0] == [MAX_LOSS_SCALE] * 3
    assert _run(LossScaler(True, init=2.0, backoff=0.5), [(False, False)] * 3)[0] == [1.0, 1.0, 1.0]


def test_a_finite_step_that_applied_nothing_neither_counts_nor_backs_off():
    """A step skipped for another reason (finite gradients, not applied) keeps the scale and the count."""
    scales, goods = _run(LossScaler(True, init=8.0, window=2), [(True, True), (True, False), (True, True)])
    assert scales == [8.0, 8.0, 16.0] and goods == [1, 1, 0]


def test_a_static_scaler_never_moves():
    assert _run(LossScaler(False, init=1024.0, window=1), [(True, True), (False, False)])[0] == [1.0, 1.0]


def test_scaled_gradients_and_their_norm_equal_the_unscaled_ones():
    """The scale is a power of 2, so the fp16 path's unscaled gradients (and the squared norm that clipping and the
    logged grad_norm use) equal the plain path's bit for bit; a norm taken before unscaling would be 2^20 larger."""
    cfg = tiny_config()
    ms.set_seed(3)
    model = build_model(cfg)
    params = model.trainable_params()
    rng = np.random.default_rng(0)
    ids = Tensor(rng.integers(0, 256, (4, 32)).astype(np.int32))
    batch = (ids, ids, Tensor(np.zeros((4, 32), np.int32)))
    plain = make_gradient(model, params, 40)(*batch)
    scaled = make_gradient(model, params, 40, loss_scaler=LossScaler(True, init=1024.0))(*batch)
    assert float(scaled[0].asnumpy()) == float(plain[0].asnumpy())  # the returned loss is not scaled
    assert float(scaled[6].asnumpy()) == float(plain[6].asnumpy()) > 0
    for a, b in zip(scaled[5], plain[5]):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())
