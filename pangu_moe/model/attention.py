"""Causal multi-head attention whose query input may differ from its key/value input.

Self-attention passes the same tensor twice; the PanGu-α query layer passes a learned position
embedding as the query input.
"""
import math

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from pangu_moe.precision import operand


def causal_mask(seq_len):
    """Additive mask [S, S] fp32: 0 on and below the diagonal, -1e9 above."""
    return Tensor(np.triu(np.full((seq_len, seq_len), -1e9, np.float32), 1))


class Attention(nn.Cell):
    """Multi-head attention, no biases. The matmuls run in `compute_dtype` (`precision`), the mask and
    softmax in fp32; the output is fp32.

    Args:
        hidden: H; num_heads: heads (H % heads == 0); init_std / out_std: normal init stds.
    """

    compute_dtype, bf16_operands = ms.float32, False  # set by `PanguModel.use_precision`

    def __init__(self, hidden, num_heads, init_std=0.02, out_std=None):
        super().__init__()
        out_std = init_std if out_std is None else out_std
        self.num_heads = num_heads
        self.head_dim = hidden // num_heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.w_q = Parameter(initializer(Normal(init_std), (hidden, hidden), ms.float32), name="w_q")
        self.w_kv = Parameter(initializer(Normal(init_std), (hidden, 2 * hidden), ms.float32), name="w_kv")
        self.w_o = Parameter(initializer(Normal(out_std), (hidden, hidden), ms.float32), name="w_o")

    def _heads(self, x):
        b, s, _ = x.shape
        return x.reshape(b, s, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)  # (B, nh, S, hd)

    def construct(self, query_in, kv_in, mask):
        """query_in [B, S, H] (or [S, H], broadcast), kv_in [B, S, H], mask [S, S] -> [B, S, H]."""
        k, v = self.keys_values(kv_in)
        return self.attend(query_in, k, v, mask)

    def keys_values(self, kv_in):
        """kv_in [B, S, H] -> keys, values [B, nh, S, hd] in `compute_dtype` (what a KV cache holds)."""
        h = kv_in.shape[-1]
        dt, bf16 = self.compute_dtype, self.bf16_operands
        k, v = ops.split(ops.matmul(operand(kv_in, dt, bf16), operand(self.w_kv, dt, bf16)), h, axis=-1)
        return self._heads(k), self._heads(v)

    def attend(self, query_in, k, v, mask):
        """query_in [B, Sq, H] (or [Sq, H], broadcast), keys and values [B, nh, Sk, hd] (`keys_values`),
        mask [Sq, Sk] additive -> [B, Sq, H] fp32."""
        b, _, sk, _ = k.shape
        sq, h = query_in.shape[-2], query_in.shape[-1]
        dt, bf16 = self.compute_dtype, self.bf16_operands
        q = ops.matmul(operand(query_in, dt, bf16), operand(self.w_q, dt, bf16))
        if q.ndim == 2:
            q = ops.broadcast_to(q.reshape(1, sq, h), (b, sq, h))  # (B, Sq, H) <- (Sq, H)
        q, k, v = operand(self._heads(q), dt, bf16), operand(k, dt, bf16), operand(v, dt, bf16)
        if dt == ms.float32:
            att = ops.bmm(q, k.transpose(0, 1, 3, 2)) * self.scale + mask  # (B, nh, Sq, Sk)
        else:  # scaled before the product, which could overflow fp16; the mask and softmax in fp32 (-1e9, exp)
            att = ops.bmm(q * self.scale, k.transpose(0, 1, 3, 2)).astype(ms.float32) + mask  # (B, nh, Sq, Sk)
        out = ops.bmm(operand(ops.softmax(att, axis=-1), dt, bf16), v)  # (B, nh, Sq, hd)
        out = out.transpose(0, 2, 1, 3).reshape(b, sq, h)  # (B, Sq, H) <- (B, Sq, nh, hd)
        return ops.matmul(operand(out, dt, bf16), operand(self.w_o, dt, bf16)).astype(ms.float32)
