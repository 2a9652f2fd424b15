"""Dispatch and combine: index-based gather of routed tokens into per-expert buffers [E, C, H] and back.

Under expert parallelism the "experts" indexed here are (source rank, expert) pairs, R*E of them, so
the buffer is every held rank's destination-major send buffer (`model.moe_layer.MoELayer`).

No [T, E, C] one-hot tensor is built: dispatch is a gather through a row map (buffer row -> source
token) and combine is a gather through the flat slot index, both differentiable, both O(T*K*H).
"""
import mindspore as ms
from mindspore import nn, ops


class Dispatcher(nn.Cell):
    """Permute tokens into buffers and un-permute them; no communication (that is `dispatch.exchange`).

    Args:
        num_experts: the number of buffers (E, or R*E for R ranks' send buffers).
    """

    def __init__(self, num_experts):
        super().__init__()
        self.num_experts = num_experts

    def flat_index(self, expert_index, keep, slot, capacity):
        """Buffer row of every choice: expert * C + slot, or E * C (a zero row) if dropped.

        Args: expert_index, slot [T, K] int32; keep [T, K] bool; capacity C.
        Returns: [T*K] int32 (token-major).
        """
        rows = expert_index * capacity + slot
        dropped = ops.full_like(rows, self.num_experts * capacity)
        return ops.select(keep, rows, dropped).reshape(-1)  # (T*K,) <- (T, K)

    def dispatch(self, x, flat_index, capacity):
        """Permute tokens into the expert buffer.

        Args:
            x: [T, H].
            flat_index: [T*K] int32 from `flat_index`.
        Returns:
            expert_in [E, C, H], zero in unused slots.
        """
        num_tokens, hidden = x.shape
        top_k = flat_index.shape[0] // num_tokens
        num_rows = self.num_experts * capacity
        source = ops.arange(num_tokens, dtype=ms.int32).reshape(-1, 1)  # (T, 1)
        source = ops.broadcast_to(source, (num_tokens, top_k)).reshape(-1)  # (T*K,): token of each choice
        # Row r of the buffer reads token row_source[r]; unused rows (and the dropped-choice sink row
        # E*C) read the zero row appended at index T.
        row_source = ops.full((num_rows + 1,), num_tokens, dtype=ms.int32)
        row_source = ops.tensor_scatter_update(row_source, flat_index.reshape(-1, 1), source)  # (E*C+1,)
        padded = ops.concat((x, ops.zeros((1, hidden), x.dtype)), 0)  # (T+1, H)
        expert_in = ops.gather(padded, row_source[:num_rows], 0)  # (E*C, H)
        return expert_in.reshape(self.num_experts, capacity, hidden)  # (E, C, H) <- (E*C, H)

    def combine(self, expert_out, flat_index, gate, keep):
        """Un-permute and weight by the gate; dropped choices contribute exactly 0.

        Args:
            expert_out: [E, C, H].
            flat_index: [T*K] int32.
            gate: [T, K] fp32; keep: [T, K] bool.
        Returns:
            y [T, H] in expert_out's dtype.
        """
        num_tokens, top_k = gate.shape
        hidden = expert_out.shape[-1]
        rows = expert_out.reshape(-1, hidden)  # (E*C, H) <- (E, C, H)
        padded = ops.concat((rows, ops.zeros((1, hidden), rows.dtype)), 0)  # (E*C+1, H)
        picked = ops.gather(padded, flat_index, 0).reshape(num_tokens, top_k, hidden)  # (T, K, H)
        weight = (gate * keep.astype(gate.dtype)).astype(rows.dtype).reshape(num_tokens, top_k, 1)  # (T, K, 1)
        return (picked * weight).sum(1)
