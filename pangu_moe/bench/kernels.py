"""Reference vs custom kernels: moe_gating + moe_dispatch_layout, moe_permute, moe_unpermute (forward).

Each stage is one `ms.jit` graph per backend, timed on the same inputs (routing: on a batch of inputs,
see `GatingLayout`); runs alternate between the
backends so machine drift hits all alike, and each figure is the median of `repeats` runs after two
warmups. The custom kernels run with their default OpenMP threads (every core) and with one thread,
which is how we decide where threads pay off.

permute_bw_fraction: the bytes moe_permute and moe_unpermute move (rows read + rows written), per
second, over a plain copy's bytes per second (`MoeMemCopy` through the same AOT call path, sized as
the send buffer).
"""
import ctypes
import os
import platform
import time

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from pangu_moe import runtime
from pangu_moe.capacity import expert_capacity
from pangu_moe.config import RuntimeConfig
from pangu_moe.ops import make_op
from pangu_moe.ops.build import library_path
from pangu_moe.ops.custom import aot_op
from pangu_moe.ops.gating import SOFTMAX, SOFTMAX_NORMALIZE

SHAPES = [(t, 1024, e, k) for t in (4096, 16384) for e in (8, 64) for k in (1, 2)]  # (T, H, E, K)
CAPACITY_FACTOR = 1.25
WORLD, NODES = 8, 2  # the destination layout of the counts: 2 nodes x 4 devices
ROUTING_BATCH = 16
ROUTING_OUTPUTS = 8  # per routed input: scores, weight, demand, flat_index, tokens, kept, send, node counts
VARIANTS = ("reference", "custom", "custom_1_thread")


class GatingLayout(nn.Cell):
    """moe_gating then moe_dispatch_layout on each of ROUTING_BATCH logits [T, E] -> every output (nothing pruned).

    One graph launch costs about as much as a small routing call (about 0.6 ms here), so one graph routes
    ROUTING_BATCH distinct inputs and the time is divided by it, as inside a model's step graph.
    """

    def __init__(self, backend, top_k, num_experts, capacity):
        super().__init__()
        self.gating = make_op("moe_gating", backend, top_k, num_experts, SOFTMAX_NORMALIZE if top_k > 1 else SOFTMAX)
        self.layout = make_op("moe_dispatch_layout", backend, 1, num_experts, WORLD, NODES)
        self.capacity = capacity

    def construct(self, logits_batch, group_ids):
        outputs = ()
        for logits in logits_batch:
            scores, expert_index, gate, slot, keep, demand = self.gating(logits, group_ids, self.capacity)
            layout = self.layout(expert_index, slot, keep, ops.ones_like(keep), self.capacity)
            outputs += (scores, gate * keep.astype(gate.dtype), demand) + tuple(layout)
        return outputs


class Permute(nn.Cell):
    """moe_permute with a fixed C: x [T, H] fp32, flat_index [T*K] int32 -> buffer [E, C, H] fp32."""

    def __init__(self, backend, num_experts, capacity):
        super().__init__()
        self.permute = make_op("moe_permute", backend, num_experts)
        self.capacity = capacity

    def construct(self, x, flat_index):
        return self.permute(x, flat_index, self.capacity)


class Unpermute(nn.Cell):
    """moe_unpermute: buffer [E, C, H] fp32, flat_index [T*K] int32, weight [T, K] fp32 -> y [T, H] fp32."""

    def __init__(self, backend):
        super().__init__()
        self.unpermute = make_op("moe_unpermute", backend)

    def construct(self, buffer, flat_index, weight):
        return self.unpermute(buffer, flat_index, weight)


class Copy(nn.Cell):
    """A plain copy of a float tensor through the AOT path (the bandwidth yardstick)."""

    def __init__(self):
        super().__init__()

        def same(x):
            return x
        self.copy = aot_op("MoeMemCopy", "cpu", (("x", "f32"),), (("y", "f32"),), same, same)

    def construct(self, x):
        return self.copy(x)


def _timed(fn, *args):
    """(seconds, outputs); asnumpy waits for the graph and, on CPU, shares the tensor's memory (no copy)."""
    began = time.perf_counter()
    out = fn(*args)
    for tensor in out if isinstance(out, tuple) else (out,):
        tensor.asnumpy()
    return time.perf_counter() - began, out


