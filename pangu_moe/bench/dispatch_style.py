"""Dispatch styles: index gather (what the layer does) vs a [T, E*C] one-hot matmul (GShard/Tutel's einsum
style, written as matmuls since `ops.einsum` is unsupported on CPU), forward + backward.

Both dispatch the same routed tokens into [E, C, H], apply the same experts, combine back with the gate,
and return sum(y * cotangent) with its gradients with respect to x and the expert weights, as one
`ms.jit` graph each. Runs alternate; each figure is the median of `repeats` runs after two warmups.
"""
import time

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from pangu_moe import runtime
from pangu_moe.capacity import expert_capacity
from pangu_moe.config import RuntimeConfig
from pangu_moe.dispatch.dispatcher import Dispatcher
from pangu_moe.experts import GroupedExperts
from pangu_moe.ops.gating import position_slots
from pangu_moe.ops.layout import reference_layout

SHAPES = {"T": 4096, "H": 256, "F": 1024, "E": 8, "K": 1, "capacity_factor": 1.25}


def onehot_dispatch_combine(x, expert_index, gate, keep, slot, experts, num_experts, capacity):
    """The one-hot style: a dispatch mask [T, E*C] with a 1 at each kept choice's buffer row,
    expert_in = mask^T x, and y = (the mask weighted by the gate) @ expert_out.

    Args: x [T, H]; expert_index, slot [T, K] int32; gate [T, K] fp32; keep [T, K] bool; experts: a cell on
        [E, C, H]; num_experts E; capacity C.
    Returns: y [T, H].
    """
    num_tokens, hidden = x.shape
    rows = expert_index * capacity + slot  # (T, K)
    row_ids = ops.arange(num_experts * capacity, dtype=ms.int32).reshape(1, 1, -1)  # (1, 1, E*C)
    hit = ops.logical_and(rows.reshape(num_tokens, -1, 1) == row_ids, keep.reshape(num_tokens, -1, 1))  # (T, K, E*C)
    mask = ops.stop_gradient(hit.astype(x.dtype))
    dispatch = mask.sum(1)  # (T, E*C)
    combine = (mask * gate.reshape(num_tokens, -1, 1)).sum(1)  # (T, E*C)
    expert_in = ops.matmul(dispatch.T, x).reshape(num_experts, capacity, hidden)  # (E, C, H) <- (E*C, H)
    expert_out = experts(expert_in).reshape(num_experts * capacity, hidden)  # (E*C, H)
    return ops.matmul(combine, expert_out)


def run(repeats=10, shapes=SHAPES, seed=0, progress=None):
    """Measure; returns shapes, gather_seconds, onehot_seconds and `onehot_over_gather` (time ratio).

    `progress`: callable(done, total) after each of the repeats + 2 warmup runs, or None.
    """
    runtime.setup(RuntimeConfig(device="CPU", mode="graph", seed=seed))
    t, h, f, e, k = shapes["T"], shapes["H"], shapes["F"], shapes["E"], shapes["K"]
    capacity = expert_capacity(t, e, k, shapes["capacity_factor"])
    rng = np.random.default_rng(seed)
    expert_index = Tensor(np.stack([rng.permutation(e)[:k] for _ in range(t)]).astype(np.int32))
    gate = Tensor(rng.random((t, k)).astype(np.float32))
    slot, keep = position_slots(expert_index, e, capacity)
    flat_index = reference_layout(expert_index, slot, keep, keep, capacity, 1, e, 1, 1)[0]
    experts = GroupedExperts(e, h, f)
    dispatcher = Dispatcher(e)
    x = Tensor(rng.standard_normal((t, h)).astype(np.float32))
    cotangent = Tensor(rng.standard_normal((t, h)).astype(np.float32))

    def gather_loss(x_):
        y = dispatcher.combine(experts(dispatcher.dispatch(x_, flat_index, capacity)), flat_index, gate, keep)
        return (y * cotangent).sum()

    def onehot_loss(x_):
        return (onehot_dispatch_combine(x_, expert_index, gate, keep, slot, experts, e, capacity) * cotangent).sum()

    steps = {name: ms.jit(ms.value_and_grad(fn, 0, experts.trainable_params()))
             for name, fn in (("gather", gather_loss), ("onehot", onehot_loss))}
    times, values = {"gather": [], "onehot": []}, {}
    for i in range(repeats + 2):
        for name, step in steps.items():
            began = time.perf_counter()
            loss, (d_x, d_weights) = step(x)
            values[name] = (loss.asnumpy(), d_x.asnumpy(), [g.asnumpy() for g in d_weights])
            if i >= 2:
                times[name].append(time.perf_counter() - began)
        if progress:
            progress(i + 1, repeats + 2)
    gather_s, onehot_s = float(np.median(times["gather"])), float(np.median(times["onehot"]))
    same = bool(np.allclose(values["gather"][0], values["onehot"][0], rtol=1e-4)
                and np.allclose(values["gather"][1], values["onehot"][1], rtol=1e-4, atol=1e-5))
    return {"shapes": dict(shapes, C=capacity), "repeats": repeats, "gather_seconds": gather_s,
            "onehot_seconds": onehot_s, "onehot_over_gather": onehot_s / gather_s, "same_result": same}
