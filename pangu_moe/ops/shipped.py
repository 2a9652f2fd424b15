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

Under expert parallelism (`parallel.dispatch` other than local) each rank permutes its own choices by slot, which
groups them by destination rank, and `dispatch.compact_exchange.CompactExchange` sends the kept rows on AlltoAllV to
the ranks of their experts, regroups them by expert there for GroupedMatmul, and brings the outputs back for
moe_token_unpermute (see that module for the rows each rank multiplies).

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
    if cfg.parallel.dispatch != "local" and cfg.parallel.exchange_layout != "ragged":
        return (f"parallel.exchange_layout={cfg.parallel.exchange_layout}: the compact rows travel on the ragged "
                f"exchange only (dispatch/compact_exchange.py); use parallel.exchange_layout=ragged")
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
    """The `dispatch.dispatcher.Dispatcher` of `ascend_builtin`: compact rows grouped by expert, no padded buffers.

    `layout` is the reference layout (the per-slot counts feed the token accounting and the group ends); the other
    steps run the shipped ops of `shipped` (a `ShippedOps`; held as cell attributes so a compiled step sees them).
    With `parallel.dispatch` local every expert is held here and the R ranks' choices are permuted at once; under
    expert parallelism each rank permutes its own and `exchange` (a `dispatch.compact_exchange.CompactExchange`)
    moves the kept rows to the ranks of their experts and the outputs back.

    Args: num_experts E; num_ranks R (ranks whose tokens this process holds); world_size W; nodes N; shipped;
    exchange (None for the local dispatch).
    """

    compact = True

    def __init__(self, num_experts, num_ranks=1, world_size=1, nodes=1, shipped=None, exchange=None):
        super().__init__(num_ranks, num_experts, world_size, nodes)
        shipped = shipped or ShippedOps()
        self.token_permute, self.token_unpermute = shipped.permute, shipped.unpermute
        self.grouped_matmul = shipped.grouped_matmul
        self.exchange = exchange

    def layout(self, pair_index, slot, keep, requested, capacity):
        """As `dispatch.dispatcher.Dispatcher.layout`."""
        return self.construct(pair_index, slot, keep, requested, capacity)

    def _permute(self, x, slot_index, keep, num_rows):
        """x [n, H], slot_index [n, K] int32 (the slot of each choice), keep [n, K] bool -> rows [M, H] bf16 grouped
        by slot, dropped choices last (M = num_rows), order [n*K] int32: the row of choice i*K + k."""
        key = ops.select(keep, slot_index, ops.full_like(slot_index, self.num_experts))  # (n, K): dropped last
        return self.token_permute(x.astype(OPS_DTYPE), key, num_rows, False)

    def dispatch_compact(self, x, slot_index, keep, capacity):
        """x [T, H], slot_index [T, K] int32, keep [T, K] bool, capacity: python int C -> (rows, order).

        Local dispatch: rows [M, H] bf16 (M = min(T*K, R*E*C)) grouped by slot, dropped choices last; order [T*K]
        int32, the row of choice n*K + k. Expert parallelism: rows [R, W * S, H] in the exchange's carrier dtype
        (bf16 on hccl), each rank's M_r = min(n*K, E*C) rows (n = T / R) padded with zeros (S = E_loc * C, W * S =
        E * C >= M_r); order [R, n*K] int32.
        """
        num_tokens, top_k = slot_index.shape
        if self.exchange is None:
            return self._permute(x, slot_index, keep, min(num_tokens * top_k, self.num_ranks * self.num_experts *
                                                          capacity))
        n = num_tokens // self.num_ranks
        rows, orders = (), ()
        for r in range(self.num_ranks):  # each rank permutes its own choices, as on a cluster
            part, order = self._permute(x[r * n:(r + 1) * n], slot_index[r * n:(r + 1) * n], keep[r * n:(r + 1) * n],
                                        min(n * top_k, self.num_experts * capacity))
            part = part.astype(self.exchange.carrier)
            pad = self.num_experts * capacity - part.shape[0]
            if pad:
                part = ops.concat((part, ops.zeros((pad, part.shape[1]), part.dtype)), 0)
            rows, orders = rows + (part,), orders + (order,)
        return ops.stack(rows), ops.stack(orders)  # (R, E*C, H), (R, n*K)

    def run_experts(self, rows, order, kept_per_expert, capacity, w_in, w_out):
        """The held experts on the rows of `dispatch_compact` (`grouped_ffn`), back in those rows' layout.

        Args: rows, order as `dispatch_compact` returns them; kept_per_expert [R, E] int32 (slot order); capacity
            C; w_in [E_held, H, F], w_out [E_held, F, H] fp32 (cast here).
        Returns: expert outputs in the layout and dtype of `rows` (after an exchange: zero past each rank's kept
        rows). The shipped ops see bf16 only: the rows are cast to it after every slice (CPU MindSpore cannot
        slice bf16 in the backward pass).
        """
        if self.exchange is None:
            return grouped_ffn(rows, group_ends(kept_per_expert, rows.shape[0]), w_in.astype(OPS_DTYPE),
                               w_out.astype(OPS_DTYPE), self.grouped_matmul)
        local = self.num_experts // self.world_size
        multiplied = self.world_size * min(order.shape[-1], local * capacity)  # B (dispatch/compact_exchange.py)
        grouped, received, state = self.exchange.dispatch(rows, kept_per_expert, capacity, multiplied)
        out = ()
        for i in range(rows.shape[0]):  # rank i holds slots i*E_loc..(i+1)*E_loc-1 of the weights held here
            w_in_i, w_out_i = w_in[i * local:(i + 1) * local], w_out[i * local:(i + 1) * local]  # (E_loc, ...)
            out += (grouped_ffn(grouped[i].astype(OPS_DTYPE), group_ends(received[i], multiplied),
                                w_in_i.astype(OPS_DTYPE), w_out_i.astype(OPS_DTYPE),
                                self.grouped_matmul).astype(rows.dtype),)
        return self.exchange.combine(ops.stack(out), state)  # (R, B, H) -> (R, W*S, H)

    def combine(self, expert_rows, order, gate, keep):
        """expert_rows and order as `run_experts` and `dispatch_compact` give them, gate [T, K] fp32, keep [T, K] bool
        -> y [T, H] bf16; dropped choices weigh 0."""
        weight = gate * keep.astype(gate.dtype)
        if self.exchange is None:
            return self._unpermute(expert_rows, order, weight.astype(expert_rows.dtype))
        n = weight.shape[0] // self.num_ranks
        parts = ()
        for r in range(self.num_ranks):
            parts += (self._unpermute(expert_rows[r], order[r], weight[r * n:(r + 1) * n].astype(OPS_DTYPE)),)
        return ops.concat(parts, 0)

    def _unpermute(self, rows, order, weight):
        """rows [M, H] (bf16, or the exchange's carrier dtype), order [n*K] int32, weight [n, K] bf16 -> [n, H] bf16:
        moe_token_unpermute takes n*K rows, so the rows are cut (before the cast to bf16: CPU MindSpore cannot
        slice bf16 in the backward pass) or padded with zeros to n*K (the choices past M read zero rows)."""
        cut = order.shape[0] - rows.shape[0]
        if cut > 0:
            rows = ops.concat((rows, ops.zeros((cut, rows.shape[1]), rows.dtype)), 0)
        elif cut < 0:
            rows = rows[:order.shape[0]]
        return self.token_unpermute(rows.astype(OPS_DTYPE), order, weight, False, None)
