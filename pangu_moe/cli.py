"""`pangu-moe`: train, evaluate and sample PanGu-Σ-style MoE models; prepare data; convert checkpoints; benchmarks,
studies, reports and plans. User errors exit 2 with one line, no traceback."""
import argparse
import json
import os
import sys
import time

from pangu_moe.config import ConfigError, RunConfig, describe, fields_markdown, one_line


def _add_config_args(p, required=True):
    p.add_argument("--config", required=required, help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable, e.g. --set train.steps=50")


def _train(args):
    from pangu_moe.checks import check
    from pangu_moe.train.trainer import Trainer, check_run_dir
    cfg = check(RunConfig.from_yaml(args.config, args.overrides))
    run_dir = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    check_run_dir(cfg, run_dir, args.resume)  # fail before the corpus and model are built
    trainer = Trainer(cfg, run_dir, log=_stderr)  # progress on stderr; stdout keeps the summary path
    trainer.train(resume=args.resume)
    if trainer.rank == 0:
        print(f"summary: {os.path.join(run_dir, 'summary.json')}")


def _stderr(line):
    print(line, file=sys.stderr)


def _eval(args):
    from pangu_moe.train import checkpoint
    from pangu_moe.data.source import check_tokenizer
    from pangu_moe.train.trainer import Trainer
    args.checkpoint = checkpoint.resolve(args.checkpoint, _stderr)
    run_dir = checkpoint.run_dir_of(args.checkpoint)
    cfg = RunConfig.from_yaml(args.config or checkpoint.config_of(args.checkpoint), args.overrides)
    trainer = Trainer(cfg, run_dir)
    check_tokenizer(run_dir, trainer.data.tokenizer, "eval")
    state = trainer.load_checkpoint(args.checkpoint)
    from pangu_moe.progress import Progress
    val = trainer.evaluator.evaluate(progress=Progress("eval", "batches").update)
    result = {"checkpoint": args.checkpoint, "step": state["step"], **val}
    if trainer.rank == 0:
        print(json.dumps(result))


def _config(args):
    if args.markdown and not args.fields:
        raise ConfigError("config: --markdown goes with --fields")
    if args.fields:
        print(fields_markdown() if args.markdown else
              "\n".join(f"{path:32s} {default!r:>14}  {text}" for path, default, text in describe()))
        return
    if not args.show:
        raise ConfigError("config: pass --show FILE or --fields")
    from pangu_moe.checks import check
    print(check(RunConfig.from_yaml(args.show, args.overrides)).to_yaml(), end="")


def _bench_moe_layer(repeats, steps):
    from pangu_moe.bench import moe_layer
    from pangu_moe.progress import Progress
    result = moe_layer.run(repeats=repeats, progress=Progress("bench moe-layer", "runs").update)
    return result, moe_layer.table(result)


def _bench_dispatch(repeats, steps):
    from pangu_moe.bench import dispatch_style
    from pangu_moe.progress import Progress
    result = dispatch_style.run(repeats=repeats, progress=Progress("bench dispatch", "runs").update)
    return result, (f"one-hot / index-gather dispatch+combine, forward+backward: {result['onehot_over_gather']:.2f} "
                    f"({result['onehot_seconds'] * 1e3:.1f} / {result['gather_seconds'] * 1e3:.1f} ms, same result: "
                    f"{result['same_result']})")


def _bench_with_log(module_name):
    """A benchmark whose `run(repeats, log)` reports progress lines and whose `table(result)` renders it."""
    def bench(repeats, steps):
        import importlib
        module = importlib.import_module(f"pangu_moe.bench.{module_name}")
        result = module.run(repeats=repeats, log=_stderr)
        return result, module.table(result)
    return bench


def _bench_precision(repeats, steps):
    from pangu_moe.bench import precision
    result = precision.run(steps=steps, log=_stderr)
    return result, precision.table(result)


def _bench_data(repeats, steps):
    from pangu_moe.bench import data
    result = data.run(log=_stderr)
    return result, data.table(result)


def _bench_train_step(repeats, steps):
    from pangu_moe.bench import train_step
    result = train_step.run(steps=steps or 30, repeats=repeats, log=_stderr)
    return result, train_step.table(result)


BENCHES = {"moe-layer": _bench_moe_layer, "dispatch": _bench_dispatch, "ep": _bench_with_log("ep"),
           "kernels": _bench_with_log("kernels"), "precision": _bench_precision, "data": _bench_data,
           "train-step": _bench_train_step, "all": _bench_with_log("all")}
STEPS_BENCHES = ("precision", "train-step")  # the benchmarks that train and take --steps


def _bench(args):
    if args.repeats < 1:
        raise ConfigError(f"--repeats = {args.repeats}: must be >= 1")
    if args.steps is not None and (args.name not in STEPS_BENCHES or args.steps < 2):
        raise ConfigError(f"--steps = {args.steps}: only for bench {' and '.join(STEPS_BENCHES)}, and must be >= 2 "
                          f"(the first step compiles)")
    result, text = BENCHES[args.name](args.repeats, args.steps)
    print(json.dumps(result) if args.json else text)


def _study(args):
    from pangu_moe.studies import routers as study_routers
    from pangu_moe.studies import presets
    if args.name in presets.PRESETS:
        from pangu_moe.configs import DEMO_CONFIG
        out = args.out or os.path.join("runs", f"study_{args.name}")
        result = presets.run(args.name, args.config or DEMO_CONFIG, out,
                             presets.SEEDS if args.seeds is None else args.seeds, args.steps,
                             args.overrides, log=_stderr,
                             first_seed=presets.SEED if args.first_seed is None else args.first_seed)
        print(json.dumps(result) if args.json else presets.table(result))
        return
    if args.first_seed is not None:
        raise ConfigError(f"--first-seed: only for the claim studies ({', '.join(presets.PRESETS)}), not {args.name}")
    steps = args.steps if args.steps is not None else {"routers": 200, "kool": 3000}[args.name]
    if steps < 1:
        raise ConfigError(f"--steps = {steps}: must be >= 1")
    seeds = args.seeds if args.seeds is not None else {"routers": study_routers.SEEDS, "kool": 100}[args.name]
    if seeds < 1:
        raise ConfigError(f"--seeds = {seeds}: must be >= 1")
    if args.name == "kool":
        from pangu_moe.studies import kool as study_kool
        results = study_kool.run(seeds, steps, log=_stderr)
        print(json.dumps(results) if args.json else study_kool.table(results))
        return
    from pangu_moe.configs import DEMO_CONFIG
    config = args.config or DEMO_CONFIG
    if args.budget is not None:
        steps = study_routers.steps_for_budget(config, args.budget, seeds, args.overrides, args.arms)
    results = study_routers.run(config, steps, args.out or os.path.join("runs", "study_routers"), seeds,
                                args.overrides, arms=args.arms)
    print(json.dumps(results) if args.json else study_routers.table(results))


def _capacity(args):
    from pangu_moe.analysis import capacity as capacity_bound
    if args.run:
        if args.delta or args.d is not None or args.n is not None:
            raise ConfigError("pass either --run RUN_DIR or --d, --n and --delta, not both")
        hidden, experts, deltas = capacity_bound.from_run(args.run)
    else:
        if args.d is None or args.n is None or not args.delta:
            raise ConfigError("pass --d D --n N --delta X [X ...], or --run RUN_DIR")
        hidden, experts, deltas = args.d, args.n, args.delta
    rows = capacity_bound.bounds(deltas, hidden, experts)
    if args.json:
        print(json.dumps({"d": hidden, "n": experts, "rows": rows}))
    else:
        print(capacity_bound.table(rows, hidden, experts, layers=bool(args.run)))


def _prepare_data(args):
    from pangu_moe.data import prepare
    if args.seq_len < 1 or args.shard_records < 1:
        raise ConfigError(f"--seq-len = {args.seq_len}, --shard-records = {args.shard_records}: both must be >= 1")
    manifest = prepare.prepare(args.input, args.out, args.domains.split(","), args.seq_len, args.format,
                               args.tokenizer, args.text_field, args.domain_field, args.val_fraction, args.bad_utf8,
                               args.shard_records, log=lambda line: print(line, file=sys.stderr, flush=True),
                               bpe_sample_mb=args.bpe_sample_mb, seed=args.seed, workers=args.workers)
    print(json.dumps({"out": args.out, "tokenizer": manifest["tokenizer"], "counts": manifest["counts"],
                      "skipped": manifest["skipped"], "shards": len(manifest["shards"])}))


def _generate(args):
    from pangu_moe import generate
    from pangu_moe.progress import Progress
    from pangu_moe.train import checkpoint
    args.checkpoint = checkpoint.resolve(args.checkpoint, _stderr)
    cfg, model, tok = generate.load_model(args.checkpoint, args.overrides)
    progress = Progress("generate", "bytes")
    began = time.perf_counter()
    text, trace = generate.generate(cfg, model, tok, args.prompt, args.domain, args.max_bytes, args.temperature,
                                    args.top_k, args.seed, progress.update, not args.recompute)
    seconds = time.perf_counter() - began
    print(f"generated {len(text)} tokens in {seconds:.1f} s: {len(text) / seconds:.1f} tokens/s "
          f"({'recomputing the window' if args.recompute else 'KV cache'}, compilation included)", file=sys.stderr)
    print(args.prompt + tok.decode(text))
    if args.trace:
        from pangu_moe.report import trace as trace_text
        colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
        print()
        print(trace_text.render(trace, colour))
        path = args.trace_out or os.path.join(checkpoint.run_dir_of(args.checkpoint), "trace.json")
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(trace, fh)
        print(f"wrote {path} (pangu-moe report draws it)", file=sys.stderr)


def _ckpt(args):
    from pangu_moe.train import checkpoint, convert
    args.checkpoint = checkpoint.resolve(args.checkpoint, _stderr)
    if args.action == "reshard":
        if (args.ep is None) == (not args.consolidate):
            raise ConfigError("ckpt reshard: pass either --ep W2 (the expert shards to write) or --consolidate")
        written = convert.reshard(args.checkpoint, args.out, args.ep, args.consolidate)
    else:
        if args.domain is None:
            raise ConfigError("ckpt extract-domain: pass --domain NAME (one of the run's data.domains)")
        written = convert.extract_domain_run(args.checkpoint, args.domain, args.out)
    print(f"wrote {written} (run directory {args.out})")


def _report(args):
    from pangu_moe import report
    from pangu_moe.report.runs import load_runs
    runs = load_runs(args.runs)
    out = args.out or (os.path.join(args.runs[0], "report") if len(args.runs) == 1 else "report")
    result = report.write(runs, out, log=lambda line: print(f"pangu-moe report: {line}", file=sys.stderr))
    print(report.markdown(result["rows"]))
    for path in [result["report"], *result["figures"]]:
        print(f"wrote {path}")


def _claims(args):
    from pangu_moe.studies import claims
    studies = [os.path.join(path, "study.json") if os.path.isdir(path) else path for path in args.study]
    claim_studies = [os.path.join(path, "study.json") if os.path.isdir(path) else path for path in args.claim_study]
    inputs = [("--study", path) for path in studies] + [("--claim-study", path) for path in claim_studies]
    inputs += [("--kool", args.kool), ("--precision", args.precision), ("--tests", args.tests)]
    for name, path in inputs:
        if path and not os.path.isfile(path):
            raise ConfigError(f"{name} {path}: no such file (a study's --out folder, or the JSON its --json printed)")
    rows = claims.write(args.out, studies, args.kool, args.precision, args.tests, claim_studies)
    print(f"wrote {args.out}: {len(rows)} claims", file=sys.stderr)


def _doctor(args):
    from pangu_moe import doctor
    found = doctor.findings()
    print(json.dumps(found) if args.json else doctor.text(found))


def _plan(args):
    from pangu_moe.analysis import plan
    result = plan.run(args.runs, args.cluster, tuple(args.devices), args.tokens, args.hidden,
                      hierarchical=args.hierarchical, experts=args.experts, tensor_parallel=args.tensor_parallel)
    print(json.dumps(result) if args.json else plan.table(result))


def build_parser():
    from pangu_moe.data.corpus import BAD_UTF8
    from pangu_moe.data.encode_workers import available_cores
    from pangu_moe.data.prepare import BPE_SAMPLE_MB, INPUT_FORMATS
    from pangu_moe import __version__
    parser = argparse.ArgumentParser(prog="pangu-moe", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pangu-moe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train; writes RUN_DIR/{config.yaml,metrics.jsonl,checkpoints/,summary.json}")
    _add_config_args(p)
    p.add_argument("--out", help="run directory (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run directory")
    p.set_defaults(func=_train)
    p = sub.add_parser("prepare-data", help="tokenize a corpus into MindRecord shards of training windows for "
                       "data.source: prepared (docs/data.md)")
    p.add_argument("input", help="a JSONL file (--format jsonl) or a folder with one sub-folder of .txt files per "
                   "domain (--format folders)")
    p.add_argument("--out", required=True, help="new folder for the shards, tokenizer and manifest.json")
    p.add_argument("--domains", required=True, help="comma-separated domain names, in data.domains order")
    p.add_argument("--seq-len", type=int, required=True, help="model.seq_len of the runs that will read it")
    p.add_argument("--format", default="jsonl", choices=list(INPUT_FORMATS))
    p.add_argument("--tokenizer", default="bytes", help="bytes, bpe:<vocab size> (a byte-level BPE trained on the "
                   "corpus), or the path of a tokenizer.json (default bytes)")
    p.add_argument("--text-field", default="text", help="jsonl: the text field (default text)")
    p.add_argument("--domain-field", default="domain", help="jsonl: the domain field (default domain)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of each domain's documents held out")
    p.add_argument("--bad-utf8", default="error", choices=list(BAD_UTF8), help="bytes that are not UTF-8: "
                   "stop with the file and line, or decode them as U+FFFD and count the document")
    p.add_argument("--shard-records", type=int, default=65536, help="windows per shard file")
    p.add_argument("--bpe-sample-mb", type=float, default=BPE_SAMPLE_MB,
                   help="bpe:V trains on a sample of about this many MB of the input, each document drawn with the "
                        f"same probability (default {BPE_SAMPLE_MB}; the whole corpus when smaller), so its "
                        "memory does not grow with the corpus")
    p.add_argument("--seed", type=int, default=0, help="seed of the BPE's sample (default 0)")
    p.add_argument("--workers", type=int, default=available_cores(),
                   help="processes that tokenize (default: the cores this process may use); the output is the same "
                        "for any number")
    p.set_defaults(func=_prepare_data)
    p = sub.add_parser("eval", help="validation loss and bits per byte of a checkpoint (prints one JSON line)")
    p.add_argument("--checkpoint", required=True, help="a run directory (its newest valid checkpoint), "
                   "RUN_DIR/checkpoints/step_NNNNNN (a multi-process run's shards are joined into one model with --set "
                   "parallel.dispatch=simulated), or a consolidated .ckpt file")
    _add_config_args(p, required=False)
    p.set_defaults(func=_eval)
    p = sub.add_parser("config", help="print the resolved config (defaults filled in, overrides applied)")
    p.add_argument("--show", metavar="FILE", help="YAML config file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable")
    p.add_argument("--fields", action="store_true", help="list every field with its default and meaning")
    p.add_argument("--markdown", action="store_true", help="with --fields: the page docs/configuration.md")
    p.set_defaults(func=_config)
    p = sub.add_parser("bench", help="benchmarks that print figures")
    p.add_argument("name", choices=list(BENCHES), help="all: every benchmark "
                   "below in one run, one table of ratios; dispatch: one-hot vs index-gather dispatch; moe-layer: MoE "
                   "layer vs dense FFN, "
                   "forward+backward; ep: train-step time of simulated over local (2 nodes x 2 devices) and of msrun_cpu "
                   "(4 processes); kernels: reference vs custom gating+layout, permute, unpermute at T=4096/16384, "
                   "H=1024, E=8/64, K=1/2; precision: the demo model trained in fp32, fp16, bf16 (on CPU its "
                   "rounding form) and fp16 with a low-precision router, over 3 paired seeds; data: prepare-data "
                   "(memory, workers), the prepared reader (one epoch, 1 vs 44 files) and a 100,000-step resume on "
                   "64 and 512 MB Zipf-vocabulary corpora; train-step: the demo's training step against a float32 "
                   "matmul, cpu_utilisation (precision, data and train-step are not part of all)")
    p.add_argument("--repeats", type=int, default=10, help="timed iterations after two warmup runs")
    p.add_argument("--steps", type=int, default=None, help="bench precision: training steps (default: the demo's); "
                   "bench train-step: training steps timed (default 30)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_bench)
    p = sub.add_parser("study", help="experiments that train several models and print one row each")
    p.add_argument("name", choices=["routers", "kool", "capacity", "estimator", "locality-null", "locality",
                                    "placement"],
                   help="routers: dense, rre (hash), topk (Switch, K=1), LocMoE at four locality weights and LocMoE+ "
                   "with three keep rules on 2 nodes x 2 devices, over seeds with 95%% intervals "
                   "(pangu_moe/studies/routers.py); kool: the Kool et al. toy task, success rate over seeds per "
                   "estimator (pangu_moe/studies/kool.py); capacity, estimator, locality-null, locality, "
                   "placement: one study per claim with its arms, 5 paired seeds and its verdict rules fixed in "
                   "pangu_moe/studies/presets.py (a rerun with the same --out resumes)")
    p.add_argument("--config", default=None, help="base config (default: the package's configs/demo_cpu.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value for every router; repeatable")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (routers 200, kool 3000, "
                   "capacity 160, estimator 400, locality-null and locality 120)")
    p.add_argument("--seeds", type=int, default=None, help="seeds: routers and the claim studies 5 (each arm on "
                   "each), kool 100 (per method, regime and capacity factor)")
    p.add_argument("--first-seed", type=int, default=None, help="capacity, estimator, locality-null, "
                   "locality: seed i of every arm is run seed FIRST_SEED + i (default 1234, "
                   "pangu_moe/studies/routers.py SEED); a replication passes seeds no earlier run used")
    p.add_argument("--budget", type=float, default=None, metavar="MINUTES", help="routers: size --steps so the "
                   "study fits this wall time (a short timed probe first)")
    p.add_argument("--arms", nargs="+", default=None, help="routers: train only these arms (names in "
                   "pangu_moe/studies/routers.py ARMS)")
    p.add_argument("--out", default=None, help="OUT/<arm>/seed<i> run directories and study.json (routers also "
                   "report/); default runs/study_<name>")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_study)
    p = sub.add_parser("capacity", help="LocMoE's capacity lower bound (Theorem 1) in its exact, erfc and exp "
                       "forms, for given d, n, delta or a run's measured delta-hat per layer")
    p.add_argument("--d", type=int, help="hidden size d")
    p.add_argument("--n", type=int, help="experts a token chooses among (per group)")
    p.add_argument("--delta", type=float, nargs="+", default=[], help="cosine threshold(s) in [0, 1)")
    p.add_argument("--run", help="a run trained with moe.capacity_mode=locmoe_bound: its d, n and delta-hat per layer")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_capacity)
    p = sub.add_parser("generate", help="sample text from a trained checkpoint; --trace shows the expert and node "
                       "each byte was routed to in every MoE layer")
    p.add_argument("--checkpoint", required=True, help="a run directory (its newest valid checkpoint), "
                   "RUN_DIR/checkpoints/step_NNNNNN, or a consolidated .ckpt file")
    p.add_argument("--prompt", required=True, help="text to continue (at most model.seq_len tokens)")
    p.add_argument("--domain", default=None, help="data domain of the text, for level-1 routing (default: the first)")
    p.add_argument("--max-bytes", type=int, default=200,
                   help="generate until the text holds this many UTF-8 bytes (the last token may add a few more)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0 = all")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (same seed, same text)")
    p.add_argument("--recompute", action="store_true", help="recompute the whole context for every token instead "
                   "of decoding it from the key/value cache (same text; slower)")
    p.add_argument("--trace", action="store_true", help="print each character's expert per MoE layer, one colour "
                   "per expert, and write the trace to --trace-out")
    p.add_argument("--trace-out", default=None, help="trace file (default RUN_DIR/trace.json, which report reads)")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto", help="colour the trace (auto: "
                   "on a terminal)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a value of the run's config, e.g. --set runtime.kernels=reference")
    p.set_defaults(func=_generate)
    p = sub.add_parser("ckpt", help="convert checkpoints: reshard between expert-parallel degrees, or cut out a "
                       "domain's sub-model; both write a run directory (config.yaml + checkpoint)")
    p.add_argument("action", choices=["reshard", "extract-domain"])
    p.add_argument("checkpoint", help="a run directory (its newest valid checkpoint), RUN_DIR/checkpoints/step_NNNNNN, "
                   "or a consolidated .ckpt file")
    p.add_argument("--out", required=True, help="new run directory for the result")
    p.add_argument("--ep", type=int, help="reshard: expert shards (expert-parallel degree W2) to write")
    p.add_argument("--consolidate", action="store_true", help="reshard: one file OUT/model.ckpt with every tensor")
    p.add_argument("--domain", help="extract-domain: a data.domains name")
    p.set_defaults(func=_ckpt)
    p = sub.add_parser("report", help="figures (loss, val bpb, expert load, drops, inter-node traffic, capacity) "
                       "and a summary table of runs, side by side")
    p.add_argument("runs", nargs="+", help="run directories, or a study's --out folder")
    p.add_argument("--out", help="output folder (default RUN_DIR/report for one path, ./report for several)")
    p.set_defaults(func=_report)
    p = sub.add_parser("claims", help="write the claims table (docs/results/claims.md) from the studies' outputs, "
                       "a verdict per claim computed from its figure (pangu_moe/studies/claims.py)")
    p.add_argument("--study", required=True, action="append", help="a router study's --out folder (or its "
                   "study.json); repeatable: each claim comes from the study with the most seeds that measured it")
    p.add_argument("--kool", default=None, help="the JSON `pangu-moe study kool --json` printed")
    p.add_argument("--precision", default=None, help="the JSON `pangu-moe bench precision --json` printed")
    p.add_argument("--tests", default=None, help="a pytest --junitxml file: rows shown by an exact test take "
                   "that test's recorded outcome")
    p.add_argument("--claim-study", action="append", default=[], help="a claim study's --out folder (or its "
                   "study.json: `pangu-moe study capacity|estimator|locality-null|locality`); repeatable; its verdicts "
                   "become rows")
    p.add_argument("--out", default=os.path.join("docs", "results", "claims.md"), help="the page to write")
    p.set_defaults(func=_claims)
    p = sub.add_parser("doctor", help="what this machine offers a run: MindSpore and its devices, CANN and HCCL "
                       "settings, msrun, kernels built or not, the backends usable here")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_doctor)
    p = sub.add_parser("plan", help="estimated exchange time per router at 64/128/256 devices from runs' routing "
                       "(pangu_moe/accounting/cost.py states the model)")
    p.add_argument("runs", nargs="+", help="run directories, or a study's --out folder")
    p.add_argument("--cluster", default="atlas800", help="cluster preset (atlas800)")
    p.add_argument("--devices", type=int, nargs="+", default=[64, 128, 256], help="device counts")
    p.add_argument("--tokens", type=float, default=None, help="kept choices per device per layer (default: the run's)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size H (default: the run's)")
    p.add_argument("--hierarchical", action="store_true", help="node-hierarchical two-stage exchange message counts")
    p.add_argument("--experts", type=int, default=None, help="experts E of the target model (default: a multiple "
                   "of every device count); layouts that cannot be built are listed, not modelled")
    p.add_argument("--tensor-parallel", type=int, default=1, help="tensor-parallel size mp: LocMoE's group-wise "
                   "exchange (1/mp of the all-to-all, then an AllGather inside the node)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_plan)
    for command in sub.choices.values():
        command.add_argument("--verbose", action="store_true", help="show MindSpore's own warnings (by default its "
                             "C++ and Python logs show errors only)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not args.verbose:
        # MindSpore reads its log level when it is first imported (nothing above imports it); a GLOG_v the user set
        # is kept.
        os.environ.setdefault("GLOG_v", "3")
    from pangu_moe.data.corpus import DataError
    from pangu_moe.ops.build import KernelBuildError
    from pangu_moe.train.checkpoint import CheckpointError
    from pangu_moe.train.stop import TrainingStopped
    try:
        args.func(args)
    except TrainingStopped as e:
        print(f"pangu-moe {args.command}: {e}", file=sys.stderr)
        return e.exit_code
    except (ConfigError, DataError, CheckpointError, KernelBuildError, FloatingPointError, OSError) as e:
        print(f"pangu-moe {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
