"""Mixed precision: the compute dtype of `train.precision` and fp16's dynamic loss scale.

Selective precision (docs/architecture.md, Precision): weights stay fp32 and are cast to the compute
dtype where a matmul uses them, so gradients, the optimizer and checkpoints are fp32 (master weights
without a second copy). The residual stream, layer norms, routers and every loss stay fp32.
"""
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

COMPUTE_DTYPES = {"fp32": ms.float32, "fp16": ms.float16, "bf16": ms.bfloat16}
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}  # per exchanged activation value
MAX_LOSS_SCALE = 2.0 ** 24  # growth stops here: a larger scale only overflows more often


def kl_dtype():
    """The dtype of the locality loss's log-and-sum over [W, E] (`routing.losses.locality_loss`): float64 on
    CPU, float32 on Ascend, whose AI Core has no float64. It is the only float64 a training step holds, and only
    on CPU. In float32, a resumed LocMoE run's locality loss differed from the uninterrupted run's in the last
    digits (measured: up to 3e-6 relative over 12 steps of a tiny run, and through it two gradient norms and an
    aux loss in their last bit), and MindSpore's CPU float32 `log` is not a pure function of its input: the
    same value rounds differently in the kernel's vector body and in its scalar tail. Read from the MindSpore
    context that `runtime.setup` set, so call it when building cells, not inside a compiled step."""
    return ms.float64 if ms.get_context("device_target") == "CPU" else ms.float32


def compute_form(precision, device):
    """`train.precision` ("fp32" | "fp16" | "bf16") and `runtime.device` ("CPU" | "Ascend") -> (dtype,
    bf16_operands): the dtype of matmuls, dispatch buffers and the exchange, and whether each matmul's operands
    are first rounded to bf16.

    bf16 on CPU, whose MindSpore has no bf16 matmul, is held in fp32 with every matmul operand (and the dispatch
    buffers) rounded to bf16: the Ascend cube's operand rounding with fp32 accumulation, but fp32 outputs where
    the cube rounds them to bf16 too. It reproduces bf16's rounding of what is multiplied, for measuring its
    effect on training; it is no faster and no smaller than fp32.
    """
    if precision == "bf16" and device == "CPU":
        return ms.float32, True
    return COMPUTE_DTYPES[precision], False


def operand(x, dtype, bf16_operands):
    """x cast to the compute dtype for a matmul; rounded to bf16 too under the CPU bf16 form (`compute_form`)."""
    x = x.astype(dtype)
    return x.astype(ms.bfloat16).astype(dtype) if bf16_operands else x


class LossScaler(nn.Cell):
    """Dynamic loss scale for fp16 (a static 1 otherwise): the loss is multiplied by `scale` before the
    backward and the gradients divided by it after, so small fp16 gradients do not flush to zero.

    After a step with non-finite gradients the scale is multiplied by `backoff` (floored at 1); after `window`
    applied steps in a row without one it doubles (up to `MAX_LOSS_SCALE`). The scale stays a power of 2, so
    scaling and unscaling are exact. The state is two Parameters saved with the optimizer's checkpoint, so a resumed run goes on
    with the same scale.

    Args:
        dynamic: python bool (True for fp16); init: initial scale; window: growth interval in steps;
        backoff: factor in (0, 1) after an overflow.
    """

    def __init__(self, dynamic, init=65536.0, window=1000, backoff=0.5):
        super().__init__()
        self.dynamic = dynamic
        self.scale = Parameter(Tensor(init if dynamic else 1.0, ms.float32), name="loss_scale", requires_grad=False)
        self.good_steps = Parameter(Tensor(0, ms.int32), name="loss_scale_good_steps", requires_grad=False)
        self.window, self.backoff = window, backoff

    def construct(self, finite, applied):
        """Update after a step (inside the compiled step). finite: bool scalar, the gradients were finite;
        applied: bool scalar, the step changed the weights. Returns the new scale fp32 scalar."""
        if not self.dynamic:
            return self.scale
        good = ops.where(applied, self.good_steps + 1, self.good_steps)
        grow = good >= self.window
        scale = ops.where(finite, ops.where(grow, ops.minimum(self.scale * 2.0, MAX_LOSS_SCALE), self.scale),
                          ops.maximum(self.scale * self.backoff, 1.0))
        ops.assign(self.good_steps, ops.where(ops.logical_or(grow, ops.logical_not(finite)), 0, good))
        ops.assign(self.scale, scale)
        return scale
