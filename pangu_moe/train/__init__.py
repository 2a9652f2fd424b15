"""Training: optimizer, schedule, checkpoints, metrics and the trainer loop."""
