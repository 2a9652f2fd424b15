"""Learning-rate schedule: linear warmup, then cosine decay to min_lr. Pure Python."""
import math


def learning_rate(step, lr, min_lr, warmup_steps, total_steps):
    """LR for optimizer step `step` (0-based).

    Warmup: lr * (step + 1) / warmup_steps for step < warmup_steps; then cosine from lr at the end of
    warmup down to min_lr at step total_steps - 1.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
