"""AdamW with PanGu-Σ's hybrid epsilon: a much smaller epsilon for the sparse (expert) parameters,
whose gradients are small because each expert sees only a fraction of the tokens."""
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from pangu_moe.model.pangu import is_expert_parameter
from pangu_moe.precision import LossScaler


class HybridEpsAdamW(nn.Cell):
    """Decoupled-weight-decay Adam with a per-parameter epsilon.

    Weight decay applies to matrices (ndim >= 2) only, not to norm gains and biases.

    Args:
        params: trainable Parameters.
        beta1, beta2: Adam betas; eps: epsilon of dense parameters; expert_eps: epsilon of expert
        parameters; weight_decay: decoupled decay coefficient.
        loss_scaler: a `precision.LossScaler` (default: the static scale 1 of fp32 and bf16).
    State (saved with checkpoints): `adam_m.*`, `adam_v.*` moments, `optimizer_step` and the loss scaler's.
    """

    def __init__(self, params, beta1, beta2, eps, expert_eps, weight_decay, loss_scaler=None, fused=False):
        super().__init__()
        self.fused = fused
        self.adam_weight_decay = ops.AdamWeightDecay() if fused else None
        # Held here so every checkpoint of a model carries the scale, whatever the precision that wrote it.
        self.loss_scaler = loss_scaler or LossScaler(False)
        self.parameters = ParameterTuple(params)
        self.moments1 = self.parameters.clone(prefix="adam_m", init="zeros")
        self.moments2 = self.parameters.clone(prefix="adam_v", init="zeros")
        self.step = Parameter(Tensor(0, ms.int32), name="optimizer_step", requires_grad=False)
        self.beta1, self.beta2 = beta1, beta2
        self.eps = tuple(expert_eps if is_expert_parameter(p.name) else eps for p in params)
        self.decay = tuple(weight_decay if p.ndim >= 2 else 0.0 for p in params)

    def construct(self, grads, lr, apply):
        """Apply one update, or with `apply` False leave every parameter, moment and the step count exactly as
        they are (a skipped step: non-finite loss or gradients, whose values never reach the state).

        grads: tuple matching `parameters`; lr: fp32 scalar Tensor; apply: bool scalar Tensor.
        """
        step = self.step + 1
        ops.assign(self.step, ops.where(apply, step, self.step))
        t = step.astype(ms.float32)
        correction1 = 1.0 - ops.pow(Tensor(self.beta1, ms.float32), t)
        correction2 = 1.0 - ops.pow(Tensor(self.beta2, ms.float32), t)
        if self.fused:
            return self._fused(grads, lr, apply, correction1, correction2, step)
        for i in range(len(self.parameters)):
            param, m, v, g = self.parameters[i], self.moments1[i], self.moments2[i], grads[i]
            m_new = self.beta1 * m + (1.0 - self.beta1) * g
            v_new = self.beta2 * v + (1.0 - self.beta2) * g * g
            update = (m_new / correction1) / (ops.sqrt(v_new / correction2) + self.eps[i])
            ops.assign(m, ops.where(apply, m_new, m))
            ops.assign(v, ops.where(apply, v_new, v))
            ops.assign(param, ops.where(apply, param * (1.0 - lr * self.decay[i]) - lr * update, param))
        return step

    def _fused(self, grads, lr, apply, correction1, correction2, step):
        """The same update through MindSpore's fused `AdamWeightDecay` kernel, one call a parameter.

        That kernel has no bias correction: it does m, v = EMA(g, g^2); p -= lr' (m / (sqrt(v) + eps') + wd' p).
        With lr' = lr sqrt(c2) / c1, eps' = eps sqrt(c2) and wd' = wd c1 / sqrt(c2) this is Adam's corrected
        update (m / c1) / (sqrt(v / c2) + eps) and the decoupled decay lr wd p, up to rounding. A skipped step
        passes betas of 1, a zero gradient and lr' = 0, which leave p, m and v exactly as they were.
        """
        root2 = ops.sqrt(correction2)
        zero, one = Tensor(0.0, ms.float32), Tensor(1.0, ms.float32)
        lr_step = ops.where(apply, lr * root2 / correction1, zero)
        beta1 = ops.where(apply, Tensor(self.beta1, ms.float32), one)
        beta2 = ops.where(apply, Tensor(self.beta2, ms.float32), one)
        for i in range(len(self.parameters)):
            g = ops.where(apply, grads[i], ops.zeros_like(grads[i]))
            self.adam_weight_decay(self.parameters[i], self.moments1[i], self.moments2[i], lr_step, beta1, beta2,
                                   self.eps[i] * root2, self.decay[i] * correction1 / root2, g)
        return step


def square_sum(grads):
    """Sum of squares of all grads: fp32 scalar."""
    total = ops.zeros((), ms.float32)
    for g in grads:
        total = total + (g * g).sum()
    return total


def clip_by_global_norm(grads, max_norm, squares=None):
    """Scale grads so their global L2 norm is at most max_norm (0 = no clipping).

    `squares`: the global sum of squares, when grads are sharded over processes
    (`data_parallel.DataParallel.square_sum`); by default `square_sum(grads)`.
    Returns: (clipped grads tuple, global norm fp32 scalar before clipping).
    """
    norm = ops.sqrt(square_sum(grads) if squares is None else squares)
    if max_norm <= 0:
        return grads, norm
    scale = ops.minimum(Tensor(1.0, ms.float32), max_norm / (norm + 1e-6))
    return tuple(g * scale for g in grads), norm
