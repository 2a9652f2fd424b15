"""kernels: ascend_builtin under expert parallelism (pangu_moe/dispatch/compact_exchange.py, ops/shipped.py): the
expert-major regrouping exact on a hand-built case, and W = 2 and 4 ranks in one process, with the shipped ops
and AlltoAllV replaced by emulations of their documented semantics (tests/ops/test_shipped.py, dispatch/ragged.py),
equal to the reference layer in output and gradients; only the kept rows travel, and the experts multiply
B = W * min(n * K, E_loc * C) rows a rank."""
import os
import subprocess
import sys

import numpy as np
import mindspore as ms
import pytest
from mindspore import Tensor

from pangu_moe.dispatch.compact_exchange import CompactExchange, expert_major
from pangu_moe.dispatch.dispatcher import Dispatcher
from pangu_moe.dispatch.placement import rows_after_move
from pangu_moe.dispatch.topology import Topology
from pangu_moe.experts import GroupedExperts
from pangu_moe.model.moe_layer import MoELayer
from pangu_moe.model.pangu import build_moe_layer
from pangu_moe.ops.shipped import CompactDispatcher, ShippedOps
from pangu_moe.routing.topk import TopKRouter
from tests.conftest import tiny_config
from tests.ops.test_shipped import (EMULATED, _agree, compiled_layers_agree, emulated_grouped_matmul, emulated_permute,
                                   emulated_unpermute)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENS, E, H, F = 40, 4, 8, 16


def test_expert_major_regroups_each_ranks_rows_by_expert_then_source():
    # 2 receiving ranks, W = 2 sources, L = 2 local experts, C = 2, B = 6. Rank 0 receives from source 0 one row
    # for expert 0 and two for expert 1, from source 1 two for expert 0: source-major rows s0e0 | s0e1 s0e1 |
    # s1e0 s1e0, expert-major e0: s0, s1, s1 | e1: s0, s0. Rank 1: s0e1 | s1e0 | s1e1.
    counts = Tensor(np.array([[[1, 2], [2, 0]], [[0, 1], [1, 1]]], np.int32))
    gather, scatter = expert_major(counts, 2, 6)
    # 1-based flat rows (rank 1's source rows start at 8 = W * L * C, its expert rows at 6 = B), 0 past the rows
    assert gather.asnumpy().tolist() == [[1, 4, 5, 2, 3, 0], [8 + 2, 8 + 1, 8 + 3, 0, 0, 0]]
    assert scatter.asnumpy().tolist() == [[1, 4, 5, 2, 3, 0, 0, 0], [6 + 2, 6 + 1, 6 + 3, 0, 0, 0, 0, 0]]


class _Counted(ShippedOps):
    """The emulated shipped ops, recording the rows of each GroupedMatmul call."""

    def __init__(self):
        self.multiplied = []

        def grouped_matmul(x, *rest):
            self.multiplied.append(x[0].shape[0])
            return emulated_grouped_matmul(x, *rest)
        super().__init__(emulated_permute, emulated_unpermute, grouped_matmul)


class _SentRows:
    """Wraps an exchange's uneven all-to-all, recording the send counts [R, W] of each call."""

    def __init__(self, rows):
        self.rows, self.sent = rows, []

    def __call__(self, x, send, receive):
        self.sent.append(send.asnumpy())
        return self.rows(x, send, receive)


