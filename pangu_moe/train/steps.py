"""The compiled train and eval steps (one `ms.jit` graph each in graph mode)."""
import mindspore as ms
from mindspore import ops

from pangu_moe.train.optim import clip_by_global_norm


def make_train_step(model, optimizer, capacity, grad_clip, graph):
    """Forward, backward, clip and update in one step.

    Returns step(input_ids [B,S] int32, labels [B,S] int32, domain_ids [B,S] int32, lr fp32 scalar) ->
    (loss, lm_loss) fp32 scalars, router losses [3] fp32 (`routing.base.LOSS_NAMES`), grad_norm fp32,
    tokens_per_expert [L,E] int32, kept_per_expert [L,E] int32.
    """

    def forward(input_ids, labels, domain_ids):
        logits, losses, demand, kept = model(input_ids, domain_ids, capacity, True)
        vocab = logits.shape[-1]
        lm_loss = ops.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1))  # (B*S, V)
        return lm_loss + losses.sum(), (lm_loss, losses, demand, kept)

    grad_fn = ms.value_and_grad(forward, None, optimizer.parameters, has_aux=True)

    def train_step(input_ids, labels, domain_ids, lr):
        (loss, (lm_loss, losses, demand, kept)), grads = grad_fn(input_ids, labels, domain_ids)
        grads, grad_norm = clip_by_global_norm(grads, grad_clip)
        optimizer(grads, lr)
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