def _measure(shape, repeats, threads, rng):
    t, h, e, k = shape
    capacity = expert_capacity(t, e, k, CAPACITY_FACTOR)
    logits = tuple(Tensor(rng.standard_normal((t, e)).astype(np.float32)) for _ in range(ROUTING_BATCH))
    group_ids = Tensor(np.zeros(t, np.int32))
    x = Tensor(rng.standard_normal((t, h)).astype(np.float32))
    backends = {"reference": "reference", "custom": "cpu", "custom_1_thread": "cpu"}
    stages = {v: (ms.jit(GatingLayout(b, k, e, capacity).construct), ms.jit(Permute(b, e, capacity).construct),
                  ms.jit(Unpermute(b).construct)) for v, b in backends.items()}
    copy = ms.jit(Copy().construct)
    copy_input = Tensor(np.zeros((e * capacity, h), np.float32))
    times = {v: {"gating_layout": [], "permute": [], "unpermute": []} for v in VARIANTS}
    copy_times, kept = [], None
    for i in range(repeats + 2):
        for variant in VARIANTS:
            threads(1 if variant == "custom_1_thread" else 0)
            routing, permute, unpermute = stages[variant]
            seconds_r, out = _timed(routing, logits, group_ids)
            seconds_r /= ROUTING_BATCH
            weight, flat_index, kept = out[1], out[3], int(out[5].asnumpy().sum())  # of the first routed input
            seconds_p, buffer = _timed(permute, x, flat_index)
            seconds_u, _ = _timed(unpermute, buffer, flat_index, weight)
            if i >= 2:
                for stage, seconds in zip(("gating_layout", "permute", "unpermute"), (seconds_r, seconds_p, seconds_u)):
                    times[variant][stage].append(seconds)
        threads(0)
        seconds_c, _ = _timed(copy, copy_input)
        if i >= 2:
            copy_times.append(seconds_c)
    medians = {v: {s: float(np.median(ts)) for s, ts in stages_.items()} for v, stages_ in times.items()}
    for m in medians.values():
        m["total"] = m["gating_layout"] + m["permute"] + m["unpermute"]
    moved = ((kept + e * capacity) + (kept + t)) * h * 4  # permute: rows read + buffer written; unpermute: the same
    copy_bandwidth = 2 * copy_input.size * 4 / float(np.median(copy_times))

    def fraction(m):
        return moved / (m["permute"] + m["unpermute"]) / copy_bandwidth

    return {"T": t, "H": h, "E": e, "K": k, "C": capacity, "kept": kept, "seconds": medians,
            "copy_gb_per_s": copy_bandwidth / 1e9,
            "gating_layout_speedup": medians["reference"]["gating_layout"] / medians["custom"]["gating_layout"],
            "permute_speedup": (medians["reference"]["permute"] + medians["reference"]["unpermute"])
            / (medians["custom"]["permute"] + medians["custom"]["unpermute"]),
            "total_speedup": medians["reference"]["total"] / medians["custom"]["total"],
            "threads_speedup": medians["custom_1_thread"]["total"] / medians["custom"]["total"],
            "permute_bw_fraction": fraction(medians["custom"]),
            "reference_permute_bw_fraction": fraction(medians["reference"])}


def run(repeats=5, shapes=SHAPES, seed=0, log=print):
    """Measure every shape; returns a dict with one row per shape and the summary ratios."""
    runtime.setup(RuntimeConfig(device="CPU", mode="graph", seed=seed))
    lib = ctypes.CDLL(library_path())  # the library MindSpore loads: one copy in the process

    def threads(n):
        lib.PanguMoeSetThreads(n)

    rng = np.random.default_rng(seed)
    rows = []
    for shape in shapes:
        rows.append(_measure(shape, repeats, threads, rng))
        log(f"  measured T={shape[0]} E={shape[2]} K={shape[3]}")
    return {"machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, "
                       f"mindspore {ms.__version__}",
            "threads": lib.PanguMoeThreads(), "repeats": repeats, "rows": rows,
            "kernel_speedup": float(np.exp(np.mean([np.log(r["total_speedup"]) for r in rows]))),
            "gating_layout_speedup_min": min(r["gating_layout_speedup"] for r in rows),
            "permute_bw_fraction": min(r["permute_bw_fraction"] for r in rows)}


def table(result):
    """Human-readable lines for `run`'s result."""
    lines = [f"kernels, forward, median of {result['repeats']} ({result['machine']}; custom with "
             f"{result['threads']} OpenMP threads, and 1)",
             f"  {'T':>6s} {'E':>3s} {'K':>2s} {'C':>5s} | {'gating+layout ms':>22s} | {'permute+unpermute ms':>22s} | "
             f"{'speedup':>14s} | {'bw fraction':>11s} | {'2 thr/1 thr':>11s}",
             f"  {'':20s} | {'ref':>7s} {'custom':>7s} {'1 thr':>6s} | {'ref':>7s} {'custom':>7s} {'1 thr':>6s} | "
             f"{'g+l':>6s} {'total':>7s} | {'custom':>5s} {'ref':>5s} |"]
    for r in result["rows"]:
        s = r["seconds"]
        gl = [s[v]["gating_layout"] * 1e3 for v in VARIANTS]
        pu = [(s[v]["permute"] + s[v]["unpermute"]) * 1e3 for v in VARIANTS]
        lines.append(f"  {r['T']:6d} {r['E']:3d} {r['K']:2d} {r['C']:5d} | {gl[0]:7.2f} {gl[1]:7.2f} {gl[2]:6.2f} | "
                     f"{pu[0]:7.2f} {pu[1]:7.2f} {pu[2]:6.2f} | {r['gating_layout_speedup']:5.1f}x "
                     f"{r['total_speedup']:6.2f}x | {r['permute_bw_fraction']:6.2f} "
                     f"{r['reference_permute_bw_fraction']:5.2f} | {r['threads_speedup']:10.2f}x")
    lines.append(f"  gating+layout speedup min {result['gating_layout_speedup_min']:.2f}x (target >= 3); "
                 f"permute_bw_fraction min {result['permute_bw_fraction']:.2f} (target >= 0.4); "
                 f"kernel_speedup (geometric mean of total) {result['kernel_speedup']:.2f}x")
    return "\n".join(lines)
