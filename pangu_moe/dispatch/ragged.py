"""The ragged expert-parallel exchange: only the kept rows travel (the semantics of Megatron-Core's and
MegaBlocks' "alltoall" token dispatcher).

The padded exchange (`dispatch.exchange.Exchange`) moves each send buffer [W, E_loc, C, H] whole, empty
slots included, so no routing decision changes its bytes. The ragged exchange moves, per (source rank,
destination rank) block of S = E_loc * C slots:

1. the block's occupancy [S] (1 where a slot holds a kept choice): the counts with their positions, so
   every slot policy works, whichever slots it leaves empty (S values a block, 1/H of the padded rows);
2. the occupied rows only, packed to the front of the block in slot order, on an all-to-all with uneven
   splits (`AlltoAllV`): rank r sends n[r, q] rows to rank q and receives n[q, r] from it;
3. the receiver puts each row back in its slot (`unpack`), so the experts see exactly the padded layout
   and the result equals the padded exchange bit for bit (tested); the combine direction repeats 2-3
   with the experts' outputs of the occupied slots and the receiver's occupancy.

Static shapes: the contiguous send and receive buffers hold W * S rows (the padded buffer's size; rows
past the count are zero and are not part of any message). Sizing them to a bucket of the largest count
would need the count before the step is compiled; see docs/architecture.md, Expert parallelism.

The uneven all-to-all per backend (`make_rows_exchange`):
- hccl: `ops.AlltoAllV` with the send and receive element counts (CANN, not run in this repository's CI);
- simulated and msrun_cpu (CPU MindSpore has no AlltoAllV): `EmulatedAlltoAllV` with AlltoAllV's
  documented contract on top of the padded world all-to-all: each destination's rows are spread into a
  block of S, the blocks exchanged, the received rows packed again. The rows that count as sent are
  the n[r, q] of the contract.
- hierarchical (`parallel.exchange=hierarchical`, simulated and msrun_cpu only), deduplicated as DeepEP's
  internode dispatch is: stage 1 sends each token once to every node holding one of its kept choices (to
  the peer of the same local rank there) with a map from each of that node's slots to a row of the message
  (`node_rows`); the peer copies the row into every slot that chose it, and stage 2 forwards the slots
  inside the node. A token whose K choices land on one remote node crosses the boundary once, not K times.
  The combine sends each slot's expert output back through both stages (a deduplicated combine would weight
  by the gate at the peer before summing; not built). Rows that count: the (token, node) pairs of
  `node_rows` (stage 1) and the occupied slots (stage 2).
"""
import mindspore as ms
from mindspore import nn, ops

from pangu_moe.dispatch.exchange import Exchange


def positions(occupancy):
    """occupancy [R, W, S] int32 (0/1) -> (position of each slot among its block's occupied slots [R, W, S]
    int32 (meaningful where occupied), rows per block [R, W] int32)."""
    return ops.cumsum(occupancy, 2) - 1, occupancy.sum(2)


def _bases(counts, block, contiguous):
    """[R, W] int32: where block q starts in a rank's packed buffer: after the earlier blocks' rows
    (contiguous, AlltoAllV's input layout) or at q * block (one block of S rows each)."""
    if contiguous:
        return ops.cumsum(counts, 1) - counts
    r, w = counts.shape
    return ops.broadcast_to(ops.arange(w, dtype=ms.int32).reshape(1, w) * block, (r, w))


def _row_index(occupancy, contiguous):
    """1-based row in the packed buffers [R * W * S] of each occupied slot, 0 for an empty one: [R, W, S] int32."""
    r, w, s = occupancy.shape
    pos, counts = positions(occupancy)
    rank_base = (ops.arange(r, dtype=ms.int32) * (w * s)).reshape(r, 1, 1)
    row = rank_base + _bases(counts, s, contiguous).reshape(r, w, 1) + pos + 1
    return ops.where(occupancy > 0, row, ops.zeros_like(row))


def _with_zero_row(x):
    """x [..., H] -> [1 + N, H]: a zero row first, then x's rows (row 0 is what an empty index reads)."""
    h = x.shape[-1]
    return ops.concat((ops.zeros((1, h), x.dtype), x.reshape(-1, h)), 0)


def pack(x, occupancy, contiguous):
    """The occupied slots' rows, packed: x [R, W, S, H], occupancy [R, W, S] int32 -> [R, W * S, H].

    Block q's rows sit at its base (`_bases`) in slot order; every other row is zero.
    """
    r, w, s, h = x.shape
    row = _row_index(occupancy, contiguous).reshape(-1)
    source = ops.arange(1, r * w * s + 1, dtype=ms.int32)
    # inverse map: packed row -> 1-based slot (0: none); empty slots write 0 into a spare last row
    target = ops.where(row > 0, row - 1, ops.full_like(row, r * w * s))
    inverse = ops.scatter_nd(target.reshape(-1, 1), ops.where(row > 0, source, ops.zeros_like(source)),
                             (r * w * s + 1,))[:-1]
    return ops.gather(_with_zero_row(x), inverse, 0).reshape(r, w * s, h)  # (R, W*S, H)


