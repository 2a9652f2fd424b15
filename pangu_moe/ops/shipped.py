"""`runtime.kernels: ascend_builtin`: the layer's dispatch, expert compute and combine on the MoE operators that
MindSpore ships for Ascend (kernels/README.md, "ascend_builtin").

The mapping keeps tokens compact instead of padding them into [E, C, H] buffers:

1. permute: `ops.moe_token_permute(x, key, T*K)` groups the T*K choices by key, where the key of a kept choice is
   its expert and the key of a dropped one is E, so dropped choices sort after every expert. It returns the rows
   [T*K, H] and `order` [T*K] int32, the row each choice went to (flat choice n*K + k).
2. experts: `GroupedMatmul(split_item=3, group_type=0)` over those rows with `group_list` = cumulative kept counts
   per expert [E] int64 (the form MindFormers' training FFN passes), so only kept rows are computed. Rows past the
   last group (the dropped choices) are not written by the op; they are zeroed on the way in and after each
   projection, so neither their forward values nor their gradients reach anything.
3. combine: `ops.moe_token_unpermute(rows, order, weight)` gives y[n] = sum_k weight[n, k] * rows[order[n*K + k]]
   with weight = gate * keep.

Which choices are kept is decided by the router (its slot policy, under capacity), exactly as on the other
backends; the order of rows inside an expert's group is whatever the op's sort gives and nothing depends on it.
The shipped ops run on Ascend only. On CPU the adapter is tested against emulations of each op's documented
formula (tests/ops/test_shipped.py), and `check_signatures` compares the installed MindSpore's signatures with
the ones this module was written to.
"""
import inspect

import mindspore as ms
from mindspore import ops

from pangu_moe.activations import fast_gelu
from pangu_moe.ops.layout import ReferenceLayout

# The signatures this adapter calls (MindSpore 2.10). `check_signatures` compares them with the installed ones.
SIGNATURES = {
    "ops.moe_token_permute": ("tokens", "indices", "num_out_tokens", "padded_mode"),
    "ops.moe_token_unpermute": ("permuted_tokens", "sorted_indices", "probs", "padded_mode", "restore_shape"),
    "GroupedMatmul.__init__": ("split_item", "group_type", "transpose_a", "transpose_b"),
    "GroupedMatmul.__call__": ("x", "weight", "bias", "scale", "offset", "antiquant_scale", "antiquant_offset",
                               "group_list"),
}


def _installed():
    """{SIGNATURES key: the installed callable}."""
    from mindspore.ops.auto_generate import GroupedMatmul
    return {"ops.moe_token_permute": ops.moe_token_permute, "ops.moe_token_unpermute": ops.moe_token_unpermute,
            "GroupedMatmul.__init__": GroupedMatmul.__init__, "GroupedMatmul.__call__": GroupedMatmul.__call__}


def check_signatures():
    """The installed MindSpore against `SIGNATURES`: a list of one-line differences ([] when all match)."""
    try:
        installed = _installed()
    except (AttributeError, ImportError) as e:
        return [f"MindSpore {ms.__version__} lacks a shipped MoE op: {e}"]
    problems = []
    for name, expected in SIGNATURES.items():
        found = tuple(p for p in inspect.signature(installed[name]).parameters if p != "self")
        if found != expected:
            problems.append(f"{name}: MindSpore {ms.__version__} has ({', '.join(found)}), the adapter calls "
                            f"({', '.join(expected)})")
    return problems


class ShippedOps:
    """The three callables the adapter uses, with the shipped ops' argument lists.

    permute(tokens [N, H], indices [N, K] int32, num_out_tokens, padded_mode) -> (rows [N*K, H], order [N*K] int32);
    unpermute(rows [N*K, H], order [N*K] int32, probs [N, K], padded_mode, restore_shape) -> [N, H];
    grouped_matmul([x [M, A]], [w [E, A, B]], None x 5, group_list [E] int64) -> [out [M, B]].
    Tests pass emulations instead of MindSpore's.
    """

    def __init__(self, permute=None, unpermute=None, grouped_matmul=None):
        if grouped_matmul is None:
            from mindspore.ops.auto_generate import GroupedMatmul
            grouped_matmul = GroupedMatmul(split_item=3, group_type=0)
        self.permute = permute or ops.moe_token_permute
        self.unpermute = unpermute or ops.moe_token_unpermute
        self.grouped_matmul = grouped_matmul


