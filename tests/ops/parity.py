"""Run an op's forward and gradient in PyNative or graph mode, for the reference-vs-custom parity tests."""
import mindspore as ms
import numpy as np
from mindspore import nn

MODES = ("pynative", "graph")


class WeightedLoss(nn.Cell):
    """loss = sum_i <outputs[i], weights[i]> over the float outputs `float_outputs`; returns (loss, *outputs).

    `call` builds the op's inputs from the differentiable input and the fixed ones.
    """

    def __init__(self, op, extra, float_outputs):
        super().__init__()
        self.op, self.extra, self.float_outputs = op, extra, float_outputs

    def construct(self, x, other, weights):
        outputs = self.op(x, other, *self.extra)
        loss = 0.0
        for i, w in zip(self.float_outputs, weights):
            loss = loss + (outputs[i] * w).sum()
        return (loss,) + tuple(outputs)


def run(op, x, other, extra, float_outputs, weights, mode, grad_position=0):
    """Forward outputs (numpy) and the gradient(s) at `grad_position` (0: x, 1: other, tuple: both)."""
    fn = ms.value_and_grad(WeightedLoss(op, extra, float_outputs), grad_position=grad_position, has_aux=True)
    if mode == "graph":
        plain = fn

        def fn(a, b, w):
            return plain(a, b, w)
        fn = ms.jit(fn)
    (_, *outputs), grads = fn(x, other, weights)
    grads = grads if isinstance(grads, tuple) else (grads,)
    return [o.asnumpy() for o in outputs], [g.asnumpy() for g in grads]


def assert_close(actual, expected, what):
    """Floats within 1e-6 (absolute, or relative for values above 1)."""
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6, err_msg=what)
