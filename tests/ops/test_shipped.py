"""kernels: ascend_builtin (pangu_moe/ops/shipped.py) on CPU, where MindSpore's shipped MoE ops do not run.

Each shipped op is replaced by an emulation of its documented formula, written with differentiable MindSpore ops
and checked against the documentation's own examples; the layer through the adapter must then equal the
reference layer in output and gradients, with and without dropped choices, at K = 1 and K = 2. The emulations
are deliberately hostile where the documentation leaves things open: ties in the permute sort are broken at
random, and GroupedMatmul leaves NaN in the rows past its last group.
"""
import numpy as np
import mindspore as ms
import pytest
from mindspore import Tensor, ops

from pangu_moe.config import ConfigError
from pangu_moe.dispatch.dispatcher import Dispatcher
from pangu_moe.dispatch.placement import rows_after_move
from pangu_moe.experts import GroupedExperts
from pangu_moe.model.moe_layer import MoELayer
from pangu_moe.ops import run_kernel_backend
from pangu_moe.ops import shipped
from pangu_moe.ops.shipped import CompactDispatcher, ShippedOps, check_signatures
from pangu_moe.routing.topk import TopKRouter
from tests.conftest import tiny_config


def _bf16_in(*tensors):
    """The shipped ops run in bf16 here (ops/shipped.py OPS_DTYPE): an adapter that passes another dtype fails."""
    for t in tensors:
        assert t.dtype == ms.bfloat16, f"a shipped op got {t.dtype}, the adapter must pass bf16"
    return [t.astype(ms.float32) for t in tensors]  # CPU MindSpore cannot gather or multiply bf16