def _layers(k, world, algorithm="flat", placement=None, record=True):
    """The reference layer (local, CPU bf16 form) and the same router and experts behind the adapter under expert
    parallelism on the simulated backend (2 nodes), with the emulated shipped ops and AlltoAllV; `record`: the
    rows each call sends are recorded (PyNative only)."""
    ms.set_seed(5)
    router, experts = TopKRouter(H, E, 1, k, 0.01, 0.001), GroupedExperts(E, H, F, 0.3)
    experts.bf16_operands = True
    reference = MoELayer(router, Dispatcher(E, world, world), experts, world)
    reference.bf16_operands = True
    if placement is not None:  # the same experts, each in its slot
        placed = GroupedExperts(E, H, F, 0.3)
        source = rows_after_move(np.arange(E), placement)
        for weight, original in ((placed.w_in, experts.w_in), (placed.w_out, experts.w_out)):
            weight.set_data(Tensor(original.asnumpy()[source]))
        experts = placed
    exchange = CompactExchange("simulated", algorithm, 0, 2, world // 2)
    sent = _SentRows(exchange.rows)
    if record:
        shipped_ops = _Counted()
        object.__setattr__(exchange, "rows", sent)
    else:
        shipped_ops = EMULATED
    dispatcher = CompactDispatcher(E, world, world, 2, shipped_ops, exchange)
    builtin = MoELayer(router, dispatcher, experts, world, None, 0, world, placement=placement)
    return reference, builtin, getattr(shipped_ops, "multiplied", None), sent.sent


def _outputs_and_gradients(layer, x, capacity):
    zeros = Tensor(np.zeros(TOKENS, np.int32))
    weights = [p for p in layer.trainable_params() if "expert_slot" not in p.name]

    def f(x_in):
        y = layer(x_in, zeros, zeros, capacity, False)[0]
        return (y * y).sum()
    return layer(x, zeros, zeros, capacity, False), ms.value_and_grad(f, 0, weights)(x), [p.name for p in weights]


# (W, K, C, drops): with 40 tokens and E = 4, a rank of n = 40 / W tokens drops nothing at C = n
# (2, 1, 40): n * K = 20 choices a rank, fewer than the E_loc * C = 80 slots of a block, so B = W * n * K
CASES = [(2, 1, 3, True), (2, 1, 40, False), (2, 2, 20, False), (4, 1, 3, True), (4, 2, 10, False), (4, 2, 2, True)]


@pytest.mark.parametrize("world, k, capacity, drops", CASES)
def test_expert_parallel_adapter_equals_the_reference_layer(world, k, capacity, drops):
    reference, builtin, multiplied, sent = _layers(k, world)
    x = Tensor(np.random.default_rng(world * 10 + k + capacity).standard_normal((TOKENS, H)).astype(np.float32))
    (out_ref, (value_ref, (dx_ref, dw_ref)), _), (out, (value, (dx, dw)), _) = (
        _outputs_and_gradients(reference, x, capacity), _outputs_and_gradients(builtin, x, capacity))
    _agree(out[0], out_ref[0])
    for got, want in zip(out[1:4], out_ref[1:4]):  # losses, requested and kept counts
        np.testing.assert_array_equal(got.asnumpy(), want.asnumpy())
    kept = out[3].asnumpy()  # (W, E)
    assert (kept.sum() < out[2].asnumpy().sum()) == drops
    _agree(value, value_ref)
    _agree(dx, dx_ref)
    for got, want in zip(dw, dw_ref):
        assert np.isfinite(got.asnumpy()).all()
        _agree(got, want)
    # only the kept rows travel: rank r sends rank q its kept choices for q's experts (E_loc = E / W), and the
    # outputs come back on the counts swapped
    local = E // world
    to_rank = kept.reshape(world, world, local).sum(2)  # (source, destination)
    assert sent[0].tolist() == to_rank.tolist() and sent[1].tolist() == to_rank.T.tolist()
    # each rank's experts multiply B = W * min(n * K, E_loc * C) rows, one GroupedMatmul pair per rank
    n = TOKENS // world
    assert multiplied[:2 * world] == [world * min(n * k, local * capacity)] * (2 * world)


def test_hierarchical_padded_primitive_and_a_placement_change_nothing():
    """Under the emulation the rows cross on the hierarchical padded all-to-all and give the flat one's result;
    experts in slots [2, 0, 3, 1] send each kept row to its slot's rank and give the unplaced result."""
    placement = np.array([2, 0, 3, 1])
    x = Tensor(np.random.default_rng(3).standard_normal((TOKENS, H)).astype(np.float32))
    flat = _layers(2, 4)[1]
    out, (value, (dx, dw)), names = _outputs_and_gradients(flat, x, 4)
    for algorithm, slots in (("hierarchical", None), ("flat", placement)):
        layer = _layers(2, 4, algorithm, slots)[1]
        out_b, (value_b, (dx_b, dw_b)), names_b = _outputs_and_gradients(layer, x, 4)
        assert names_b == names
        for got, want in zip(out_b[:4], out[:4]):  # output, losses, counts (expert order)
            assert got.asnumpy().tobytes() == want.asnumpy().tobytes()
        assert value_b.asnumpy() == value.asnumpy() and dx_b.asnumpy().tobytes() == dx.asnumpy().tobytes()
        source = np.arange(E) if slots is None else rows_after_move(np.arange(E), slots)
        for got, want, name in zip(dw_b, dw, names):
            want = want.asnumpy()[source] if name.startswith("experts.") else want.asnumpy()
            assert got.asnumpy().tobytes() == want.tobytes()


def test_a_built_expert_parallel_layer_runs_the_compact_exchange():
    """`build_moe_layer` with ascend_builtin on the simulated backend (2 nodes x 2 devices, E = 8: two experts a
    rank) builds the compact exchange, and with the shipped ops emulated equals the local reference layer built
    from the same seed."""
    cfg = tiny_config("runtime.device=Ascend", "train.precision=bf16", "parallel.dispatch=simulated",
                      "parallel.nodes=2", "moe.num_experts=8", "moe.top_k=2")
    layers = {}
    for backend, kernels in (("local", "reference"), ("simulated", "ascend_builtin")):
        ms.set_seed(5)
        layers[backend] = build_moe_layer(cfg.model, cfg.moe, 0, 0.02, Topology(2, 2, 8), backend, kernels=kernels)
    reference, builtin = layers["local"], layers["simulated"]
    assert builtin.exchange is None and isinstance(builtin.dispatcher.exchange, CompactExchange)
    assert builtin.dispatcher.exchange.world_size == 4
    builtin.dispatcher.token_permute, builtin.dispatcher.token_unpermute = emulated_permute, emulated_unpermute
    builtin.dispatcher.grouped_matmul = emulated_grouped_matmul
    reference.bf16_operands = reference.experts.bf16_operands = True
    x = Tensor(np.random.default_rng(2).standard_normal((TOKENS, cfg.model.hidden)).astype(np.float32))
    (out_ref, (_, (dx_ref, dw_ref)), names), (out, (_, (dx, dw)), names_b) = (
        _outputs_and_gradients(reference, x, 6), _outputs_and_gradients(builtin, x, 6))
    assert names_b == names
    _agree(out[0], out_ref[0])
    np.testing.assert_array_equal(out[3].asnumpy(), out_ref[3].asnumpy())
    _agree(dx, dx_ref)
    for got, want in zip(dw, dw_ref):
        _agree(got, want)


def test_expert_parallel_adapter_compiles_in_graph_mode_and_agrees():
    compiled_layers_agree(*_layers(2, 2, record=False)[:2], 6)


MSRUN_WORLD, MSRUN_K, MSRUN_CAPACITY = 4, 2, 4  # 2 nodes x 2 devices, one expert a rank, with drops


def _msrun_inputs():
    """The tokens and weights of the one-rank-a-process test: x [T, H], router [1, H, E], w_in [E, H, F],
    w_out [E, F, H] fp32."""
    rng = np.random.default_rng(11)
    return {"x": rng.standard_normal((TOKENS, H)).astype(np.float32),
            "router": (0.3 * rng.standard_normal((1, H, E))).astype(np.float32),
            "w_in": (0.3 * rng.standard_normal((E, H, F))).astype(np.float32),
            "w_out": (0.3 * rng.standard_normal((E, F, H))).astype(np.float32)}


def _with_weights(inputs, rows, ranks, first, exchange):
    """A compact layer holding `ranks` ranks' tokens from world rank `first` on and the expert rows `rows`, weights
    from `inputs`."""
    router = TopKRouter(H, E, 1, MSRUN_K, 0.01, 0.001)
    router.weight.set_data(Tensor(inputs["router"]))
    experts = GroupedExperts(E, H, F, 0.3, rows=rows)
    experts.w_in.set_data(Tensor(inputs["w_in"][rows]))
    experts.w_out.set_data(Tensor(inputs["w_out"][rows]))
    return MoELayer(router, CompactDispatcher(E, ranks, MSRUN_WORLD, 2, EMULATED, exchange), experts, ranks, None,
                    first, MSRUN_WORLD)


def rank_layer(inputs, rank):
    """Rank `rank`'s layer on the msrun_cpu exchange (tests/ops/compact_exchange_worker.py) and its tokens."""
    n = TOKENS // MSRUN_WORLD
    exchange = CompactExchange("msrun_cpu", "flat", rank, 2, MSRUN_WORLD // 2)
    return _with_weights(inputs, [rank], 1, rank, exchange), Tensor(inputs["x"][rank * n:(rank + 1) * n])


@pytest.mark.msrun
def test_one_rank_a_process_equals_the_simulated_ranks(tmp_path):
    """4 msrun_cpu processes, each holding one rank's tokens and expert (the path hccl runs, with AlltoAllV's
    contract emulated on msrun_cpu's all-to-all): every rank's output and input gradient equal the simulated
    layer's rows for that rank, its expert gradient that expert's, and the router gradients sum to the simulated
    one."""
    inputs = _msrun_inputs()
    np.savez(tmp_path / "inputs.npz", **inputs)
    cmd = ["bash", os.path.join(REPO, "run_scripts", "run_msrun_cpu.sh"), "--workers", str(MSRUN_WORLD), "--python",
           sys.executable, "--log-dir", str(tmp_path / "logs"), "--timeout", "300", "--script",
           os.path.join(REPO, "tests", "ops", "compact_exchange_worker.py"), "--", str(tmp_path), str(MSRUN_CAPACITY)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=str(tmp_path),
                          env={**os.environ, "PYTHONPATH": REPO})
    assert done.returncode == 0, done.stderr[-3000:]
    simulated = _with_weights(inputs, list(range(E)), MSRUN_WORLD, 0,
                              CompactExchange("simulated", "flat", 0, 2, MSRUN_WORLD // 2))
    (out, (_, (dx, dw)), names) = _outputs_and_gradients(simulated, Tensor(inputs["x"]), MSRUN_CAPACITY)
    assert (out[3].asnumpy().sum() < out[2].asnumpy().sum()), "the case must drop"
    grads = dict(zip(names, (g.asnumpy() for g in dw)))
    n = TOKENS // MSRUN_WORLD
    saved = [np.load(tmp_path / f"rank{r}.npz") for r in range(MSRUN_WORLD)]
    for r, got in enumerate(saved):
        rows = slice(r * n, (r + 1) * n)
        np.testing.assert_array_equal(got["y"], out[0].asnumpy()[rows])
        np.testing.assert_array_equal(got["dx"], dx.asnumpy()[rows])
        for name in ("experts.w_in", "experts.w_out"):
            np.testing.assert_allclose(got[f"d_{name}"], grads[name][r:r + 1], rtol=1e-5, atol=1e-6)
    router = [name for name in names if not name.startswith("experts.")]
    assert router == ["router.weight"]
    np.testing.assert_allclose(sum(got["d_router.weight"] for got in saved), grads["router.weight"], rtol=1e-5,
                               atol=1e-6)
