"""LocMoE's frozen capacity: measured on the step-0 batch before training."""
import math

import numpy as np
import pytest
from mindspore import Tensor

from pangu_moe.config import ConfigError
from pangu_moe.routing.locmoe import routed_cosines
from pangu_moe.train.trainer import Trainer
from tests.conftest import tiny_config


@pytest.mark.parametrize("cosine, capacity", [(0.0, 1), (0.999, 128)])
def test_probe_sets_capacity_from_the_bound_and_reports_it(tmp_path, monkeypatch, cosine, capacity):
    """The bound grows with delta-hat (at d = 5120, n = 16: 1.97 slots at 0.03, 181.5 at 0.05): routed cosines all
    0 give a bound below one slot, so C = moe.min_capacity = 1; all 0.999 give one far above the 128 tokens of a
    rank, so C = 128."""
    from pangu_moe.routing import locmoe
    monkeypatch.setattr(locmoe, "routed_cosines", lambda router, x, *rest: np.full(x.shape[0], cosine))
    cfg = tiny_config("moe.router=locmoe", "moe.capacity_mode=locmoe_bound", "moe.min_capacity=1",
                      "runtime.mode=pynative")
    lines = []
    trainer = Trainer(cfg, str(tmp_path), log=lines.append)
    probe = trainer.capacity_proposals
    assert probe["delta_hat"] == [cosine, cosine] and trainer.capacity == capacity
    assert lines and lines[0].startswith("capacity proposed by the routers: delta_hat")


def test_routed_cosine_is_the_largest_grap_cosine_with_zero_bias(tmp_path):
    # With the bias at 0 the routed expert maximises the block mean, hence (Lemma 1) the cosine.
    cfg = tiny_config("moe.router=locmoe", "runtime.mode=pynative")
    trainer = Trainer(cfg, str(tmp_path), log=lambda line: None)
    ids = trainer.evaluator.inputs[:4]
    doms = trainer.evaluator.domain_ids[:4]
    x, tokens, groups = trainer.model.moe_inputs(Tensor(ids), Tensor(doms), 128)[0]
    xs = x.asnumpy()
    blocks = xs.reshape(len(xs), 2, 16)
    cos = blocks.mean(-1) / (np.linalg.norm(xs, axis=1, keepdims=True) * math.sqrt(2 / 32))
    np.testing.assert_allclose(routed_cosines(trainer.model.moe_blocks[0].moe.router, x, tokens, groups),
                               cos.max(1), rtol=1e-5, atol=1e-7)


def test_bound_mode_needs_the_locmoe_router():
    with pytest.raises(ConfigError, match="moe.capacity_mode = 'locmoe_bound': must be factor unless"):
        tiny_config("moe.capacity_mode=locmoe_bound")