def emulated_permute(tokens, indices, num_out_tokens=None, padded_mode=False, seed=0):
    """ops.moe_token_permute: the N*K choices (flat n*K + k) grouped by index value; returns the rows and, per
    choice, the row it went to. Ties are broken at random: the documentation promises grouping, not order."""
    tokens, = _bf16_in(tokens)
    flat = indices.reshape(-1).astype(ms.float32)
    top_k = flat.shape[0] // tokens.shape[0]
    jitter = Tensor(np.random.default_rng(seed).random(flat.shape[0]) * 0.5, ms.float32)
    _, source = ops.sort(flat + jitter)  # (N*K,): the choice each output row holds
    source = source.astype(ms.int32)
    rows = ops.gather(tokens, source // top_k, 0)
    row_of_choice = ops.argsort(source.astype(ms.float32)).astype(ms.int32)  # the inverse permutation
    return rows[:num_out_tokens or flat.shape[0]].astype(ms.bfloat16), row_of_choice


def emulated_unpermute(permuted_tokens, sorted_indices, probs=None, padded_mode=False, restore_shape=None):
    """ops.moe_token_unpermute: out[n] = sum_k probs[n, k] * permuted_tokens[sorted_indices[n*K + k]]; the
    documentation gives permuted_tokens as [N*K, H], one row per index, and that is required here."""
    assert permuted_tokens.shape[0] == sorted_indices.shape[0], "permuted_tokens must have N*K rows"
    permuted_tokens, = _bf16_in(permuted_tokens)
    picked = ops.gather(permuted_tokens, sorted_indices, 0)  # (N*K, H)
    if probs is None:
        return picked.astype(ms.bfloat16)
    probs, = _bf16_in(probs)
    n, k = probs.shape
    return (picked.reshape(n, k, -1) * probs.reshape(n, k, 1)).sum(1).astype(ms.bfloat16)


def emulated_grouped_matmul(x, weight, bias, scale, offset, antiquant_scale, antiquant_offset, group_list):
    """GroupedMatmul(split_item=3, group_type=0): row m of x[0] [M, A] times weight[0][e] [E, A, B], e the group
    with group_list[e-1] <= m < group_list[e] (cumulative ends, int64); bf16 in, fp32 accumulation, bf16 out (the
    cube's). The documentation requires the last end to be M: rows past it would not be written, and a last end
    past M is outside x; either way every row is NaN here, so an adapter that breaks the rule fails."""
    rows, experts = _bf16_in(x[0], weight[0])
    group = (ops.arange(rows.shape[0], dtype=ms.int64).reshape(-1, 1) >= group_list.reshape(1, -1)).astype(
        ms.int32).sum(1)  # (M,)
    written = ((group < experts.shape[0]) & (group_list[-1] == rows.shape[0])).reshape(-1, 1)
    w = ops.gather(experts, ops.minimum(group, experts.shape[0] - 1), 0)  # (M, A, B)
    out = ops.bmm(rows.reshape(rows.shape[0], 1, -1), w).reshape(rows.shape[0], -1)  # (M, B)
    return [ops.select(ops.broadcast_to(written, out.shape), out, ops.full_like(out, float("nan"))).astype(
        ms.bfloat16)]


EMULATED = ShippedOps(emulated_permute, emulated_unpermute, emulated_grouped_matmul)


def _bf16(values):
    return Tensor(np.asarray(values, np.float32)).astype(ms.bfloat16)


def _numpy(t):
    return t.astype(ms.float32).asnumpy()


def test_emulations_reproduce_the_documented_examples():
    tokens = _bf16([[1] * 3, [7] * 3, [2] * 3, [1] * 3, [2] * 3, [3] * 3])
    rows, row_of_choice = emulated_permute(tokens, Tensor(np.array([5, 0, 3, 1, 2, 4], np.int32)))
    np.testing.assert_array_equal(_numpy(rows)[:, 0], [7, 1, 2, 2, 3, 1])  # ops.moe_token_permute's example
    np.testing.assert_array_equal(row_of_choice.asnumpy(), [5, 0, 3, 1, 2, 4])
    permuted = _bf16([[1] * 3, [0] * 3, [0] * 3, [3] * 3, [2] * 3, [1] * 3, [2] * 3, [3] * 3])
    out = emulated_unpermute(permuted, Tensor(np.array([0, 6, 7, 5, 3, 1, 2, 4], np.int32)))
    assert out.shape == (8, 3)  # ops.moe_token_unpermute's example (its values are not printed)
    np.testing.assert_array_equal(_numpy(out)[:, 0], [1, 2, 3, 1, 3, 0, 0, 2])  # the formula, by hand
    # CANN's GroupedMatmul: "group_list[0] = 10: the first 10 rows of x take part in the first group's matmul".
    x = _bf16(np.ones((12, 2)))
    w = _bf16(np.stack([np.eye(2), 2 * np.eye(2)]))
    out = emulated_grouped_matmul([x], [w], None, None, None, None, None, Tensor(np.array([10, 12], np.int64)))[0]
    np.testing.assert_array_equal(_numpy(out)[:, 0], [1] * 10 + [2] * 2)
    for ends in ([10, 11], [10, 13]):  # the last end short of M, or past it: the documentation's rule broken
        out = emulated_grouped_matmul([x], [w], None, None, None, None, None, Tensor(np.array(ends, np.int64)))[0]
        assert np.isnan(_numpy(out)).all()
    # MindSpore's own GroupedMatmul example (ops/auto_generate/gen_ops_def.py, printed output), in bf16: every value
    # is exact there.
    x = _bf16([[0] * 4, [1] * 4, [2] * 4, [2] * 4, [1] * 4, [1] * 4])
    w = _bf16(np.arange(32).reshape(4, 4, 2))
    out = emulated_grouped_matmul([x], [w], None, None, None, None, None, Tensor(np.array([1, 3, 4, 6], np.int64)))[0]
    np.testing.assert_array_equal(_numpy(out), [[0, 0], [44, 48], [88, 96], [152, 160], [108, 112], [108, 112]])
    with pytest.raises(AssertionError, match="a shipped op got Float32"):  # the emulations take bf16 only
        emulated_permute(Tensor(np.ones((2, 3), np.float32)), Tensor(np.array([1, 0], np.int32)))


def test_unpermute_with_probs_against_the_documented_formula_in_numpy():
    """out[n] = sum_k probs[n, k] * permuted[sorted_indices[n*K + k]] (the op's documentation), restated in numpy on
    the bf16 values: N = 5 tokens, K = 2, H = 3."""
    rng = np.random.default_rng(4)
    permuted, probs = _bf16(rng.standard_normal((10, 3))), _bf16(rng.random((5, 2)))
    order = rng.permutation(10).astype(np.int32)
    got = _numpy(emulated_unpermute(permuted, Tensor(order), probs))
    rows, weights = _numpy(permuted).astype(np.float64), _numpy(probs).astype(np.float64)
    want = np.array([sum(weights[n, k] * rows[order[2 * n + k]] for k in range(2)) for n in range(5)])
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=1e-6)  # the output is rounded to bf16 once