def _zero_past(rows, end):
    """rows [M, X] with rows m >= end (int64 scalar tensor) set to 0."""
    valid = (ops.arange(rows.shape[0], dtype=ms.int64) < end).reshape(-1, 1)  # (M, 1)
    return ops.select(ops.broadcast_to(valid, rows.shape), rows, ops.zeros_like(rows))


def group_ends(kept_per_expert):
    """kept_per_expert [R, E] int32 -> group_list [E] int64: cumulative kept rows per expert over the R ranks."""
    return ops.cumsum(kept_per_expert.sum(0), 0).astype(ms.int64)


def grouped_ffn(rows, ends, w_in, w_out, grouped_matmul):
    """The E expert FFNs of `experts.GroupedExperts` (GeLU between two projections) on compact rows.

    Args:
        rows [M, H] grouped by expert (expert e owns rows ends[e-1]..ends[e]-1); ends [E] int64;
        w_in [E, H, F], w_out [E, F, H] in rows' dtype.
    Returns: [M, H] in rows' dtype; rows >= ends[-1] are 0.

    GroupedMatmul leaves the rows past its last group unwritten, so they are zeroed after each projection: their
    contents (and, on the way back, their gradients) never reach another op, whatever the op left there.
    """
    last = ends[-1]
    rows = _zero_past(rows, last)
    hidden = _zero_past(grouped_matmul([rows], [w_in], None, None, None, None, None, ends)[0], last)  # (M, F)
    out = grouped_matmul([fast_gelu(hidden)], [w_out], None, None, None, None, None, ends)[0]  # (M, H)
    return _zero_past(out, last)


class CompactDispatcher(ReferenceLayout):
    """The `dispatch.dispatcher.Dispatcher` of `ascend_builtin`: no padded buffers, no exchange (the layer's
    `parallel.dispatch` is local, so every expert is held here).

    `layout` is the reference layout (the per-expert counts feed the token accounting and `group_ends`); the other
    steps run the shipped ops of `shipped` (a `ShippedOps`; held as cell attributes so a compiled step sees them).

    Args: num_experts E; num_ranks R (ranks whose tokens this process holds); world_size W; nodes N; shipped.
    """

    compact = True

    def __init__(self, num_experts, num_ranks=1, world_size=1, nodes=1, shipped=None):
        super().__init__(num_ranks, num_experts, world_size, nodes)
        shipped = shipped or ShippedOps()
        self.token_permute, self.token_unpermute = shipped.permute, shipped.unpermute
        self.grouped_matmul = shipped.grouped_matmul

    def layout(self, pair_index, slot, keep, requested, capacity):
        """As `dispatch.dispatcher.Dispatcher.layout`."""
        return self.construct(pair_index, slot, keep, requested, capacity)

    def dispatch_compact(self, x, expert_index, keep, kept_per_expert):
        """x [T, H], expert_index [T, K] int32, keep [T, K] bool, kept_per_expert [R, E] int32 ->
        rows [T*K, H] (x's dtype) grouped by expert, dropped choices last; order [T*K] int32, the row of choice
        n*K + k; ends [E] int64 (`group_ends`)."""
        num_tokens, top_k = expert_index.shape
        key = ops.select(keep, expert_index, ops.full_like(expert_index, self.num_experts))  # (T, K): dropped last
        rows, order = self.token_permute(x, key, num_tokens * top_k, False)
        return rows, order, group_ends(kept_per_expert)

    def run_experts(self, rows, ends, w_in, w_out):
        """rows [M, H], ends [E] int64, w_in [E, H, F], w_out [E, F, H] in rows' dtype -> [M, H] (`grouped_ffn`)."""
        return grouped_ffn(rows, ends, w_in, w_out, self.grouped_matmul)

    def combine(self, expert_rows, order, gate, keep):
        """expert_rows [T*K, H], order [T*K] int32, gate [T, K] fp32, keep [T, K] bool -> y [T, H] in the rows'
        dtype; dropped choices weigh 0 (and their rows are 0)."""
        weight = (gate * keep.astype(gate.dtype)).astype(expert_rows.dtype)
        return self.token_unpermute(expert_rows, order, weight, False, None)
