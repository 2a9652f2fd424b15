"""The ragged exchange of compact rows: `runtime.kernels: ascend_builtin` under expert parallelism (the
semantics of Megatron-Core's "alltoall" token dispatcher).

Each rank's compact rows (`ops.shipped.CompactDispatcher.dispatch_compact`) are sorted by slot, and slots are
destination-major (slot s lives on rank s // E_loc), so the rows for rank q are one contiguous run: AlltoAllV's
input layout, with n[r, q] = the kept choices of rank r for rank q's slots. The exchange

1. sends the kept counts per (source rank, destination slot) [W, E_loc] through the padded all-to-all (as
   fp32, exact below 2^24), so every rank knows what it receives and in which order;
2. moves the kept rows only, on `dispatch.ragged`'s uneven all-to-all (`ops.AlltoAllV` on hccl, its documented
   contract emulated on the padded all-to-all on CPU): rank q receives, for each source in rank order, that
   source's rows for its E_loc experts, sorted by expert;
3. regroups them expert-major (`expert_major`; Megatron's sort_chunks_by_idxs), so the E_loc experts run on one
   GroupedMatmul with cumulative group ends, then restores the source-major order and sends the outputs back
   on the same AlltoAllV with the counts swapped.

Static shapes: a rank's rows are padded to W * S (S = E_loc * C, the padded block; every source sends at most
S rows to a rank, since no expert keeps more than C choices of a rank), and the experts multiply B = W *
min(n * K, S) rows a rank (n tokens a rank): the kept rows of every source, then zeros. The rows past the kept
ones join the last expert's group (GroupedMatmul's last end must be B) and are never combined.
"""
import mindspore as ms
from mindspore import nn, ops

from pangu_moe.dispatch.exchange import Exchange
from pangu_moe.dispatch.ragged import EmulatedAlltoAllV, HcclAlltoAllV, _with_zero_row
from pangu_moe.ops.shipped import OPS_DTYPE


def expert_major(counts, capacity, rows):
    """Where each received row goes when the rows are regrouped by expert.

    Args: counts [R, W, L] int32: rows each receiving rank (of the R held here) gets from source rank s for its
        local expert l, each at most `capacity`; capacity C; rows B: the expert-major buffer's rows a rank.
    Returns: (gather [R, B] int32: 1 + the flat source-major row (rank r's rows at r * W * L * C) of each
        expert-major row, 0 past the received ones; scatter [R, W * L * C] int32: 1 + the flat expert-major row
        (rank r's at r * B) of each source-major row, 0 past the received ones).
    """
    r, w, loc = counts.shape
    sent = w * loc * capacity  # source-major rows a rank: W blocks of S = L * C
    by_source = counts.reshape(r, w * loc)
    source_start = (ops.cumsum(by_source, 1) - by_source).reshape(r, w, loc, 1)  # (R, W, L, 1)
    by_expert = ops.swapaxes(counts, 1, 2).reshape(r, loc * w)  # (R, L*W) <- (R, L, W)
    expert_start = ops.swapaxes((ops.cumsum(by_expert, 1) - by_expert).reshape(r, loc, w), 1, 2).reshape(r, w, loc, 1)
    i = ops.arange(capacity, dtype=ms.int32).reshape(1, 1, 1, capacity)
    valid = i < counts.reshape(r, w, loc, 1)  # (R, W, L, C)
    rank = ops.arange(r, dtype=ms.int32).reshape(r, 1, 1, 1)
    source_row = rank * sent + source_start + i  # (R, W, L, C)
    expert_row = rank * rows + expert_start + i
    spare = ops.full_like(source_row, r * rows)  # invalid entries write into one spare element past the end
    gather = ops.scatter_nd(ops.where(valid, expert_row, spare).reshape(-1, 1),
                            ops.where(valid, source_row + 1, ops.zeros_like(source_row)).reshape(-1),
                            (r * rows + 1,))[:-1]
    # the inverse map: each received row's cell writes its expert-major row at its source-major row
    spare = ops.full_like(source_row, r * sent)
    scatter = ops.scatter_nd(ops.where(valid, source_row, spare).reshape(-1, 1),
                             ops.where(valid, expert_row + 1, ops.zeros_like(expert_row)).reshape(-1),
                             (r * sent + 1,))[:-1]
    return gather.reshape(r, rows), scatter.reshape(r, sent)


class CompactExchange(nn.Cell):
    """Compact rows to the ranks holding their experts and the experts' outputs back (module docstring).

    Args: backend ("simulated", "msrun_cpu", "hccl"); algorithm ("flat", "hierarchical": how the padded
    all-to-all under the emulation runs; the rows of the AlltoAllV contract are the same); rank: this process's
    first world rank; nodes N, devices_per_node D.
    """

    def __init__(self, backend, algorithm, rank, nodes, devices_per_node):
        super().__init__()
        self.world_size = nodes * devices_per_node
        self.blocks = Exchange(backend, algorithm, rank, nodes, devices_per_node)
        self.rows = HcclAlltoAllV() if backend == "hccl" else EmulatedAlltoAllV(self.blocks)
        # The dtype the rows travel and are moved around in: bf16 (the shipped ops') on Ascend; fp32 on the CPU
        # backends, exact both ways, since CPU MindSpore cannot gather, stack, slice or reshape bf16 in a graph.
        self.carrier = OPS_DTYPE if backend == "hccl" else ms.float32

    def dispatch(self, rows, kept, capacity, multiplied):
        """rows [R, W * S, H] in the carrier dtype (each rank's kept rows sorted by slot, zero past them), kept [R, E]
        int32 (kept choices per slot), capacity C, multiplied B -> (the received rows regrouped by expert [R, B, H],
        the received counts [R, W, E_loc] int32, the state `combine` needs)."""
        r, _, h = rows.shape
        counts = kept.reshape(r, self.world_size, -1)  # (R, W destinations, E_loc)
        received = ops.stop_gradient(self.blocks(counts.astype(ms.float32)).astype(ms.int32))  # (R, W sources, E_loc)
        send, receive = counts.sum(2), received.sum(2)
        gather, scatter = ops.stop_gradient(expert_major(received, capacity, multiplied))
        source_major = self.rows(rows, send, receive)  # (R, W*S, H)
        grouped = ops.gather(_with_zero_row(source_major), gather.reshape(-1), 0).reshape(r, multiplied, h)
        return grouped, received, (send, receive, scatter)

    def combine(self, expert_out, state):
        """expert_out [R, B, H] in the carrier dtype (expert-major, as `dispatch` gave) -> at the sources [R, W * S,
        H], each row where `dispatch` took it from, zero past the kept rows."""
        send, receive, scatter = state
        r, _, h = expert_out.shape
        source_major = ops.gather(_with_zero_row(expert_out), scatter.reshape(-1), 0).reshape(r, -1, h)  # (R, W*S, H)
        return self.rows(source_major, receive, send)
