"""A model and optimizer rebuilt from a checkpoint in one process, for commands that use a trained model
(generate, ckpt extract-domain) rather than continue training it."""

from pangu_moe import runtime
from pangu_moe.config import RunConfig
from pangu_moe.model.pangu import build_model
from pangu_moe.train import checkpoint
from pangu_moe.train.optim import HybridEpsAdamW

STATE_KEYS = ("step", "choices_total", "kept_total", "train_seconds", "train_tokens", "routed_local",
              "routed_intra", "routed_inter", "capacity_sum", "skipped_steps", "consecutive_skips")


def run_config(checkpoint_path, overrides=()):
    """The RunConfig of the run a checkpoint belongs to (`checkpoint.run_dir_of`), with every expert in
    one process (`parallel.dispatch=local`, whose exchange is flat: the hierarchical one gives the same
    result) and `overrides` applied."""
    config_path = checkpoint.config_of(checkpoint.resolve(checkpoint_path))
    return RunConfig.from_yaml(config_path, ["parallel.dispatch=local", "parallel.exchange=flat", *overrides])


def restore(checkpoint_path, cfg):
    """(model in evaluation mode, optimizer, trainer state dict) from a checkpoint, for `cfg` (`run_config`)."""
    runtime.setup(cfg.runtime)
    model = build_model(cfg)
    t = cfg.train
    optimizer = HybridEpsAdamW(model.trainable_params(), t.beta1, t.beta2, t.eps, t.expert_eps, t.weight_decay)
    state = checkpoint.load(checkpoint_path, [model, optimizer], STATE_KEYS)
    model.set_train(False)
    return model, optimizer, state
