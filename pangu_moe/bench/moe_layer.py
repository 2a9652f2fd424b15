"""The whole MoE layer, forward + backward: against a dense FFN with the same active parameters, with the
custom CPU kernels against the reference ops (runtime.kernels), at K = 1 and K = 2, and at K = 1 with its
buffers at a shrunk capacity bucket (what a live capacity such as LocMoE+'s buys when it falls to half).

Every variant runs as one `ms.jit` graph computing the loss sum(y * cotangent) plus the router losses and its
gradients with respect to the input and every weight. The MoE variants of one K share their weights, so the
backends do the same work. Runs alternate (every variant once per round) so machine drift hits all alike;
each figure is the median of `repeats` timed rounds after two warmup rounds.
"""
import math
import time

import numpy as np
import mindspore as ms
from mindspore import Tensor

from pangu_moe import runtime
from pangu_moe.capacity import capacity_bucket, expert_capacity
from pangu_moe.config import RuntimeConfig
from pangu_moe.dispatch.dispatcher import Dispatcher
from pangu_moe.experts import GroupedExperts
from pangu_moe.model.mlp import DenseMLP
from pangu_moe.model.moe_layer import MoELayer
from pangu_moe.ops import kernel_backend
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


def _layer_loss(layer, token_ids, group_ids, capacity):
    """forward(x, cotangent) -> sum(y * cotangent) + the router losses of one MoE layer in training."""
    def forward(x, cotangent):
        y, losses = layer(x, token_ids, group_ids, capacity, True)[:2]
        return (y * cotangent).sum() + losses.sum()
    return forward


def moe_layers_seconds(model, layer_inputs, capacity, repeats=5):
    """Forward + backward seconds of all MoE layers of a trained `model` at `capacity` slots per expert, each
    on its own router input (`PanguModel.moe_inputs`), summed over the layers; each layer's figure is the
    median of `repeats` runs after one warmup run. The routers keep their state (a live capacity still
    limits what a layer keeps), so this is the layer a training step runs with buffers of `capacity`.

    Args: layer_inputs: list of (x [T, H], token_ids [T], group_ids [T]) per MoE layer; capacity: python int.
    Returns: float seconds.
    """
    total = 0.0
    rng = np.random.default_rng(0)
    for block, (x, token_ids, group_ids) in zip(model.moe_blocks, layer_inputs):
        step = _grad_step(block.moe, _layer_loss(block.moe, token_ids, group_ids, capacity))
        cotangent = Tensor(rng.standard_normal(x.shape).astype(np.float32))
        times = [_time(step, x, cotangent) for _ in range(repeats + 1)][1:]
        total += float(np.median(times))
    return total


PHASES = ("route", "dispatch", "experts", "combine")


def moe_layer_phases(layer, x, token_ids, group_ids, capacity):
    """The training-mode MoE layer cut into its four phases, each one compiled forward + backward step
    (`MoELayer.route`; `layout` + `Dispatcher.dispatch` of the routing found; `run_experts`, the exchange
    included; `Router.combine`),
    fed with what the previous phase produced on `x`, with the loss sum(output * a fixed random cotangent)
    (plus the router losses for route) and its gradients with respect to the phase's float input and weights.

    Args: layer: `MoELayer` (not the compact `ascend_builtin` dispatch); x [T, H] fp32; token_ids, group_ids [T]
        int32; capacity: python int.
    Returns: ({phase: step() -> None, run once to time it}, y [T, H]: the layer's output recomposed from the
        phases' forward outputs).
    """
    rng = np.random.default_rng(0)

    def noise(shape):
        return Tensor(rng.standard_normal(shape).astype(np.float32))

    routing = layer.route(x, token_ids, group_ids, capacity, True)
    expert_index, gate, keep, _, _, _, log_prob = routing
    flat_index = layer.layout(routing, capacity)[0]
    r, e, h = layer.num_ranks, layer.num_experts, x.shape[1]
    dtype = layer.compute_dtype
    buffer = layer.dispatcher.dispatch(x.astype(dtype), flat_index, capacity).reshape(r, e, capacity, h)
    tokens = x.astype(dtype)
    expert_out = layer.run_experts(buffer, flat_index, tokens)[0].reshape(r * e, capacity, h)  # (R*E, C, H)
    y = layer.router.combine(layer.dispatcher, expert_out, flat_index, gate, keep, log_prob)[0]
    gate_cot, buffer_cot = noise(gate.shape), noise(buffer.shape)
    out_cot, y_cot = noise(expert_out.shape), noise(y.shape)

    def route(x):
        fields = layer.route(x, token_ids, group_ids, capacity, True)
        return (fields[1] * gate_cot).sum() + fields[5].sum()

    def dispatch(x):
        rows = layer.layout(routing, capacity)[0]
        return (layer.dispatcher.dispatch(x.astype(dtype), rows, capacity).reshape(buffer.shape) * buffer_cot).sum()

    def experts(buffer):
        return (layer.run_experts(buffer, flat_index, tokens)[0].reshape(expert_out.shape) * out_cot).sum()

    def combine(expert_out, gate):
        return (layer.router.combine(layer.dispatcher, expert_out, flat_index, gate, keep, log_prob)[0] * y_cot).sum()

    cells = {"route": layer.router, "dispatch": layer.dispatcher, "experts": layer.experts, "combine": layer.router}
    forwards = {"route": (route, (x,)), "dispatch": (dispatch, (x,)), "experts": (experts, (buffer,)),
                "combine": (combine, (expert_out, gate))}
    steps = {}
    for phase, (forward, inputs) in forwards.items():
        grad_fn = ms.value_and_grad(forward, tuple(range(len(inputs))), cells[phase].trainable_params())
        steps[phase] = _phase_step(ms.jit(grad_fn), inputs)
    return steps, y


