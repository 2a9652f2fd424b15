"""Bucketed gradient reduction: one AllReduce per bucket of shared gradients, none for the experts, and each
gradient back in its own shape and place."""
import numpy as np
from mindspore import Tensor

from pangu_moe.model.pangu import build_model, is_expert_parameter
from pangu_moe.train import data_parallel
from tests.conftest import tiny_config


class SameOnEveryRank:
    """AllReduce(sum) of W ranks that all hold the same tensor: x * W; counts its calls."""

    def __init__(self, world):
        self.world, self.calls = world, []

    def __call__(self, x):
        self.calls.append(x.shape)
        return x * self.world


def test_shared_gradients_are_reduced_in_buckets_and_experts_not_at_all(monkeypatch):
    params = build_model(tiny_config()).trainable_params()
    shared = [p for p in params if not is_expert_parameter(p.name)]
    sizes = [4 * int(np.prod(p.shape)) for p in shared]
    bucket_bytes = max(sizes) * 2
    groups = data_parallel.buckets(params, bucket_bytes)
    assert [i for group in groups for i in group] == [i for i, p in enumerate(params) if not is_expert_parameter(p.name)]
    assert all(sum(4 * int(np.prod(params[i].shape)) for i in g) <= bucket_bytes for g in groups)
    assert 1 < len(groups) < len(shared)  # fewer collectives than parameters
    assert len(data_parallel.buckets(params)) == 1  # the tiny model fits one 25 MB bucket
    parallel = data_parallel.DataParallel(params, 4, bucket_bytes)
    fake = SameOnEveryRank(4)
    monkeypatch.setattr(parallel, "all_reduce", fake)
    rng = np.random.default_rng(0)
    grads = tuple(Tensor(rng.standard_normal(p.shape).astype(np.float32)) for p in params)
    out = parallel.grads(grads)
    assert len(fake.calls) == len(groups)
    for p, g, reduced in zip(params, grads, out):
        expected = g.asnumpy() / 4 if is_expert_parameter(p.name) else g.asnumpy()  # mean over 4 equal ranks
        assert reduced.shape == g.shape and np.array_equal(reduced.asnumpy(), expected), p.name