def unpack(packed, occupancy, contiguous):
    """The inverse of `pack`: packed [R, W * S, H] -> [R, W, S, H], each row back in its slot, zero elsewhere."""
    r, w, s = occupancy.shape
    row = _row_index(occupancy, contiguous).reshape(-1)
    return ops.gather(_with_zero_row(packed), row, 0).reshape(r, w, s, packed.shape[-1])  # (R, W, S, H)


def first_rows(counts, block):
    """The occupancy of blocks whose rows are packed to the front: [R, W] counts -> [R, W, S] int32."""
    r, w = counts.shape
    return (ops.arange(block, dtype=ms.int32).reshape(1, 1, block) < counts.reshape(r, w, 1)).astype(ms.int32)


class EmulatedAlltoAllV(nn.Cell):
    """AlltoAllV's contract on a padded all-to-all primitive (CPU: `simulated`, `msrun_cpu`).

    x [R, W * S, H] holds, for each destination q in order, send_counts[r, q] rows back to back (the
    contiguous packing); the result holds, for each source in order, recv_counts[r, s] rows back to back.
    """

    def __init__(self, all_to_all):
        super().__init__()
        self.all_to_all = all_to_all

    def construct(self, x, send_counts, recv_counts):
        block = x.shape[1] // send_counts.shape[1]
        blocks = unpack(x, first_rows(send_counts, block), True)  # (R, W destinations, S, H)
        received = self.all_to_all(blocks)  # (R, W sources, S, H)
        return pack(received, first_rows(recv_counts, block), True)


class HcclAlltoAllV(nn.Cell):
    """`ops.AlltoAllV` in the world group, one rank per process (Ascend; not run in this repository's CI).

    x [1, W * S, H] contiguous as in `EmulatedAlltoAllV`; counts in rows, sent as element counts (rows * H).
    The received rows (sum of recv_counts, a dynamic shape) are placed at the front of a [1, W * S, H] buffer.
    """

    def __init__(self):
        super().__init__()
        self.all_to_all_v = ops.AlltoAllV()

    def construct(self, x, send_counts, recv_counts):
        _, rows, h = x.shape
        received = self.all_to_all_v(x.reshape(-1), send_counts.reshape(-1) * h, recv_counts.reshape(-1) * h)
        received = received.reshape(-1, h)  # (sum of recv_counts, H)
        index = ops.arange(rows, dtype=ms.int32)
        index = ops.where(index < recv_counts.sum(), index + 1, ops.zeros_like(index))
        return ops.gather(_with_zero_row(received), index, 0).reshape(1, rows, h)


def node_rows(slot_token, tokens_per_rank, nodes, devices_per_node):
    """The deduplicated stage-1 messages of the hierarchical exchange: one row per (token, destination node).

    Args: slot_token [R, W, S] int32: 1 + the source rank's token index held in each slot of the block for
        destination rank q (W = N * D, node-major), 0 in an empty slot; tokens_per_rank n; nodes N, D.
    Returns: (slot_row [R, N, D * S] int32: 1 + the row of node m's message feeding the slot, 0 if empty;
        message [R, N, n] int32: 1 + the token carried in each row, rows packed to the front in token order,
        0 past them; rows [R, N] int32: the rows of each message, i.e. its distinct tokens).
    """
    r, n = slot_token.shape[0], tokens_per_rank
    by_node = slot_token.reshape(r, nodes, -1)  # (R, N, D*S): the slots of node m's D ranks
    m = by_node.shape[2]
    cell = (ops.arange(r * nodes, dtype=ms.int32) * (n + 1)).reshape(r, nodes, 1) + by_node  # into [R*N, n+1]
    hits = ops.scatter_nd(cell.reshape(-1, 1), ops.ones((r * nodes * m,), ms.int32), (r * nodes * (n + 1),))
    present = (hits.reshape(r, nodes, n + 1)[:, :, 1:] > 0).astype(ms.int32)  # (R, N, n): token t goes to node m
    row = ops.cumsum(present, 2) * present  # (R, N, n): 1-based row of token t in node m's message
    with_empty = ops.concat((ops.zeros((r, nodes, 1), ms.int32), row), 2)  # (R, N, 1+n): slot token 0 -> row 0
    slot_row = ops.gather_elements(with_empty, 2, by_node)
    # inverse map: message row -> 1-based token; absent tokens write into a spare last row
    target = ops.where(present > 0, row - 1, ops.full_like(row, n)) + (
        ops.arange(r * nodes, dtype=ms.int32) * (n + 1)).reshape(r, nodes, 1)
    token = ops.broadcast_to(ops.arange(1, n + 1, dtype=ms.int32).reshape(1, 1, n), (r, nodes, n)) * present
    message = ops.scatter_nd(target.reshape(-1, 1), token.reshape(-1), (r * nodes * (n + 1),))
    return slot_row, message.reshape(r, nodes, n + 1)[:, :, :n], present.sum(2)


