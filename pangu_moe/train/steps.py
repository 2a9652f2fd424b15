"""The compiled train and eval steps (one `ms.jit` graph each in graph mode)."""
import mindspore as ms
from mindspore import ops

from pangu_moe.train.optim import clip_by_global_norm, square_sum


def make_gradient(model, params, capacity, data_parallel=None, loss_scaler=None):
    """Loss and gradients of one batch, without the update.

    With a dynamic `loss_scaler` (`precision.LossScaler`, fp16) the backward runs on the loss times its
    scale and the gradients are divided by it again (exactly: the scale is a power of 2).

    With `data_parallel` (a `data_parallel.DataParallel`; one rank per process) the inputs are this
    rank's rows, gradients are reduced to those of the mean loss over ranks, the returned losses are
    means over ranks and the counts cover all W ranks.

    The loss is the LM loss, the routers' weighted losses, and the routers' own objective terms
    (`PanguModel.router_objective`, e.g. a REINFORCE surrogate) where a router has one.

    Returns gradient(input_ids, labels, domain_ids [B,S] int32) -> (loss, lm_loss fp32 scalars, router losses
    [3] fp32 (`routing.base.LOSS_NAMES`), tokens_per_expert [L,W,E] int32, kept_per_expert [L,W,E] int32,
    grads (tuple in `params` order), global sum of squares of the grads fp32, inter_rows [L,W] int32 (the rows
    each rank's dispatch sent to other nodes, `model.moe_layer.MoELayer.apply`)).
    """
    scaled = loss_scaler is not None and loss_scaler.dynamic

    def forward(input_ids, labels, domain_ids):
        logits, losses, demand, kept, policy_terms, inter_rows = model(input_ids, domain_ids, capacity, True)
        vocab = logits.shape[-1]
        token_loss = ops.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), reduction="none")  # (B*S,)
        lm_loss = token_loss.mean()
        loss = lm_loss + losses.sum()
        objective = model.router_objective(token_loss, policy_terms)
        if objective is not None:
            loss = loss + objective
        if scaled:
            return loss * loss_scaler.scale, (loss, lm_loss, losses, demand, kept, inter_rows)
        return loss, (loss, lm_loss, losses, demand, kept, inter_rows)

    grad_fn = ms.value_and_grad(forward, None, params, has_aux=True)

    def gradient(input_ids, labels, domain_ids):
        (_, (loss, lm_loss, losses, demand, kept, inter_rows)), grads = grad_fn(input_ids, labels, domain_ids)
        if scaled:
            unscale = 1.0 / loss_scaler.scale
            grads = tuple(g * unscale for g in grads)
        if data_parallel is None:
            return loss, lm_loss, losses, demand, kept, grads, square_sum(grads), inter_rows
        grads = data_parallel.grads(grads)
        layers = inter_rows.shape[0]
        return (data_parallel.mean(loss), data_parallel.mean(lm_loss), data_parallel.mean(losses),
                data_parallel.gather_ranks(demand), data_parallel.gather_ranks(kept), grads,
                data_parallel.square_sum(grads),
                data_parallel.gather_ranks(inter_rows.reshape(layers, 1, 1)).reshape(layers, -1))  # (L, W)

    return gradient


def make_train_step(model, optimizer, capacity, grad_clip, graph, data_parallel=None, must_fit=False):
    """Forward, backward (`make_gradient`), clip and update in one step, then the routers' in-graph state
    (`PanguModel.update_router_state`, e.g. a REINFORCE baseline). A step whose loss or gradient norm is
    not finite changes nothing (the optimizer's `apply` flag); the trainer counts and limits those.

    With `must_fit` the step also changes nothing when some (rank, expert) asked for more than `capacity`
    slots: a dropless run sized its buffers by the demand it expected, and reruns the batch with buffers
    that hold the demand the step returned (`Trainer.run_step`).

    The optimizer's loss scaler (`precision.LossScaler`) scales the backward and is updated after it: a
    step whose gradients overflowed applies nothing and backs the scale off.

    Returns step(input_ids [B,S] int32, labels [B,S] int32, domain_ids [B,S] int32, lr fp32 scalar) ->
    (loss, lm_loss) fp32 scalars, router losses [3] fp32 (`routing.base.LOSS_NAMES`), grad_norm fp32,
    tokens_per_expert [L,W,E] int32, kept_per_expert [L,W,E] int32, loss scale fp32 (after the update), inter_rows
    [L,W] int32 (`make_gradient`).
    """
    scaler = optimizer.loss_scaler
    gradient = make_gradient(model, optimizer.parameters, capacity, data_parallel, scaler)

    def train_step(input_ids, labels, domain_ids, lr):
        loss, lm_loss, losses, demand, kept, grads, squares, inter_rows = gradient(input_ids, labels, domain_ids)
        grads, grad_norm = clip_by_global_norm(grads, grad_clip, squares)
        applied = ops.logical_and(ops.isfinite(loss), ops.isfinite(grad_norm))
        if must_fit:
            applied = ops.logical_and(applied, (demand <= capacity).all())
        optimizer(grads, lr, applied)
        model.update_router_state(lm_loss, applied)
        scale = scaler(ops.isfinite(grad_norm), applied)
        return loss, lm_loss, losses, grad_norm, demand, kept, scale, inter_rows

    return ms.jit(train_step) if graph else train_step


def make_eval_step(model, capacity, graph, data_parallel=None):
    """Returns step(input_ids, labels, domain_ids [B,S] int32) -> summed cross-entropy per sequence [B] fp32.

    With `data_parallel` the inputs are this rank's rows and the result covers all ranks' rows.
    """

    def eval_step(input_ids, labels, domain_ids):
        logits = model(input_ids, domain_ids, capacity, False)[0]
        b, s, vocab = logits.shape
        losses = ops.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), reduction="none")  # (B*S,)
        sums = losses.reshape(b, s).sum(1)
        return sums if data_parallel is None else data_parallel.gather_rows(sums)

    return ms.jit(eval_step) if graph else eval_step
