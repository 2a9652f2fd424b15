"""`runtime.kernels: ascend_builtin`: the layer's dispatch, expert compute and combine on the MoE operators that
MindSpore ships for Ascend (kernels/README.md, "ascend_builtin").

The mapping keeps tokens compact instead of padding them into [E, C, H] buffers:

1. permute: `ops.moe_token_permute(x, key, M)` groups the T*K choices by key, where the key of a kept choice is
   its expert and the key of a dropped one is E, so dropped choices sort after every expert, and keeps the first
   M = min(T*K, R*E*C) rows (`num_out_tokens`, "the tokens not dropped" in its documentation): no expert keeps
   more than C choices of a rank, so every kept row is among them. It returns the rows [M, H] and `order`
   [T*K] int32, the row each choice went to (flat choice n*K + k; M or more for a choice cut off).
2. experts: `GroupedMatmul(split_item=3, group_type=0)` over those rows with `group_list` = cumulative kept counts
   per expert [E] int64 (the form MindFormers' training FFN passes), except that the last end is M, as the op's
   documentation requires: the dropped choices' rows left among the M join the last expert's group. Their
   outputs weigh 0 in the combine, so they add nothing and send no gradient back. The experts multiply M rows,
   never more than the R*E*C of the padded buffers, and fewer as the capacity bucket shrinks.
3. combine: the rows are padded with zeros to T*K (`ops.moe_token_unpermute` documents permuted_tokens as
   [T*K, H]), then `ops.moe_token_unpermute(rows, order, weight)` gives y[n] = sum_k weight[n, k] *
   rows[order[n*K + k]] with weight = gate * keep.

Dtypes: the three ops run in bf16 (`OPS_DTYPE`), cast to around them as MindFormers does. bf16 is the one dtype
every documentation read lists for all three: MindSpore 2.6's pages give moe_token_permute and moe_token_unpermute
bf16 only, later ones list bf16, fp16 and fp32 for permute and no dtype for unpermute, and CANN's GroupedMatmul
pages list fp16 and bf16 (fp32 only in newer ones). So the adapter runs only under `train.precision=bf16`
(`unfit`), where the casts are no-ops and nothing changes precision behind the user's back; `auto` picks the
reference dispatch for fp32 and fp16 runs. The gate is weighted inside moe_token_unpermute, in bf16 (the
reference combine weights in fp32).

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

MAX_GROUPS = 128  # CANN's GroupedMatmul: group_list holds at most 128 groups
OPS_DTYPE = ms.bfloat16  # the dtype the shipped ops run in (module docstring)

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


def group_ends(kept_per_expert, num_rows):
    """kept_per_expert [R, E] int32, num_rows M -> group_list [E] int64: cumulative kept rows per expert over the R
    ranks, the last end M (GroupedMatmul's group_list must end at x's row count; the rows past the kept ones are
    the dropped choices')."""
    ends = ops.cumsum(kept_per_expert.astype(ms.int64).sum(0), 0)  # (E,)
    return ops.concat((ends[:-1], ops.full((1,), num_rows, dtype=ms.int64)))


def grouped_ffn(rows, ends, w_in, w_out, grouped_matmul):
    """The E expert FFNs of `experts.GroupedExperts` (GeLU between two projections) on compact rows.

    Args:
        rows [M, H] grouped by expert (expert e owns rows ends[e-1]..ends[e]-1; the dropped choices' rows, last,
        belong to the last expert's group); ends [E] int64 (`group_ends`); w_in [E, H, F], w_out [E, F, H] in
        rows' dtype.
    Returns: [M, H] in rows' dtype. The dropped rows' outputs are computed but weigh 0 in `combine`, so they add
    nothing to y and send no gradient back.
    """
    hidden = grouped_matmul([rows], [w_in], None, None, None, None, None, ends)[0]  # (M, F)
    hidden = fast_gelu(hidden.astype(ms.float32)).astype(rows.dtype)  # GeLU in fp32 (CPU has no bf16 sigmoid)
    return grouped_matmul([hidden], [w_out], None, None, None, None, None, ends)[0]  # (M, H)


def unfit(cfg):
    """Why `ascend_builtin` cannot run a `RunConfig` (one line), or None where it can."""
    if cfg.runtime.device != "Ascend":
        return f"runtime.device={cfg.runtime.device}: MindSpore's shipped MoE ops run on Ascend only"
    if cfg.parallel.dispatch != "local":
        return (f"parallel.dispatch={cfg.parallel.dispatch}: the compact layout needs the local dispatch (the "
                f"expert-parallel exchange sends fixed-size buffers)")
    if cfg.train.precision != "bf16":
        return (f"train.precision={cfg.train.precision}: the shipped MoE ops run in bf16, the one dtype every "
                f"documented version of all three accepts (docs/ascend.md); use train.precision=bf16")
    if cfg.moe.num_experts > MAX_GROUPS:
        return f"moe.num_experts={cfg.moe.num_experts}: GroupedMatmul takes at most {MAX_GROUPS} groups (CANN)"
    if cfg.moe.router == "expert_choice":
        return ("moe.router=expert_choice: its K = E columns would make T*E compact rows, more than the E*C padded "
                "ones")
    problems = check_signatures()
    return problems[0] if problems else None


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

    def dispatch_compact(self, x, expert_index, keep, kept_per_expert, capacity):
        """x [T, H], expert_index [T, K] int32, keep [T, K] bool, kept_per_expert [R, E] int32, capacity: python
        int C -> rows [M, H] bf16 (M = min(T*K, R*E*C)) grouped by expert, dropped choices last; order
        [T*K] int32, the row of choice n*K + k; ends [E] int64 (`group_ends`)."""
        num_tokens, top_k = expert_index.shape
        num_rows = min(num_tokens * top_k, self.num_ranks * self.num_experts * capacity)
        key = ops.select(keep, expert_index, ops.full_like(expert_index, self.num_experts))  # (T, K): dropped last
        rows, order = self.token_permute(x.astype(OPS_DTYPE), key, num_rows, False)
        return rows, order, group_ends(kept_per_expert, num_rows)

    def run_experts(self, rows, ends, w_in, w_out):
        """rows [M, H] bf16, ends [E] int64, w_in [E, H, F], w_out [E, F, H] fp32 (cast here) -> [M, H] bf16
        (`grouped_ffn`)."""
        return grouped_ffn(rows, ends, w_in.astype(rows.dtype), w_out.astype(rows.dtype), self.grouped_matmul)

    def combine(self, expert_rows, order, gate, keep):
        """expert_rows [M, H] (`dispatch_compact`), order [T*K] int32, gate [T, K] fp32, keep [T, K] bool -> y [T, H]
        in the rows' dtype; dropped choices weigh 0."""
        weight = (gate * keep.astype(gate.dtype)).astype(expert_rows.dtype)
        cut = order.shape[0] - expert_rows.shape[0]
        if cut:  # the choices cut off by num_out_tokens read zero rows
            expert_rows = ops.concat((expert_rows, ops.zeros((cut, expert_rows.shape[1]), expert_rows.dtype)), 0)
        return self.token_unpermute(expert_rows, order, weight, False, None)
