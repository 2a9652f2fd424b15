"""MoE layer vs a dense FFN with the same active parameters: forward + backward tokens/s.

Both run as one `ms.jit` graph computing the loss sum(y * cotangent) and its gradients with respect
to the input and every weight. Runs alternate (MoE, dense, MoE, ...) so machine drift hits both
alike; each figure is the median of `repeats` timed runs after two warmup runs.
"""
import time

import numpy as np
import mindspore as ms
from mindspore import Tensor

from pangu_moe import runtime
from pangu_moe.capacity import expert_capacity
from pangu_moe.config import RuntimeConfig
from pangu_moe.dispatch.dispatcher import Dispatcher
from pangu_moe.experts import GroupedExperts
from pangu_moe.model.mlp import DenseMLP
from pangu_moe.model.moe_layer import MoELayer
from pangu_moe.routing.topk import TopKRouter

SHAPES = {"T": 4096, "H": 256, "F": 1024, "E": 8, "K": 1, "capacity_factor": 1.25}


def _grad_step(cell, forward):
    params = cell.trainable_params()
    grad_fn = ms.value_and_grad(forward, 0, params)

    @ms.jit
    def step(x, cotangent):
        return grad_fn(x, cotangent)

    return step


def _time(step, x, cotangent):
    began = time.perf_counter()
    loss, grads = step(x, cotangent)
    loss.asnumpy()
    for g in grads[1]:
        g.asnumpy()
    return time.perf_counter() - began


def run(repeats=10, shapes=SHAPES, seed=0, progress=None):
    """Measure; returns a dict of shapes, seconds, tokens/s and `moe_over_dense` (time ratio).

    `progress`: callable(done, total) after each of the repeats + 2 warmup runs, or None.
    """
    runtime.setup(RuntimeConfig(device="CPU", mode="graph", seed=seed))
    t, h, f, e, k = shapes["T"], shapes["H"], shapes["F"], shapes["E"], shapes["K"]
    capacity = expert_capacity(t, e, k, shapes["capacity_factor"])
    moe = MoELayer(TopKRouter(h, e, 1, k, 0.01, 0.001), Dispatcher(e), GroupedExperts(e, h, f))
    dense = DenseMLP(h, f)
    token_ids = Tensor(np.zeros(t, np.int32))
    group_ids = Tensor(np.zeros(t, np.int32))

    def moe_forward(x, cotangent):
        y, losses = moe(x, token_ids, group_ids, capacity, True)[:2]
        return (y * cotangent).sum() + losses.sum()

    def dense_forward(x, cotangent):
        return (dense(x) * cotangent).sum()

    rng = np.random.default_rng(seed)
    x = Tensor(rng.standard_normal((t, h)).astype(np.float32))
    cotangent = Tensor(rng.standard_normal((t, h)).astype(np.float32))
    steps = {"moe": _grad_step(moe, moe_forward), "dense": _grad_step(dense, dense_forward)}
    times = {"moe": [], "dense": []}
    for i in range(repeats + 2):
        for name, step in steps.items():
            seconds = _time(step, x, cotangent)
            if i >= 2:
                times[name].append(seconds)
        if progress:
            progress(i + 1, repeats + 2)
    moe_s, dense_s = float(np.median(times["moe"])), float(np.median(times["dense"]))
    return {"shapes": dict(shapes, C=capacity), "repeats": repeats,
            "moe_seconds": moe_s, "dense_seconds": dense_s,
            "moe_tokens_per_s": t / moe_s, "dense_tokens_per_s": t / dense_s,
            "moe_over_dense": moe_s / dense_s}


def table(result):
    """Human-readable lines for `run`'s result."""
    s = result["shapes"]
    return "\n".join([
        f"MoE layer vs dense FFN, forward+backward, T={s['T']} H={s['H']} F={s['F']} E={s['E']} K={s['K']} "
        f"capacity_factor={s['capacity_factor']} (C={s['C']}), median of {result['repeats']}",
        f"  {'layer':8s} {'ms/step':>9s} {'tokens/s':>10s}",
        f"  {'moe':8s} {result['moe_seconds'] * 1e3:9.1f} {result['moe_tokens_per_s']:10,.0f}",
        f"  {'dense':8s} {result['dense_seconds'] * 1e3:9.1f} {result['dense_tokens_per_s']:10,.0f}",
        f"  moe_over_dense = {result['moe_over_dense']:.3f}  (time ratio; target <= 1.15)",
    ])
