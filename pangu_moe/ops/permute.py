"""moe_permute / moe_unpermute: routed tokens into the send buffer [B, C, H] and the weighted sum back.

`reference_permute` and `reference_unpermute` are the specification (kernels/README.md): index
gathers through a row map, no [T, B, C] one-hot, both differentiable by MindSpore's own gradients.
The custom ops run the C++ / Ascend C kernels with explicit backward kernels.
"""
import mindspore as ms
from mindspore import nn, ops

from pangu_moe.ops.custom import aot_op


def reference_permute(x, flat_index, num_buffers, capacity):
    """x [T, H], flat_index [T*K] int32 (row of each choice, B*C = dropped) -> buffer [B, C, H], 0 in unused rows."""
    num_tokens, hidden = x.shape
    top_k = flat_index.shape[0] // num_tokens
    num_rows = num_buffers * capacity
    source = ops.broadcast_to(ops.arange(num_tokens, dtype=ms.int32).reshape(-1, 1), (num_tokens, top_k))
    # Row r reads token row_source[r]; unused rows (and the sink row B*C) read the zero row appended at T.
    row_source = ops.full((num_rows + 1,), num_tokens, dtype=ms.int32)
    row_source = ops.tensor_scatter_update(row_source, flat_index.reshape(-1, 1), source.reshape(-1))  # (B*C+1,)
    padded = ops.concat((x, ops.zeros((1, hidden), x.dtype)), 0)  # (T+1, H)
    return ops.gather(padded, row_source[:num_rows], 0).reshape(num_buffers, capacity, hidden)  # (B, C, H)


def reference_unpermute(buffer, flat_index, weight):
    """buffer [B, C, H] (any float dtype), flat_index [T*K] int32, weight [T, K] fp32 -> y [T, H] fp32:
    sum_k weight * row (the sink adds 0). The rows are widened to fp32 and the gate never narrowed, so the
    router's gradient through the combine stays fp32 under a low-precision compute dtype."""
    num_tokens, top_k = weight.shape
    hidden = buffer.shape[-1]
    rows = buffer.reshape(-1, hidden)  # (B*C, H) <- (B, C, H)
    padded = ops.concat((rows, ops.zeros((1, hidden), rows.dtype)), 0)  # (B*C+1, H): the sink row reads 0
    picked = ops.gather(padded, flat_index, 0).reshape(num_tokens, top_k, hidden)  # (T, K, H)
    return (picked.astype(ms.float32) * weight.astype(ms.float32).reshape(num_tokens, top_k, 1)).sum(1)


class ReferencePermute(nn.Cell):
    """`reference_permute` as a cell. Args: num_buffers B."""

    def __init__(self, num_buffers):
        super().__init__()
        self.num_buffers = num_buffers

    def construct(self, x, flat_index, capacity):
        """x [T, H] fp32, flat_index [T*K] int32, capacity: python int C -> buffer [B, C, H] fp32."""
        return reference_permute(x, flat_index, self.num_buffers, capacity)


class ReferenceUnpermute(nn.Cell):
    """`reference_unpermute` as a cell."""

    def construct(self, buffer, flat_index, weight):
        """buffer [B, C, H], flat_index [T*K] int32, weight [T, K] fp32 -> y [T, H] fp32."""
        return reference_unpermute(buffer, flat_index, weight)


def _unpermute_ops(backend):
    """(MoeUnpermute, MoeUnpermuteGrad) Custom ops; the forward's bprop calls the grad kernel."""
    def grad_shape(buffer, flat_index, weight, d_y):
        return buffer, weight

    def grad_dtype(buffer, flat_index, weight, d_y):
        return buffer, weight

    grad = aot_op("MoeUnpermuteGrad", backend,
                  (("buffer", "f32"), ("flat_index", "i32"), ("weight", "f32"), ("d_y", "f32")),
                  (("d_buffer", "f32"), ("d_weight", "f32")), grad_shape, grad_dtype)

    def shape(buffer, flat_index, weight):
        return [weight[0], buffer[2]]

    def dtype(buffer, flat_index, weight):
        return buffer

    def bprop(buffer, flat_index, weight, out, dout):
        d_buffer, d_weight = grad(buffer, flat_index, weight, dout)
        return d_buffer, ops.zeros_like(flat_index), d_weight

    forward = aot_op("MoeUnpermute", backend, (("buffer", "f32"), ("flat_index", "i32"), ("weight", "f32")),
                     (("y", "f32"),), shape, dtype, bprop)
    return forward, grad


class CustomUnpermute(nn.Cell):
    """moe_unpermute by the `cpu` or `ascend` kernels (same call as `ReferenceUnpermute`)."""

    def __init__(self, backend):
        super().__init__()
        self.unpermute, self.unpermute_grad = _unpermute_ops(backend)

    def construct(self, buffer, flat_index, weight):
        """As `ReferenceUnpermute.construct` (fp32 out); the kernel is f32, so other dtypes are cast there."""
        return self.unpermute(buffer.astype(ms.float32), flat_index, weight.astype(ms.float32))


class CustomPermute(nn.Cell):
    """moe_permute by the `cpu` or `ascend` kernels (same call as `ReferencePermute`).

    C fixes the output shape but AOT kernels take no attributes on CPU, so it travels as the length
    of an int8 carrier tensor [C]; the backward is moe_unpermute with unit weights.
    """

    def __init__(self, num_buffers, backend):
        super().__init__()
        self.num_buffers = num_buffers
        # Held as attributes so graph mode sees every primitive the bprops call (and tests can list them).
        unpermute, self.unpermute_grad = _unpermute_ops(backend)
        self.unpermute = unpermute

        def shape(x, flat_index, carrier):
            return [num_buffers, carrier[0], x[1]]

        def dtype(x, flat_index, carrier):
            return x

        def bprop(x, flat_index, carrier, out, dout):
            units = ops.ones((x.shape[0], flat_index.shape[0] // x.shape[0]), ms.float32)  # (T, K)
            return unpermute(dout, flat_index, units), ops.zeros_like(flat_index), ops.zeros_like(carrier)

        self.permute = aot_op("MoePermute", backend, (("x", "f32"), ("flat_index", "i32"), ("capacity", "i8")),
                              (("buffer", "f32"),), shape, dtype, bprop, attrs={"num_buffers": num_buffers})

    def construct(self, x, flat_index, capacity):
        """As `ReferencePermute.construct`; the kernel is f32, so other dtypes are cast there and back."""
        return self.permute(x.astype(ms.float32), flat_index, ops.zeros((capacity,), ms.int8)).astype(x.dtype)