def _phase_step(step, inputs):
    def run():
        loss, (input_grads, weight_grads) = step(*inputs)
        loss.asnumpy()
        for g in tuple(input_grads) + tuple(weight_grads):
            g.asnumpy()
    return run


def moe_layer_phase_seconds(layer, x, token_ids, group_ids, capacity, repeats=5):
    """{phase: [seconds of `repeats` timed runs]} of `moe_layer_phases`, the phases run in turn each round after
    one warmup round."""
    steps = moe_layer_phases(layer, x, token_ids, group_ids, capacity)[0]
    times = {phase: [] for phase in PHASES}
    for round_ in range(repeats + 1):
        for phase in PHASES:
            began = time.perf_counter()
            steps[phase]()
            if round_:
                times[phase].append(time.perf_counter() - began)
    return times


def moe_layers_split(model, layer_inputs, capacity, repeats=5):
    """The MoE layers of a trained `model` at `capacity`, whole and by phase: {"layer": figure, "route": figure,
    ...} with figure = {"median_ms", "min_ms", "max_ms"} over `repeats` rounds of each round's sum over the
    layers (the whole layer as `moe_layers_seconds` times it; the phases as `moe_layer_phase_seconds`)."""
    rounds = {name: np.zeros(repeats) for name in ("layer",) + PHASES}
    rng = np.random.default_rng(0)
    for block, (x, token_ids, group_ids) in zip(model.moe_blocks, layer_inputs):
        step = _grad_step(block.moe, _layer_loss(block.moe, token_ids, group_ids, capacity))
        cotangent = Tensor(rng.standard_normal(x.shape).astype(np.float32))
        rounds["layer"] += [_time(step, x, cotangent) for _ in range(repeats + 1)][1:]
        for phase, times in moe_layer_phase_seconds(block.moe, x, token_ids, group_ids, capacity, repeats).items():
            rounds[phase] += times
    return {name: {"median_ms": 1e3 * float(np.median(v)), "min_ms": 1e3 * float(v.min()),
                   "max_ms": 1e3 * float(v.max())} for name, v in rounds.items()}


def _moe_layer(shapes, top_k, kernels, seed, shrink=False):
    """A top-k MoE layer of `shapes` whose gating and dispatch run on `kernels` ("reference" | "custom"); with
    `shrink`, its buffers at the smallest capacity bucket holding half the capacity-factor capacity
    (`capacity_bucket`)."""
    t, h, f, e = shapes["T"], shapes["H"], shapes["F"], shapes["E"]
    backend = kernel_backend(kernels, "CPU")
    ms.set_seed(seed)  # the same weights for both backends
    router = TopKRouter(h, e, 1, top_k, 0.01, 0.001)
    router.use_kernels(backend)
    layer = MoELayer(router, Dispatcher(e, backend=backend), GroupedExperts(e, h, f))
    capacity = expert_capacity(t, e, top_k, shapes["capacity_factor"])
    capacity = capacity_bucket(math.ceil(capacity / 2), capacity) if shrink else capacity
    ids = Tensor(np.zeros(t, np.int32))
    return _grad_step(layer, _layer_loss(layer, ids, ids, capacity)), capacity


