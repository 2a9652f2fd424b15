"""LocMoE's frozen capacity: measured on the step-0 batch before training."""
import math

import numpy as np
import pytest
from mindspore import Tensor

from pangu_moe.capacity import capacity_lower_bound
from pangu_moe.config import ConfigError
from pangu_moe.routing.locmoe import routed_cosines
from pangu_moe.train.trainer import Trainer
from tests.conftest import tiny_config


def test_probe_sets_capacity_from_the_bound_and_reports_it(tmp_path):
    cfg = tiny_config("moe.router=locmoe", "moe.capacity_mode=locmoe_bound", "moe.min_capacity=1",
                      "runtime.mode=pynative")
    lines = []
    trainer = Trainer(cfg, str(tmp_path), log=lines.append)
    probe = trainer.capacity_proposals
    assert len(probe["delta_hat"]) == 2 and all(0 <= d < 1 for d in probe["delta_hat"])
    assert probe["capacity_lower_bound"] == [capacity_lower_bound(d, 32, 2) for d in probe["delta_hat"]]
    assert trainer.capacity == min(128, max(1, math.ceil(max(probe["capacity_lower_bound"]))))
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
