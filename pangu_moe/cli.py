"""`pangu-moe`: train, eval, config and bench commands. User errors exit 2 with one line, no traceback."""
import argparse
import json
import os
import sys

from pangu_moe.config import ConfigError, RunConfig, describe


def _add_config_args(p, required=True):
    p.add_argument("--config", required=required, help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable, e.g. --set train.steps=50")


def _train(args):
    from pangu_moe.train.trainer import Trainer
    cfg = RunConfig.from_yaml(args.config, args.overrides)
    run_dir = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    summary = Trainer(cfg, run_dir).train(resume=args.resume)
    print(f"summary: {os.path.join(run_dir, 'summary.json')}")
    return summary


def _eval(args):
    from pangu_moe.train import checkpoint
    from pangu_moe.train.trainer import STATE_KEYS, Trainer
    config = args.config or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.checkpoint))),
                                         "config.yaml")
    cfg = RunConfig.from_yaml(config, args.overrides)
    trainer = Trainer(cfg, os.path.dirname(os.path.dirname(os.path.abspath(args.checkpoint))))
    state = checkpoint.load(args.checkpoint, [trainer.model, trainer.optimizer], STATE_KEYS)
    val_loss, val_bpb = trainer.evaluate()
    from pangu_moe.data.pipeline import unigram_bpb
    result = {"checkpoint": args.checkpoint, "step": state["step"], "val_loss": val_loss, "val_bpb": val_bpb,
              "unigram_bpb": unigram_bpb(trainer.domains)}
    print(json.dumps(result))


def _config(args):
    cfg = RunConfig.from_yaml(args.show, args.overrides)
    if args.help_fields:
        for path, default, text in describe():
            print(f"{path:32s} {default!r:>14}  {text}")
        return
    print(cfg.to_yaml(), end="")


def _bench(args):
    from pangu_moe.bench import moe_layer
    result = moe_layer.run(repeats=args.repeats)
    print(json.dumps(result) if args.json else moe_layer.table(result))


def build_parser():
    parser = argparse.ArgumentParser(prog="pangu-moe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a model; writes RUN_DIR/{config.yaml,metrics.jsonl,checkpoints/,summary.json}")
    _add_config_args(p)
    p.add_argument("--out", help="run directory (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run directory")
    p.set_defaults(func=_train)
    p = sub.add_parser("eval", help="validation loss and bits per byte of a checkpoint")
    p.add_argument("--checkpoint", required=True, help="a .ckpt written by train")
    _add_config_args(p, required=False)
    p.set_defaults(func=_eval)
    p = sub.add_parser("config", help="print the resolved config (defaults filled in, overrides applied)")
    p.add_argument("--show", required=True, metavar="FILE", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--fields", dest="help_fields", action="store_true", help="list every field with its help")
    p.set_defaults(func=_config)
    p = sub.add_parser("bench", help="benchmarks that print figures")
    p.add_argument("name", choices=["moe-layer"], help="moe-layer: MoE layer vs dense FFN, forward+backward")
    p.add_argument("--repeats", type=int, default=10, help="timed iterations (after warmup)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_bench)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from pangu_moe.data.corpus import DataError
    from pangu_moe.train.checkpoint import CheckpointError
    try:
        args.func(args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"pangu-moe {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