def run(repeats=10, shapes=SHAPES, seed=0, progress=None):
    """Measure; returns a dict of shapes, seconds per variant, tokens/s, `moe_over_dense` (K = `shapes["K"]`,
    reference ops, against the dense FFN of the same active size), `custom_over_reference_k1` /
    `custom_over_reference_k2` (time ratios of the whole layer), and at K = 1 `shrunk_capacity` (the bucket of
    half the capacity), `shrunk_over_full_k1` (measured time ratio) and `shrunk_exchange_bytes_ratio` (what a
    padded all-to-all of those buffers would move, counted: the ratio of the capacities).

    `progress`: callable(done, total) after each of the repeats + 2 warmup rounds, or None.
    """
    runtime.setup(RuntimeConfig(device="CPU", mode="graph", seed=seed))
    t, h, f, k = shapes["T"], shapes["H"], shapes["F"], shapes["K"]
    steps, capacities = {}, {}
    for top_k in (1, 2):
        for kernels in ("reference", "custom"):
            steps[f"{kernels}_k{top_k}"], capacities[top_k] = _moe_layer(shapes, top_k, kernels, seed)
    steps["reference_k1_shrunk"], shrunk = _moe_layer(shapes, 1, "reference", seed, shrink=True)
    dense = DenseMLP(h, f * k)  # the active FFN size of a token routed to K experts of F

    def dense_forward(x, cotangent):
        return (dense(x) * cotangent).sum()

    steps["dense"] = _grad_step(dense, dense_forward)
    rng = np.random.default_rng(seed)
    x = Tensor(rng.standard_normal((t, h)).astype(np.float32))
    cotangent = Tensor(rng.standard_normal((t, h)).astype(np.float32))
    times = {name: [] for name in steps}
    for i in range(repeats + 2):
        for name, step in steps.items():
            seconds = _time(step, x, cotangent)
            if i >= 2:
                times[name].append(seconds)
        if progress:
            progress(i + 1, repeats + 2)
    seconds = {name: float(np.median(values)) for name, values in times.items()}
    moe_s, dense_s = seconds[f"reference_k{k}"], seconds["dense"]
    return {"shapes": dict(shapes, C=capacities[k]), "repeats": repeats, "seconds": seconds,
            "moe_seconds": moe_s, "dense_seconds": dense_s,
            "moe_tokens_per_s": t / moe_s, "dense_tokens_per_s": t / dense_s,
            "moe_over_dense": moe_s / dense_s,
            "custom_over_reference_k1": seconds["custom_k1"] / seconds["reference_k1"],
            "custom_over_reference_k2": seconds["custom_k2"] / seconds["reference_k2"],
            "full_capacity_k1": capacities[1], "shrunk_capacity": shrunk,
            "shrunk_over_full_k1": seconds["reference_k1_shrunk"] / seconds["reference_k1"],
            "shrunk_exchange_bytes_ratio": shrunk / capacities[1]}


def table(result):
    """Human-readable lines for `run`'s result."""
    s = result["shapes"]
    return "\n".join([
        f"MoE layer vs dense FFN, forward+backward, T={s['T']} H={s['H']} F={s['F']} E={s['E']} K={s['K']} "
        f"capacity_factor={s['capacity_factor']} (C={s['C']}), median of {result['repeats']}",
        f"  {'layer':8s} {'ms/step':>9s} {'tokens/s':>10s}",
        f"  {'moe':8s} {result['moe_seconds'] * 1e3:9.1f} {result['moe_tokens_per_s']:10,.0f}",
        f"  {'dense':8s} {result['dense_seconds'] * 1e3:9.1f} {result['dense_tokens_per_s']:10,.0f}",
        f"  moe_over_dense = {result['moe_over_dense']:.3f}  (time ratio; target <= 1.0)",
        f"  whole layer, custom kernels / reference ops: K=1 {result['custom_over_reference_k1']:.3f}, "
        f"K=2 {result['custom_over_reference_k2']:.3f}  (time ratios; target <= 0.9)",
        f"  buffers at C={result['shrunk_capacity']} instead of {result['full_capacity_k1']} (K=1): time "
        f"x{result['shrunk_over_full_k1']:.3f} (measured), exchange bytes x{result['shrunk_exchange_bytes_ratio']:.3f}"
        f" (counted)",
    ])
