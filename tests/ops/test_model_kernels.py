"""runtime.kernels = custom against reference inside the model: one MoE layer's outputs and gradients,
and whole training runs (the demo model over 20 steps, tiny expert-parallel runs)."""
import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

from pangu_moe.configs import DEMO_CONFIG
from pangu_moe.config import RunConfig
from pangu_moe.dispatch.dispatcher import Dispatcher
from pangu_moe.experts import GroupedExperts
from pangu_moe.model.moe_layer import MoELayer
from pangu_moe.routing.topk import TopKRouter
from pangu_moe.routing.locmoe import LocMoERouter
from pangu_moe.train.metrics import read
from pangu_moe.train.trainer import Trainer
from tests.conftest import tiny_config

H, E, G, RANKS = 16, 8, 2, 2


def _router(kind):
    if kind == "locmoe":
        mask = np.arange(2)[:, None] == (np.arange(E) // 4)[None, :]
        return LocMoERouter(H, E, G, 1, 0.01, 0.001, 0.1, "kl", mask)
    return TopKRouter(H, E, G, int(kind[-1]), 0.01, 0.001, init_std=0.5)


def _layer(kind, backend):
    ms.set_seed(3)
    router = _router(kind)
    assert router.use_kernels(backend) == (backend != "reference")
    assert (router.gating is not None) == (backend != "reference")  # the fused op is what construct runs
    return MoELayer(router, Dispatcher(E, RANKS, RANKS, 1, backend), GroupedExperts(E, H, 32, 0.3), RANKS)


@pytest.mark.parametrize("kind", ["topk1", "topk2", "locmoe"])
def test_moe_layer_outputs_and_gradients_match(kind):
    rng = np.random.default_rng(0)
    x = Tensor(rng.normal(size=(24, H)).astype(np.float32))
    groups = Tensor(rng.integers(0, G, 24).astype(np.int32))
    cot = Tensor(rng.normal(size=(24, H)).astype(np.float32))
    results = []
    for backend in ("reference", "cpu"):
        layer = _layer(kind, backend)

        def loss(x_):
            y, losses, tokens, kept, _, _ = layer(x_, groups, groups, 3, True)
            return (y * cot).sum() + losses.sum(), tokens, kept
        step = ms.jit(ms.value_and_grad(loss, grad_position=0, weights=layer.trainable_params(), has_aux=True))
        (value, tokens, kept), (d_x, d_params) = step(x)
        results.append((value.asnumpy(), tokens.asnumpy(), kept.asnumpy(), d_x.asnumpy(),
                        [g.asnumpy() for g in d_params]))
    (ref_value, ref_tokens, ref_kept, ref_dx, ref_dp), (value, tokens, kept, d_x, d_p) = results
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_array_equal(kept, ref_kept)
    assert kept.sum() < tokens.sum()  # capacity binds
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    # The gates differ in the last bit (the kernel's exp and sum round differently from MindSpore's softmax);
    # after the expert matmuls an element that cancels to near 0 can differ relatively more, so the absolute
    # tolerance scales with each gradient's magnitude.
    for got, want in zip([d_x] + d_p, [ref_dx] + ref_dp):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _losses(cfg, run_dir):
    Trainer(cfg, str(run_dir), log=lambda line: None).train()
    return np.array([r["loss"] for r in read(run_dir / "metrics.jsonl")])


def test_demo_model_trains_the_same_with_custom_kernels(tmp_path):
    steps = ["train.steps=20", "train.warmup_steps=5", "train.log_every=1", "train.eval_every=20", "train.eval_batches=1",
             "train.checkpoint_every=1000"]
    losses = {k: _losses(RunConfig.from_yaml(DEMO_CONFIG, steps + [f"runtime.kernels={k}"]), tmp_path / k)
              for k in ("reference", "custom")}
    assert len(losses["custom"]) == 20
    np.testing.assert_allclose(losses["custom"], losses["reference"], rtol=1e-5)


@pytest.mark.parametrize("overrides", [
    ("moe.top_k=2", "parallel.dispatch=simulated", "parallel.nodes=2", "parallel.devices_per_node=2",
     "parallel.exchange=hierarchical"),
    ("moe.router=locmoe", "parallel.dispatch=simulated", "parallel.nodes=2", "parallel.devices_per_node=2"),
])
def test_tiny_expert_parallel_runs_match(tmp_path, overrides):
    base = ("train.steps=6", "train.eval_every=6", "train.checkpoint_every=1000", "moe.num_experts=8") + overrides
    reference = _losses(tiny_config(*base, "runtime.kernels=reference"), tmp_path / "reference")
    custom = _losses(tiny_config(*base, "runtime.kernels=custom"), tmp_path / "custom")
    np.testing.assert_allclose(custom, reference, rtol=1e-5)
