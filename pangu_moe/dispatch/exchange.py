"""The expert-parallel exchange: send buffers [R, W, E_loc, C, H] -> received buffers, flat or two-stage.

One algorithm for every backend; the backend only supplies the group all-to-all primitive
(`dispatch.collectives`). The exchange is the transpose of the (source rank, destination rank) block
matrix, so it is its own inverse: the combine direction runs the same exchange on the expert outputs.

- flat: one all-to-all in the world group.
- hierarchical (a node-hierarchical two-stage all-to-all, as in DeepSpeed-MoE's and Tutel's hierarchical
  all-to-all; LocMoE's own scheme is the group-wise exchange, `dispatch.group_wise`): stage 1 sends, among same-local-rank peers, each
  destination node's share [D, E_loc, C, H] to the peer on that node, so each rank sends one message
  per other node instead of one per remote rank (the bytes crossing nodes are the same: the buffer
  holds one row per kept choice); stage 2 forwards inside each node. The result equals the flat
  exchange exactly (tested). With one node, or one device per node, one of the two stages would be
  among a single rank, so the flat exchange is used.
"""
from mindspore import nn, ops

from pangu_moe.dispatch.collectives import make_all_to_all

EXCHANGES = ("flat", "hierarchical")


class Exchange(nn.Cell):
    """Args: backend ("simulated", "msrun_cpu", "hccl"); algorithm: an EXCHANGES name; rank: this process's
    first world rank (0 for `simulated`, which holds all W); nodes N, devices_per_node D."""

    ragged = False  # moves every slot; `dispatch.ragged.RaggedExchange` moves the kept rows only

    def __init__(self, backend, algorithm, rank, nodes, devices_per_node):
        super().__init__()
        if algorithm not in EXCHANGES:
            raise ValueError(f"exchange {algorithm!r}: must be one of {', '.join(EXCHANGES)}")
        self.hierarchical = algorithm == "hierarchical" and nodes > 1 and devices_per_node > 1
        self.nodes, self.devices = nodes, devices_per_node
        if self.hierarchical:
            self.inter = make_all_to_all(backend, "inter", rank, nodes, devices_per_node)
            self.intra = make_all_to_all(backend, "intra", rank, nodes, devices_per_node)
        else:
            self.world = make_all_to_all(backend, "world", rank, nodes, devices_per_node)

    def dispatch(self, send, slot_token, tokens):
        """The expert-parallel interface shared with `RaggedExchange`: send [R, W, S, H] -> (received
        [R, W, S, H], state for `combine`, None: every slot travels, so no deduplicated row count); slot_token
        and tokens are not read."""
        return self.construct(send), None, None

    def combine(self, expert_out, state):
        """expert_out [R, W, S, H] -> back at the sources [R, W, S, H]: the same transpose."""
        return self.construct(expert_out)

    def construct(self, send):
        """send [R, W, ...]: send[r, q] goes from rank r to rank q -> received [R, W, ...]: from rank q."""
        if not self.hierarchical:
            return self.world(send)
        r, w = send.shape[:2]
        rest = send.shape[2:]
        n, d = self.nodes, self.devices
        x = send.reshape((r, n, d) + rest)  # (R, destination node, destination local rank, ...)
        x = self.inter(x)  # (R, source node, destination local rank, ...) at the same-local-rank peer
        x = self.intra(ops.swapaxes(x, 1, 2))  # (R, source local rank, source node, ...) at the destination
        return ops.swapaxes(x, 1, 2).reshape((r, w) + rest)  # (R, W source ranks, ...)