def test_installed_mindspore_has_the_signatures_the_adapter_calls(monkeypatch):
    assert check_signatures() == []
    monkeypatch.setitem(shipped.SIGNATURES, "ops.moe_token_permute", ("tokens", "indices", "num_out_tokens"))
    (problem,) = check_signatures()
    assert problem.startswith("ops.moe_token_permute: MindSpore") and "padded_mode" in problem


def _layers(k, num_ranks=1, e=4, h=8, f=16, multiplied=None):
    """The reference layer in the CPU bf16 form (bf16-rounded matmul operands, `precision.compute_form`) and the
    same router and experts behind the adapter with the emulated ops (`multiplied`, a list, collects the rows of
    each GroupedMatmul call). The adapter runs in bf16 and the cube rounds its outputs to bf16 too, so the two
    agree to bf16's precision, not bit for bit."""
    ms.set_seed(5)
    router, experts = TopKRouter(h, e, 1, k, 0.01, 0.001), GroupedExperts(e, h, f, 0.3)
    experts.bf16_operands = True  # read by the reference layer only: the adapter has its own expert FFN
    reference = MoELayer(router, Dispatcher(e, num_ranks, num_ranks), experts, num_ranks)
    reference.bf16_operands = True

    def grouped_matmul(x, *rest):
        if multiplied is not None:
            multiplied.append(x[0].shape[0])
        return emulated_grouped_matmul(x, *rest)

    shipped_ops = ShippedOps(emulated_permute, emulated_unpermute, grouped_matmul)
    builtin = MoELayer(router, CompactDispatcher(e, num_ranks, num_ranks, shipped=shipped_ops), experts, num_ranks)
    return reference, builtin


def _agree(got, want):
    """Equal to bf16's precision: within 2% of the largest magnitude (one bf16 rounding is 0.4%; the rows are rounded
    at each of the ops' outputs), where an index error would be off by the whole value."""
    got, want = got.asnumpy(), want.asnumpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=0.02 * np.abs(want).max())


