"""The compiled train and eval steps (one `ms.jit` graph each in graph mode)."""
import mindspore as ms
from mindspore import ops

from pangu_moe.train.optim import clip_by_global_norm


def make_train_step(model, optimizer, capacity, grad_clip, graph, baseline_decay=0.9):
    """Forward, backward, clip and update in one step.

    With a REINFORCE router (`model.reinforce`) the loss gains the surrogate
    mean_t(sg(l_t - b) * score_t) - sg(itself): value 0, gradient the REINFORCE term, with l_t the token's
    LM loss and b = `model.reinforce_baseline`, then updated to its EMA with the batch's mean LM loss
    (`baseline_decay`), so b never depends on the current batch.

    Returns step(input_ids [B,S] int32, labels [B,S] int32, domain_ids [B,S] int32, lr fp32 scalar) ->
    (loss, lm_loss) fp32 scalars, router losses [3] fp32 (`routing.base.LOSS_NAMES`), grad_norm fp32,
    tokens_per_expert [L,W,E] int32, kept_per_expert [L,W,E] int32.
    """

    def forward(input_ids, labels, domain_ids):
        logits, losses, demand, kept, score = model(input_ids, domain_ids, capacity, True)
        vocab = logits.shape[-1]
        token_loss = ops.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), reduction="none")  # (B*S,)
        lm_loss = token_loss.mean()
        loss = lm_loss + losses.sum()
        if model.reinforce:
            advantage = ops.stop_gradient(token_loss - model.reinforce_baseline)
            surrogate = (advantage * score.reshape(-1)).mean()
            loss = loss + surrogate - ops.stop_gradient(surrogate)
        return loss, (lm_loss, losses, demand, kept)

    grad_fn = ms.value_and_grad(forward, None, optimizer.parameters, has_aux=True)

    def train_step(input_ids, labels, domain_ids, lr):
        (loss, (lm_loss, losses, demand, kept)), grads = grad_fn(input_ids, labels, domain_ids)
        grads, grad_norm = clip_by_global_norm(grads, grad_clip)
        optimizer(grads, lr)
        if model.reinforce:
            ops.assign(model.reinforce_baseline,
                       baseline_decay * model.reinforce_baseline + (1.0 - baseline_decay) * lm_loss)
        return loss, lm_loss, losses, grad_norm, demand, kept

    return ms.jit(train_step) if graph else train_step


def make_eval_step(model, capacity, graph):
    """Returns step(input_ids, labels, domain_ids [B,S] int32) -> summed cross-entropy per sequence [B] fp32."""

    def eval_step(input_ids, labels, domain_ids):
        logits = model(input_ids, domain_ids, capacity, False)[0]
        b, s, vocab = logits.shape
        losses = ops.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), reduction="none")  # (B*S,)
        return losses.reshape(b, s).sum(1)

    return ms.jit(eval_step) if graph else eval_step