def to_other_nodes(per_node, first_rank, devices_per_node):
    """per_node [R, N] int32: rows each held rank (world rank first_rank + r) sends to each node -> [R] int32: those
    sent to another node than the rank's own."""
    r, nodes = per_node.shape
    home = ((ops.arange(r, dtype=ms.int32) + first_rank) // devices_per_node).reshape(r, 1)  # (R, 1)
    return (per_node * (ops.arange(nodes, dtype=ms.int32).reshape(1, nodes) != home).astype(ms.int32)).sum(1)


class RaggedExchange(nn.Cell):
    """The exchange of `dispatch.exchange.Exchange`'s interface (`dispatch`, `combine`) moving kept rows only.

    Args: backend ("simulated", "msrun_cpu", "hccl"); algorithm ("flat", "hierarchical"; hierarchical not
    on hccl, `RunConfig.validate`); rank: this process's first world rank; nodes N, devices_per_node D.
    """

    ragged = True

    def __init__(self, backend, algorithm, rank, nodes, devices_per_node):
        super().__init__()
        self.first_rank = rank
        self.blocks = Exchange(backend, algorithm, rank, nodes, devices_per_node)  # occupancy, hierarchical rows
        self.contiguous = not self.blocks.hierarchical
        if self.contiguous:
            self.rows = HcclAlltoAllV() if backend == "hccl" else EmulatedAlltoAllV(self.blocks)

    def _send(self, x, occupancy, received_occupancy):
        """Rows of x [R, W, S, H] in the occupied slots -> the peers' rows in their slots [R, W, S, H]."""
        packed = pack(x, occupancy, self.contiguous)  # (R, W*S, H)
        if self.contiguous:
            moved = self.rows(packed, positions(occupancy)[1], positions(received_occupancy)[1])
        else:
            r, w, s, h = x.shape
            moved = self.blocks(packed.reshape(r, w, s, h)).reshape(r, w * s, h)
        return unpack(moved, received_occupancy, self.contiguous)

    def dispatch(self, send, slot_token, tokens):
        """send [R, W, S, H] (block q for rank q), slot_token [R, W, S] int32 (1 + the token in each slot, 0 if
        empty), tokens [R, n, H] (each rank's tokens; read by the hierarchical exchange instead of `send`) ->
        (received [R, W sources, S, H], the state `combine` needs: both occupancies, inter-node rows [R] int32
        counted on the hierarchical stage-1 messages (one per (token, other node)), or None where one row
        travels per kept choice)."""
        occupancy = (slot_token > 0).astype(ms.int32)
        if self.blocks.hierarchical:
            received, received_occupancy, inter_rows = self._dispatch_by_node(slot_token, tokens)
            return received, (occupancy, received_occupancy), inter_rows
        received_occupancy = ops.stop_gradient(self.blocks(occupancy.astype(ms.float32)).astype(ms.int32))
        return self._send(send, occupancy, received_occupancy), (occupancy, received_occupancy), None

    def _dispatch_by_node(self, slot_token, tokens):
        """The deduplicated two-stage dispatch (module docstring): -> (received [R, W, S, H], received
        occupancy [R, W, S] int32, the rows of each held rank's stage-1 messages to other nodes [R] int32)."""
        r, w, s = slot_token.shape
        n, h = tokens.shape[1], tokens.shape[2]
        nodes, d = self.blocks.nodes, self.blocks.devices
        slot_row, message, per_node = ops.stop_gradient(node_rows(slot_token, n, nodes, d))
        inter_rows = to_other_nodes(per_node, self.first_rank, d)
        rank_base = (ops.arange(r, dtype=ms.int32) * n).reshape(r, 1, 1)
        rows = ops.gather(_with_zero_row(tokens), ops.where(message > 0, message + rank_base, message), 0)
        rows = self.blocks.inter(rows.reshape(r, nodes, n, h))  # (R, N source nodes, n, H) at the peer
        # the int map travels as fp32 (exact below 2^24 rows)
        slot_row = self.blocks.inter(slot_row.astype(ms.float32)).astype(ms.int32)  # (R, N sources, D*S)
        message_base = (ops.arange(r * nodes, dtype=ms.int32) * n).reshape(r, nodes, 1)
        slots = ops.gather(_with_zero_row(rows), ops.where(slot_row > 0, slot_row + message_base, slot_row), 0)
        slots = slots.reshape(r, nodes, d, s, h)  # (R, N source nodes, D destination local ranks, S, H)
        occupancy = (slot_row > 0).astype(ms.float32).reshape(r, nodes, d, s)
        received = ops.swapaxes(self.blocks.intra(ops.swapaxes(slots, 1, 2)), 1, 2)  # (R, N, D sources, S, H)
        occupancy = ops.swapaxes(self.blocks.intra(ops.swapaxes(occupancy, 1, 2)), 1, 2)
        return (received.reshape(r, w, s, h), ops.stop_gradient(occupancy.reshape(r, w, s).astype(ms.int32)),
                inter_rows)

    def combine(self, expert_out, state):
        """expert_out [R, W sources, S, H] -> at the sources [R, W, S, H] (rows of empty slots are zero)."""
        occupancy, received_occupancy = state
        return self._send(expert_out, received_occupancy, occupancy)