@pytest.mark.parametrize("k, capacity, num_ranks", [(1, 3, 1), (1, 40, 1), (2, 4, 1), (2, 80, 1), (2, 3, 2)])
def test_adapter_equals_the_reference_layer_in_output_and_gradients(k, capacity, num_ranks):
    multiplied = []
    reference, builtin = _layers(k, num_ranks, multiplied=multiplied)
    x = Tensor(np.random.default_rng(k * 100 + capacity).standard_normal((40, 8)).astype(np.float32))
    zeros = Tensor(np.zeros(40, np.int32))
    weights = reference.trainable_params()

    def loss(layer):
        def f(x_in):
            y = layer(x_in, zeros, zeros, capacity, False)[0]
            return (y * y).sum()
        return ms.value_and_grad(f, 0, weights)

    (ref_value, (ref_dx, ref_dw)), (value, (dx, dw)) = loss(reference)(x), loss(builtin)(x)
    out_ref, out = reference(x, zeros, zeros, capacity, False), builtin(x, zeros, zeros, capacity, False)
    _agree(out[0], out_ref[0])
    for got, want in zip(out[1:4], out_ref[1:4]):  # losses, requested and kept counts
        np.testing.assert_array_equal(got.asnumpy(), want.asnumpy())
    kept, requested = out[3].asnumpy().sum(), out[2].asnumpy().sum()
    assert (kept < requested) == (capacity < 40 * k // 4), "the small capacities must drop, the large ones not"
    _agree(value, ref_value)
    _agree(dx, ref_dx)
    for got, want, param in zip(dw, ref_dw, weights):
        assert np.isfinite(got.asnumpy()).all(), param.name
        _agree(got, want)
    # the experts multiply min(T*K, R*E*C) rows: 40 tokens, E = 4
    assert set(multiplied) == {{(1, 3, 1): 12, (1, 40, 1): 40, (2, 4, 1): 16, (2, 80, 1): 80,
                                (2, 3, 2): 24}[(k, capacity, num_ranks)]}


@pytest.mark.parametrize("k, capacity", [(1, 3), (2, 80)])
def test_a_placement_changes_nothing_the_adapter_computes(k, capacity):
    """Experts in slots [2, 0, 3, 1] (`MoELayer`'s placement): the adapter groups the rows by slot and multiplies
    them by their slot's weights, so output, counts and gradients (the expert rows in slot order) equal the unplaced
    adapter's exactly."""
    ms.set_seed(5)
    router, experts = TopKRouter(8, 4, 1, k, 0.01, 0.001), GroupedExperts(4, 8, 16, 0.3)
    slots = np.array([2, 0, 3, 1])
    source = rows_after_move(np.arange(4), slots)  # slot s holds expert source[s]
    placed_experts = GroupedExperts(4, 8, 16, 0.3)
    for weight, original in ((placed_experts.w_in, experts.w_in), (placed_experts.w_out, experts.w_out)):
        weight.set_data(Tensor(original.asnumpy()[source]))
    shipped_ops = ShippedOps(emulated_permute, emulated_unpermute, emulated_grouped_matmul)
    unplaced = MoELayer(router, CompactDispatcher(4, shipped=shipped_ops), experts)
    placed = MoELayer(router, CompactDispatcher(4, shipped=shipped_ops), placed_experts, placement=slots)
    x = Tensor(np.random.default_rng(k).standard_normal((40, 8)).astype(np.float32))
    zeros = Tensor(np.zeros(40, np.int32))

    def run(layer):
        weights = [p for p in layer.trainable_params() if "expert_slot" not in p.name]

        def f(x_in):
            y = layer(x_in, zeros, zeros, capacity, False)[0]
            return (y * y).sum()
        return layer(x, zeros, zeros, capacity, False), ms.value_and_grad(f, 0, weights)(x), weights

    (out, (value, (dx, dw)), names), (out_p, (value_p, (dx_p, dw_p)), names_p) = run(unplaced), run(placed)
    for got, want in zip(out_p[:4], out[:4]):  # output, losses, requested and kept counts (expert order)
        assert got.asnumpy().tobytes() == want.asnumpy().tobytes()
    assert value_p.asnumpy() == value.asnumpy() and dx_p.asnumpy().tobytes() == dx.asnumpy().tobytes()
    assert [p.name for p in names_p] == [p.name for p in names]
    for got, want, param in zip(dw_p, dw, names):
        want = want.asnumpy()[source] if param.name.startswith("experts.") else want.asnumpy()
        assert got.asnumpy().tobytes() == want.tobytes(), param.name


def test_ascend_builtin_is_refused_where_it_cannot_run():
    with pytest.raises(ConfigError, match="runtime.kernels.*Ascend only"):
        tiny_config("runtime.kernels=ascend_builtin").validate()
    ascend = ("runtime.kernels=ascend_builtin", "runtime.device=Ascend")
    with pytest.raises(ConfigError, match="parallel.exchange_layout=padded: the compact rows travel on the ragged"):
        tiny_config(*ascend, "train.precision=bf16", "parallel.dispatch=hccl", "parallel.nodes=2",
                    "parallel.exchange_layout=padded").validate()
    with pytest.raises(ConfigError, match="train.precision=fp32: the shipped MoE ops run in bf16"):
        tiny_config(*ascend).validate()
    with pytest.raises(ConfigError, match="moe.router=expert_choice: its K = E columns"):
        tiny_config(*ascend, "train.precision=bf16", "moe.router=expert_choice").validate()
    tiny_config(*ascend, "train.precision=bf16").validate()
    # under expert parallelism on the ragged exchange (dispatch/compact_exchange.py), the default layout
    for dispatch in ("hccl", "simulated"):
        tiny_config(*ascend, "train.precision=bf16", f"parallel.dispatch={dispatch}", "parallel.nodes=2").validate()


@pytest.mark.parametrize("settings, backend", [
    (("runtime.device=Ascend", "train.precision=bf16"), "ascend_builtin"), (("runtime.device=CPU",), "reference"),
    (("runtime.device=Ascend", "train.precision=bf16", "parallel.dispatch=hccl", "parallel.nodes=2"),
     "ascend_builtin"),
    (("runtime.device=Ascend", "train.precision=bf16", "parallel.dispatch=hccl", "parallel.nodes=2",
      "parallel.exchange_layout=padded"), "reference"),
    (("runtime.device=Ascend",), "reference"), (("runtime.device=Ascend", "train.precision=fp16"), "reference"),
    (("runtime.device=Ascend", "train.precision=bf16", "moe.router=expert_choice"), "reference"),
    (("runtime.device=Ascend", "train.precision=bf16", "moe.num_experts=256", "moe.num_groups=1"), "reference"),
    (("runtime.device=Ascend", "train.precision=bf16", "moe.num_experts=129", "moe.num_groups=1"), "reference"),
    (("runtime.device=Ascend", "train.precision=bf16", "moe.num_experts=128", "moe.num_groups=1"),
     "ascend_builtin"),  # CANN's limit is 128 groups: 128 experts fit
    (("runtime.device=Ascend", "train.precision=bf16", "runtime.kernels=ascend_builtin"), "ascend_builtin"),
    (("runtime.kernels=custom",), "cpu"), (("runtime.device=Ascend", "runtime.kernels=custom"), "ascend_c")])
def test_kernel_backend_of_each_setting(settings, backend):
    assert run_kernel_backend(tiny_config(*settings)) == backend  # runtime.kernels is auto unless given


def test_auto_falls_back_when_the_installed_signatures_differ(monkeypatch):
    monkeypatch.setitem(shipped.SIGNATURES, "ops.moe_token_unpermute", ("permuted_tokens",))
    assert run_kernel_backend(tiny_config("runtime.device=Ascend", "train.precision=bf16")) == "reference"


def test_adapter_compiles_in_graph_mode_and_agrees():
    """The compact branch of the layer inside `ms.jit` (how the trainer runs it): list arguments to GroupedMatmul,
    the ops held as cell attributes."""
    compiled_layers_agree(*_layers(2), 4)


def compiled_layers_agree(reference, builtin, capacity):
    """Both layers' loss sum(y * y) on 40 tokens of H = 8, with its gradients, inside `ms.jit`, agree (`_agree`)."""
    x = Tensor(np.random.default_rng(1).standard_normal((40, 8)).astype(np.float32))
    zeros = Tensor(np.zeros(40, np.int32))

    def compiled(layer):
        def f(x_in):
            y = layer(x_in, zeros, zeros, capacity, False)[0]
            return (y * y).sum()
        return ms.jit(ms.value_and_grad(f, 0, layer.trainable_params()))(x)

    (ref_value, (ref_dx, ref_dw)), (value, (dx, dw)) = compiled(reference), compiled(builtin)
    _agree(value, ref_value)
    _agree(dx, ref_dx)
    for got, want in zip(dw, ref_dw):
        _agree(got, want)


def test_auto_continues_the_run_of_the_kernels_it_picks():
    """The checkpoint fingerprint sees the kernels a setting resolves to: auto on CPU is reference (so checkpoints
    written before auto was the default still resume), custom is not."""
    from pangu_moe.train.trainer import config_fingerprint
    auto = config_fingerprint(tiny_config())
    assert tiny_config().runtime.kernels == "auto"
    assert auto == config_fingerprint(tiny_config("runtime.kernels=reference"))
    assert auto != config_fingerprint(tiny_config("runtime.kernels=custom"))
    on_ascend = tiny_config("runtime.device=Ascend", "train.precision=bf16")
    builtin = tiny_config("runtime.device=Ascend", "train.precision=bf16", "runtime.kernels=ascend_builtin")
    assert config_fingerprint(on_ascend) == config_fingerprint(builtin)
